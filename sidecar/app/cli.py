"""The ``discovery-sidecar`` command: ``run``, ``instance-id``, ``peers`` and ``inject``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence

import grpc

from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.client import DEFAULT_TARGET, DiscoveryClient, PeerSetUpdate, make_filter
from sidecar import __version__
from sidecar.app.config import ConfigError, add_arguments, load_relay_settings, load_settings
from sidecar.core.instance_id import instance_id
from sidecar.serve.wire import peer_from_pb_json


def _run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args)
    except ConfigError as exc:
        print(f"discovery-sidecar: {exc}", file=sys.stderr)
        return 2
    from sidecar.app.daemon import Sidecar
    from sidecar.app.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    try:
        sidecar = Sidecar(settings)
    except OSError as exc:
        print(f"discovery-sidecar: cannot start: {exc}", file=sys.stderr)
        return 1
    return sidecar.run_until_signalled()


def _relay(args: argparse.Namespace) -> int:
    try:
        settings = load_relay_settings(args)
    except ConfigError as exc:
        print(f"discovery-sidecar relay: {exc}", file=sys.stderr)
        return 2
    from sidecar.app.logs import configure_logging
    from sidecar.app.relay import Relay

    configure_logging(settings.log_format, settings.log_level)
    try:
        relay = Relay(settings)
    except OSError as exc:
        print(f"discovery-sidecar relay: cannot start: {exc}", file=sys.stderr)
        return 1
    return relay.run_until_signalled()


def _instance_id(args: argparse.Namespace) -> int:
    for name in args.names:
        print(f"{name}\t{instance_id(name)}")
    return 0


def _client_target(args: argparse.Namespace) -> str:
    target = args.target or os.environ.get("DISCOVERY_GRPC_LISTEN") or DEFAULT_TARGET
    return target.replace("unix:///", "unix:/", 1) if target.startswith("unix:///") else target


STATE_NAMES = {pb.PEER_STATE_READY: "ready", pb.PEER_STATE_DRAINING: "draining"}


def _table(peers: Sequence[pb.Peer]) -> list[str]:
    rows = [("NAME", "STATE", "ADDRESSES", "PORTS", "INSTANCE-ID", "GROUPS", "LABELS")]
    for p in sorted(peers, key=lambda p: p.name):
        rows.append(
            (
                p.name,
                STATE_NAMES.get(p.state, "?"),
                ",".join(p.addresses) or "-",
                ",".join(str(port.port) for port in p.ports) or "-",
                p.instance_id_hex,
                ",".join(p.groups) or "-",
                ",".join(f"{k}={v}" for k, v in sorted(p.labels.items())) or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


def _render_screen(update: PeerSetUpdate, target: str) -> None:
    status = "connected" if update.connected else f"DEGRADED: {update.status_reason or 'the peer set may be stale'}"
    lines = [f"peers via {target}  revision {update.revision}  {len(update.peers)} peer(s)  [{status}]", ""]
    lines += _table(list(update.peers.values()))
    height = shutil.get_terminal_size((100, 40)).lines
    sys.stdout.write("\x1b[H\x1b[2J" + "\n".join(lines[: height - 1]) + "\n")
    sys.stdout.flush()


def _print_events(update: PeerSetUpdate, as_json: bool) -> None:
    if as_json:
        record = {
            "kind": update.kind,
            "revision": update.revision,
            "reset": update.reset,
            "connected": update.connected,
            "added": [peer_from_pb_json(p) for p in update.added],
            "updated": [peer_from_pb_json(p) for p in update.updated],
            "removed": [peer_from_pb_json(p) for p in update.removed],
        }
        print(json.dumps(record), flush=True)
        return
    if update.kind == "snapshot":
        print(f"# snapshot at revision {update.revision}: {len(update.peers)} peer(s)", flush=True)
        for line in _table(list(update.peers.values())):
            print(line)
    for label, peers in (
        ("added", update.added if update.kind != "snapshot" else []),
        ("updated", update.updated if update.kind != "snapshot" else []),
        ("removed", update.removed),
    ):
        for p in peers:
            print(
                f"{update.revision}\t{label}\t{p.name}\t{STATE_NAMES.get(p.state, '?')}\t{','.join(p.addresses)}",
                flush=True,
            )
    if update.kind == "status":
        print(
            f"{update.revision}\tstatus\t{'connected' if update.connected else 'degraded'}\t{update.status_reason}",
            flush=True,
        )


def _peers(args: argparse.Namespace) -> int:
    target = _client_target(args)
    groups = []
    for spec in args.group:
        name, sep, selector = spec.partition("=")
        if not sep or not name:
            print(f"discovery-sidecar peers: --group expects NAME=SELECTOR, got {spec!r}", file=sys.stderr)
            return 2
        groups.append((name, selector))
    peer_filter = make_filter(
        args.selector, groups, args.include_self, args.ready_only, endpoint=args.endpoint, model=args.model
    )
    client = DiscoveryClient(target)
    try:
        if not args.watch:
            reply = client.list_peers(peer_filter, timeout=args.timeout)
            if args.output == "json":
                print(
                    json.dumps(
                        {"revision": reply.revision, "peers": [peer_from_pb_json(p) for p in reply.peers]}, indent=2
                    )
                )
            else:
                print("\n".join(_table(list(reply.peers))))
            return 0
        interactive = sys.stdout.isatty() and args.output == "table"
        for update in client.watch(peer_filter):
            if interactive:
                _render_screen(update, target)
            else:
                _print_events(update, args.output == "json")
        return 0
    except grpc.RpcError as exc:
        print(f"discovery-sidecar peers: {exc.code().name}: {exc.details()} (target {target})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


def _inject(args: argparse.Namespace) -> int:
    from sidecar.app.injection.manifests import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="discovery-sidecar", description="Per-pod peer-discovery sidecar for Kubernetes"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="run the sidecar daemon",
        description="Register this pod's DynamoWorkerMetadata, watch peers and serve the local gRPC API. "
        "Every flag has an environment variable (shown as its metavar); flags win.",
    )
    add_arguments(run)
    run.set_defaults(func=_run)

    relay = commands.add_parser(
        "relay",
        help="run the relay tier: watch peers once, serve them to sidecars over TLS (DISCOVERY_UPSTREAM)",
        description="Watch the peers of DISCOVERY_NAMESPACES as a sidecar would (same settings), and serve "
        "WatchPeers and ListPeers on DISCOVERY_RELAY_LISTEN over TLS to sidecars that follow it, each client "
        "authorised by its own service-account token. Reads the same options table as run; flags win.",
    )
    add_arguments(relay)
    relay.set_defaults(func=_relay)

    ids = commands.add_parser("instance-id", help="print Dynamo's instance ID for pod names (NAME<TAB>ID)")
    ids.add_argument("names", nargs="+", metavar="NAME")
    ids.set_defaults(func=_instance_id)

    peers = commands.add_parser("peers", help="show the live peer set (a client of the local API)")
    peers.add_argument("--target", help=f"sidecar address (default: $DISCOVERY_GRPC_LISTEN or {DEFAULT_TARGET})")
    peers.add_argument("--watch", "-w", action="store_true", help="keep watching; redraws in place on a terminal")
    peers.add_argument("--selector", "-l", default="", help="label selector over peer labels, e.g. 'role in (prefill)'")
    peers.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="NAME=SELECTOR",
        help="named group (repeatable), e.g. --group prefill=role=prefill",
    )
    peers.add_argument(
        "--endpoint", default="", help="only peers serving this Dynamo endpoint, e.g. dyn://ns.backend.generate"
    )
    peers.add_argument("--model", default="", help="only peers serving this model (a model card's display_name)")
    peers.add_argument("--include-self", action="store_true", help="include this pod's own entry")
    peers.add_argument("--ready-only", action="store_true", help="leave out draining peers")
    peers.add_argument("-o", "--output", choices=["table", "json"], default="table")
    peers.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the list (not with --watch)")
    peers.set_defaults(func=_peers)

    from sidecar.app.injection.manifests import add_arguments as add_inject_arguments

    inject = commands.add_parser(
        "inject",
        help="add the sidecar to the pods of manifests on stdin (for clusters without the injection policy)",
        description="Read manifests (YAML or JSON) on stdin and write them with the sidecar added to every pod "
        "template, from the same template as the MutatingAdmissionPolicy; per-pod settings come from the pods' "
        "discovery-sidecar.io/ annotations. Pods labelled discovery-sidecar.io/inject=false, and pods that already "
        "declare a discovery-sidecar container, are left alone.",
    )
    add_inject_arguments(inject)
    inject.set_defaults(func=_inject)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.func  # set by each subcommand's set_defaults
    return command(args)


if __name__ == "__main__":
    sys.exit(main())
