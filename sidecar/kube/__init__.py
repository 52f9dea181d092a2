"""The Kubernetes-facing shell: transport, watches and registration."""
