//! One `WatchPeers` subscription across reconnects.
//!
//! [`PeerWatch::next`] hides the seams: when the stream breaks (the sidecar restarts, a proxy cuts it, the
//! socket resets) it waits a backoff and reopens the stream with the position of the last complete change
//! (`resume_history_id`, `resume_revision`). The sidecar then answers `Resumed` and sends only what was
//! missed, or, when it no longer holds that history (a restarted sidecar has a new `history_id`), a
//! snapshot with reason `RESUME_UNAVAILABLE`, which [`crate::view::PeerSetView`] applies as a reset. The
//! caller sees an update per change and, between streams, a [`WatchEvent::Retrying`] it may log.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

use crate::api::discovery_client::DiscoveryClient;
use crate::api::{PeerFilter, WatchPeersResponse};
use crate::view::{PeerSetUpdate, PeerSetView};

/// Codes that no retry can fix: a bad filter, a sidecar without this API, or one that refuses us.
pub const PERMANENT_CODES: [Code; 4] = [
    Code::InvalidArgument,
    Code::Unimplemented,
    Code::PermissionDenied,
    Code::Unauthenticated,
];

/// The largest message accepted. Stream messages are at most ~1 MiB (the sidecar splits bigger changes into
/// parts), but a single peer with large metadata may exceed gRPC's 4 MiB default; the Python client's limit.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// What [`PeerWatch::next`] returns.
#[derive(Debug)]
pub enum WatchEvent {
    /// A change was applied; the whole set is [`PeerWatch::view`]`.peers()`.
    Update(PeerSetUpdate),
    /// The stream ended with `error` (or without a status, shown as UNAVAILABLE); the next call waits
    /// `delay` and resumes.
    Retrying { error: Status, delay: Duration },
}

/// Delays between reconnects: doubling from `initial` up to `maximum`, each drawn between half the bound
/// and the bound, so that the clients of one restarted sidecar do not return in lockstep.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    maximum: Duration,
    attempts: u32,
}

impl Backoff {
    pub fn new(initial: Duration, maximum: Duration) -> Self {
        Self {
            initial,
            maximum,
            attempts: 0,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let bound = self
            .initial
            .saturating_mul(1u32 << self.attempts.min(20))
            .min(self.maximum);
        self.attempts = self.attempts.saturating_add(1);
        // Jitter without a random-number crate: the standard library's per-process random hash keys.
        let unit = std::collections::hash_map::RandomState::new().build_hasher().finish() as f64 / u64::MAX as f64;
        bound.mul_f64(0.5 + unit / 2.0)
    }

    /// Any message received: the next failure starts again from `initial`.
    pub fn reset(&mut self) {
        self.attempts = 0;
    }
}

/// One subscription: the stub, the filter, the peer set and where the current stream stands.
pub struct PeerWatch {
    client: DiscoveryClient<Channel>,
    filter: PeerFilter,
    view: PeerSetView,
    backoff: Backoff,
    stream: Option<Streaming<WatchPeersResponse>>,
    wait_before_next: Option<Duration>,
}

impl PeerWatch {
    /// A watch over `channel` (see [`crate::connect`]) for the peers `filter` selects. Nothing is sent until
    /// the first [`PeerWatch::next`].
    pub fn new(channel: Channel, filter: PeerFilter, max_backoff: Duration) -> Self {
        let client = DiscoveryClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
        Self {
            client,
            filter,
            view: PeerSetView::new(),
            backoff: Backoff::new(Duration::from_millis(100), max_backoff),
            stream: None,
            wait_before_next: None,
        }
    }

    /// The peer set as of the last update returned, and the position a reconnect resumes from.
    pub fn view(&self) -> &PeerSetView {
        &self.view
    }

    /// The next applied change, reconnecting (and reporting each retry) as needed. Errors only with a status
    /// in [`PERMANENT_CODES`]; any other failure becomes a [`WatchEvent::Retrying`].
    pub async fn next(&mut self) -> Result<WatchEvent, Status> {
        if let Some(delay) = self.wait_before_next.take() {
            tokio::time::sleep(delay).await;
        }
        loop {
            let stream = match self.stream.take() {
                Some(stream) => self.stream.insert(stream),
                None => {
                    let request = self.view.resume_request(self.filter.clone());
                    match self.client.watch_peers(request).await {
                        Ok(response) => self.stream.insert(response.into_inner()),
                        Err(error) => return self.retry(error),
                    }
                }
            };
            match stream.message().await {
                Ok(Some(message)) => {
                    self.backoff.reset();
                    if let Some(update) = self.view.apply(message) {
                        return Ok(WatchEvent::Update(update));
                    }
                }
                // The sidecar never ends a watch with OK; a proxy or a stream-duration limit may. Resume.
                Ok(None) => return self.retry(Status::unavailable("the stream ended without an error status")),
                Err(error) => return self.retry(error),
            }
        }
    }

    fn retry(&mut self, error: Status) -> Result<WatchEvent, Status> {
        self.stream = None;
        if PERMANENT_CODES.contains(&error.code()) {
            return Err(error);
        }
        let delay = self.backoff.next_delay();
        self.wait_before_next = Some(delay);
        Ok(WatchEvent::Retrying { error, delay })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_up_to_the_maximum_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        for (attempt, delay) in delays.iter().enumerate() {
            let bound = Duration::from_millis(100 * (1 << attempt)).min(Duration::from_millis(1000));
            assert!(
                *delay >= bound / 2 && *delay <= bound,
                "attempt {attempt}: {delay:?} outside [{:?}, {bound:?}]",
                bound / 2
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
