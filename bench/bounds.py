"""Benchmark: what the sidecar's bounds hold under hostile or unlucky metadata, side by side.

``python -m bench.bounds`` runs each case in a fresh process (so resident memory is its own) and writes
``bench/bounds-results.json`` and ``bench/BOUNDS.md``:

* **history memory**: 100 peers carrying 16 KB of metadata each change 20,000 times, fed through the same
  parse-and-store path as the reflector. Baseline: history bounded by count only (10,000 entries, the
  behaviour before ``DISCOVERY_HISTORY_BYTES``); against it, the default byte bound (32 MiB). Reported:
  resident memory every 2,000 changes, the log's entry count and estimated bytes.
* **check cost**: the time to check one typical Dynamo document against the depth/size/number bounds,
  next to the cost of encoding it to JSON once (the work the check replaces nothing of: it is extra).
* **hostile decode**: decoding a watch event whose CR nests 2,000 levels (the C decoder runs out of stack;
  the fallback truncates the deep part) against decoding an ordinary event.
"""

from __future__ import annotations

import json
import multiprocessing
import pathlib
import statistics
import sys
import time
import timeit
import uuid
from typing import Any

import psutil

from bench.workload import metadata
from sidecar.core.bounds import metadata_problem
from sidecar.core.directory import PeerDirectory
from sidecar.core.json_decode import loads
from sidecar.core.peer import canonical_json
from sidecar.kube.sources import ENDPOINT_SLICES, WORKER_METADATA
from sidecar.peers.hub import PeerHub

BENCH_DIR = pathlib.Path(__file__).parent
MiB = 1024 * 1024


def _slice(peers: int) -> dict[str, Any]:
    return {
        "metadata": {"name": "s1", "namespace": "bench", "resourceVersion": "1"},
        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [f"10.1.{i // 250}.{i % 250 + 1}"],
                "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", "name": f"p-{i}", "namespace": "bench", "uid": f"uid-{i}"},
            }
            for i in range(peers)
        ],
    }


