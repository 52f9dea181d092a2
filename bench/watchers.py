"""Many sidecars' watches in one process: the requests a sidecar makes, without the sidecar.

``python -m bench.watchers --server URL --token-file F --ca CA --namespace NS --watchers N`` opens, for
each simulated sidecar, the two watches ``sidecar/kube/reflector.py`` opens, with the same requests:

* ``--initial stream`` (the default, as the sidecar's ``DISCOVERY_INITIAL_LIST=stream``): a streaming
  list, one WATCH with ``sendInitialEvents=true&resourceVersionMatch=NotOlderThan`` (and
  ``resourceVersion=""``), whose initial events end with a bookmark annotated
  ``k8s.io/initial-events-end``, and which goes on as the watch;
* ``--initial list`` (``DISCOVERY_INITIAL_LIST=pages``): a paginated, consistent LIST (``limit=500``,
  ``continue``), then a WATCH from the list's resourceVersion;
* every WATCH with ``allowWatchBookmarks=true`` and ``timeoutSeconds`` in 300-600; ``410 Gone`` syncs
  again, a watch ended by the server is resumed from the last resourceVersion;
* one watch of the EndpointSlices of ``--slice-selector``, one of the DynamoWorkerMetadata CRs
  (``--cr-selector``: the sidecar's ``DISCOVERY_PEER_SELECTOR``, empty by default), in ``--namespace``.

Besides those peer watchers, ``--own-names-file`` (a JSON list of CR names) starts one *own-registration*
watcher per name: the watch every sidecar holds of its own CR whatever ``DISCOVERY_WATCH`` says
(``sidecar/kube/own_registration.py``): the CR collection with ``fieldSelector=metadata.name=<name>``,
the same initial sync, bookmarks and timeout. Its bytes, events and requests are counted under the
resource ``own-registration``.

``tests/unit/test_bench_watchers.py`` checks these against the sidecar's reflectors; ``bench.cost``
checks them against a real sidecar in the API server's audit log.

It speaks HTTP/1.1 over TLS (as the sidecar's urllib3 does) with the standard library's asyncio
streams and counts what a sidecar would receive: response bytes (headers, chunk framing and bodies,
before TLS), events by type, requests by verb. It decodes only what it needs: the lists (JSON) and, per
watch event, the object's name and resourceVersion, found by a byte search in the event line (the API
server writes compact JSON, and metadata's ``name`` and ``resourceVersion`` are the first such keys in
every object of both kinds, so the whole 25 KB slice is never parsed). Each watcher keeps, per resource,
name -> resourceVersion, which the driver compares with a LIST of the truth to decide that the watcher
has converged.

Commands, one JSON object per line on stdin; one JSON reply per line on stdout:

* ``{"cmd": "wait_ready"}``: reply once every watcher holds both watches (after its initial sync);
* ``{"cmd": "restart", "ids": [3, 7]}``: those watchers drop their watches and sync again from
  scratch, as a replaced pod's new sidecar does;
* ``{"cmd": "start", "ids": ["web-6d9f-abcde"]}`` / ``{"cmd": "stop", "ids": [...]}``: watchers by name come
  and go with the pods they stand for (``bench.rollout``: a new pod's sidecar starts, an old one's stops);
  ``start`` replies at once, a following ``wait_ready`` once they have synced;
* ``{"cmd": "restart_own", "ids": [3], "names": ["peer-00003-g1"]}``: those own-registration watchers
  follow the new pod's CR from scratch (a replaced pod's new sidecar watching its own CR);
* ``{"cmd": "stats"}``: the counters;
* ``{"cmd": "converge", "truth": {"endpointslices": {name: rv}, ...}, "timeout": 120}``: wait until every
  watcher's state equals the truth; reply with each watcher's time of its last change
  (``time.monotonic()``, which is system-wide on Linux, so the driver can compare it with its own);
  with ``--peers`` and ``"peers": {pod name: "READY" | "DRAINING"}`` also until each watcher's peer set
  is that, replying with each watcher's time of its last peer-set change (``last_peer_change``, by id).

With ``--peers`` each watcher also keeps the peer set a sidecar would serve from what it received
(``PeerView``: pods live in a slice, ready or serving while terminating, that have a CR of their name),
to time when it reached the final set. A slice is decoded once per (name, resourceVersion) for all
watchers (``SliceCache``): every watcher receives the same event.
* ``{"cmd": "quit"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import pathlib
import random
import ssl
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

SLICES = "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"
CRS = "/apis/nvidia.com/v1alpha1/namespaces/{ns}/dynamoworkermetadatas"
RESOURCES = ("endpointslices", "dynamoworkermetadatas")
OWN = "own-registration"  # the resource label of the own-registration watches (their path is the CRs')

_NAME = b'"name":"'
_RV = b'"resourceVersion":"'
_TYPE = b'{"type":"'


def normalise(uri: str) -> str:
    """A request URI with the values that differ between two runs of the same request replaced."""
    split = urlsplit(uri)
    query = []
    for key, value in sorted(parse_qsl(split.query, keep_blank_values=True)):
        if key == "resourceVersion" and value:
            value = "<rv>"
        elif key == "continue":
            value = "<token>"
        elif key == "timeoutSeconds" and value.isdigit() and 300 <= int(value) < 600:
            value = "<300-600>"
        query.append(f"{key}={value}")
    return split.path + ("?" + "&".join(query) if query else "")


class Gone(Exception):
    """410: the resourceVersion is compacted away; relist."""


class Cut(Exception):
    """A streaming list ended before its initial-events-end bookmark (the server closed a slow watcher):
    what it sent is not the whole state, so the sync starts again, as the sidecar's reflector does."""


