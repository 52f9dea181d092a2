"""A strict client of projected messages, shared by the core's property tests."""

from __future__ import annotations

from typing import Any

from sidecar.core.projection import EventType, GroupedPeer, StatusMessage


def apply_messages(view: dict[str, GroupedPeer], messages: list[Any]) -> None:
    """Apply messages, asserting the stream contract: an ADDED peer is new, an UPDATED or REMOVED one
    is known, no message is empty, and a message has at most one event per peer."""
    for message in messages:
        if isinstance(message, StatusMessage):
            continue
        assert message.events, "an empty delta must not be sent"
        uids = [e.peer.peer.uid for e in message.events]
        assert len(uids) == len(set(uids)), "one event per peer per message"
        for event in message.events:
            uid = event.peer.peer.uid
            if event.type is EventType.ADDED:
                assert uid not in view
                view[uid] = event.peer
            elif event.type is EventType.UPDATED:
                assert uid in view and view[uid] != event.peer
                view[uid] = event.peer
            else:
                assert view.get(uid) == event.peer
                del view[uid]
