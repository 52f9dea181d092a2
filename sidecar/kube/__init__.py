"""The Kubernetes backend: the API transport, the reflectors, this pod's CR, its settings and ``build``."""