class HttpError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300]!r}")
        self.status = status


def _field(line: bytes, key: bytes, start: int = 0) -> str:
    at = line.find(key, start)
    if at < 0:
        return ""
    at += len(key)
    end = line.find(b'"', at)
    return line[at:end].decode()


def _condition(conditions: dict[str, Any], name: str, default: bool) -> bool:
    value = conditions.get(name)
    return default if value is None else bool(value)


def live_endpoints(item: Mapping[str, Any]) -> dict[str, str]:
    """pod name -> READY or DRAINING for the endpoints of one EndpointSlice that count towards a peer, by the
    sidecar's rule (``sidecar.core.records.EndpointEntry.live``: ready, or serving and terminating)."""
    live: dict[str, str] = {}
    for endpoint in item.get("endpoints") or ():
        name = (endpoint.get("targetRef") or {}).get("name")
        conditions = endpoint.get("conditions") or {}
        ready = _condition(conditions, "ready", False)
        serving = _condition(conditions, "serving", ready)
        if name and (ready or (serving and _condition(conditions, "terminating", False))):
            live[name] = "READY" if ready else "DRAINING"
    return live


class SliceCache:
    """(slice name, resourceVersion) -> its live endpoints, decoded once for every watcher (bounded)."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self.items: dict[tuple[str, str], dict[str, str]] = {}
        self.decoded = 0

    def get(self, name: str, rv: str, line: bytes) -> dict[str, str]:
        key = (name, rv)
        found = self.items.get(key)
        if found is None:
            found = live_endpoints(json.loads(line).get("object") or {})
            self.decoded += 1
            self.items[key] = found
            if len(self.items) > self.size:
                self.items.pop(next(iter(self.items)))
        return found


EMPTY: dict[str, str] = {}


class PeerView:
    """The peer set one simulated sidecar would serve, and when it last changed (``changed_at``).

    Fed from the watches' committed state: per slice its live endpoints, and the names of the CRs.
    A peer is a live pod with a CR of its name (the sidecar also matches the CR's owner UID; a
    Deployment's pod names are unique, so the name is enough here)."""

    def __init__(self) -> None:
        self.slices: dict[str, dict[str, str]] = {}
        self.crs: set[str] = set()
        self.changed_at = 0.0
        self._cached: dict[str, str] | None = None  # peers(), until the next change of slices or CRs

    def peers(self) -> dict[str, str]:
        if self._cached is None:
            self._cached = self._peers()
        return self._cached

    def _peers(self) -> dict[str, str]:
        live: dict[str, str] = {}
        for endpoints in self.slices.values():
            for pod, state in endpoints.items():
                if live.get(pod) != "READY":
                    live[pod] = state
        return {pod: state for pod, state in live.items() if pod in self.crs}

    def _live(self, pod: str) -> bool:
        return any(pod in endpoints for endpoints in self.slices.values())

    def set_slice(self, name: str, endpoints: dict[str, str] | None) -> None:
        self._cached = None
        old = self.slices.get(name, EMPTY)
        new = EMPTY if endpoints is None else endpoints
        if endpoints is None:
            self.slices.pop(name, None)
        else:
            self.slices[name] = endpoints
        if old is not new and any(pod in self.crs for pod, _ in old.items() ^ new.items()):
            self.changed_at = time.monotonic()

    def set_cr(self, name: str, present: bool, modified: bool = False) -> None:
        if present == (name in self.crs) and not modified:
            return
        self._cached = None
        if present:
            self.crs.add(name)
        else:
            self.crs.discard(name)
        if self._live(name):
            self.changed_at = time.monotonic()

    def replace(self, slices: dict[str, dict[str, str]] | None = None, crs: set[str] | None = None) -> None:
        """A fresh sync of one resource: changed if the peer set differs from before."""
        before = self.peers()
        self._cached = None
        if slices is not None:
            self.slices = slices
        if crs is not None:
            self.crs = crs
        if self.peers() != before:
            self.changed_at = time.monotonic()


@dataclass
class Totals:
    """What every watcher together received; the driver reads differences across a phase."""

    bytes: Counter[str] = field(default_factory=Counter)  # resource -> response bytes
    events: Counter[str] = field(default_factory=Counter)  # "resource TYPE" -> events
    requests: Counter[str] = field(default_factory=Counter)  # "VERB resource" -> requests
    errors: Counter[str] = field(default_factory=Counter)


class Connection:
    """One keep-alive HTTP/1.1 connection over TLS, counting the bytes it reads."""

    def __init__(self, sim: Simulator, resource: str) -> None:
        self.sim = sim
        self.resource = resource
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _read(self, n: int) -> bytes:
        assert self.reader is not None
        data = await self.reader.readexactly(n)
        self.sim.totals.bytes[self.resource] += n
        return data

    async def _readline(self) -> bytes:
        assert self.reader is not None
        data = await self.reader.readuntil(b"\r\n")
        self.sim.totals.bytes[self.resource] += len(data)
        return data

    async def open(self) -> None:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(
                self.sim.host, self.sim.port, ssl=self.sim.ssl, server_hostname=self.sim.host if self.sim.ssl else None
            )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, path: str, query: list[tuple[str, str]]) -> tuple[int, dict[str, str]]:
        """Send a GET; return the status and headers (the body is read by ``body`` or ``chunks``)."""
        await self.open()
        assert self.writer is not None
        target = path + ("?" + urlencode(query) if query else "")
        self.writer.write(
            f"GET {target} HTTP/1.1\r\nHost: {self.sim.host}:{self.sim.port}\r\n"
            f"Authorization: Bearer {self.sim.token}\r\nAccept: application/json\r\n"
            f"User-Agent: bench-watchers/1\r\n\r\n".encode()
        )
        await self.writer.drain()
        status_line = await self._readline()
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():  # the server closed the connection mid-reply
            raise ConnectionResetError(f"no HTTP status line: {status_line[:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        while True:
            line = await self._readline()
            if line == b"\r\n":
                break
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        return status, headers

    async def chunks(self, headers: dict[str, str]) -> AsyncIterator[bytes]:
        """The body's pieces as they arrive (chunked or Content-Length)."""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await self._readline()).split(b";")[0], 16)
                if size == 0:
                    await self._readline()  # the empty trailer
                    return
                data = await self._read(size)
                await self._readline()
                yield data
        else:
            length = int(headers.get("content-length", "0"))
            if length:
                yield await self._read(length)

    async def body(self, headers: dict[str, str]) -> bytes:
        return b"".join([piece async for piece in self.chunks(headers)])


