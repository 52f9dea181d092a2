//! The client's copy of the peer set, kept by applying `WatchPeers` messages in order.
//!
//! This is the protocol's state machine, with no IO: [`crate::watch::PeerWatch`] feeds it, and a program that
//! reads the stream itself can use it directly. It mirrors the Python client's `PeerSetView`.

use std::collections::BTreeMap;

use crate::api::{
    ApiStatus, EventType, Peer, PeerFilter, SnapshotReason, WatchPeersRequest, WatchPeersResponse,
    watch_peers_response::Kind,
};

/// What an applied message was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpdateKind {
    /// The whole set, replacing the previous one: the first message of a stream, or resume was not possible.
    Snapshot(SnapshotReason),
    /// Ordered changes since the previous message (at most one event per peer).
    Delta,
    /// The sidecar still held our history: what we missed follows as deltas, no snapshot.
    Resumed,
    /// The sidecar lost (or regained) the API server; the reason in words.
    Status(String),
    /// A kind this client does not know (a newer sidecar): the revision still moves on.
    Unknown,
}

impl UpdateKind {
    /// The name printed in the JSON lines: `snapshot`, `delta`, `resumed`, `status` or `unknown`.
    pub fn name(&self) -> &'static str {
        match self {
            UpdateKind::Snapshot(_) => "snapshot",
            UpdateKind::Delta => "delta",
            UpdateKind::Resumed => "resumed",
            UpdateKind::Status(_) => "status",
            UpdateKind::Unknown => "unknown",
        }
    }
}

/// One applied change: what it brought. The whole set after it is [`PeerSetView::peers`].
#[derive(Clone, Debug, PartialEq)]
pub struct PeerSetUpdate {
    pub kind: UpdateKind,
    pub revision: u64,
    pub history_id: String,
    pub added: Vec<Peer>,
    pub updated: Vec<Peer>,
    /// For a delta, each removed peer as last sent; for a snapshot, the peers it no longer holds.
    pub removed: Vec<Peer>,
    /// A snapshot replaced the set (so `added`/`updated`/`removed` are its difference from the old one).
    pub reset: bool,
    /// False while the sidecar has lost the API server: the set is the last known one and may be stale.
    pub connected: bool,
}

/// The peer set by peer UID, the position to resume from, and the parts of a change not yet complete.
#[derive(Clone, Debug, Default)]
pub struct PeerSetView {
    peers: BTreeMap<String, Peer>,
    revision: u64,
    history_id: String,
    degraded: bool,
    parts: Vec<WatchPeersResponse>,
}

impl PeerSetView {
    pub fn new() -> Self {
        Self::default()
    }

    /// The current peers, by UID (a pod incarnation; `{uid}/{container}` in Dynamo's container mode).
    pub fn peers(&self) -> &BTreeMap<String, Peer> {
        &self.peers
    }

    /// The revision of the last complete change applied (0 before any).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The sidecar process whose revisions these are (a restarted sidecar has a new one).
    pub fn history_id(&self) -> &str {
        &self.history_id
    }

    pub fn connected(&self) -> bool {
        !self.degraded
    }

