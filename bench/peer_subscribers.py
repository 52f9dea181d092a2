"""Many ``WatchPeers`` subscribers in one process: the relay arm's subscribers (issue #23).

``python -m bench.peer_subscribers --targets HOST:PORT[,HOST:PORT...]`` follows, for each subscriber id
it is told to start, one ``WatchPeers`` stream, spread round-robin over the targets (relay replicas, or
any sidecar: the API is the same). Each subscriber keeps its peer set as the client library's
``PeerSetView`` would, reduced to what the benchmark compares (``LeanPeerSet``: pod UID -> name and state,
shared between subscribers), and, when its stream fails, resumes (history id and revision) on the next
target, as a sidecar following relays moves to another replica: with the sidecar's channel options
(``sidecar.kube.upstream.CHANNEL_OPTIONS``: its connect deadline and keepalive) and its rotation and backoff
(``sidecar.core.failover``), so a failover storm here is the one sidecars would make. ``--processes N``
spreads the subscribers over N worker processes behind the same commands (``Workers``).

It answers the JSON-lines commands of ``bench.watchers`` (``bench.rollout.ProcessSubscribers`` drives
both): ``start``/``stop`` with ``ids``, ``wait_ready`` (every started subscriber has its first snapshot),
``stats``, ``converge`` with ``peers`` (pod name -> READY/DRAINING; ``truth``, the API server's
resourceVersions, does not apply here), ``pids`` (the worker processes, for their CPU and memory) and
``quit``. Bytes counted are what the subscribers received: each message's protobuf size plus gRPC's 5-byte
frame header (before HTTP/2 and TLS), the relays' egress.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import pathlib
import sys
import time
from collections import Counter
from typing import Any

import grpc
import grpc.aio

from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from sidecar.core.backoff import Backoff
from sidecar.core.failover import ReplicaRotation
from sidecar.kube.upstream import CHANNEL_OPTIONS, REFUSALS

STATES = {pb.PEER_STATE_READY: "READY", pb.PEER_STATE_DRAINING: "DRAINING"}
WATCH_PEERS = "/discovery.v1.Discovery/WatchPeers"

Entry = tuple[str, str]
"""What a subscriber keeps of one peer: its name and state ("READY", "DRAINING", "UNKNOWN")."""


class Interned:
    """One copy of each pod UID and (name, state) pair for every subscriber of the process.

    Each of ``P`` subscribers holds the same ``P`` peers: sharing the strings and pairs leaves a subscriber
    only its dict's slots (~25 bytes a peer), where a ``pb.Peer`` of its own, even stripped to three
    fields, costs about 1.2 KB (an arena of its own)."""

    def __init__(self) -> None:
        self._values: dict[object, object] = {}

    def uid(self, uid: str) -> str:
        return self._values.setdefault(uid, uid)  # type: ignore[return-value]

    def entry(self, name: str, state: int) -> Entry:
        pair = (name, STATES.get(state, "UNKNOWN"))
        return self._values.setdefault(pair, pair)  # type: ignore[return-value]


class LeanPeerSet:
    """A subscriber's peer set, reduced to what the benchmark reads: pod UID -> (name, state).

    The same semantics as the client library's ``PeerSetView`` (which ``tests/unit/test_peer_subscribers``
    checks it against): the parts of a change (``partial``) are gathered and applied together, a snapshot
    replaces the set in its order, a delta's events apply in order (REMOVED pops, ADDED/UPDATED store),
    the resume position (revision, history id) moves only once a change is complete, and a resume request
    drops an incomplete change. What differs is what is kept: a pair per peer, shared through ``Interned``,
    not the decoded message; parts are folded in as they arrive instead of being held."""

    def __init__(self, interned: Interned) -> None:
        self.interned = interned
        self.peers: dict[str, Entry] = {}
        self.revision = 0
        self.history_id = ""
        self.version = 0  # counts the completed changes that touched the set (snapshots and deltas)
        self._snapshot: list[tuple[str, Entry]] = []  # the peers of an incomplete snapshot's parts
        self._events: list[tuple[bool, str, Entry]] = []  # (removed, uid, entry) of an incomplete delta's parts

    def names(self) -> dict[str, str]:
        """Pod name -> state, what the benchmark compares with the truth (a later UID of a name wins)."""
        return dict(self.peers.values())

    def apply(self, message: pb.WatchPeersResponse) -> bool | None:
        """Apply one message; None mid-change, else whether the peer set changed: for a snapshot, whether
        the names and states differ from before (a new replica's snapshot after a failover may change
        nothing); for a delta, whether it carried any event (as ``PeerSetUpdate``'s lists would)."""
        interned = self.interned
        for peer in message.snapshot.peers:
            self._snapshot.append((interned.uid(peer.uid), interned.entry(peer.name, peer.state)))
        for event in message.delta.events:
            peer = event.peer
            entry = interned.entry(peer.name, peer.state)
            self._events.append((event.type == pb.EVENT_TYPE_REMOVED, interned.uid(peer.uid), entry))
        if message.partial:
            return None
        snapshot, self._snapshot = self._snapshot, []
        events, self._events = self._events, []
        kind = message.WhichOneof("kind") or ""
        changed = False
        if kind == "snapshot":
            before = self.names()
            self.peers = dict(snapshot)
            changed = before != self.names()
            self.version += 1
        elif kind == "delta":
            for removed, uid, entry in events:
                if removed:
                    self.peers.pop(uid, None)
                else:
                    self.peers[uid] = entry
            changed = bool(events)
            self.version += 1
        self.revision = message.revision
        self.history_id = message.history_id
        return changed

    def resume_request(self, peer_filter: pb.PeerFilter) -> pb.WatchPeersRequest:
        self._snapshot, self._events = [], []  # an incomplete change is resent from the last complete revision
        return pb.WatchPeersRequest(
            filter=peer_filter, resume_history_id=self.history_id, resume_revision=self.revision
        )


class Totals:
    """What every subscriber together received; the driver reads differences across a phase."""

    def __init__(self) -> None:
        self.bytes: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()  # "CODE: details" of the failed streams (what the server said)


class Subscriber:
    """One subscriber: one WatchPeers stream at a time, resumed on the next target after a failure."""

    def __init__(self, group: Subscribers, index: str, first_target: int) -> None:
        self.group = group
        self.index = index
        self.rotation = ReplicaRotation(first=first_target)
        self.backoff = Backoff(maximum=group.backoff_max)
        self.served = False  # the current stream brought a snapshot or a resume
        self.view = LeanPeerSet(group.interned)
        self.synced = asyncio.Event()
        self.last_peer_change = 0.0
        self.failed_at: float | None = None  # monotonic: the last stream failure not yet followed by a sync
        self.failovers: list[float] = []  # seconds from a stream's failure to the next replica's first sync
        self.task: asyncio.Task[None] | None = None

    def peers(self) -> dict[str, str]:
        return self.view.names()

    def receive(self, raw: bytes) -> bool:
        """Count and apply one message of the stream; whether it completed a change."""
        totals = self.group.totals
        totals.bytes["watchpeers"] += len(raw) + 5
        message = pb.WatchPeersResponse.FromString(raw)
        kind = message.WhichOneof("kind") or ""
        totals.events[kind] += 1
        changed = self.view.apply(message)
        if changed is None:
            return False
        if changed:
            self.last_peer_change = time.monotonic()
        if kind in ("snapshot", "resumed"):
            self.synced.set()
            self.served = True  # this replica serves the subscriber: a new run of failures starts
            self.backoff.reset()
            if self.failed_at is not None:
                self.failovers.append(time.monotonic() - self.failed_at)
                self.failed_at = None
        return True

    async def run(self) -> None:
        """Follow one replica at a time; on a failure, move on as a sidecar does (``ReplicaRotation``): the
        next replica at once, a backoff once every replica failed in a row, reset by a snapshot or resume."""
        group = self.group
        while True:
            target = group.targets[self.rotation.pick(len(group.targets))]
            channel = group.channel(target)
            self.served = False
            refused = False
            try:
                # Undecoded: the bytes counted are the message's own (its protobuf size), the parse is ours.
                call = channel.unary_stream(WATCH_PEERS, request_serializer=pb.WatchPeersRequest.SerializeToString)
                request = self.view.resume_request(pb.PeerFilter(include_self=True))
                group.totals.requests[f"WatchPeers {'resume' if self.view.history_id else 'fresh'}"] += 1
                stream = call(request, metadata=group.metadata)
                # read(), not ``async for``: grpc's iterator, like a loop variable, holds the last message (a
                # snapshot, megabytes at 2,000 peers) until the next one arrives; a thousand streams hold gigabytes.
                while (raw := await stream.read()) is not grpc.aio.EOF:
                    self.receive(raw)
                    del raw
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                group.totals.errors[f"{exc.code().name}"] += 1
                when = "after" if self.served else "before"  # the stream's snapshot (or resume): which side
                group.totals.reasons[f"{exc.code().name}: {(exc.details() or '')[:160]} ({when} its snapshot)"] += 1
                refused = exc.code() in REFUSALS
                if self.failed_at is None:
                    self.failed_at = time.monotonic()
            finally:
                if not group.shared_channels:
                    await channel.close()
            if self.rotation.ended(len(group.targets), self.served, refused):
                await asyncio.sleep(self.backoff.next_delay())


class Subscribers:
    def __init__(self, args: argparse.Namespace) -> None:
        self.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        self.shared_channels = args.shared_channels
        self.backoff_max: float = args.backoff_max
        self.credentials = grpc.ssl_channel_credentials(pathlib.Path(args.ca).read_bytes()) if args.ca else None
        token = pathlib.Path(args.token_file).read_text().strip() if args.token_file else ""
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.subscribers: dict[str, Subscriber] = {}
        self.started = 0
        self.totals = Totals()
        self.interned = Interned()
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, target: str) -> grpc.aio.Channel:
        """A channel (one connection) per stream, as each pod's sidecar has its own; or one per target."""
        if self.shared_channels and target in self._channels:
            return self._channels[target]
        if self.credentials is not None:
            channel = grpc.aio.secure_channel(target, self.credentials, options=CHANNEL_OPTIONS)
        else:
            channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        if self.shared_channels:
            self._channels[target] = channel
        return channel

    def start(self, ids: list[str], first: list[int] | None = None) -> None:
        """Start ``ids``' subscribers; ``first``: each one's first target (a front's count), else this process's."""
        for at, index in enumerate(ids):
            if index in self.subscribers:
                continue
            subscriber = Subscriber(self, index, first[at] if first else self.started)
            self.started += 1
            subscriber.task = asyncio.ensure_future(subscriber.run())
            self.subscribers[index] = subscriber

    async def stop(self, ids: list[str]) -> None:
        for index in ids:
            subscriber = self.subscribers.pop(index, None)
            if subscriber is not None and subscriber.task is not None:
                subscriber.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await subscriber.task

    async def converge(self, peers: dict[str, str], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        checked: dict[str, tuple[int, bool]] = {}  # subscriber -> (its set's version when compared, equal)
        while True:
            behind = []
            for s in self.subscribers.values():
                seen = checked.get(s.index)
                if seen is None or seen[0] != s.view.version:  # compare only the sets that changed since
                    seen = checked[s.index] = (s.view.version, s.peers() == peers)
                if not seen[1]:
                    behind.append(s.index)
            if not behind or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)  # poll: the streams advance between checks
        wanted = set(peers)
        held = [set(s.peers()) for s in self.subscribers.values()]
        return {
            "converged": not behind,
            "behind": behind[:20],
            "behind_count": len(behind),
            # Peers of the truth a subscriber lacks, and peers it holds that the truth has not, over all of them.
            "lost": sum(len(wanted - h) for h in held),
            "phantom": sum(len(h - wanted) for h in held),
            "last_peer_change": {s.index: s.last_peer_change for s in self.subscribers.values()},
            "failover_s": [f for s in self.subscribers.values() for f in s.failovers],
        }

    def stats(self) -> dict[str, Any]:
        return {
            "bytes": dict(self.totals.bytes),
            "events": dict(self.totals.events),
            "requests": dict(self.totals.requests),
            "errors": dict(self.totals.errors),
            "error_reasons": dict(self.totals.reasons.most_common(10)),
            "watchers": len(self.subscribers),
            "t": time.monotonic(),
        }

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        """Answer one command of the JSON-lines interface (the module docstring)."""
        cmd = command["cmd"]
        reply: dict[str, Any] = {"cmd": cmd}
        if cmd == "start":
            self.start([str(i) for i in command["ids"]], command.get("first"))
        elif cmd == "stop":
            await self.stop([str(i) for i in command["ids"]])
        elif cmd == "wait_ready":
            await asyncio.gather(*(s.synced.wait() for s in self.subscribers.values()))
        elif cmd == "stats":
            reply["stats"] = self.stats()
        elif cmd == "converge":
            reply.update(await self.converge(command.get("peers") or {}, float(command.get("timeout", 120))))
            print(json.dumps({"error_reasons": self.stats()["error_reasons"]}), file=sys.stderr, flush=True)
        elif cmd == "pids":
            reply["pids"] = {}  # no process but this one
        return reply

    async def close(self) -> None:
        await self.stop(list(self.subscribers))
        for channel in self._channels.values():
            await channel.close()


