"""The process: the command line, the daemon, the common configuration and logging.

The top of the package: it chooses a backend (``sidecar.kube`` or ``sidecar.etcd``, imported only when
chosen), wires it to the pod-facing layer (``sidecar.serve``) and runs them until SIGTERM. Nothing
below imports from here.
"""
