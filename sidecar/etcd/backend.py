"""The etcd backend, built: one source (the watch of Dynamo's ``v1/`` prefixes, joined by lease) feeds the
hub, and this instance's lease (with its keys) is its publisher, followed by a watch of exactly those keys
whatever ``DISCOVERY_WATCH`` says.

Imported only when ``DYN_DISCOVERY_BACKEND`` is etcd (``sidecar.app.backends``). This instance is the
peer ``etcd/{lease:x}``; a lost lease is replaced by a new one (a new instance ID), so the hub's notion
of "self" follows the publisher.
"""

from __future__ import annotations

import threading
import time

import structlog

from sidecar.core.backoff import Backoff
from sidecar.core.instance_join import InstanceJoin, instance_peer_key
from sidecar.etcd.client import EtcdClient, EtcdError, EtcdUnavailable
from sidecar.etcd.own_keys import OwnKeysWatch
from sidecar.etcd.publisher import EtcdPublisher
from sidecar.etcd.settings import EtcdSettings
from sidecar.etcd.source import SOURCE_NAME, EtcdSource
from sidecar.peers.backend import Backend, SharedSettings, StartupError, new_hub
from sidecar.peers.metrics import Metrics


def build(
    settings: SharedSettings, etcd: EtcdSettings, metrics: Metrics, transport: object | None = None
) -> Backend:
    """The etcd source, the hub it feeds, the lease publisher and the watch of its keys, over one client.

    ``transport``: an ``EtcdClient`` to use (tests inject one); otherwise one is made. Making it dials
    nothing: ``wait_reachable`` is the first call.
    """
    if transport is not None and not isinstance(transport, EtcdClient):
        raise TypeError(f"the etcd backend needs an EtcdClient, got {type(transport).__name__}")
    client = transport or EtcdClient(etcd, settings.request_timeout)
    hub = new_hub(settings, [SOURCE_NAME], InstanceJoin())
    publisher = EtcdPublisher(
        client,
        settings.initial_metadata,
        lease_ttl=etcd.lease_ttl,
        metrics=metrics,
        backoff_max=settings.backoff_max,
        labels=settings.pod_labels,
        on_registered=lambda lease: hub.set_self_uid(instance_peer_key(lease)),
        register=settings.register,
        name=settings.identity.name,
        resync=settings.registration_resync,
        health_listener=hub.set_registration_health,  # failing writes and renewals: DEGRADED on streams
    )
    # Watch-only holds no lease and writes no key: there is nothing of its own to follow.
    own = (
        []
        if publisher.watch_only
        else [
            OwnKeysWatch(
                client,
                publisher,
                backoff_max=settings.backoff_max,
                silence_timeout=settings.watch_silence_timeout,
                resync=settings.registration_resync,
            )
        ]
    )
    publisher.own_watch = own[0] if own else None
    source = EtcdSource(
        client,
        hub.store(SOURCE_NAME),
        metrics,
        backoff_max=settings.backoff_max,
        silence_timeout=settings.watch_silence_timeout,
    )
    log = structlog.get_logger("sidecar").bind(pod=settings.identity.name)

    def wait_reachable(stop: threading.Event) -> bool:
        """Dynamo's start-up rule on etcd: reach it within ``ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS`` or exit.

        True once reached, False when ``stop`` was set while waiting. Only unavailability is retried; a
        refusal (credentials, permissions) raises ``StartupError`` at once.
        """
        timeout = etcd.startup_connect_timeout
        deadline = time.monotonic() + timeout
        backoff = Backoff(maximum=min(2.0, settings.backoff_max))
        while not stop.is_set():
            try:
                client.range(b"v1/instances/", limit=1)
                return True
            except EtcdUnavailable as exc:
                delay = backoff.next_delay()
                if time.monotonic() + delay > deadline:
                    raise StartupError(
                        f"cannot reach etcd at {etcd.endpoints_text} within {timeout:g}s "
                        f"(ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS): {exc}"
                    ) from exc
                log.warning("etcd not reachable yet", error=str(exc), retry_in=round(delay, 2))
                stop.wait(delay)
            except EtcdError as exc:
                raise StartupError(f"etcd at {etcd.endpoints_text} refused the sidecar: {exc}") from exc
        return False

    return Backend(
        name="etcd",
        hub=hub,
        publisher=publisher,
        sources=[source],
        descriptions=[f"etcd {etcd.endpoints_text} (v1/instances, v1/mdc, v1/event_channels, v1/event_sources)"],
        close=client.close,
        wait_reachable=wait_reachable,
        own_watches=own,
    )
