"""Tests for sidecar.app.collector: after start-up the collector leaves long-lived objects alone, until shutdown."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from sidecar.app import collector


@pytest.fixture
def restored() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    collector.release()
    gc.unfreeze()
    gc.set_threshold(*before)


class TestSettle:
    def test_freezes_what_is_alive_and_makes_young_collections_rarer(self, restored: None) -> None:
        """Everything alive at settle() moves to the permanent generation; the young threshold is raised."""
        kept = [[index] for index in range(1000)]  # containers, tracked by the collector
        collector.settle()
        assert gc.get_freeze_count() >= len(kept)
        assert gc.get_threshold()[0] >= collector.YOUNG_THRESHOLD

    def test_release_undoes_it(self, restored: None) -> None:
        """At shutdown nothing stays frozen and the thresholds are those from before the first settle()."""
        before = gc.get_threshold()
        collector.settle()
        collector.settle()  # at start-up and again once synced
        collector.release()
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == before

    def test_cycles_made_after_settle_are_still_collected(self, restored: None) -> None:
        """Freezing exempts what was alive, not what comes later: a cycle made afterwards is collected."""
        collector.settle()

        class Node:
            partner: object = None

        first, second = Node(), Node()
        first.partner, second.partner = second, first
        ids = {id(first), id(second)}
        del first, second
        gc.collect()
        assert not ids & {id(o) for o in gc.get_objects() if isinstance(o, Node)}
