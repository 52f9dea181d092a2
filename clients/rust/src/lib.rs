//! A Rust client of the discovery sidecar's local gRPC API (`discovery.v1.Discovery`).
//!
//! The pieces, each usable alone:
//!
//! * [`api`]: the messages and the client stub, generated at build time from `protos/` (see `build.rs`).
//! * [`view::PeerSetView`]: applies `WatchPeersResponse` messages to a local peer set (snapshot, delta,
//!   resumed, status; a change sent in parts is applied once complete) and knows where to resume.
//! * [`watch::PeerWatch`]: one `WatchPeers` subscription across reconnects (backoff with jitter, resume from
//!   the last complete revision), yielding an update per applied change.
//! * [`connect`]: a channel to the sidecar at `host:port`, `http://host:port` or `unix:///path`.
//! * [`json`]: the JSON-lines rendering the `discovery-watch` binary prints.

pub mod connect;
pub mod json;
pub mod view;
pub mod watch;

/// The generated API: `api::Peer`, `api::WatchPeersRequest`, ..., and `api::discovery_client::DiscoveryClient`.
pub mod api {
    tonic::include_proto!("discovery.v1");
}
