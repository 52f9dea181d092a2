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
//!
//! Following the peers from your own program (the binary, `src/main.rs`, does this and prints each update):
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use discovery_client::api::{Peer, PeerFilter};
//! use discovery_client::watch::{PeerWatch, WatchEvent};
//!
//! fn route_to<'a>(peers: impl Iterator<Item = &'a Peer>) {
//!     for peer in peers {
//!         println!("{} {:?}", peer.name, peer.addresses);
//!     }
//! }
//!
//! # async fn follow() -> Result<(), Box<dyn std::error::Error>> {
//! let channel = discovery_client::connect::channel("127.0.0.1:50051")?; // the sidecar's DISCOVERY_GRPC_LISTEN
//! let filter = PeerFilter { selector: "role=decode".into(), ..Default::default() };
//! let mut watch = PeerWatch::new(channel, filter, Duration::from_secs(5));
//! loop {
//!     match watch.next().await? {
//!         WatchEvent::Update(_) => route_to(watch.view().peers().values()), // the whole set, by UID
//!         WatchEvent::Retrying { error, delay } => eprintln!("{error}; resuming in {delay:?}"),
//!     }
//! }
//! # }
//! ```

pub mod connect;
pub mod json;
pub mod view;
pub mod watch;

/// The generated API: `api::Peer`, `api::WatchPeersRequest`, ..., and `api::discovery_client::DiscoveryClient`.
pub mod api {
    tonic::include_proto!("discovery.v1");
}
