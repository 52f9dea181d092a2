"""The cyclic garbage collector, set for a long-running process once start-up is over.

CPython's cyclic collector runs a young collection every 700 net container allocations, and every tenth
of those a middle one, every tenth of those a full one over every tracked object. The sidecar's hot path
allocates thousands of short-lived containers per second (the decoded watch events, the joined peers,
the messages it projects), nearly all freed by reference counting, never in a cycle; yet they keep the
collector running, and its older collections traverse everything start-up left alive: the modules of
the Kubernetes client, gRPC and protobuf, and the synced peer set, tens of thousands of objects that
live as long as the process.

So, once start-up is over (the servers listening; again once the watches have synced), ``settle``
collects what start-up threw away, moves everything still alive to the permanent generation that the
collector never traverses (``gc.freeze``), and makes young collections rarer. Cycles are still
collected (gRPC leaves some behind aborted calls), only later: at most ``YOUNG_THRESHOLD`` allocations
late, a few MiB at worst, and a young collection of that many containers takes about 0.3 ms. ``settle``
itself costs one full collection, about 20 ms at start-up. At shutdown ``release`` undoes it: the gRPC
server's last cycles, some made before a ``settle``, must be collectable when the server is dropped
(``GrpcServer.stop``), so that its threads end (and a test process that ran a sidecar goes on as before).
Called by the daemon and the relay.
"""

from __future__ import annotations

import gc
import threading

YOUNG_THRESHOLD = 20_000
"""Net container allocations between young collections (CPython's default: 700)."""


_lock = threading.Lock()  # guards _thresholds: the daemon's main thread and its health thread both settle
_thresholds: list[tuple[int, int, int]] = []  # the thresholds before the first ``settle`` (until ``release``)


def settle() -> None:
    """Collect start-up's garbage, exempt what is left from later collections, and make them rarer."""
    gc.collect()
    with _lock:
        gc.freeze()
        young, middle, oldest = gc.get_threshold()
        if not _thresholds:
            _thresholds.append((young, middle, oldest))
        gc.set_threshold(max(YOUNG_THRESHOLD, young), middle, oldest)


def release() -> None:
    """Undo ``settle`` (at shutdown): everything frozen may be collected again, at the former pace."""
    with _lock:
        gc.unfreeze()
        if _thresholds:
            gc.set_threshold(*_thresholds.pop())
