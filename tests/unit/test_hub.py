"""Tests for sidecar.peers.hub: the one change signal every consumer subscribes to.

A change is signalled once per commit that appends entries, reaches the first sync, changes a source's
health, or closes the hub; a commit that changes nothing signals nothing. Consumers (the gRPC streams,
the SMG writer, the reporter) rely on it instead of polling: tests/unit/test_grpc_scale.py shows the
streams served through it alone.
"""

from __future__ import annotations

import threading

from devcluster.waiting import wait_for
from sidecar.core.eventlog import ApiStatus, StatusChange
from sidecar.kube.sources import ENDPOINT_SLICES, WORKER_METADATA
from sidecar.peers.hub import PeerHub
from sidecar.peers.ports import HubChange
from tests.unit.feeding import SourceFeed, new_hub
from tests.unit.test_grpc_stream import endpoint_slice, worker_cr


def subscribed() -> tuple[SourceFeed, list[HubChange], PeerHub]:
    hub = new_hub(100, "uid-self")
    changes: list[HubChange] = []
    hub.subscribe(changes.append)
    return SourceFeed(hub), changes, hub


class TestTheChangeSignal:
    def test_the_first_sync_is_signalled_even_without_entries(self) -> None:
        """No peers at all: the sync appends nothing, yet every waiting consumer must learn of it."""
        feed, changes, _ = subscribed()
        feed.replace(ENDPOINT_SLICES, [])
        assert changes == []  # one source listed: not synced, nothing appended
        feed.replace(WORKER_METADATA, [])
        assert [(list(c.entries), c.synced, c.closed) for c in changes] == [([], True, False)]
        feed.replace(WORKER_METADATA, [])  # a relist that changes nothing: no signal
        assert len(changes) == 1

    def test_entries_are_signalled_once_per_commit_in_order(self) -> None:
        feed, changes, _ = subscribed()
        feed.replace(ENDPOINT_SLICES, [endpoint_slice("s", {"a": ("uid-a", True)})])
        feed.replace(WORKER_METADATA, [worker_cr("a", "uid-a")])
        (added,) = changes
        assert added.synced and [e.change.after.name for e in added.entries] == ["a"]  # type: ignore[union-attr]
        feed.upsert(WORKER_METADATA, worker_cr("a", "uid-a", data={"x": 1}))
        assert len(changes) == 2 and changes[1].entries[0].revision > added.entries[-1].revision
        feed.upsert(WORKER_METADATA, worker_cr("a", "uid-a", data={"x": 1}))  # the same again: no change
        assert len(changes) == 2

    def test_health_is_signalled_on_each_change_even_when_the_status_does_not_flip(self) -> None:
        """The second unhealthy source leaves the status DEGRADED (no entry) but changes what readers see."""
        feed, changes, hub = subscribed()
        slices, crs = feed.stores[ENDPOINT_SLICES.name], feed.stores[WORKER_METADATA.name]
        slices.set_health(False, "slices down")
        (degraded,) = changes
        assert isinstance(degraded.entries[0].change, StatusChange)
        assert degraded.entries[0].change.status is ApiStatus.DEGRADED
        crs.set_health(False, "CRs down")
        assert len(changes) == 2 and not changes[1].entries
        crs.set_health(False, "CRs down")  # said again: nothing changed
        assert len(changes) == 2
        slices.set_health(True)
        crs.set_health(True)
        assert changes[-1].entries[0].change.status is ApiStatus.CONNECTED  # type: ignore[union-attr]
        assert hub.source_health() == {}

    def test_closing_is_signalled_once(self) -> None:
        _, changes, hub = subscribed()
        hub.close()
        hub.close()
        assert [(list(c.entries), c.synced, c.closed) for c in changes] == [([], False, True)]

    def test_blocked_readers_wake_with_the_signal(self) -> None:
        """``wait_synced`` and ``wait_entries`` wake on the same change (no timer)."""
        feed, _, hub = subscribed()
        feed.replace(ENDPOINT_SLICES, [])
        synced = threading.Event()
        threading.Thread(target=lambda: hub.wait_synced(None) and synced.set(), daemon=True).start()
        feed.replace(WORKER_METADATA, [])
        wait_for(synced.is_set, 5, what="the blocked reader to wake on the sync")
