"""The daemon in-process against the real API server: it leaves no thread or connection behind."""

from __future__ import annotations

import asyncio
import threading

import psutil
import pytest

from devcluster.cluster import ControlPlane, free_port
from devcluster.objects import Cluster
from devcluster.sidecars import write_token_kubeconfig
from devcluster.waiting import wait_for
from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.client import AsyncDiscoveryClient, make_filter
from sidecar.app.config import load_settings
from sidecar.app.daemon import Sidecar
from tests.integration.test_peer_stream import register_like_dynamo

pytestmark = pytest.mark.integration


def connections_to(port: int) -> set[tuple[str, int]]:
    """Local addresses of this process's open TCP connections to ``port``."""
    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    }


def test_shutdown_leaves_no_threads_or_connections(
    control_plane: ControlPlane, namespace: str, cluster: Cluster, tmp_path
) -> None:
    cluster.create_service(namespace, "w", {"app": "w"})
    pod = cluster.start_pod(namespace, "inproc", {"app": "w", "role": "router"})
    register_like_dynamo(cluster, cluster.start_pod(namespace, "peer-1", {"app": "w", "role": "decode"}))
    # The EndpointSlice controller works asynchronously: only once it lists peer-1 must a snapshot show it.
    wait_for(lambda: cluster.ready_pods_in_slices(namespace, "w").get("peer-1"), 30, what="peer-1 in the slice")
    kubeconfig = write_token_kubeconfig(
        control_plane, cluster.pod_bound_token(namespace, "discovery-sidecar", pod), tmp_path / "kubeconfig"
    )
    threads_before = {t.ident for t in threading.enumerate()}
    settings = load_settings(
        environ={
            "POD_NAME": "inproc",
            "POD_NAMESPACE": namespace,
            "POD_UID": pod["metadata"]["uid"],
            "KUBECONFIG": str(kubeconfig),
            "DISCOVERY_SERVICE_NAME": "w",
            "DISCOVERY_GRPC_LISTEN": f"127.0.0.1:{free_port()}",
            "DISCOVERY_HTTP_LISTEN": f"127.0.0.1:{free_port()}",
            "DISCOVERY_PODINFO_DIR": str(tmp_path / "none"),
        }
    )
    sidecar = Sidecar(settings)
    admin_connections = connections_to(control_plane.apiserver_port)  # the test's own client
    sidecar.start()
    try:
        wait_for(lambda: not sidecar.readiness_problems(), 30, what="the in-process sidecar to be ready")
        assert connections_to(control_plane.apiserver_port) - admin_connections, "the watches hold connections"

        async def first_update() -> list[str]:
            client = AsyncDiscoveryClient(sidecar.grpc.target)
            try:
                async for update in client.watch(make_filter("role=decode")):
                    return sorted(p.name for p in update.peers.values())
            finally:
                await client.close()
            return []

        assert asyncio.run(first_update()) == ["peer-1"], "the asyncio client sees the snapshot"
    finally:
        sidecar.shutdown()
    wait_for(
        lambda: not connections_to(control_plane.apiserver_port) - admin_connections, 10, what="connections to close"
    )
    leftover = [t for t in threading.enumerate() if t.ident not in threads_before and t.is_alive()]
    wait_for(lambda: not [t for t in leftover if t.is_alive()], 10, what=f"threads to end: {leftover}")
    assert cluster.get_or_none(f"/apis/nvidia.com/v1alpha1/namespaces/{namespace}/dynamoworkermetadatas/inproc") is None
    assert pb.DESCRIPTOR.package == "discovery.v1"
