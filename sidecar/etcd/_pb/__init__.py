"""Generated from sidecar/etcd/protos by `python -m sidecar.etcd.generate`; do not edit."""