class Watch:
    """One sidecar's watch of one resource: list (or streaming list), then watch, forever."""

    def __init__(
        self,
        sim: Simulator,
        watcher: Watcher | OwnWatcher,
        resource: str,
        path: str,
        selector: str,
        field_selector: str = "",
    ) -> None:
        self.sim = sim
        self.watcher = watcher
        self.resource = resource
        self.path = path
        self.selector = selector
        self.field_selector = field_selector
        self.state: dict[str, str] = {}  # name -> resourceVersion
        self.rv = ""
        self.synced = asyncio.Event()
        self.conn = Connection(sim, resource)

    def _query(self) -> list[tuple[str, str]]:
        query = [("labelSelector", self.selector)] if self.selector else []
        return query + ([("fieldSelector", self.field_selector)] if self.field_selector else [])

    def _changed(self) -> None:
        self.watcher.last_change = time.monotonic()

    async def run(self) -> None:
        need_sync = True
        backoff = 0.2
        while True:
            try:
                if need_sync:
                    if self.sim.initial == "stream":
                        await self._watch(stream=True)  # returns only when the server ends the watch
                    else:
                        await self._list()
                    need_sync = False
                    if self.sim.initial == "stream":
                        continue
                await self._watch(stream=False)
                backoff = 0.2
            except Gone:
                self.sim.totals.errors[f"{self.resource} 410"] += 1
                need_sync = True
            except Cut:
                self.sim.totals.errors[f"{self.resource} initial list cut"] += 1
                self.conn.close()
                await asyncio.sleep(backoff * (1 + random.random()))  # jittered backoff, as the sidecar
                backoff = min(backoff * 2, 2.0)
            except asyncio.CancelledError:
                self.conn.close()
                raise
            except Exception as exc:  # noqa: BLE001 - counted; a simulated sidecar keeps trying, as the sidecar
                self.sim.totals.errors[f"{self.resource} {type(exc).__name__}"] += 1
                self.conn.close()
                await asyncio.sleep(backoff * (1 + random.random()))  # jittered backoff, as the sidecar
                backoff = min(backoff * 2, 2.0)

    async def _list(self) -> None:
        state: dict[str, str] = {}
        live: dict[str, dict[str, str]] = {}
        token = ""
        while True:
            query = self._query() + [("limit", str(self.sim.page_size))]
            if token:
                query.append(("continue", token))
            self.sim.totals.requests[f"LIST {self.resource}"] += 1
            status, headers = await self.conn.request(self.path, query)
            body = await self.conn.body(headers)
            if status == 410 and token:
                state, live, token = {}, {}, ""
                continue
            if status != 200:
                raise HttpError(status, body)
            page = json.loads(body)
            for item in page.get("items") or ():
                meta = item["metadata"]
                state[meta["name"]] = meta["resourceVersion"]
                if self.resource == "endpointslices" and self.sim.track_peers:
                    live[meta["name"]] = live_endpoints(item)
            meta = page.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                break
        self.rv = meta.get("resourceVersion", "")
        if state != self.state:
            self.state = state
            self._changed()
        self._replace_peers(state, live)
        self.synced.set()

    def _replace_peers(self, state: dict[str, str], live: dict[str, dict[str, str]]) -> None:
        view = self.watcher.peers
        if view is None:
            return
        if self.resource == "endpointslices":
            view.replace(slices=live)
        else:
            view.replace(crs=set(state))

    async def _watch(self, stream: bool) -> None:
        query = self._query() + [("watch", "1"), ("allowWatchBookmarks", "true")]
        view = self.watcher.peers
        slices = self.resource == "endpointslices"
        if stream:
            query += [("sendInitialEvents", "true"), ("resourceVersionMatch", "NotOlderThan"), ("resourceVersion", "")]
            initial: dict[str, str] = {}
            initial_live: dict[str, dict[str, str]] = {}
        else:
            query.append(("resourceVersion", self.rv))
        query.append(("timeoutSeconds", str(int(300 * (1 + random.random())))))
        self.sim.totals.requests[f"WATCH {self.resource}"] += 1
        status, headers = await self.conn.request(self.path, query)
        if status != 200:
            body = await self.conn.body(headers)
            if status == 410:
                raise Gone
            raise HttpError(status, body)
        if not stream:
            self.synced.set()
        buffer = b""
        async for piece in self.conn.chunks(headers):
            buffer += piece
            while True:
                end = buffer.find(b"\n")
                if end < 0:
                    break
                line, buffer = buffer[:end], buffer[end + 1 :]
                if not line.strip():
                    continue
                kind = _field(line, _TYPE)
                self.sim.totals.events[f"{self.resource} {kind}"] += 1
                if kind == "ERROR":
                    if b'"code":410' in line:
                        raise Gone
                    raise HttpError(int(json.loads(line)["object"].get("code") or 500), line)
                rv = _field(line, _RV)
                if kind == "BOOKMARK":
                    if rv:
                        self.rv = rv
                    if stream and b"k8s.io/initial-events-end" in line:
                        stream = False
                        if initial != self.state:
                            self.state = initial
                            self._changed()
                        self._replace_peers(initial, initial_live)
                        self.synced.set()
                    continue
                name = _field(line, _NAME)
                target = initial if stream else self.state
                if kind in ("ADDED", "MODIFIED"):
                    target[name] = rv
                elif kind == "DELETED":
                    target.pop(name, None)
                if rv:
                    self.rv = rv
                if view is not None:
                    live = None if kind == "DELETED" or not slices else self.sim.slice_cache.get(name, rv, line)
                    if stream:
                        if slices and live is not None:
                            initial_live[name] = live
                        elif slices:
                            initial_live.pop(name, None)
                    elif slices:
                        view.set_slice(name, live)
                    else:
                        view.set_cr(name, kind != "DELETED", modified=kind == "MODIFIED")
                if not stream:
                    self._changed()
        if stream:
            raise Cut
        # the server ended the watch (timeoutSeconds): the caller re-watches from self.rv


