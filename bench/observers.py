"""The watchers under comparison, each recording when every event reached it.

* ``sidecar``: a real ``discovery-sidecar run`` process; events are what arrives on its WatchPeers
  stream at a client in this process (so the gRPC hop is included).
* ``raw-watch`` (the floor), ``client-go-informer`` and ``kube-rs-reflector``: small Go and Rust
  programs (bench/baselines/) that print one JSON line per event, flushed at once.

All clocks are this machine's wall clock (``time.time_ns()``, Go's ``UnixNano``, Rust's
``SystemTime``), so arrival times are comparable with the harness's write times.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from devcluster.sidecars import SidecarProcess
from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.client import DiscoveryClient, PeerSetView


@dataclass(frozen=True)
class Record:
    t: int  # arrival, ns since the epoch
    src: str  # endpointslices, dynamoworkermetadatas, or peer (the sidecar's stream)
    type: str
    name: str
    seq: int | None = None
    ready: frozenset[str] | None = None  # slices: names of ready endpoints
    state: str | None = None  # peers: READY / DRAINING


class Observer:
    name = "observer"

    def __init__(self) -> None:
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self._new = threading.Condition(self._lock)
        self.started_ns = 0
        self.synced_ns: int | None = None
        self.process: psutil.Process | None = None

    def add(self, record: Record) -> None:
        with self._new:
            self.records.append(record)
            self._new.notify_all()

    def wait_for(self, predicate: Callable[[Record], bool], after_ns: int, timeout: float) -> Record | None:
        """The first record at or after ``after_ns`` that satisfies ``predicate``, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        index = 0
        with self._new:
            while True:
                records = self.records
                while index < len(records):
                    record = records[index]
                    index += 1
                    if record.t >= after_ns and predicate(record):
                        return record
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._new.wait(remaining)

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._new:
            while self.synced_ns is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._new.wait(remaining)
        return True

    def rss_bytes(self) -> int:
        return self.process.memory_info().rss if self.process else 0

    def cpu_seconds(self) -> float:
        if self.process is None:
            return 0.0
        times = self.process.cpu_times()
        return times.user + times.system

    def count(self, src: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.records if src is None or r.src == src)

    def stop(self) -> None:
        raise NotImplementedError


class LineObserver(Observer):
    """A baseline program that prints one JSON object per event (see bench/baselines/)."""

    def __init__(self, name: str, argv: list[str], log_dir: pathlib.Path) -> None:
        super().__init__()
        self.name = name
        self.argv = argv
        self.log_dir = log_dir
        self._synced_sources: set[str] = set()
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> LineObserver:
        self.started_ns = time.time_ns()
        stderr = (self.log_dir / f"{self.name}.stderr").open("ab")
        self._popen = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL)
        stderr.close()
        self.process = psutil.Process(self._popen.pid)
        threading.Thread(target=self._read, name=f"read-{self.name}", daemon=True).start()
        return self

    def _read(self) -> None:
        assert self._popen is not None and self._popen.stdout is not None
        for raw in self._popen.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if line.get("type") == "SYNCED":
                self._synced_sources.add(line["src"])
                if len(self._synced_sources) == 2:
                    with self._new:
                        self.synced_ns = int(line["t"])
                        self._new.notify_all()
                continue
            ready = line.get("ready")
            self.add(
                Record(
                    t=int(line["t"]),
                    src=line["src"],
                    type=line["type"],
                    name=line.get("name") or "",
                    seq=line.get("seq"),
                    ready=frozenset(ready) if ready is not None else None,
                )
            )

    def stop(self) -> None:
        if self._popen is not None and self._popen.poll() is None:
            self._popen.terminate()
            try:
                self._popen.wait(10)
            except subprocess.TimeoutExpired:
                self._popen.kill()


class SidecarObserver(Observer):
    """A real sidecar process, observed through its WatchPeers stream."""

    name = "sidecar"

    def __init__(self, process: SidecarProcess) -> None:
        super().__init__()
        self.sidecar = process
        self.client: DiscoveryClient | None = None
        self.status_records: list[tuple[int, bool]] = []

    def start(self) -> SidecarObserver:
        self.started_ns = time.time_ns()
        self.sidecar.start()
        assert self.sidecar.process is not None
        self.process = psutil.Process(self.sidecar.process.pid)
        self.client = DiscoveryClient(self.sidecar.target)
        threading.Thread(target=self._read, name="read-sidecar", daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.client is not None
        view = PeerSetView()
        try:
            for update in self.client.watch(pb.PeerFilter(), view=view, max_backoff=0.2):
                now = time.time_ns()
                if update.kind == "snapshot" and self.synced_ns is None:
                    with self._new:
                        self.synced_ns = now
                        self._new.notify_all()
                    continue
                if update.kind in ("status", "resumed"):
                    self.status_records.append((now, update.connected))
                for kind, peers in (("ADDED", update.added), ("UPDATED", update.updated), ("REMOVED", update.removed)):
                    for peer in peers:
                        seq = self.seq_of(peer) if kind != "REMOVED" and peer.data_json else None
                        self.add(
                            Record(
                                t=now,
                                src="peer",
                                type=kind,
                                name=peer.name,
                                seq=seq,
                                state=pb.PeerState.Name(peer.state),
                            )
                        )
        except Exception:  # noqa: BLE001 - the stream ends when the sidecar is stopped
            return

    def seq_of(self, peer: pb.Peer) -> int | None:
        """The write sequence number the workload put into the peer's data (``seq`` at its top)."""
        seq = json.loads(peer.data_json).get("seq")
        return seq if isinstance(seq, int) else None

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        self.sidecar.terminate(timeout=30)
