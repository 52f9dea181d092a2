"""The local gRPC server: ``discovery.v1.Discovery`` plus standard health checking and reflection.

A ``grpc.aio`` server on one event-loop thread of its own, bound to loopback or a Unix socket, serving
the ``DiscoveryService`` (``sidecar.serve.grpc_service``). Every gRPC object is created and used on
that thread; the daemon reaches it through ``set_serving``, ``start`` and ``stop``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from sidecar.peers.ports import ListenAddress, TlsFiles
from sidecar.serve.grpc_service import PENDING_MARGIN, SERVICE_NAME, DiscoveryService, add_to_server

T = TypeVar("T")
REMOTE_CLIENT_OPTIONS = [
    # A relay's clients are other pods' sidecars, whose streams sit idle between changes: they ping every 20 s
    # to notice a vanished replica (sidecar.kube.upstream), which gRPC's default policy (one ping per 5 min
    # without data, two strikes) would answer by closing the connection.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    # A client that vanished is found by the relay's own pings, so its stream does not hold memory for hours.
    # The answer may wait long: in a failover, a follower is busy taking in a snapshot of every peer (megabytes
    # at 2,000 peers, queued ahead of the ping), and dropping it as dead makes it reconnect and be owed another
    # snapshot: at 2,000 pods on a loaded machine, a 20 s timeout dropped ~1,500 live followers that way and the
    # failover never settled (bench/COST_MODEL.md). A dead follower costs an idle stream until then (~35 KiB).
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 90_000),
    # A handshake its client has given up on (a follower's connection attempt lasts 20 s, gRPC's default) is
    # given up here too, rather than after gRPC's 120 s: in a reconnect storm those held connections, one
    # file descriptor each, ran two replicas out of descriptors (bench/COST_MODEL.md).
    ("grpc.server_handshake_timeout_ms", 20_000),
]


def reloading_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """Server credentials from PEM files, read again on the next handshake after either file changed
    (cert-manager renews a Secret in place: no restart). A pair that cannot be read at start-up raises
    ``OSError`` naming the file; a renewal that cannot be read keeps the pair in use (and is retried)."""

    def read() -> grpc.ServerCertificateConfiguration:
        pair = []
        for path in (tls.key, tls.cert):
            with open(path, "rb") as file:
                pair.append(file.read())
        return grpc.ssl_server_certificate_configuration([(pair[0], pair[1])])

    def stamp() -> tuple[float, float]:
        return (os.stat(tls.cert).st_mtime, os.stat(tls.key).st_mtime)

    loaded = [stamp()]
    initial = read()

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            current = stamp()
            if current == loaded[0]:
                return None
            configuration = read()
        except OSError:
            return None
        loaded[0] = current
        return configuration

    # grpc's stub says the fetcher returns a configuration; None (keep the current one) is documented.
    return grpc.dynamic_ssl_server_credentials(initial, fetch)  # type: ignore[arg-type]


class GrpcServer:
    """The server with Discovery, health and reflection, bound to loopback or a Unix socket.

    Owns a ``grpc.aio`` server and the event-loop thread it runs on (from construction to ``stop``), and
    ends the service's pools when it stops. The listening socket is bound at construction; ``start()``
    returns once the server accepts calls. Every gRPC object is created and used on the loop thread;
    other threads reach it through ``_on_loop`` (``set_serving`` is called from the daemon's threads).
    ``_lock`` guards ``_serving`` and ``_closed``.
    """

    def __init__(self, service: DiscoveryService, listen: ListenAddress, tls: TlsFiles | None = None) -> None:
        self.listen = listen
        self.tls = tls  # a relay's key pair: then the port speaks TLS only
        self.service = service
        self.health = health_aio.HealthServicer()
        self.log = structlog.get_logger("sidecar.grpc")
        self._lock = threading.Lock()
        self._serving = False
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="grpc-loop", daemon=True)
        self._thread.start()
        self._server: grpc.aio.Server | None = None
        try:
            self._server, self.port = self._on_loop(self._build()).result()
        except BaseException:
            self._end_loop()
            raise

    async def _build(self) -> tuple[grpc.aio.Server, int]:
        # No maximum_concurrent_rpcs: streams are limited by the service, unary calls and health never.
        # gRPC core queues calls that arrive before the loop asks for the next one, and by default cancels
        # some once 1,000 wait (all beyond 3,000): a burst of every allowed stream, plus unary calls, must
        # fit, so that a stream over the limit is told why (RESOURCE_EXHAUSTED) rather than CANCELLED.
        pending = self.service.max_streams + PENDING_MARGIN
        options: list[tuple[str, int]] = [
            ("grpc.server.max_pending_requests", pending),
            ("grpc.server.max_pending_requests_hard_limit", 2 * pending),
            # Nor by age: gRPC core cancels a call the loop has not picked up within 30 s by default, and a loop
            # busy with a burst (a relay owing snapshots to hundreds of followers after a failover) takes longer.
            # The client then reconnects and asks again, adding to the burst: at 2,000 pods, ~600 of the moving
            # followers' streams were cancelled that way before their snapshot (bench/COST_MODEL.md). A waiting
            # call costs gRPC core's state only; one whose client gave up is dropped by core then.
            ("grpc.server_max_unrequested_time_in_server", 600),
            # gRPC sets SO_REUSEPORT by default: a second server on a port in use would bind too, and the kernel
            # would share the connections between the two. A port in use must be refused, and said so.
            ("grpc.so_reuseport", 0),
        ]
        if self.tls is not None:
            options += REMOTE_CLIENT_OPTIONS
        server = grpc.aio.server(options=options)
        add_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        if self.listen.unix_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.listen.unix_path)  # a socket left by a previous run of this container
        try:
            if self.tls is not None:
                port = server.add_secure_port(self.listen.bind_target, reloading_credentials(self.tls))
            else:
                port = server.add_insecure_port(self.listen.bind_target)
        except RuntimeError as exc:  # grpc's "Failed to bind": in use, or not an address of this host
            raise OSError(f"cannot listen on {self.listen.grpc_target}: {exc}") from None
        if not self.listen.unix_path and port == 0:
            raise OSError(f"cannot listen on {self.listen.grpc_target}")
        await self._apply_health()
        return server, port

    @property
    def target(self) -> str:
        """What a client dials (the real port when 0 was asked for)."""
        if self.listen.unix_path:
            return self.listen.grpc_target
        return ListenAddress(host=self.listen.host, port=self.port).grpc_target

    # -- the loop thread --------------------------------------------------------------------------------
    def _run_loop(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                tasks = asyncio.all_tasks(loop)
                for task in tasks:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    def _on_loop(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coroutine`` on the loop (from another thread)."""
        try:
            return asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        except RuntimeError:  # the loop is closed
            coroutine.close()
            raise

    def _end_loop(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self.service.close()
        # gRPC's poller thread ends with its last aio object. Every aborted call leaves a reference cycle
        # in gRPC (RPCState -> AbortError -> traceback -> handler frame -> context -> RPCState) that holds
        # the server, so dropping ours is not enough: collect the cycles now rather than at some later GC.
        self._server = None
        gc.collect()

    # -- health -----------------------------------------------------------------------------------------
    def set_serving(self, serving: bool) -> None:
        """Set the health status of "" and the Discovery service; callable from any thread."""
        with self._lock:
            self._serving = serving
            if self._closed:
                return
        if threading.current_thread() is self._thread:
            self._loop.create_task(self._apply_health())
            return
        with contextlib.suppress(RuntimeError):
            # Waited for, so a Check right after this call sees it; bounded, should the loop be stopping.
            concurrent.futures.wait([self._on_loop(self._apply_health())], timeout=5)

    async def _apply_health(self) -> None:
        with self._lock:
            serving = self._serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    # -- start and stop ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._on_loop(self._start()).result()

    async def _start(self) -> None:
        assert self._server is not None
        self.service.attach(asyncio.get_running_loop())
        await self._server.start()

    def stop(self, grace: float) -> None:
        """Tell health watchers NOT_SERVING, end every stream with UNAVAILABLE, give unary calls ``grace``
        seconds, then stop the loop thread and the pools: no thread is left."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            done, _ = concurrent.futures.wait([self._on_loop(self._shutdown(grace))], timeout=grace + 5)
            if not done:
                self.log.warning("the gRPC server did not stop in time; cancelling what is left", grace=grace)
        finally:
            self._end_loop()

    async def _shutdown(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        self.service.begin_shutdown()
        # The streams end themselves, each with its UNAVAILABLE status, while the server still runs as usual;
        # stopping the server under them raced its GOAWAY and teardown with those statuses, and a client could
        # get "connection reset" instead of the reason (tests/unit/test_grpc_scale.py, intermittently).
        # Within the same grace: what the streams took is not given again to the server's stop.
        started = asyncio.get_running_loop().time()
        await self.service.streams_ended(grace)
        if self._server is not None:
            await self._server.stop(max(0.0, grace - (asyncio.get_running_loop().time() - started)))
