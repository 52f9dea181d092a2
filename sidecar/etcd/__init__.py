"""The etcd backend (Dynamo's ``v1/`` keys on a lease): the v3 client, the watch, the lease, its settings
and ``build``."""
