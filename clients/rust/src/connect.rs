//! A channel to the sidecar's local API, at the address its `DISCOVERY_GRPC_LISTEN` names.

use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// The Python client's default, and the sidecar's when `DISCOVERY_GRPC_LISTEN` is unset.
pub const DEFAULT_TARGET: &str = "127.0.0.1:50051";

/// A lazy channel to `target`: `host:port`, `http://host:port`, or `unix:///path` (also `unix:/path`).
///
/// Lazy: nothing is dialled until the first call, and a call on a channel whose connection broke dials
/// again, so one channel serves a watch across sidecar restarts. A call made while the sidecar is down
/// fails at once with UNAVAILABLE, which [`crate::watch::PeerWatch`] retries with backoff.
pub fn channel(target: &str) -> Result<Channel, tonic::transport::Error> {
    if let Some(path) = target.strip_prefix("unix://").or_else(|| target.strip_prefix("unix:")) {
        let path = format!("/{}", path.trim_start_matches('/'));
        // The URI is required by the API but unused: the connector dials the socket whatever it says.
        let endpoint = Endpoint::from_static("http://localhost").connect_timeout(Duration::from_secs(5));
        return Ok(endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        })));
    }
    let uri = if target.contains("://") {
        target.to_string()
    } else {
        format!("http://{target}")
    };
    Ok(Endpoint::from_shared(uri)?
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy())
}