    /// Apply one message. `None` while a change sent in parts (`partial`) is incomplete: its parts are
    /// applied together with the last one, and only then does the resume position move.
    pub fn apply(&mut self, message: WatchPeersResponse) -> Option<PeerSetUpdate> {
        if message.partial {
            self.parts.push(message);
            return None;
        }
        let revision = message.revision;
        let history_id = message.history_id.clone();
        let mut parts = std::mem::take(&mut self.parts);
        parts.push(message);
        let kind = parts.last().and_then(|m| m.kind.as_ref());
        let mut update = PeerSetUpdate {
            kind: UpdateKind::Unknown,
            revision,
            history_id: history_id.clone(),
            added: Vec::new(),
            updated: Vec::new(),
            removed: Vec::new(),
            reset: false,
            connected: true,
        };
        match kind {
            Some(Kind::Snapshot(last)) => {
                update.kind = UpdateKind::Snapshot(last.reason());
                self.degraded = last.status() == ApiStatus::Degraded;
                let mut previous = std::mem::take(&mut self.peers);
                for part in parts {
                    if let Some(Kind::Snapshot(snapshot)) = part.kind {
                        for peer in snapshot.peers {
                            self.peers.insert(peer.uid.clone(), peer);
                        }
                    }
                }
                for (uid, peer) in &self.peers {
                    match previous.remove(uid) {
                        None => update.added.push(peer.clone()),
                        Some(old) if old != *peer => update.updated.push(peer.clone()),
                        Some(_) => {}
                    }
                }
                update.removed = previous.into_values().collect();
                update.reset = true;
            }
            Some(Kind::Delta(_)) => {
                update.kind = UpdateKind::Delta;
                for part in parts {
                    let Some(Kind::Delta(delta)) = part.kind else { continue };
                    for event in delta.events {
                        let event_type = event.r#type();
                        let Some(peer) = event.peer else { continue };
                        match event_type {
                            EventType::Removed => {
                                self.peers.remove(&peer.uid);
                                update.removed.push(peer);
                            }
                            EventType::Added => {
                                self.peers.insert(peer.uid.clone(), peer.clone());
                                update.added.push(peer);
                            }
                            EventType::Updated | EventType::Unspecified => {
                                self.peers.insert(peer.uid.clone(), peer.clone());
                                update.updated.push(peer);
                            }
                        }
                    }
                }
            }
            Some(Kind::Resumed(resumed)) => {
                update.kind = UpdateKind::Resumed;
                self.degraded = resumed.status() == ApiStatus::Degraded;
            }
            Some(Kind::Status(status)) => {
                update.kind = UpdateKind::Status(status.reason.clone());
                self.degraded = status.status() == ApiStatus::Degraded;
            }
            None => {}
        }
        self.revision = revision;
        self.history_id = history_id;
        update.connected = self.connected();
        Some(update)
    }