class Watcher:
    """One simulated sidecar: its two watches (and, with ``--peers``, the peer set it would serve)."""

    def __init__(self, sim: Simulator, index: str) -> None:
        self.sim = sim
        self.index = index
        self.last_change = 0.0
        self.peers: PeerView | None = PeerView() if sim.track_peers else None
        self.stopped = False
        self.watches: list[Watch] = []
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        ns = self.sim.namespace
        self.watches = [
            Watch(self.sim, self, "endpointslices", SLICES.format(ns=ns), self.sim.slice_selector),
            Watch(self.sim, self, "dynamoworkermetadatas", CRS.format(ns=ns), self.sim.cr_selector),
        ]
        self.tasks = [asyncio.create_task(w.run()) for w in self.watches]

    async def stop(self) -> None:
        self.stopped = True
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):  # a watch that died is stopped too
                await task
        for watch in self.watches:
            watch.conn.close()
            watch.synced.set()  # whoever waits for this watcher's sync (start-up's slot) stops waiting

    async def synced(self) -> None:
        for watch in self.watches:
            await watch.synced.wait()

    def matches(self, truth: dict[str, dict[str, str]]) -> bool:
        return bool(self.watches) and all(w.state == truth.get(w.resource, {}) for w in self.watches)


class OwnWatcher:
    """One simulated sidecar's watch of its own CR alone (by field selector on the name)."""

    def __init__(self, sim: Simulator, index: int, name: str) -> None:
        self.sim = sim
        self.index = index
        self.name = name
        self.last_change = 0.0
        self.peers: PeerView | None = None  # it follows one CR, not the peer set
        self.stopped = False
        self.watches: list[Watch] = []
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        path = CRS.format(ns=self.sim.namespace)
        self.watches = [Watch(self.sim, self, OWN, path, "", f"metadata.name={self.name}")]
        self.tasks = [asyncio.create_task(w.run()) for w in self.watches]

    async def stop(self) -> None:
        self.stopped = True
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):  # a watch that died is stopped too
                await task
        for watch in self.watches:
            watch.conn.close()
            watch.synced.set()  # whoever waits for this watcher's sync (start-up's slot) stops waiting

    async def synced(self) -> None:
        for watch in self.watches:
            await watch.synced.wait()

    def matches(self, truth: dict[str, dict[str, str]]) -> bool:
        crs = truth.get("dynamoworkermetadatas", {})
        want = {self.name: crs[self.name]} if self.name in crs else {}
        return all(w.state == want for w in self.watches)


