"""A local, real Kubernetes control plane for tests, the demo and benchmarks.

``devcluster.build`` compiles kube-apiserver, kube-controller-manager, kubectl and etcd from the Go
modules pinned in ``hack/controlplane`` (no registry ships them) into ``~/.cache``; ``devcluster.cluster``
runs them on loopback. There is no kubelet: callers create Nodes and Pods and patch pod status
themselves (see ``devcluster.objects``).
"""