    /// The request that (re)opens the stream: resume after the last complete change, or start fresh when
    /// nothing was applied yet. Parts of an incomplete change are dropped: the sidecar sends it again.
    pub fn resume_request(&mut self, filter: PeerFilter) -> WatchPeersRequest {
        self.parts.clear();
        WatchPeersRequest {
            filter: Some(filter),
            resume_history_id: self.history_id.clone(),
            resume_revision: self.revision,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Delta, PeerEvent, Resumed, Snapshot, StatusChange};

    fn peer(uid: &str, name: &str) -> Peer {
        Peer {
            uid: uid.into(),
            name: name.into(),
            ..Default::default()
        }
    }

    fn snapshot(revision: u64, peers: Vec<Peer>, partial: bool) -> WatchPeersResponse {
        WatchPeersResponse {
            revision,
            history_id: "h1".into(),
            kind: Some(Kind::Snapshot(Snapshot {
                peers,
                reason: SnapshotReason::Initial as i32,
                status: ApiStatus::Connected as i32,
            })),
            partial,
        }
    }

    fn delta(revision: u64, events: Vec<(EventType, Peer)>, partial: bool) -> WatchPeersResponse {
        let events = events
            .into_iter()
            .map(|(t, p)| PeerEvent {
                r#type: t as i32,
                peer: Some(p),
            })
            .collect();
        WatchPeersResponse {
            revision,
            history_id: "h1".into(),
            kind: Some(Kind::Delta(Delta { events })),
            partial,
        }
    }

    fn names(view: &PeerSetView) -> Vec<String> {
        view.peers().values().map(|p| p.name.clone()).collect()
    }

    #[test]
    fn a_snapshot_replaces_the_set_and_reports_its_difference() {
        let mut view = PeerSetView::new();
        let first = view
            .apply(snapshot(3, vec![peer("u1", "a"), peer("u2", "b")], false))
            .unwrap();
        assert_eq!(first.kind, UpdateKind::Snapshot(SnapshotReason::Initial));
        assert!(first.reset);
        assert_eq!(first.added.len(), 2);
        let mut changed = peer("u2", "b");
        changed.addresses = vec!["10.0.0.2".into()];
        let second = view.apply(snapshot(9, vec![changed, peer("u3", "c")], false)).unwrap();
        assert_eq!(second.added.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["c"]);
        assert_eq!(
            second.updated.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
        assert_eq!(
            second.removed.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(names(&view), ["b", "c"]);
        assert_eq!(view.revision(), 9);
    }

    #[test]
    fn deltas_add_update_and_remove_by_uid() {
        let mut view = PeerSetView::new();
        view.apply(snapshot(1, vec![peer("u1", "a")], false));
        let update = view
            .apply(delta(
                2,
                vec![
                    (EventType::Added, peer("u2", "b")),
                    (EventType::Removed, peer("u1", "a")),
                ],
                false,
            ))
            .unwrap();
        assert_eq!(update.kind, UpdateKind::Delta);
        assert!(!update.reset);
        assert_eq!(names(&view), ["b"]);
        assert_eq!(update.removed[0].name, "a");
    }

    #[test]
    fn parts_are_applied_together_and_only_then_move_the_resume_position() {
        let mut view = PeerSetView::new();
        assert!(view.apply(snapshot(5, vec![peer("u1", "a")], true)).is_none());
        assert_eq!(
            view.revision(),
            0,
            "an incomplete change is not a position to resume from"
        );
        assert!(view.peers().is_empty());
        let update = view.apply(snapshot(5, vec![peer("u2", "b")], false)).unwrap();
        assert_eq!(update.added.len(), 2);
        assert_eq!(view.revision(), 5);
        assert!(
            view.apply(delta(6, vec![(EventType::Added, peer("u3", "c"))], true))
                .is_none()
        );
        let request = view.resume_request(PeerFilter::default());
        assert_eq!((request.resume_history_id.as_str(), request.resume_revision), ("h1", 5));
        // The cut change is sent again after the reconnect; the dropped part must not be applied twice.
        let update = view
            .apply(delta(6, vec![(EventType::Added, peer("u4", "d"))], false))
            .unwrap();
        assert_eq!(update.added.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["d"]);
        assert_eq!(names(&view), ["a", "b", "d"]);
    }

    #[test]
    fn status_and_resumed_track_the_api_server() {
        let mut view = PeerSetView::new();
        view.apply(snapshot(1, vec![peer("u1", "a")], false));
        let lost = WatchPeersResponse {
            revision: 2,
            history_id: "h1".into(),
            kind: Some(Kind::Status(StatusChange {
                status: ApiStatus::Degraded as i32,
                reason: "gone".into(),
            })),
            partial: false,
        };
        let update = view.apply(lost).unwrap();
        assert_eq!(update.kind, UpdateKind::Status("gone".into()));
        assert!(!update.connected);
        assert_eq!(names(&view), ["a"], "peers are kept while the API server is away");
        let resumed = WatchPeersResponse {
            revision: 2,
            history_id: "h1".into(),
            kind: Some(Kind::Resumed(Resumed {
                status: ApiStatus::Connected as i32,
            })),
            partial: false,
        };
        let update = view.apply(resumed).unwrap();
        assert_eq!(update.kind, UpdateKind::Resumed);
        assert!(update.connected);
    }

    #[test]
    fn a_fresh_view_asks_for_a_snapshot() {
        let request = PeerSetView::new().resume_request(PeerFilter {
            selector: "role=decode".into(),
            ..Default::default()
        });
        assert_eq!((request.resume_history_id.as_str(), request.resume_revision), ("", 0));
        assert_eq!(request.filter.unwrap().selector, "role=decode");
    }
}
