"""py-spy on a running sidecar under churn, and what its samples say about where the CPU goes.

Two modes. ``gil`` (the default) samples only the thread holding the GIL, with native frames: each sample is
the interpreter doing work, so shares are shares of CPU spent in Python and the C it calls (JSON, protobuf,
gRPC's Cython, the garbage collector); threads parked in ``epoll_wait``, ``SSL_read`` or ``Condition.wait``
hold no GIL and are not counted. Native stacks need py-spy to pause the process at each sample, so a
profile's run is never a measurement's run. ``wall`` is the older view (every thread py-spy does not judge
idle, without pausing the process): waiting shows up in it as ``SSLSocket.read`` and ``Condition.wait``.
"""

from __future__ import annotations

import collections
import pathlib
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from bench import report

PY_SPY = pathlib.Path(sys.executable).parent / "py-spy"


@dataclass(frozen=True)
class Mode:
    name: str
    flags: tuple[str, ...]
    file: str  # the summary's name under bench/results/


GIL = Mode("gil", ("--gil", "--native"), "sidecar-profile-gil.txt")
# Native frames cannot be read without pausing the process; if py-spy cannot, the GIL view without them.
GIL_NONBLOCKING = Mode("gil", ("--gil", "--nonblocking"), "sidecar-profile-gil.txt")
WALL = Mode("wall", ("--nonblocking",), "sidecar-profile.txt")

# What a sample is spent on: GC or a wake-up if any of its frames is one (``ANYWHERE``), otherwise the first
# of the others that a frame matches, from the innermost frame outwards (so protobuf work called from the
# stream's code counts as protobuf, and gRPC's Cython frames around the servicer do not claim it).
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("GC (the cyclic collector)", ("gc_collect", "collect_with_callback", "(gc)")),
    (
        "thread-to-loop wake-ups (`_write_to_self`, and the loop's side: `_read_from_self`, `Wakeup.trigger`)",
        ("_write_to_self", "call_soon_threadsafe", "_read_from_self", "_process_self_data", "Wakeup.trigger"),
    ),
    (
        "gRPC's send per message (cygrpc, its sendmsg and its poller's eventfd kick)",
        ("sendmsg", "eventfd_write", "grpc/_cython", "grpc/aio/"),
    ),
    (
        "JSON encoding (`json.dumps`: a peer's `data_json`)",
        ("json/encoder.py", "encoder_listencode", "encoder_call", "JSONEncoder"),
    ),
    (
        "protobuf encoding and message splitting",
        (
            "SerializeToString",
            "ByteSize",
            "split_by_size",
            "_to_pb",
            "encode_peer",
            "serve/wire.py",
            "_message.",
            "upb_",
            "PyUpb",
            "well_known_types",
        ),
    ),
    (
        "JSON decoding (watch events)",
        (
            "json/decoder.py",
            "scan_once",
            "scanstring",
            "_parse_object",
            "_parse_array",
            "json_decode.py",
            "JSONDecoder",
        ),
    ),
    (
        "the watch stream's chunked reading (urllib3, http.client, ssl)",
        ("read_chunked", "urllib3/", "http/client.py", "ssl.py", "socket.py", "WatchStream.__iter__", "SSL_read"),
    ),
    (
        "parsing watch objects into records (core/resources.py, core/bounds.py)",
        ("sidecar/core/resources.py", "sidecar/core/bounds.py", "sidecar/core/dynamo_schema.py"),
    ),
    (
        "the join and the log (core/directory.py, join.py, eventlog.py)",
        ("sidecar/core/directory.py", "sidecar/core/join.py", "sidecar/core/instance_join.py", "eventlog.py"),
    ),
    ("the per-stream projection (core/projection.py)", ("sidecar/core/projection.py",)),
    ("the rest of sidecar/core (peer records, instance ids)", ("sidecar/core/",)),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("the hub and the streams (sidecar/peers, sidecar/serve)", ("sidecar/peers/", "sidecar/serve/")),
    ("asyncio's loop turns (`_run_once`, epoll, handles)", ("asyncio/", "selectors.py", "_asynciomodule.c")),
    ("the reflector (sidecar/kube)", ("sidecar/kube/",)),
]
ANYWHERE = 2  # the first categories count wherever their frame is in a stack
OTHER = "other"