class Simulator:
    def __init__(self, args: argparse.Namespace) -> None:
        split = urlsplit(args.server)
        self.host = split.hostname or "127.0.0.1"
        self.port = split.port or 443
        self.token = pathlib.Path(args.token_file).read_text().strip()
        self.ssl: ssl.SSLContext | None = None
        if split.scheme == "https":
            self.ssl = ssl.create_default_context(cafile=args.ca)
            self.ssl.set_alpn_protocols(["http/1.1"])  # as the sidecar's urllib3: no HTTP/2
        self.namespace = args.namespace
        self.slice_selector = args.slice_selector
        self.cr_selector = args.cr_selector
        self.initial = args.initial
        self.page_size = args.page_size
        self.concurrency = asyncio.Semaphore(args.start_concurrency)
        self.totals = Totals()
        self.track_peers = args.peers
        self.slice_cache = SliceCache()
        self.watchers: dict[str, Watcher] = {str(i): Watcher(self, str(i)) for i in range(args.watchers)}
        self.starting: list[asyncio.Future[None]] = []
        names = json.loads(pathlib.Path(args.own_names_file).read_text()) if args.own_names_file else []
        self.own = [OwnWatcher(self, i, name) for i, name in enumerate(names)]

    async def _start_one(self, watcher: Watcher | OwnWatcher) -> None:
        # Bounded start-up concurrency: the pods of a fleet do not all start in the same millisecond.
        async with self.concurrency:
            if watcher.stopped:  # stopped (its pod gone) before its turn came
                return
            watcher.start()
            await watcher.synced()

    async def start(self) -> None:
        """Start every watcher; return when each holds both watches (after its initial sync)."""
        await asyncio.gather(*(self._start_one(w) for w in self.everyone()))

    async def stop(self) -> None:
        for watcher in self.everyone():
            await watcher.stop()

    def everyone(self) -> list[Watcher | OwnWatcher]:
        return [*self.watchers.values(), *self.own]

    async def serve(self) -> None:
        starting = asyncio.ensure_future(self.start())
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader(limit=2**28)  # a converge command carries every object's name and version
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        while True:
            line = await stdin.readline()
            if not line:
                break
            command = json.loads(line)
            cmd = command["cmd"]
            reply: dict[str, Any] = {"cmd": cmd}
            if cmd == "wait_ready":
                await starting
                await asyncio.gather(*self.starting)
                self.starting = []
                reply["t"] = time.monotonic()
            elif cmd == "restart":
                for index in command["ids"]:
                    watcher = self.watchers[str(index)]
                    await watcher.stop()
                    fresh = Watcher(self, str(index))
                    self.watchers[str(index)] = fresh
                    fresh.start()
                reply["t"] = time.monotonic()
            elif cmd == "start":
                for index in command["ids"]:
                    if str(index) not in self.watchers:
                        fresh = Watcher(self, str(index))
                        self.watchers[str(index)] = fresh
                        self.starting.append(asyncio.ensure_future(self._start_one(fresh)))
                reply["t"] = time.monotonic()
            elif cmd == "stop":
                for index in command["ids"]:
                    gone = self.watchers.pop(str(index), None)
                    if gone is not None:
                        await gone.stop()
                reply["t"] = time.monotonic()
            elif cmd == "restart_own":
                for index, name in zip(command["ids"], command["names"], strict=True):
                    await self.own[index].stop()
                    own = OwnWatcher(self, index, name)
                    self.own[index] = own
                    own.start()
                reply["t"] = time.monotonic()
            elif cmd == "stats":
                reply["stats"] = self.stats()
            elif cmd == "converge":
                reply.update(
                    await self.converge(command["truth"], float(command.get("timeout", 120)), command.get("peers"))
                )
            elif cmd == "quit":
                break
            print(json.dumps(reply), flush=True)
        starting.cancel()
        await self.stop()

    def stats(self) -> dict[str, Any]:
        return {
            "bytes": dict(self.totals.bytes),
            "events": dict(self.totals.events),
            "requests": dict(self.totals.requests),
            "errors": dict(self.totals.errors),
            "watchers": len(self.watchers),
            "slices_decoded": self.slice_cache.decoded,
            "t": time.monotonic(),
        }

    async def converge(
        self, truth: dict[str, dict[str, str]], timeout: float, peers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Wait (checking after each batch of the event loop's work) until every watcher matches the truth
        (and, given ``peers``, serves exactly that peer set)."""
        deadline = time.monotonic() + timeout

        def lag(watcher: Watcher) -> str:
            """Why ``watcher`` has not converged ("" when it has)."""
            if not watcher.watches:
                return "not started"
            if not all(w.synced.is_set() for w in watcher.watches):
                return "not synced"
            if not watcher.matches(truth):
                return "objects differ"
            if peers is not None and (watcher.peers is None or watcher.peers.peers() != peers):
                return "peer set differs"
            return ""

        while True:
            began = time.monotonic()
            lags = {w.index: lag(w) for w in self.watchers.values()}
            behind = [index for index, why in lags.items() if why]
            behind_own = [w.index for w in self.own if not w.matches(truth)]
            if not (behind or behind_own) or time.monotonic() > deadline:
                break
            # poll: the watchers' tasks advance between checks, given at least as long as a check took
            await asyncio.sleep(max(0.05, time.monotonic() - began))
        reply: dict[str, Any] = {
            "converged": not (behind or behind_own),
            "behind": behind[:20],
            "behind_count": len(behind),
            "behind_why": dict(Counter(why for why in lags.values() if why)),
            "behind_own_count": len(behind_own),
            "last_change": [w.last_change for w in self.watchers.values()],
            "own_last_change": [w.last_change for w in self.own],
        }
        if peers is not None:
            reply["last_peer_change"] = {w.index: w.peers.changed_at for w in self.watchers.values() if w.peers}
        return reply


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="https://host:port (http:// for a test's fake server)")
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--ca", default=None)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--watchers", type=int, required=True)
    parser.add_argument("--slice-selector", default="")
    parser.add_argument("--cr-selector", default="")
    parser.add_argument(
        "--initial",
        choices=("list", "stream"),
        default="stream",
        help="stream: DISCOVERY_INITIAL_LIST=stream; list: =pages",
    )
    parser.add_argument(
        "--own-names-file", default="", help="a JSON list of CR names: one own-registration watcher for each"
    )
    parser.add_argument("--page-size", type=int, default=500)
    parser.add_argument("--start-concurrency", type=int, default=50)
    parser.add_argument(
        "--peers", action="store_true", help="keep each watcher's peer set (PeerView), to time its convergence"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    asyncio.run(Simulator(parse_args(argv)).serve())


if __name__ == "__main__":
    main()
