"""List-then-watch of one source into its store, the way client-go's Reflector does it.

The reflector is generic over the rows of ``sidecar.kube.sources``: it parses each object with its
source's parser as soon as it arrives and writes records into a ``SourceStore``; it never knows who
reads them.

* List (paginated, consistent), hand the full set to the store, which diffs it against what it knew;
  then watch from the list's resourceVersion with bookmarks, so a reconnect resumes where it left off.
* Or, with ``streaming_list`` (the daemon's default, ``DISCOVERY_INITIAL_LIST=stream``), the initial
  state comes as a *streaming list*: one watch with ``sendInitialEvents=true``, whose ADDED events up
  to the bookmark annotated ``k8s.io/initial-events-end`` are the full set; the same stream then goes
  on as the watch. The API server serves it from its watch cache, without building a LIST response
  (cheaper when many sidecars start together). A server that refuses it (an older one: 400/422) gets
  the paginated LIST from then on.
* ``410 Gone`` (on the watch request or as an ERROR event): the history is compacted; relist. Because
  the directory diffs a relist, peers that did not change are not removed and re-added.
* A watch that delivers nothing, not even a bookmark, for ``silence_timeout`` is abandoned and
  re-established from the last resourceVersion: managed control planes drop idle watches without
  closing them.
* Any other failure: jittered exponential backoff, and the store is told the source is unhealthy, which
  the stream reports as DEGRADED until the next successful list or watch.
"""

from __future__ import annotations

import ctypes
import gc
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog
import urllib3

from sidecar.core.records import Record
from sidecar.kube.api import CONNECTION_ERRORS, ApiError, KubeApi
from sidecar.kube.sources import WatchTarget
from sidecar.peers.metrics import Metrics
from sidecar.peers.ports import SourceStore
from sidecar.peers.source_loop import SourceLoop

INITIAL_EVENTS_END = "k8s.io/initial-events-end"
"""The annotation on the bookmark that closes a streaming list's initial events."""

WatchObserver = Callable[[str, Mapping[str, Any]], None]
"""Called with (event type, object) for every ADDED/MODIFIED/DELETED event, after the store applied it."""


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
        return trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_free_memory() -> None:
    """Hand the heap freed by a (re)list back to the OS: without this the resident size keeps the
    high-water mark of decoding the list, which for thousands of objects dwarfs what is retained."""
    if _MALLOC_TRIM is not None:
        gc.collect()
        _MALLOC_TRIM(0)


class _Gone(Exception):
    """The resourceVersion we hold is compacted away: relist."""


class _Silent(Exception):
    """The watch delivered nothing, not even a bookmark, for the silence timeout: re-establish it."""


