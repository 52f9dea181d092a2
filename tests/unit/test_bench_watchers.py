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
from urllib.parse import parse_qsl, urlsplit

from bench import watchers
from bench.watchers import normalise
from sidecar.config import load_settings
from sidecar.kube.reflector import Reflector
from sidecar.kube.sources import watch_targets
from sidecar.metrics import Metrics
from tests.unit.fake_api import DEADLINE, RecordingStore, ScriptedApi
from tests.unit.test_reflector import page

NAMESPACE = "bench"
SERVICE = "workers"


def shape(path: str, query: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> str:
    verb = "WATCH" if ("watch", "1") in query else "LIST"
    return f"{verb} {normalise(path + '?' + '&'.join(f'{k}={v}' for k, v in query))}"


def sidecar_requests(tmp_path: pathlib.Path) -> set[str]:
    """The first LIST and WATCH of each of the sidecar's reflectors, for a pod behind ``SERVICE``."""
    settings = load_settings(
        environ={
            "POD_NAME": "worker-0",
            "POD_NAMESPACE": NAMESPACE,
            "POD_UID": "uid-1",
            "DISCOVERY_SERVICE_NAME": SERVICE,
            "DISCOVERY_PODINFO_DIR": str(tmp_path),
        }
    )
    targets = watch_targets(settings)
    api = ScriptedApi()
    api.on_get(*(page([], rv="7") for _ in targets))
    reflectors = [
        Reflector(api.as_kube_api(), t, RecordingStore(), Metrics(), silence_timeout=30, backoff_max=0.05)
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
                if ("watch", "1") in parse_qsl(urlsplit(target).query):
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                    )
                    line = json.dumps({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "8"}}}) + "\n"
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


async def simulator_requests(tmp_path: pathlib.Path) -> set[str]:
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
            "1",
            "--slice-selector",
            f"kubernetes.io/service-name={SERVICE}",
        ]
    )
    simulator = watchers.Simulator(args)
    try:
        await asyncio.wait_for(simulator.start(), DEADLINE)
    finally:
        await simulator.stop()
        fake.close()
    return {shape(urlsplit(t).path, parse_qsl(urlsplit(t).query, keep_blank_values=True)) for t in fake.targets}


def test_the_simulator_sends_the_sidecars_list_and_watch_requests(tmp_path: pathlib.Path) -> None:
    """Per resource, the same paginated LIST and the same WATCH (selector, bookmarks, resume, timeout)."""
    expected = sidecar_requests(tmp_path)
    assert len(expected) == 4, expected  # a LIST and a WATCH per resource
    assert asyncio.run(simulator_requests(tmp_path)) == expected
