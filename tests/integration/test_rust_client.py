"""The Rust example client (clients/rust, ``discovery-watch``) against a real sidecar on the real control plane.

The proto is a contract for other languages: this builds the Rust client (tonic and prost, code generated at
build time from protos/) and checks what it prints against the truth computed from the API server, as
test_peer_stream does for the Python client. The resume scenario is a stream cut by a TCP proxy between the
client and the sidecar: the sidecar still holds the client's history, so the client must come back with
``Resumed`` and exactly the deltas it missed, never a snapshot. A restarted sidecar is a new history: there
the client must take the snapshot it is sent (``SNAPSHOT_REASON_RESUME_UNAVAILABLE``) and go on.
"""

from __future__ import annotations

import itertools
import pathlib
import re
import subprocess
from collections.abc import Iterator

import grpc
import pytest

from devcluster import rust_client
from devcluster.faults import FaultProxy
from devcluster.objects import Cluster
from devcluster.rust_client import RustWatch
from devcluster.waiting import wait_for
from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.api.discovery.v1 import discovery_pb2_grpc as pb_grpc
from discovery_client.client import snapshot_peers
from tests.conftest import Sidecars
from tests.integration.test_peer_stream import READY, World, truth

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def rust_binary() -> pathlib.Path:
    return rust_client.build()


@pytest.fixture
def world(namespace: str, cluster: Cluster, sidecars: Sidecars) -> World:
    return World(cluster, namespace, sidecars)


@pytest.fixture
def proxy(world: World) -> Iterator[FaultProxy]:
    """A TCP proxy in front of the observer's gRPC port (the same port after a restart of the sidecar)."""
    fault_proxy = FaultProxy(world.observer.grpc_port)
    yield fault_proxy
    fault_proxy.close()


def settle(world: World, watch: RustWatch, expected: dict[str, str], timeout: float = 45.0) -> None:
    """Wait until the API's truth and what the Rust client printed both equal ``expected``."""
    wait_for(lambda: truth(world.cluster, world.namespace) == expected, timeout, what=f"API truth == {expected}")
    watch.wait_until(lambda w: w.names() == expected, timeout, f"discovery-watch == {expected}")


def sidecar_names(world: World) -> dict[str, str]:
    """The peer set straight from the sidecar (Python client, no proxy): what it holds right now."""
    peers = snapshot_peers(world.observer.target, timeout=10).values()
    return {p.name: pb.PeerState.Name(p.state) for p in peers}


def retries(watch: RustWatch, since: int = 0) -> list[dict[str, object]]:
    """The client's retry notices (stderr) from the ``since``-th notice on."""
    return [n["retrying"] for n in watch.notices[since:] if isinstance(n, dict) and "retrying" in n]


