"""The directory shell every backend and consumer shares: ports, the hub and its change signal, the loops.

Sources (``source_loop``) write into the hub, publishers register this pod (``publisher_loop``), the
pod-facing layer reads the hub and subscribes to its one change signal; all of them meet through
``ports`` (protocols, typed errors, the pod's identity and listen addresses). Imports only the pure core.
"""
