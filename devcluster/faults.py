"""Network faults between a client and the real kube-apiserver (and a byte counter for benchmarks).

Some failures cannot be asked of a real API server: a watch connection that stays open but goes
silent (what a managed control plane's load balancer does to idle watches), or an API server that is
unreachable when a sidecar starts. ``FaultProxy`` is a TCP proxy on loopback in front of the real
server (TLS passes through untouched, so certificates still verify) that can refuse connections, answer
new ones only after a pause (a server paused that long), or freeze the connections it has open without
closing them.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        self._accepting = threading.Event()
        self._accepting.set()
        self._closed = threading.Event()
        self.connections_accepted = 0
        self.answer_delay = 0.0  # seconds a new connection waits before it reaches the server
        self.bytes_to_server = 0
        self.bytes_from_server = 0
        threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True).start()

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    # -- faults ---------------------------------------------------------------------------------------
    def refuse(self) -> None:
        """Close every connection and reset new ones, as an unreachable server would."""
        self._accepting.clear()
        self.drop_all()

    def accept(self) -> None:
        self._accepting.set()

    def answer_after(self, seconds: float) -> None:
        """Connect each new connection to the server only ``seconds`` after accepting it (0: at once), as a
        server paused that long (a CPU-throttled container) answers; open connections are not affected."""
        self.answer_delay = seconds

    def freeze_existing(self) -> int:
        """Stop moving bytes on every open connection without closing it; return how many."""
        with self._lock:
            for _, _, frozen in self._pairs:
                frozen.set()
            return len(self._pairs)

    def drop_all(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, upstream, _ in pairs:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.close()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self.drop_all()

    # -- plumbing -------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._accepting.is_set():
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()  # RST: connection refused/reset, as seen by the client
                continue
            threading.Thread(target=self._connect, args=(client, self.answer_delay), daemon=True).start()

    def _connect(self, client: socket.socket, delay: float) -> None:
        """Join ``client`` to the server (after ``delay`` seconds, the fault), then move bytes between them."""
        if delay and self._closed.wait(delay):  # the pause this fault is for; closed meanwhile: drop the client
            client.close()
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        frozen = threading.Event()
        with self._lock:
            self._pairs.append((client, upstream, frozen))
            self.connections_accepted += 1
        self._pump(client, upstream, frozen)

    def _pump(self, client: socket.socket, upstream: socket.socket, frozen: threading.Event) -> None:
        peers = {client: upstream, upstream: client}
        try:
            while not self._closed.is_set():
                if frozen.is_set():
                    if self._closed.wait(0.2):  # frozen: hold the connection open, move nothing
                        return
                    continue
                readable, _, _ = select.select(list(peers), [], [], 0.2)
                if frozen.is_set():
                    continue  # frozen while waiting: what just arrived stays unread
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
                    if sock is upstream:
                        self.bytes_from_server += len(data)
                    else:
                        self.bytes_to_server += len(data)
        except OSError:
            return
        finally:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.close()
            with self._lock:
                self._pairs = [p for p in self._pairs if p[0] is not client]
