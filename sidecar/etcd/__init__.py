"""etcd backend (see sidecar/etcd/__init__ docs)."""