def categorise(collapsed: str, categories: list[tuple[str, tuple[str, ...]]] = CATEGORIES) -> dict[str, float]:
    """Each category's share of the samples (percent, summing to 100), largest first, ``other`` last."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for stack, count in report.collapsed_stacks(collapsed):
        total += count
        counts[_category_of(stack, categories)] += count
    if not total:
        return {}
    other = counts.pop(OTHER, 0)
    shares = {label: round(100 * n / total, 1) for label, n in counts.most_common()}
    return {**shares, OTHER: round(100 * other / total, 1)} if other else shares


def _category_of(frames: list[str], categories: list[tuple[str, tuple[str, ...]]]) -> str:
    # GC and the wake-ups first, wherever they are in the stack: the collector and a wake-up's handle run
    # inside other work's frames, and their own innermost frames are generic (asyncio's Event, libc).
    for label, patterns in categories[:ANYWHERE]:
        if any(pattern in frame for frame in frames for pattern in patterns):
            return label
    for frame in reversed(frames):
        for label, patterns in categories[ANYWHERE:]:
            if any(pattern in frame for pattern in patterns):
                return label
    return OTHER


@dataclass(frozen=True)
class CpuShare:
    """How much of the process's CPU the samples stand for: GIL-held seconds sampled against CPU-seconds used."""

    sampled_seconds: float
    process_cpu_seconds: float

    def sentence(self) -> str:
        return (
            f"samples stand for {self.sampled_seconds:.1f} s holding the GIL; the process used "
            f"{self.process_cpu_seconds:.1f} CPU-s meanwhile (more CPU than GIL: C code outside it, such as gRPC "
            "core's threads and TLS; more GIL than CPU: a thread holding it while it waits for a core, or while "
            "py-spy has the process paused to read native stacks)"
        )


def samples(collapsed: str) -> int:
    return sum(count for _, count in report.collapsed_stacks(collapsed))


def summarise(collapsed: str, mode: Mode, cpu: CpuShare | None = None) -> dict[str, Any]:
    """``report.summarise_profile``'s self and inclusive tops, with the category shares before them."""
    summary = report.summarise_profile(collapsed)
    shares = categorise(collapsed)
    header = [f"py-spy mode: {mode.name} ({' '.join(mode.flags)}; idle samples excluded)"]
    if cpu is not None and mode.name == "gil":
        header.append(cpu.sentence())
    if mode.name == "gil":
        header += ["", "what the CPU samples are spent on (% of samples holding the GIL, innermost match):"]
        header += [f"  {share:5.1f}%  {label}" for label, share in shares.items()]
    summary["text"] = "\n".join(header) + "\n\n" + summary["text"]
    summary["categories"] = shares
    return summary


def record(
    pid: int, raw: pathlib.Path, mode: Mode, seconds: float, load: Callable[[], None], rate: int = 200
) -> str | None:
    """py-spy ``pid`` into ``raw`` (collapsed stacks) while ``load`` runs; py-spy's error text if it failed."""
    raw.unlink(missing_ok=True)
    spy = subprocess.Popen(
        [str(PY_SPY), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate)]
        + ["--format", "raw", "--output", str(raw), *mode.flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    load()
    _, err = spy.communicate(timeout=seconds + 60)
    if raw.exists() and raw.stat().st_size:
        return None
    message = " ".join(err.split("Stack backtrace:")[0].split())  # py-spy's own words, without its backtrace
    return f"py-spy {' '.join(mode.flags)} exited {spy.returncode}: {message[-500:]}"


def profile(
    pid: int,
    work: pathlib.Path,
    out_dir: pathlib.Path,
    mode: Mode,
    seconds: float,
    load: Callable[[], None],
    rate: int = 200,
) -> dict[str, Any]:
    """Record ``pid`` under ``load`` and write the summary to ``out_dir/mode.file`` (the raw stacks beside it)."""
    raw = work / f"profile-{mode.name}.collapsed"
    process = psutil.Process(pid)
    cpu_before = sum(process.cpu_times()[:2])
    error = record(pid, raw, mode, seconds, load, rate)
    cpu_seconds = sum(process.cpu_times()[:2]) - cpu_before
    if error is not None and mode == GIL:
        # No native stacks (no ptrace, or an unsupported build): the GIL-only view without them.
        cpu_before = sum(process.cpu_times()[:2])
        fallback_error = record(pid, raw, GIL_NONBLOCKING, seconds, load, rate)
        cpu_seconds = sum(process.cpu_times()[:2]) - cpu_before
        if fallback_error is None:
            mode, error = GIL_NONBLOCKING, None
        else:
            error = f"{error}; then {fallback_error}"
    if error is not None:
        return {"error": error, "mode": mode.name}
    text = raw.read_text()
    summary = summarise(text, mode, CpuShare(samples(text) / rate, cpu_seconds))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / mode.file).write_text(summary["text"])
    (out_dir / mode.file).with_suffix(".collapsed").write_text(_without_line_numbers(text))
    return {
        "mode": mode.name,
        "flags": list(mode.flags),
        "top_self": summary["top_self"],
        "top_inclusive": summary["top_inclusive"],
        "categories": summary["categories"],
        "sampled_seconds": round(samples(text) / rate, 2),
        "process_cpu_seconds": round(cpu_seconds, 2),
        "file": mode.file,
    }


def _without_line_numbers(collapsed: str) -> str:
    """The raw stacks folded per function (line numbers dropped), so the kept file stays small."""
    folded: collections.Counter[str] = collections.Counter()
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack and count_text.isdigit():
            frames = (re.sub(r"^0x[0-9a-f]+ ", "? ", re.sub(r":\d+\)$", ")", f)) for f in stack.split(";"))
            folded[";".join(frames)] += int(count_text)
    return "".join(f"{stack} {count}\n" for stack, count in folded.most_common())