class Workers:
    """``--processes N``: the subscribers spread over N worker processes (each this module with
    ``--processes 1``), behind the same commands, so that decoding is not one Python thread's.

    Owns the workers and which worker each subscriber is on. A subscriber goes to the next worker in turn
    and keeps the first target it would have had in one process (``first``), so the streams spread over the
    targets as before. Replies are merged: counters summed, lists and maps joined, ``converged`` if every
    worker's subscribers converged (each worker waits up to the same timeout, at the same time)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workers: list[asyncio.subprocess.Process] = []
        self.owner: dict[str, int] = {}  # subscriber id -> its worker's index
        self.started = 0

    async def open(self) -> None:
        argv = [sys.executable, "-m", "bench.peer_subscribers", "--targets", self.args.targets, "--processes", "1"]
        argv += ["--ca", self.args.ca] if self.args.ca else []
        argv += ["--token-file", self.args.token_file] if self.args.token_file else []
        argv += ["--shared-channels"] if self.args.shared_channels else []
        argv += ["--backoff-max", str(self.args.backoff_max)]
        for _ in range(self.args.processes):
            self.workers.append(
                await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=2**28
                )
            )

    async def call(self, worker: int, command: dict[str, Any]) -> dict[str, Any]:
        process = self.workers[worker]
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write((json.dumps(command) + "\n").encode())
        await process.stdin.drain()
        line = await process.stdout.readline()
        if not line:
            raise RuntimeError(f"subscriber worker {worker} exited with {await process.wait()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def each(self, commands: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        """Send each worker its command at once; their replies."""
        return list(await asyncio.gather(*(self.call(w, c) for w, c in commands.items())))

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        cmd = command["cmd"]
        reply: dict[str, Any] = {"cmd": cmd}
        everyone = dict.fromkeys(range(len(self.workers)), command)
        if cmd == "start":
            parts: dict[int, dict[str, list[Any]]] = {}
            for index in (str(i) for i in command["ids"]):
                if index in self.owner:
                    continue
                worker = self.owner[index] = self.started % len(self.workers)
                part = parts.setdefault(worker, {"ids": [], "first": []})
                part["ids"].append(index)
                part["first"].append(self.started)
                self.started += 1
            await self.each({w: {"cmd": "start", **part} for w, part in parts.items()})
        elif cmd == "stop":
            gone: dict[int, list[str]] = {}
            for index in (str(i) for i in command["ids"]):
                if index in self.owner:
                    gone.setdefault(self.owner.pop(index), []).append(index)
            await self.each({w: {"cmd": "stop", "ids": ids} for w, ids in gone.items()})
        elif cmd == "wait_ready":
            await self.each(everyone)
        elif cmd == "stats":
            reply["stats"] = merge_stats([r["stats"] for r in await self.each(everyone)])
        elif cmd == "converge":
            reply.update(merge_converge(await self.each(everyone)))
        elif cmd == "pids":
            reply["pids"] = {f"subscribers-{i}": p.pid for i, p in enumerate(self.workers)}
        return reply

    async def close(self) -> None:
        for process in self.workers:
            if process.stdin is not None:
                process.stdin.write(b'{"cmd": "quit"}\n')
                process.stdin.close()
        for process in self.workers:
            await process.wait()


def merge_stats(replies: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' ``stats`` as one process's: each counter summed."""
    merged: dict[str, Any] = {}
    for key in ("bytes", "events", "requests", "errors", "error_reasons"):
        total: Counter[str] = Counter()
        for reply in replies:
            total.update(reply.get(key) or {})
        merged[key] = dict(total.most_common(10)) if key == "error_reasons" else dict(total)
    merged["watchers"] = sum(r["watchers"] for r in replies)
    merged["t"] = time.monotonic()
    return merged


