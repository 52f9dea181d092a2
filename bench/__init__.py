"""Benchmarks: the sidecar against a raw watch, a client-go informer and a kube-rs reflector."""
