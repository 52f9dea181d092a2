"""The watcher simulator of ``bench.cost`` sends a sidecar's requests.

The sidecar's side: its reflectors, for the targets its settings give, against ``ScriptedApi`` (which
records every call). The simulator's side: ``bench.watchers`` against a small HTTP server that records
every request line. The two sets of (path, query) must be equal once the values that differ from run
to run (resourceVersion, the random timeout) are normalised, so the cost the benchmark measures is
the cost of the sidecar's own requests. The same comparison against the real API server's audit log
is part of every ``python -m bench.cost`` run.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from bench import watchers
from bench.watchers import normalise
from sidecar.app.config import load_settings
from sidecar.kube.reflector import Reflector
from sidecar.kube.settings import KubeSettings
from sidecar.kube.sources import own_registration_target, watch_targets
from sidecar.peers.metrics import Metrics
from tests.unit.fake_api import ScriptedApi
from tests.unit.fake_store import DEADLINE, RecordingStore
from tests.unit.test_reflector import page

NAMESPACE = "bench"
SERVICE = "workers"


def shape(path: str, query: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> str:
    verb = "WATCH" if ("watch", "1") in query else "LIST"
    return f"{verb} {normalise(path + '?' + '&'.join(f'{k}={v}' for k, v in query))}"


def sidecar_requests(tmp_path: pathlib.Path, environ: dict[str, str], own: bool = False) -> set[str]:
    """The first requests of each of the sidecar's reflectors, for a pod behind ``SERVICE``, with the
    settings ``environ`` adds (the reflectors are built from the settings as the daemon builds them); with
    ``own``, of the watch of its own CR instead."""
    settings = load_settings(
        environ={
            "POD_NAME": "worker-0",
            "POD_NAMESPACE": NAMESPACE,
            "POD_UID": "uid-1",
            "DISCOVERY_SERVICE_NAME": SERVICE,
            "DISCOVERY_PODINFO_DIR": str(tmp_path),
            **environ,
        }
    )
    kube = settings.backend_settings
    assert isinstance(kube, KubeSettings)
    targets = watch_targets(kube) if not own else [own_registration_target(NAMESPACE, kube.metadata_name)]
    api = ScriptedApi()
    api.on_get(*(page([], rv="7") for _ in targets))
    reflectors = [
        Reflector(
            api.as_kube_api(),
            t,
            RecordingStore(),
            Metrics(),
            silence_timeout=30,
            backoff_max=0.05,
            streaming_list=kube.streaming_list,
        )
        for t in targets
    ]
    for reflector in reflectors:
        reflector.start()
    try:
        api.wait_for_calls("stream", len(targets))
    finally:
        for reflector in reflectors:
            reflector.stop()
    return {shape(c.path, c.query) for c in api.calls if c.method in ("get", "stream")}


class FakeApiServer:
    """Answers a LIST with an empty page and a WATCH with one bookmark (then holds it open); records each
    request's target."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_line = await reader.readuntil(b"\r\n")
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                target = request_line.split(b" ")[1].decode()
                self.targets.append(target)
                query = parse_qsl(urlsplit(target).query, keep_blank_values=True)
                if ("watch", "1") in query:
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                    )
                    metadata: dict[str, Any] = {"resourceVersion": "8"}
                    if ("sendInitialEvents", "true") in query:  # a streaming list of no objects
                        metadata["annotations"] = {"k8s.io/initial-events-end": "true"}
                    # compact, as the API server writes events (the simulator searches the bytes)
                    line = json.dumps({"type": "BOOKMARK", "object": {"metadata": metadata}}, separators=(",", ":"))
                    line += "\n"
                    writer.write(f"{len(line):x}\r\n{line}\r\n".encode())
                    await writer.drain()
                    await reader.read()  # held open until the client goes
                    return
                body = json.dumps(page([], rv="7")).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
                writer.write(f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def simulator_requests(tmp_path: pathlib.Path, options: list[str]) -> set[str]:
    fake = FakeApiServer()
    server = await fake.start()
    token = tmp_path / "token"
    token.write_text("t")
    args = watchers.parse_args(
        [
            "--server",
            server,
            "--token-file",
            str(token),
            "--namespace",
            NAMESPACE,
            "--watchers",
            "0" if "--own-names-file" in options else "1",
            "--slice-selector",
            f"kubernetes.io/service-name={SERVICE}",
            *options,
        ]
    )
    simulator = watchers.Simulator(args)
    try:
        await asyncio.wait_for(simulator.start(), DEADLINE)
    finally:
        await simulator.stop()
        fake.close()
    return {shape(urlsplit(t).path, parse_qsl(urlsplit(t).query, keep_blank_values=True)) for t in fake.targets}


@pytest.mark.parametrize(
    ("environ", "options"),
    [
        ({"DISCOVERY_INITIAL_LIST": "pages"}, ["--initial", "list"]),
        ({"DISCOVERY_INITIAL_LIST": "stream"}, ["--initial", "stream"]),
        ({}, []),  # the defaults agree
        ({"DISCOVERY_PEER_SELECTOR": "role=decode"}, ["--cr-selector", "role=decode"]),
    ],
    ids=["paged-list", "streaming-list", "defaults", "peer-selector"],
)
def test_the_simulator_sends_the_sidecars_requests(
    tmp_path: pathlib.Path, environ: dict[str, str], options: list[str]
) -> None:
    """Per resource, the same initial sync (a paginated LIST then a WATCH from its resourceVersion, or one
    streaming-list WATCH), with the same selector, bookmarks and timeout."""
    expected = sidecar_requests(tmp_path, environ)
    assert len(expected) in (2, 4), expected  # per resource: a LIST and a WATCH, or one streaming WATCH
    assert asyncio.run(simulator_requests(tmp_path, options)) == expected


@pytest.mark.parametrize(
    ("environ", "options"),
    [({"DISCOVERY_INITIAL_LIST": "pages"}, ["--initial", "list"]), ({}, [])],
    ids=["paged-list", "defaults"],
)
def test_the_simulated_own_registration_watch_is_the_sidecars(
    tmp_path: pathlib.Path, environ: dict[str, str], options: list[str]
) -> None:
    """The watch of the pod's own CR: the CR collection by field selector on its name, the same sync."""
    expected = sidecar_requests(tmp_path, environ, own=True)
    assert all("fieldSelector=metadata.name=worker-0" in request for request in expected), expected
    names = tmp_path / "names.json"
    names.write_text('["worker-0"]')
    assert asyncio.run(simulator_requests(tmp_path, [*options, "--own-names-file", str(names)])) == expected


def _slice(*endpoints: tuple[str, dict[str, bool]]) -> dict[str, Any]:
    return {"endpoints": [{"targetRef": {"name": name}, "conditions": conditions} for name, conditions in endpoints]}


def test_live_endpoints_follow_the_sidecars_readiness_rule() -> None:
    """Ready is READY; serving while terminating is DRAINING; not serving, or no conditions, is not a peer."""
    item = _slice(
        ("ready", {"ready": True, "serving": True, "terminating": False}),
        ("draining", {"ready": False, "serving": True, "terminating": True}),
        ("stopped", {"ready": False, "serving": False, "terminating": True}),
        ("starting", {"ready": False}),
        ("unknown", {}),
    )
    assert watchers.live_endpoints(item) == {"ready": "READY", "draining": "DRAINING"}


class TestPeerView:
    """The peer set a simulated sidecar would serve, and when it last changed."""

    def test_a_peer_needs_a_live_endpoint_and_a_cr(self) -> None:
        view = watchers.PeerView()
        view.set_slice("s1", {"a": "READY", "b": "READY"})
        assert view.peers() == {} and view.changed_at == 0.0, "no CR yet: no peer, nothing changed"
        view.set_cr("a", present=True)
        assert view.peers() == {"a": "READY"} and view.changed_at > 0

    def test_slice_changes_that_touch_no_peer_change_nothing(self) -> None:
        view = watchers.PeerView()
        view.replace(slices={"s1": {"a": "READY"}}, crs={"a"})
        first = view.changed_at
        assert first > 0
        view.set_slice("s1", {"a": "READY", "c": "READY"})  # c has no CR: not a peer of this view yet
        assert view.changed_at == first
        view.set_cr("gone", present=False)  # a CR it never had
        assert view.changed_at == first
        view.set_slice("s1", {"a": "DRAINING", "c": "READY"})
        assert view.changed_at > first and view.peers() == {"a": "DRAINING"}

    def test_a_deleted_slice_or_cr_removes_the_peer(self) -> None:
        view = watchers.PeerView()
        view.replace(slices={"s1": {"a": "READY"}, "s2": {"b": "READY"}}, crs={"a", "b"})
        view.set_slice("s2", None)
        assert view.peers() == {"a": "READY"}
        view.set_cr("a", present=False)
        assert view.peers() == {}

    def test_a_pod_ready_in_one_slice_is_ready(self) -> None:
        """A pod in transit between two slices is one peer, READY if either says so."""
        view = watchers.PeerView()
        view.replace(slices={"s1": {"a": "DRAINING"}, "s2": {"a": "READY"}}, crs={"a"})
        assert view.peers() == {"a": "READY"}


def test_the_slice_cache_decodes_each_version_once() -> None:
    cache = watchers.SliceCache(size=2)
    line = json.dumps({"type": "MODIFIED", "object": _slice(("a", {"ready": True}))}).encode()
    assert cache.get("s1", "5", line) == {"a": "READY"}
    assert cache.get("s1", "5", b"not json: served from the cache") == {"a": "READY"}
    assert cache.decoded == 1
    cache.get("s1", "6", line)
    cache.get("s1", "7", line)
    assert len(cache.items) == 2, "bounded"
