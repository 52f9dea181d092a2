"""The pod-facing layer: the local gRPC API, its wire encoding, the HTTP endpoints and the SMG manifest.

Reads the hub through ``sidecar.peers.ports`` and waits on its change signal, never on a timer; imports
neither backend (``sidecar.kube``, ``sidecar.etcd``), so the main container is served the same way
whichever backend is configured.
"""