class Reflector(SourceLoop):
    """Owns one watch: its resourceVersion and whether it must list again; its thread, open stream, health
    and backoff are the ``SourceLoop``'s.

    The daemon constructs and starts it; it writes into ``store`` and tells ``observers`` (the
    publisher follows its own CR this way). ``stop`` may be called from any thread.
    """

    def __init__(
        self,
        api: KubeApi,
        target: WatchTarget,
        store: SourceStore,
        metrics: Metrics,
        *,
        silence_timeout: float,
        backoff_max: float,
        page_size: int = 500,
        observers: list[WatchObserver] | None = None,
        streaming_list: bool = False,
    ) -> None:
        self.api = api
        self.target = target
        self.metrics = metrics
        self.silence_timeout = silence_timeout
        self.page_size = page_size
        self.observers = observers or []
        super().__init__(
            store,
            structlog.get_logger("sidecar.reflector").bind(source=target.name),
            backoff_max,
            thread_name=f"reflector-{target.name}",
        )
        self.resource_version = ""
        self.relists = 0
        self.streaming_list = streaming_list  # turned off for good when the server refuses it
        self._need_list = True  # no full set applied since start-up or the last 410 (only the loop's thread)

    def run(self) -> None:
        self._need_list = True
        while not self._stop.is_set():
            try:
                if self._need_list and self.streaming_list:
                    try:
                        # Lists, then watches on; clears _need_list once the initial set is applied, so a
                        # break after that resumes from the last resourceVersion like any watch.
                        self._watch(initial_events=True)
                        self.backoff.reset()
                        continue
                    except ApiError as exc:
                        if exc.status not in (400, 422):
                            raise
                        self.streaming_list = False
                        self.log.info("the API server refuses streaming lists; listing with pages", reason=exc.message)
                if self._need_list:
                    self._list()
                self._watch()
                self.backoff.reset()
            except _Gone:
                self.log.info("resource version expired, relisting", resource_version=self.resource_version)
                self.metrics.watch_restarts.labels(self.target.name, "expired").inc()
                self._need_list = True
            except _Silent:
                if self._stop.is_set():
                    break
                self.log.warning("watch silent, restarting it", silence_seconds=self.silence_timeout)
                self.metrics.watch_restarts.labels(self.target.name, "silent").inc()
            except ApiError as exc:
                self._failed(f"API error {exc.status} {exc.reason}: {exc.message}", str(exc.status), exc)
            except CONNECTION_ERRORS as exc:
                if self._stop.is_set():
                    break
                self._failed(f"cannot reach the API server: {type(exc).__name__}", "connection", exc)
            except Exception as exc:  # a bug must cost a retry, never the watch: the thread lives on
                self.log.exception("unexpected error in the watch; retrying")
                self._failed(f"unexpected error: {type(exc).__name__}: {exc}", "internal", exc)

    def _failed(self, reason: str, code: str, exc: Exception) -> None:
        self.metrics.api_errors.labels(f"watch-{self.target.name}", code).inc()
        self.metrics.watch_restarts.labels(self.target.name, "error").inc()
        hint = ""
        if isinstance(exc, ApiError) and exc.status in (401, 403):
            hint = "the service account lacks list/watch on this resource: apply manifests/rbac.yaml"
        elif isinstance(exc, ApiError) and exc.status == 404:
            hint = (
                "the resource type is not served: is the CRD installed (the chart charts/discovery-sidecar, "
                "or manifests/components/crd/crd.yaml)?"
            )
        needs_human = isinstance(exc, ApiError) and exc.status in (400, 401, 403, 404, 422)
        self._retry_later("watch failed, retrying", reason, hint, needs_human)

    def _became_healthy(self) -> None:
        self._report_healthy("API server reachable again")

    # -- list -------------------------------------------------------------------------------------
    def _query(self) -> list[tuple[str, str]]:
        query = [("labelSelector", self.target.label_selector)] if self.target.label_selector else []
        if self.target.field_selector:
            query.append(("fieldSelector", self.target.field_selector))
        return query

    def _list(self) -> None:
        """A paginated, consistent list. Each page is reduced to compact records as it arrives, so the
        raw objects (managedFields and all) of a large namespace are never all in memory at once."""
        records: dict[str, Record] = {}
        token = ""
        path = self.target.collection
        source = self.target.source
        while True:
            query = self._query() + [("limit", str(self.page_size))]
            if token:
                query.append(("continue", token))
            try:
                page = self.api.get(path, query, verb="list")
            except ApiError as exc:
                if exc.status == 410 and token:  # the continue token expired mid-list: start over
                    records, token = {}, ""
                    continue
                raise
            for obj in page.get("items") or ():
                record = self._parse(obj)
                if record is not None:
                    records[source.key(obj)] = record
            metadata = page.get("metadata") or {}
            token = metadata.get("continue") or ""
            del page
            if not token:
                break
        self.resource_version = metadata.get("resourceVersion", "")
        self._apply_list(records, "paged")

    def _apply_list(self, records: dict[str, Record], how: str) -> None:
        """Hand a full set to the store (it diffs); healthy from then on."""
        self.relists += 1
        self._need_list = False
        changes = self.store.replace(records, time.monotonic())
        self._became_healthy()  # after the relist is applied: CONNECTED then means current
        self.metrics.relists.labels(self.target.source.name).inc()
        self.log.info("listed", how=how, objects=len(records), resource_version=self.resource_version, changes=changes)
        release_free_memory()

    # -- watch ------------------------------------------------------------------------------------
    def _watch(self, initial_events: bool = False) -> None:
        """Watch from ``resource_version``; or, with ``initial_events``, from a streaming list (see above),
        returning only after the initial set was applied (else it raises and the caller lists again)."""
        query = self._query() + [
            ("watch", "1"),
            ("allowWatchBookmarks", "true"),
            # Like client-go: end the watch server-side every 5-10 minutes, spread so that sidecars
            # started together do not reconnect together.
            ("timeoutSeconds", str(int(300 * (1 + random.random())))),
        ]
        if initial_events:
            query += [("sendInitialEvents", "true"), ("resourceVersionMatch", "NotOlderThan"), ("resourceVersion", "")]
        else:
            query += [("resourceVersion", self.resource_version)]
        try:
            stream = self.api.stream(self.target.collection, query, self.silence_timeout)
        except ApiError as exc:
            if exc.status == 410:
                raise _Gone from exc
            raise
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise _Silent from exc
        self._hold_stream(stream)
        try:
            if self._stop.is_set():
                return
            if not initial_events:
                self._became_healthy()
            initial: dict[str, Record] | None = {} if initial_events else None
            try:
                for event in stream:
                    if initial is not None:
                        if self._initial_event(event, initial):
                            self._apply_list(initial, "streamed")
                            initial = None
                    else:
                        self._handle(event, time.monotonic())
                    if self._stop.is_set():
                        return
            except urllib3.exceptions.ReadTimeoutError as exc:  # only the watch may be silent; a list may not
                raise _Silent from exc
        finally:
            self._hold_stream(None)
            stream.close()
        if initial is not None:
            raise _Silent  # the stream ended before the initial set did: start over

    def _initial_event(self, event: Mapping[str, Any], records: dict[str, Record]) -> bool:
        """Collect one event of a streaming list's initial set; True at the bookmark that ends it."""
        kind = event.get("type")
        obj = event.get("object") or {}
        meta = obj.get("metadata") or {}
        if kind == "BOOKMARK":
            if (meta.get("annotations") or {}).get(INITIAL_EVENTS_END) == "true":
                self.resource_version = meta.get("resourceVersion", "") or self.resource_version
                return True
            return False
        if kind == "ADDED":
            record = self._parse(obj)
            if record is not None:
                records[self.target.source.key(obj)] = record
            return False
        self._handle(event, time.monotonic())  # an ERROR raises; nothing else belongs in the initial set
        return False

    def _handle(self, event: Mapping[str, Any], received: float) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise _Gone
            raise ApiError(int(code or 500), str(obj.get("reason", "")), str(obj.get("message", "watch error")), obj)
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            if rv:
                self.resource_version = rv
            return
        if kind in ("ADDED", "MODIFIED"):
            record = self._parse(obj)
            if record is not None:
                self.store.upsert(self.target.source.key(obj), record, received)
        elif kind == "DELETED":
            self.store.delete(self.target.source.key(obj), received)
        else:
            self.log.warning("unknown watch event type ignored", type=kind)
            return
        if rv:
            self.resource_version = rv
        self.metrics.events_applied.labels(self.target.name, kind.lower()).inc()
        for observer in self.observers:
            try:
                observer(kind, obj)
            except Exception:  # an observer's bug must not end the watch for everyone
                self.log.exception("watch observer failed", observer=getattr(observer, "__qualname__", repr(observer)))

    def _parse(self, obj: Mapping[str, Any]) -> Record | None:
        """The object's record; None (logged, skipped) if the parser fails, which it is written never to do."""
        meta = obj.get("metadata") or {}
        try:
            record = self.target.source.parse(obj)
        except Exception:
            self.log.exception(
                f"cannot parse this {self.target.source.noun}; skipping it",
                object=f"{meta.get('namespace', '')}/{meta.get('name', '')}",
            )
            return None
        if record.problem:
            self.log.warning(
                f"invalid {self.target.source.noun}; keeping the last valid data of this pod incarnation",
                object=f"{meta.get('namespace', '')}/{meta.get('name', '')}",
                reason=record.problem,
            )
        return record
