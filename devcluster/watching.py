"""A list-and-watch loop over one collection, on a thread, for the harness's own controllers.

The scheduler stand-in (``devcluster.kwok.Binder``) and the benchmark's bookkeeping (``bench.rollout``)
follow pods the way a controller does: list, then watch from the list's resourceVersion, list again
after ``410 Gone``, resume after a dropped watch. This is the harness side, so it is plain and
synchronous; the sidecar's own reflector (``sidecar.kube.reflector``) is the one under test.
"""

from __future__ import annotations

import contextlib
import random
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

from sidecar.kube.api import ApiError, KubeApi, WatchStream

Handler = Callable[[str, Mapping[str, Any]], None]
"""Called with the event type (ADDED, MODIFIED, DELETED) and the object, on the watch's thread."""


class CollectionWatch:
    """Follows ``path`` (a collection) with an optional label/field selector; calls ``handler`` per event.

    After a (re)list every listed object is handed over as ADDED, and every object known before but not
    listed any more as DELETED (it went while the watch was down: a ``410`` after the server closed a slow
    watch), so a handler sees each object's end too; handlers must be idempotent (they act on the object's
    current state)."""

    def __init__(
        self,
        api: KubeApi,
        path: str,
        handler: Handler,
        label_selector: str = "",
        field_selector: str = "",
        name: str = "watch",
    ) -> None:
        self.api = api
        self.path = path
        self.handler = handler
        self.query = [("labelSelector", label_selector)] if label_selector else []
        self.query += [("fieldSelector", field_selector)] if field_selector else []
        self.synced = threading.Event()
        self._known: dict[tuple[str, str], dict[str, Any]] = {}  # (namespace, name) -> last object; watch thread only
        self._stop = threading.Event()
        self._stream: WatchStream | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> CollectionWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.close()
        self._thread.join(10)

    def _deliver(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if kind == "DELETED":
            self._known.pop(key, None)
        else:
            self._known[key] = obj
        self.handler(kind, obj)

    def _list(self) -> str:
        token = ""
        listed: list[dict[str, Any]] = []
        while True:
            page = self.api.get(self.path, [*self.query, ("limit", "500"), *([("continue", token)] if token else [])])
            listed += page.get("items") or ()
            token = page["metadata"].get("continue") or ""
            if not token:
                break
        keys = {(i["metadata"].get("namespace", ""), i["metadata"]["name"]) for i in listed}
        for key in [k for k in self._known if k not in keys]:
            self._deliver("DELETED", self._known[key])
        for item in listed:
            self._deliver("ADDED", item)
        return str(page["metadata"]["resourceVersion"])

    def _run(self) -> None:
        version = ""
        backoff = 0.2
        while not self._stop.is_set():
            try:
                if not version:
                    version = self._list()
                    self.synced.set()
                query = [*self.query, ("watch", "1"), ("allowWatchBookmarks", "true"), ("resourceVersion", version)]
                self._stream = self.api.stream(self.path, [*query, ("timeoutSeconds", "300")], read_timeout=330)
                for event in self._stream:
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            version = ""
                        break
                    version = obj.get("metadata", {}).get("resourceVersion") or version
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        self._deliver(str(kind), obj)
                backoff = 0.2
            except ApiError as exc:
                if exc.status == 410:
                    version = ""
                elif not self._stop.is_set():
                    self._pause(backoff)
                    backoff = min(backoff * 2, 5.0)
            except Exception as exc:  # noqa: BLE001 - a harness loop must outlive a dropped connection
                if not self._stop.is_set():
                    print(f"[devcluster] {self._thread.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                    self._pause(backoff)
                    backoff = min(backoff * 2, 5.0)
            finally:
                stream, self._stream = self._stream, None
                if stream is not None:
                    with contextlib.suppress(Exception):
                        stream.close()

    def _pause(self, seconds: float) -> None:
        self._stop.wait(seconds * (1 + random.random()))  # jittered backoff before retrying
