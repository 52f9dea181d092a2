"""Many ``WatchPeers`` subscribers in one process: the relay arm's subscribers (issue #23).

``python -m bench.peer_subscribers --targets HOST:PORT[,HOST:PORT...]`` follows, for each subscriber id
it is told to start, one ``WatchPeers`` stream, spread round-robin over the targets (relay replicas, or
any sidecar: the API is the same). Each subscriber keeps the peer set with the client library's
``PeerSetView`` and, when its stream fails, resumes (history id and revision) on the next target, as a
sidecar following relays moves to another replica.

It answers the JSON-lines commands of ``bench.watchers`` (``bench.rollout.ProcessSubscribers`` drives
both): ``start``/``stop`` with ``ids``, ``wait_ready`` (every started subscriber has its first snapshot),
``stats``, ``converge`` with ``peers`` (pod name -> READY/DRAINING; ``truth``, the API server's
resourceVersions, does not apply here) and ``quit``. Bytes counted are what the subscribers received:
each message's protobuf size plus gRPC's 5-byte frame header (before HTTP/2 and TLS), the relays' egress.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import pathlib
import random
import sys
import time
from collections import Counter
from typing import Any

import grpc
import grpc.aio

from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.api.discovery.v1 import discovery_pb2_grpc as pb_grpc
from discovery_client.client import CHANNEL_OPTIONS, PeerSetView

STATES = {pb.PEER_STATE_READY: "READY", pb.PEER_STATE_DRAINING: "DRAINING"}


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
        self.target = first_target
        self.view = PeerSetView()
        self.synced = asyncio.Event()
        self.last_peer_change = 0.0
        self.failed_at: float | None = None  # monotonic: the last stream failure not yet followed by a sync
        self.failovers: list[float] = []  # seconds from a stream's failure to the next replica's first sync
        self.task: asyncio.Task[None] | None = None

    def peers(self) -> dict[str, str]:
        return {p.name: STATES.get(p.state, "UNKNOWN") for p in self.view.peers.values()}

    def slim(self, stored: list[pb.Peer]) -> None:
        """Keep only what ``peers()`` reads of each peer just stored. A peer taken from a message keeps that
        whole message alive (protobuf's arena): a thousand subscribers holding a thousand peers each would
        hold every snapshot and delta they ever received (gigabytes), where each sidecar holds one set."""
        for peer in stored:
            if self.view.peers.get(peer.uid) is peer:
                self.view.peers[peer.uid] = pb.Peer(uid=peer.uid, name=peer.name, state=peer.state)

    async def run(self) -> None:
        group = self.group
        backoff = 0.1
        while True:
            target = group.targets[self.target % len(group.targets)]
            channel = group.channel(target)
            try:
                stub = pb_grpc.DiscoveryStub(channel)
                request = self.view.resume_request(pb.PeerFilter(include_self=True))
                group.totals.requests[f"WatchPeers {'resume' if self.view.history_id else 'fresh'}"] += 1
                async for message in stub.WatchPeers(request, metadata=group.metadata):
                    group.totals.bytes["watchpeers"] += message.ByteSize() + 5
                    kind = message.WhichOneof("kind") or ""
                    group.totals.events[kind] += 1
                    before = self.peers() if kind == "snapshot" and not message.partial else None
                    update = self.view.apply(message)
                    if update is None:
                        continue
                    self.slim(list(self.view.peers.values()) if update.reset else [*update.added, *update.updated])
                    if before is not None:  # a snapshot (a new replica's, after a failover) may change nothing
                        changed = before != self.peers()
                    else:
                        changed = bool(update.added or update.updated or update.removed)
                    if changed:
                        self.last_peer_change = time.monotonic()
                    if kind in ("snapshot", "resumed"):
                        self.synced.set()
                        if self.failed_at is not None:
                            self.failovers.append(time.monotonic() - self.failed_at)
                            self.failed_at = None
                    backoff = 0.1
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                group.totals.errors[f"{exc.code().name}"] += 1
                group.totals.reasons[f"{exc.code().name}: {(exc.details() or '')[:160]}"] += 1
                if self.failed_at is None:
                    self.failed_at = time.monotonic()
            finally:
                if not group.shared_channels:
                    await channel.close()
            self.target += 1  # the next replica, as a sidecar fails over
            await asyncio.sleep(backoff * (1 + random.random()))  # jittered backoff
            backoff = min(backoff * 2, 2.0)


class Subscribers:
    def __init__(self, args: argparse.Namespace) -> None:
        self.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        self.shared_channels = args.shared_channels
        self.credentials = grpc.ssl_channel_credentials(pathlib.Path(args.ca).read_bytes()) if args.ca else None
        token = pathlib.Path(args.token_file).read_text().strip() if args.token_file else ""
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.subscribers: dict[str, Subscriber] = {}
        self.started = 0
        self.totals = Totals()
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

    def start(self, ids: list[str]) -> None:
        for index in ids:
            if index in self.subscribers:
                continue
            subscriber = Subscriber(self, index, self.started)
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
        while True:
            behind = [s.index for s in self.subscribers.values() if s.peers() != peers]
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

    async def serve(self) -> None:
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
            if cmd == "start":
                self.start([str(i) for i in command["ids"]])
            elif cmd == "stop":
                await self.stop([str(i) for i in command["ids"]])
            elif cmd == "wait_ready":
                await asyncio.gather(*(s.synced.wait() for s in self.subscribers.values()))
            elif cmd == "stats":
                reply["stats"] = self.stats()
            elif cmd == "converge":
                reply.update(await self.converge(command.get("peers") or {}, float(command.get("timeout", 120))))
                print(json.dumps({"error_reasons": self.stats()["error_reasons"]}), file=sys.stderr, flush=True)
            elif cmd == "quit":
                break
            reply["t"] = time.monotonic()
            print(json.dumps(reply), flush=True)
        await self.stop(list(self.subscribers))
        for channel in self._channels.values():
            await channel.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", required=True, help="host:port of each WatchPeers server (relay replica)")
    parser.add_argument("--ca", default="", help="PEM bundle verifying the targets (TLS); none: plaintext")
    parser.add_argument("--token-file", default="", help="sent as `authorization: Bearer` on every stream")
    parser.add_argument(
        "--shared-channels", action="store_true", help="one connection per target instead of one per subscriber"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    asyncio.run(Subscribers(parse_args(argv)).serve())


if __name__ == "__main__":
    main()
