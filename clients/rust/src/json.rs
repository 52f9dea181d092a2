//! The line format `discovery-watch` prints: one JSON object per applied change, on one line.
//!
//! ```text
//! {"kind":"snapshot","revision":7,"history_id":"...","reset":true,"connected":true,"reason":"SNAPSHOT_REASON_INITIAL",
//!  "added":[{peer}...],"updated":[],"removed":[],"peer_count":2}
//! ```
//!
//! Applying `added` and `updated` (insert by `uid`) and `removed` (delete by `uid`) to the previous set gives
//! the current one, for every kind (a snapshot's lists are its difference from the set before it). `reason`
//! is the snapshot's reason, a status change's text, or empty. Enum values are printed by their proto names
//! (`PEER_STATE_READY`), and `data` is the peer's metadata from its exact JSON (`data_json`), so integers
//! such as Dynamo's instance IDs keep every digit.

use serde_json::{Value, json};

use crate::api::{DynamoEndpoint, DynamoModel, Peer, PeerState, Port, Worker};
use crate::view::{PeerSetUpdate, UpdateKind};

/// One update as a JSON object; `peer_count` is the size of the set after it.
pub fn update_line(update: &PeerSetUpdate, peer_count: usize) -> Value {
    let reason = match &update.kind {
        UpdateKind::Snapshot(reason) => reason.as_str_name().to_string(),
        UpdateKind::Status(text) => text.clone(),
        _ => String::new(),
    };
    json!({
        "kind": update.kind.name(),
        "revision": update.revision,
        "history_id": update.history_id,
        "reset": update.reset,
        "connected": update.connected,
        "reason": reason,
        "added": update.added.iter().map(peer).collect::<Vec<_>>(),
        "updated": update.updated.iter().map(peer).collect::<Vec<_>>(),
        "removed": update.removed.iter().map(peer).collect::<Vec<_>>(),
        "peer_count": peer_count,
    })
}

/// A peer with every field of the proto's `Peer` (`data` parsed from `data_json`; null when absent).
pub fn peer(p: &Peer) -> Value {
    let state = PeerState::try_from(p.state).map_or_else(|_| p.state.to_string(), |s| s.as_str_name().to_string());
    json!({
        "name": p.name,
        "namespace": p.namespace,
        "uid": p.uid,
        "instance_id": p.instance_id,
        "instance_id_hex": p.instance_id_hex,
        "state": state,
        "addresses": p.addresses,
        "ports": p.ports.iter().map(port).collect::<Vec<_>>(),
        "labels": p.labels,
        "node_name": p.node_name,
        "zone": p.zone,
        "hostname": p.hostname,
        "container": p.container,
        "groups": p.groups,
        "endpoints": p.endpoints.iter().map(endpoint).collect::<Vec<_>>(),
        "models": p.models.iter().map(model).collect::<Vec<_>>(),
        "workers": p.workers.iter().map(worker).collect::<Vec<_>>(),
        "data": serde_json::from_str::<Value>(&p.data_json).unwrap_or(Value::Null),
    })
}

fn port(p: &Port) -> Value {
    json!({"name": p.name, "port": p.port, "protocol": p.protocol, "app_protocol": p.app_protocol})
}

fn endpoint(e: &DynamoEndpoint) -> Value {
    json!({
        "path": e.path,
        "namespace": e.namespace,
        "component": e.component,
        "endpoint": e.endpoint,
        "instance_id": e.instance_id,
        "instance_id_hex": e.instance_id_hex,
        "transport_kind": e.transport_kind,
        "transport_address": e.transport_address,
    })
}

fn model(m: &DynamoModel) -> Value {
    json!({"name": m.name, "path": m.path, "instance_id": m.instance_id, "model_suffix": m.model_suffix})
}

fn worker(w: &Worker) -> Value {
    json!({
        "url": w.url,
        "port": w.port,
        "protocol": w.protocol,
        "bootstrap_port": w.bootstrap_port,
        "model_id": w.model_id,
        "kv_connector": w.kv_connector,
        "kv_engine_id": w.kv_engine_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SnapshotReason;

    #[test]
    fn a_line_carries_the_change_and_exact_metadata() {
        let p = Peer {
            name: "w-0".into(),
            uid: "u0".into(),
            state: PeerState::Ready as i32,
            instance_id: 1186445869714687,
            data_json: r#"{"endpoints":{"k":{"instance_id":7758136932383685}}}"#.into(),
            ..Default::default()
        };
        let update = PeerSetUpdate {
            kind: UpdateKind::Snapshot(SnapshotReason::ResumeUnavailable),
            revision: 4,
            history_id: "h".into(),
            added: vec![p],
            updated: vec![],
            removed: vec![],
            reset: true,
            connected: true,
        };
        let line = update_line(&update, 1);
        assert_eq!(line["kind"], "snapshot");
        assert_eq!(line["reason"], "SNAPSHOT_REASON_RESUME_UNAVAILABLE");
        assert_eq!(line["added"][0]["state"], "PEER_STATE_READY");
        assert_eq!(
            line["added"][0]["data"]["endpoints"]["k"]["instance_id"].as_u64(),
            Some(7758136932383685)
        );
        assert!(!line.to_string().contains('\n'), "one line per update");
    }
}