def merge_converge(replies: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' ``converge`` replies as one process's."""
    return {
        "converged": all(r["converged"] for r in replies),
        "behind": [i for r in replies for i in r["behind"]][:20],
        "behind_count": sum(r["behind_count"] for r in replies),
        "lost": sum(r["lost"] for r in replies),
        "phantom": sum(r["phantom"] for r in replies),
        "last_peer_change": {i: t for r in replies for i, t in r["last_peer_change"].items()},
        "failover_s": [f for r in replies for f in r["failover_s"]],
    }


async def serve(group: Subscribers | Workers) -> None:
    """Answer the JSON-lines commands on stdin, one reply line each on stdout, until ``quit`` or EOF."""
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=2**28)  # a converge command carries every object's name and version
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    try:
        while line := await stdin.readline():
            command = json.loads(line)
            if command["cmd"] == "quit":
                break
            reply = await group.handle(command)
            reply["t"] = time.monotonic()
            print(json.dumps(reply), flush=True)
    finally:
        await group.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", required=True, help="host:port of each WatchPeers server (relay replica)")
    parser.add_argument("--ca", default="", help="PEM bundle verifying the targets (TLS); none: plaintext")
    parser.add_argument("--token-file", default="", help="sent as `authorization: Bearer` on every stream")
    parser.add_argument(
        "--shared-channels", action="store_true", help="one connection per target instead of one per subscriber"
    )
    parser.add_argument(
        "--backoff-max",
        type=float,
        default=30.0,
        help="longest wait between reconnections once every target failed in a row (the sidecar's "
        "DISCOVERY_BACKOFF_MAX, default 30 s)",
    )
    parser.add_argument(
        "--processes", type=int, default=1, help="worker processes the subscribers are spread over (1: this one)"
    )
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace) -> None:
    if args.processes <= 1:
        await serve(Subscribers(args))
        return
    workers = Workers(args)
    await workers.open()
    await serve(workers)


def main(argv: list[str] | None = None) -> None:
    asyncio.run(_main(parse_args(argv)))


if __name__ == "__main__":
    main()
