"""A local, real Kubernetes control plane for tests, the demo and benchmarks.

``devcluster.build`` compiles kube-apiserver, kube-controller-manager, kubectl and etcd from the Go
modules pinned in ``hack/controlplane`` (no registry ships them) into ``~/.cache``; ``devcluster.cluster``
runs them on loopback. There is no kubelet: callers create Nodes and Pods and patch pod status
themselves (see ``devcluster.objects``), except a workload controller's pods, which kwok's simulated
nodes run (``devcluster.kwok``).
"""

import os as _os

# The harness starts sidecar, Dynamo and smg processes with fork+exec from processes that hold gRPC channels
# (test clients, the demo's). gRPC's fork handlers serve a child that goes on using gRPC; these children
# exec at once, and with the handlers on, a fork racing gRPC's threads can abort the child before its exec
# (seen once: "Check failed: next_worker->initialized_cv", exit -6). Read by grpcio when it is imported,
# so set here, before anything of this package or its users imports grpc; a value given outside wins.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
