"""Tests for sidecar.serve.http_server: who may read the peer list; probes stay open to all."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from sidecar.peers.metrics import Metrics
from sidecar.peers.ports import ListenAddress
from sidecar.serve.http_server import HttpServer, may_read_peers
from tests.unit.feeding import new_hub


class TestPeerListAccess:
    @pytest.mark.parametrize(
        ("access", "host", "allowed"),
        [
            ("loopback", "127.0.0.1", True),
            ("loopback", "127.3.0.9", True),
            ("loopback", "::1", True),
            ("loopback", "10.244.1.7", False),
            ("loopback", "fe80::1%eth0", False),
            ("loopback", "not-an-address", False),
            ("all", "10.244.1.7", True),
            ("off", "127.0.0.1", False),
        ],
    )
    def test_rule(self, access: str, host: str, allowed: bool) -> None:
        """By default only this pod (loopback) reads every peer's addresses and metadata."""
        assert may_read_peers(access, host) is allowed


@pytest.fixture
def serve() -> Iterator[object]:
    servers: list[HttpServer] = []

    def start(access: str) -> int:
        server = HttpServer(
            ListenAddress("127.0.0.1", 0), new_hub(10, "self"), Metrics(), lambda: [], lambda: [], access
        )
        server.start()
        servers.append(server)
        return server.port

    yield start
    for server in servers:
        server.stop()


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class TestServer:
    def test_loopback_client_reads_peers_and_probes(self, serve) -> None:  # type: ignore[no-untyped-def]
        """From loopback the peer list is served; probes and metrics always are."""
        port = serve("loopback")
        status, body = get(port, "/debug/peers")
        assert status == 200 and '"peers": []' in body
        assert get(port, "/healthz")[0] == 200
        assert get(port, "/metrics")[0] == 200

    def test_off_refuses_the_peer_list_with_the_setting_named(self, serve) -> None:  # type: ignore[no-untyped-def]
        """``off`` answers 403 and says which setting to change; probes still answer."""
        port = serve("off")
        status, body = get(port, "/debug/peers")
        assert status == 403 and "DISCOVERY_DEBUG_PEERS" in body
        assert get(port, "/readyz")[0] == 200

    def test_unknown_access_is_refused_at_construction(self) -> None:
        """A typo cannot silently open the list to everyone."""
        with pytest.raises(ValueError, match="debug_peers must be one of loopback, all, off"):
            HttpServer(ListenAddress("127.0.0.1", 0), new_hub(10, "self"), Metrics(), list, list, "everyone")