def _cr(i: int, seq: int, data_bytes: int) -> dict[str, Any]:
    blob = f"{seq:012d}-" * (data_bytes // 13)  # distinct per change, as real metadata churn is
    return {
        "metadata": {
            "name": f"p-{i}",
            "namespace": "bench",
            "uid": f"cr-{i}",
            "resourceVersion": str(seq),
            "ownerReferences": [{"kind": "Pod", "name": f"p-{i}", "uid": f"uid-{i}"}],
        },
        "spec": {"data": {"endpoints": {}, "blob": blob}},
    }


def _history_case(history_bytes: int | None, peers: int, data_bytes: int, changes: int, out: Any) -> None:
    process = psutil.Process()
    sources = [ENDPOINT_SLICES.name, WORKER_METADATA.name]
    hub = PeerHub(PeerDirectory(uuid.uuid4().hex, 10_000, sources, None, history_bytes), "self")
    hub.store(ENDPOINT_SLICES.name).replace({"bench/s1": ENDPOINT_SLICES.parse(_slice(peers))})
    store = hub.store(WORKER_METADATA.name)
    store.replace({f"bench/p-{i}": WORKER_METADATA.parse(_cr(i, 0, data_bytes)) for i in range(peers)})
    curve = [(0, process.memory_info().rss / MiB)]
    for n in range(1, changes + 1):
        obj = json.loads(json.dumps(_cr(n % peers, n, data_bytes)))  # decoded like a watch event
        store.upsert(WORKER_METADATA.key(obj), WORKER_METADATA.parse(obj), time.monotonic())
        if n % 2000 == 0:
            curve.append((n, process.memory_info().rss / MiB))
    log = hub._directory.log  # the benchmark reads the log's own accounting
    out.send({"rss_curve_mib": curve, "entries": len(log), "estimated_bytes": log.bytes})


def history_memory(peers: int = 100, data_bytes: int = 16_000, changes: int = 20_000) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    results = {}
    for name, limit in (("count only (10,000 entries)", None), ("count + bytes (32 MiB, default)", 32 * MiB)):
        ours, theirs = context.Pipe()
        process = context.Process(target=_history_case, args=(limit, peers, data_bytes, changes, theirs))
        process.start()
        results[name] = ours.recv()
        process.join(30)
    return {"peers": peers, "data_bytes": data_bytes, "changes": changes, "cases": results}


def check_cost() -> dict[str, float]:
    document = metadata("worker-1", 5)
    document["model_cards"] = {
        f"m{i}": {"type": "Model", "name": f"model-{i}", "context": list(range(50))} for i in range(3)
    }
    n = 20_000
    return {
        "document_bytes": len(canonical_json(document)),
        "check_us": timeit.timeit(lambda: metadata_problem(document), number=n) / n * 1e6,
        "encode_json_us": timeit.timeit(lambda: canonical_json(document), number=n) / n * 1e6,
    }


def hostile_decode() -> dict[str, float]:
    ordinary = json.dumps({"type": "MODIFIED", "object": _cr(1, 1, 2000)}).encode()
    deep = (
        b'{"type":"MODIFIED","object":{"metadata":{"name":"evil"},"spec":{"data":'
        + b'{"a":' * 2000
        + b"1"
        + b"}" * 2000
        + b"}}}"
    )
    runs = [timeit.timeit(lambda: loads(deep), number=50) / 50 * 1e3 for _ in range(5)]
    return {
        "ordinary_event_bytes": len(ordinary),
        "ordinary_ms": timeit.timeit(lambda: loads(ordinary), number=2000) / 2000 * 1e3,
        "deep_event_bytes": len(deep),
        "deep_ms": statistics.median(runs),
    }


def report(results: dict[str, Any]) -> str:
    history = results["history"]
    lines = [
        "# Bounds under hostile metadata",
        "",
        f"Measured by `python -m bench.bounds` on this machine ({results['machine']}). Each history case runs",
        "in a fresh process; resident memory (RSS) includes the interpreter and the imports (~60 MiB).",
        "",
        f"## History memory: {history['peers']} peers x {history['data_bytes'] // 1000} KB metadata, "
        f"{history['changes']:,} changes",
        "",
        "| changes | " + " | ".join(history["cases"]) + " |",
        "| ---: | " + " | ".join("---:" for _ in history["cases"]) + " |",
    ]
    curves = [case["rss_curve_mib"] for case in history["cases"].values()]
    for row in zip(*curves, strict=True):
        lines.append(f"| {row[0][0]:,} | " + " | ".join(f"{rss:.0f} MiB" for _, rss in row) + " |")
    lines.append(
        "| entries held | "
        + " | ".join(f"{c['entries']:,} ({c['estimated_bytes'] / MiB:.1f} MiB est.)" for c in history["cases"].values())
        + " |"
    )
    check = results["check"]
    decode = results["decode"]
    lines += [
        "",
        "## Cost of the bounds",
        "",
        f"* Checking a {check['document_bytes']:,}-byte Dynamo document (depth, size, finite numbers): "
        f"{check['check_us']:.1f} µs, against {check['encode_json_us']:.1f} µs to encode it to JSON once.",
        f"* Decoding an ordinary {decode['ordinary_event_bytes']:,}-byte watch event: {decode['ordinary_ms']:.3f} ms; "
        f"a {decode['deep_event_bytes']:,}-byte event nesting 2,000 levels (fallback decoder, deep part truncated): "
        f"{decode['deep_ms']:.2f} ms (median of 5).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    memory = psutil.virtual_memory().total / 2**30
    results = {
        "machine": f"{psutil.cpu_count()} cores, {memory:.0f} GiB, Python {sys.version.split()[0]}",
        "history": history_memory(),
        "check": check_cost(),
        "decode": hostile_decode(),
    }
    (BENCH_DIR / "bounds-results.json").write_text(json.dumps(results, indent=2))
    (BENCH_DIR / "BOUNDS.md").write_text(report(results))
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
