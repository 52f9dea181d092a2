//! Generates the client from the repository's proto module at build time.
//!
//! `protos/` is the contract (a buf module: `buf lint` and `buf breaking` guard it); every language's code is
//! generated from that one file, never from a copy. protox parses it in pure Rust (it carries the
//! well-known types such as `google/protobuf/struct.proto`), so building needs neither `protoc` nor network.
//! A project that vendors this client copies `protos/` along and points `DISCOVERY_PROTO_ROOT` at it.

use std::path::PathBuf;

const PROTO: &str = "discovery/v1/discovery.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = match std::env::var_os("DISCOVERY_PROTO_ROOT") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../protos"),
    };
    println!("cargo:rerun-if-env-changed=DISCOVERY_PROTO_ROOT");
    println!("cargo:rerun-if-changed={}", root.join(PROTO).display());
    let descriptors = protox::compile([PROTO], [&root])
        .map_err(|error| format!("cannot compile {} under {}: {error}", PROTO, root.display()))?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(descriptors)?;
    Ok(())
}