@pytest.mark.timeout(900)  # the first user of rust_binary: a cold cargo build when `make test` did not run it
def test_rust_unit_tests_pass(rust_binary: pathlib.Path) -> None:
    """The crate's own tests (the view's snapshot/delta/partial handling, backoff, the line format) and its
    doc example (compiled, as the README shows it)."""
    result = subprocess.run(
        [rust_client.cargo(), "test", "--locked"],
        cwd=rust_client.CRATE_DIR,
        env=rust_client.cargo_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = re.findall(r"test result: (\w+)\. (\d+) passed; (\d+) failed", result.stdout)
    assert results and all(r[0] == "ok" and r[2] == "0" for r in results), result.stdout[-3000:]
    assert sum(int(r[1]) for r in results) >= 8, "the unit tests and the doc example ran"


def test_follows_peers_resumes_a_cut_stream_and_survives_a_sidecar_restart(
    world: World, proxy: FaultProxy, rust_binary: pathlib.Path
) -> None:
    watch = RustWatch(rust_binary, f"127.0.0.1:{proxy.port}")
    try:
        # Peers added, one made unready and ready again, one deleted: the printed set follows the truth.
        settle(world, watch, {})
        first = watch.printed()[0]
        assert (first["kind"], first["reason"], first["reset"]) == ("snapshot", "SNAPSHOT_REASON_INITIAL", True)
        world.worker("w-a")
        world.worker("w-b")
        settle(world, watch, {"w-a": READY, "w-b": READY})
        peer = watch.peers()["w-a"]
        assert peer["uid"] and peer["instance_id"] and peer["addresses"]
        assert [p["port"] for p in peer["ports"]] == [8000]
        assert peer["labels"]["role"] == "prefill" and peer["namespace"] == world.namespace
        world.cluster.set_pod_status(world.namespace, "w-a", ready=False)
        settle(world, watch, {"w-b": READY})
        world.cluster.set_pod_status(world.namespace, "w-a", ready=True)
        settle(world, watch, {"w-a": READY, "w-b": READY})
        world.cluster.delete_pod(world.namespace, "w-b", grace_seconds=0)
        settle(world, watch, {"w-a": READY})
        assert [line["kind"] for line in watch.printed()].count("snapshot") == 1

        # The stream is cut (the proxy drops it and refuses new connections) while peers change.
        before_cut = watch.printed()
        history_id, revision = before_cut[-1]["history_id"], before_cut[-1]["revision"]
        notices_before_cut = len(watch.notices)
        proxy.refuse()
        world.worker("w-c")
        world.cluster.delete_pod(world.namespace, "w-a", grace_seconds=0)
        expected = {"w-c": READY}
        wait_for(lambda: truth(world.cluster, world.namespace) == expected, 45, what="truth after the cut")
        wait_for(lambda: sidecar_names(world) == expected, 45, what="the sidecar holds the changes")
        watch.wait_until(lambda w: retries(w, notices_before_cut), 30, "a retry")
        assert watch.names() == {"w-a": READY}, "nothing reaches the client while the proxy refuses"
        proxy.accept()
        settle(world, watch, expected)
        after_cut = watch.printed()[len(before_cut) :]
        assert after_cut[0]["kind"] == "resumed", "the sidecar still holds that history: Resumed, no snapshot"
        assert after_cut[0]["history_id"] == history_id and after_cut[0]["revision"] == revision
        assert "snapshot" not in [line["kind"] for line in after_cut]
        assert sorted(p["name"] for line in after_cut for p in line["added"]) == ["w-c"]
        assert sorted(p["name"] for line in after_cut for p in line["removed"]) == ["w-a"]
        assert all(line["revision"] > revision for line in after_cut[1:])
        resumed_from = {(r["resume_history_id"], r["resume_revision"]) for r in retries(watch, notices_before_cut)}
        assert resumed_from == {(history_id, revision)}, "every retry resumes from the last change applied"

        # The sidecar restarts: a new history, so the client gets (and applies) a snapshot, then goes on.
        before_restart = len(watch.printed())
        world.observer.terminate()
        world.observer.start().wait_ready()
        watch.wait_until(lambda w: len(w.printed()) > before_restart, 60, "a message from the new sidecar")
        restarted = watch.printed()[before_restart]
        assert (restarted["kind"], restarted["reason"]) == ("snapshot", "SNAPSHOT_REASON_RESUME_UNAVAILABLE")
        assert restarted["reset"] and restarted["history_id"] != history_id
        settle(world, watch, expected)
        world.worker("w-d")
        settle(world, watch, {"w-c": READY, "w-d": READY})
    finally:
        assert watch.close() == 0, "discovery-watch exits 0 on SIGTERM"


def test_unix_socket_filter_and_a_snapshot_in_parts(
    namespace: str, cluster: Cluster, sidecars: Sidecars, rust_binary: pathlib.Path, socket_dir: pathlib.Path
) -> None:
    """``--target unix:///...`` (a sidecar on a Unix socket), a selector and named groups, and a snapshot too
    large for one message: the sidecar sends it in parts, the client prints it as one complete snapshot."""
    socket_path = socket_dir / "discovery.sock"
    cluster.create_service(namespace, "workers", {"app": "w"})
    router = cluster.start_pod(namespace, "router", {"app": "w", "role": "router"})
    sidecar = sidecars.start(router, "workers", extra_env={"DISCOVERY_GRPC_LISTEN": f"unix://{socket_path}"})
    sidecar.wait_ready()
    roles = {"pre-1": "prefill", "dec-1": "decode", "other-1": "other"}
    roles |= {f"big-{i}": "prefill" for i in range(4)}
    for name, role in roles.items():
        data = {"endpoints": {}, "model_cards": {}, "notes": "x" * 200_000} if name.startswith("big") else None
        cluster.register_like_dynamo(cluster.start_pod(namespace, name, {"app": "w", "role": role}), data)
    expected = {name for name, role in roles.items() if role in ("prefill", "decode")}
    peer_filter = pb.PeerFilter(selector="role in (prefill,decode)")
    wait_for(
        lambda: {p.name for p in snapshot_peers(f"unix:{socket_path}", peer_filter, timeout=10).values()} == expected,
        45,
        what="the sidecar holds every peer",
    )
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        call = pb_grpc.DiscoveryStub(channel).WatchPeers(pb.WatchPeersRequest(filter=peer_filter), timeout=30)
        parts = list(itertools.takewhile(lambda m: m.partial, call))
        call.cancel()
    assert parts, "4 peers of ~400 KB each are more than one message holds: the snapshot comes in parts"

    args = ["--selector", "role in (prefill,decode)", "--group", "prefill=role=prefill"]
    args += ["--group", "decode=role=decode"]
    watch = RustWatch(rust_binary, f"unix://{socket_path}", args)
    try:
        watch.wait_until(lambda w: set(w.names()) == expected, 45, "the filtered peers")
        first = watch.printed()[0]
        assert first["kind"] == "snapshot" and {p["name"] for p in first["added"]} == expected, "one complete line"
        assert len(watch.peers()["big-0"]["data"]["notes"]) == 200_000
        groups = {n: p["groups"] for n, p in watch.peers().items()}
        assert groups == {n: [roles[n]] for n in expected}
    finally:
        watch.close()
    # A bad selector is refused for good (INVALID_ARGUMENT): no retrying, exit 1 with the sidecar's reason.
    refused = subprocess.run(
        [str(rust_binary), "--target", f"unix://{socket_path}", "--selector", "role in ("],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 1 and "InvalidArgument" in refused.stderr, refused.stderr
    assert "retrying" not in refused.stderr
