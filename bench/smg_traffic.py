"""``python -m bench.smg_traffic``: requests through a rolling replacement, SGLang Model Gateway two ways, one run.

What users of a gateway judge discovery by is failed requests while workers come and go. Both gateways are
the real ``smg`` 1.13 from PyPI, side by side on one control plane, under the same load at the same time:

* **smg-kubernetes**: its own Kubernetes discovery (``--service-discovery --selector ...``), as its users run it;
* **smg-via-sidecar**: ``--discovery-provider file``, fed by the discovery sidecar in the gateway's pod
  (pod-label discovery, ``DISCOVERY_REQUIRE_METADATA=false``, ``DISCOVERY_SMG_MANIFEST``).

The workers are stand-in OpenAI-compatible engines (``devcluster.smg.StandInWorker``: a small HTTP server on
127.0.0.N answering SMG's probes, ``/v1/models`` and ``/v1/chat/completions`` after a fixed service time),
whose pods the run drives as a kubelet would. The rollout replaces every worker, ``--rounds`` times, the way
a Deployment with ``maxSurge: 1, maxUnavailable: 0`` does: a new pod Running and Ready, then an old pod
deleted, the next step ``--interval`` seconds later at the earliest. Three phases, one after the other in the
same run: a **graceful drain** (the old engine keeps serving through its grace period, ``--grace`` seconds,
then stops), **no drain** (it stops at the delete, as an engine that exits on SIGTERM without a ``preStop``
hook does) and **no drain, back to back** (the same with no interval: the fastest rollout); then its Pod
object goes. Both gateways use round-robin (``--policy round_robin``) and SMG's default retries.

Measured per gateway and phase: failed requests (any answer that is not a complete chat
completion, after SMG's own retries), p50 and p99 latency and the p99 added over the engine's own (a third
load sends the same requests straight to a reference engine), and the time from a new pod's Ready until
that gateway's first request reaches it. Results: ``bench/smg-traffic-results.json``, the "With traffic"
section of ``bench/SMG.md`` and ``bench/plots/smg-traffic.png``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from devcluster.build import ROOT, ensure_built, pinned_versions
from devcluster.cluster import ControlPlane, free_port
from devcluster.objects import Cluster
from devcluster.sidecars import SidecarProcess, launch_sidecar, write_token_kubeconfig
from devcluster.smg import MODEL, SmgGateway, StandInWorker
from devcluster.traffic import Load, Outcome, chat_completion, failures, percentile
from devcluster.waiting import wait_for
from sidecar.kube.api import KubeApi

NAMESPACE = "smg-traffic"
SELECTOR = {"app": "engine"}
BENCH_DIR = ROOT / "bench"
SECTION = "<!-- bench.smg_traffic: everything below is written by `python -m bench.smg_traffic` -->"
GATEWAYS = ("smg-kubernetes", "smg-via-sidecar")
SAMPLE = 0.1  # how often each gateway's /workers is sampled for the plot


def say(message: str) -> None:
    print(f"[smg-traffic] {message}", file=sys.stderr, flush=True)


@dataclass
class Replacement:
    """One step of the rollout: ``new`` Ready at ``ready_at``, then ``old`` deleted at ``deleted_at``."""

    new: str
    old: str
    ready_at: float
    deleted_at: float = 0.0
    stopped_at: float = 0.0  # the old engine stopped serving (its grace period over)


@dataclass
class Settings:
    workers: int = 4
    rounds: int = 2
    grace: float = 5.0  # seconds a terminating engine keeps serving (the graceful phase)
    interval: float = 2.0  # at least this long from one replacement to the next (a new pod's start-up)
    service: float = 0.01  # the engine's own time per request
    clients: int = 2  # load threads per gateway (and for the direct reference)
    pause: float = 0.01  # think time between one thread's requests


@dataclass
class Run:
    work: pathlib.Path
    settings: Settings
    stand_ins: dict[str, StandInWorker] = field(default_factory=dict)  # serving, by pod name
    every_stand_in: dict[str, StandInWorker] = field(default_factory=dict)  # stopped ones too (what each served)
    replacements: list[Replacement] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)  # samples of each gateway's worker count

    def __post_init__(self) -> None:
        self.plane = ControlPlane(bin_dir=ensure_built(), work_dir=self.work / "controlplane", log=say)
        self.port = free_port()
        self.addresses = (f"127.0.{a}.{b}" for a in range(150, 200) for b in range(2, 250))
        self.names = (f"engine-{i}" for i in range(10_000))
        self.gateways: dict[str, SmgGateway] = {}
        self.sidecar: SidecarProcess | None = None
        self.stopped = threading.Event()
        self.began = time.monotonic()  # reset when the load starts: every time in the results counts from it

    # -- set-up ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.plane.start()
        self.cluster = Cluster(KubeApi.from_kubeconfig(str(self.plane.kubeconfig)))
        kubectl = [str(self.plane.kubectl), f"--kubeconfig={self.plane.kubeconfig}"]
        manifests = ROOT / "manifests"
        subprocess.run([*kubectl, "apply", "-f", str(manifests / "crd.yaml")], check=True, capture_output=True)
        self.cluster.create_namespace(NAMESPACE)
        for name in ("rbac.yaml", "optional/rbac-pod-discovery.yaml"):
            subprocess.run([*kubectl, "apply", "-n", NAMESPACE, "-f", str(manifests / name)], check=True)
        self.cluster.wait_for_service_account(NAMESPACE, "discovery-sidecar")
        self.cluster.ensure_node("node-a", "zone-a")
        self.reference = StandInWorker("127.0.149.2", self.port, self.settings.service)  # never a pod
        for _ in range(self.settings.workers):
            self.add_worker()

        logs = self.work / "logs"
        logs.mkdir(parents=True)
        selector = " ".join(f"{k}={v}" for k, v in SELECTOR.items())
        common = ["--policy", "round_robin"]
        kubeconfig = write_token_kubeconfig(self.plane, self.plane.admin_token, logs / "smg.kubeconfig")
        self.gateways["smg-kubernetes"] = SmgGateway(
            [
                "--service-discovery",
                "--selector",
                selector,
                "--service-discovery-namespace",
                NAMESPACE,
                "--service-discovery-port",
                str(self.port),
                *common,
            ],
            logs / "smg-kubernetes.log",
            env={"KUBECONFIG": str(kubeconfig)},
        )
        gateway_pod = self.cluster.start_pod(NAMESPACE, "gateway", {"app": "gateway"})
        manifest = self.work / "shared" / "workers.json"
        manifest.parent.mkdir(parents=True)
        sidecar_env = {
            "DISCOVERY_SERVICE_NAME": "",
            "DISCOVERY_POD_SELECTOR": ",".join(f"{k}={v}" for k, v in SELECTOR.items()),
            "DISCOVERY_REQUIRE_METADATA": "false",
            "DISCOVERY_REGISTER": "never",
            "DISCOVERY_WORKER_PORT": str(self.port),
            "DISCOVERY_SMG_MANIFEST": str(manifest),
            "DISCOVERY_SMG_SELECTOR": selector,
            "DISCOVERY_LOG_LEVEL": "warning",
        }
        self.sidecar = launch_sidecar(self.plane, self.cluster, gateway_pod, "", logs, extra_env=sidecar_env)
        self.sidecar.wait_ready(60)
        self.gateways["smg-via-sidecar"] = SmgGateway(
            [
                "--discovery-provider",
                "file",
                "--discovery-file",
                str(manifest),
                "--discovery-check-interval-secs",
                "1",
                *common,
            ],
            logs / "smg-via-sidecar.log",
        )
        truth = self.truth()
        for name, gateway in self.gateways.items():
            wait_for(lambda g=gateway: self.urls(g) == truth, 90, what=f"{name} to have every worker")  # type: ignore[misc]
        say(f"both gateways route to the {len(truth)} workers")

    def stop(self) -> None:
        self.stopped.set()
        for gateway in self.gateways.values():
            gateway.stop()
        if self.sidecar is not None:
            self.sidecar.kill()
        for worker in [*self.stand_ins.values(), getattr(self, "reference", None)]:
            if worker is not None:
                worker.stop()
        self.plane.stop()

    # -- the world ------------------------------------------------------------------------------------------
    def add_worker(self) -> tuple[str, float]:
        """A new engine: its server up first, then its pod Running and Ready (the kubelet's readiness probe)."""
        name, address = next(self.names), next(self.addresses)
        self.stand_ins[name] = self.every_stand_in[name] = StandInWorker(address, self.port, self.settings.service)
        self.cluster.create_pod(NAMESPACE, name, SELECTOR)
        self.cluster.set_pod_status(NAMESPACE, name, ready=True, ip=address)
        return name, time.monotonic()

    def truth(self) -> set[str]:
        return {f"http://{w.host}:{w.port}" for w in self.stand_ins.values()}

    @staticmethod
    def urls(gateway: SmgGateway) -> set[str]:
        try:
            return {str(w["url"]) for w in gateway.workers()}
        except (RuntimeError, OSError, ValueError):
            return set()

    def sample(self) -> None:
        """The plot's second panel: how many workers each gateway routes to, and how many are serving."""
        while not self.stopped.wait(SAMPLE):  # poll: the sampling interval of the measurement
            truth = self.truth()
            row: dict[str, Any] = {"t": round(time.monotonic() - self.began, 2), "serving": len(truth)}
            for name, gateway in self.gateways.items():
                seen = self.urls(gateway)
                row[name] = {"workers": len(seen), "dead": len(seen - truth)}
            self.timeline.append(row)

    # -- the rollout ----------------------------------------------------------------------------------------
    def rollout(self, grace: float, interval: float) -> None:
        for round_number in range(self.settings.rounds):
            for old in list(self.stand_ins):  # this round's pods, oldest first
                new, ready_at = self.add_worker()
                step = Replacement(new, old, ready_at)
                self.cluster.delete_pod(NAMESPACE, old, grace_seconds=int(self.settings.grace) + 30)
                step.deleted_at = time.monotonic()
                say(f"round {round_number + 1}: {new} ready, {old} terminating ({grace:.0f} s of drain)")
                time.sleep(grace)  # the grace period itself, what is simulated: not synchronisation
                self.stand_ins.pop(old).stop()
                step.stopped_at = time.monotonic()
                self.cluster.delete_pod(NAMESPACE, old, grace_seconds=0)  # the kubelet confirms: the Pod goes
                self.replacements.append(step)
                time.sleep(max(0.0, interval - grace))  # the next new pod's start-up, simulated

    def measure(self, grace: float, interval: float) -> dict[str, Any]:
        """One rollout under load (old engines serving ``grace`` seconds after their pod's delete, a step at
        least every ``interval`` seconds): the summary."""
        self.replacements, self.timeline, self.stopped = [], [], threading.Event()
        senders: dict[str, Callable[[], Outcome]] = {
            name: (lambda g=gateway, n=name: chat_completion(g.port, MODEL, content=f"via {n}"))  # type: ignore[misc]
            for name, gateway in self.gateways.items()
        }
        senders["direct"] = lambda: chat_completion(self.port, MODEL, content="direct", host=self.reference.host)
        s = self.settings
        loads = {
            n: Load(send, clients=s.clients, pause=s.pause, max_seconds=600).start() for n, send in senders.items()
        }
        began = self.began = time.monotonic()
        sampler = threading.Thread(target=self.sample, name="sampler", daemon=True)
        sampler.start()
        for load in loads.values():
            load.wait_for_more(50)
        self.rollout(grace, interval)
        settle = time.monotonic() + 5.0
        while time.monotonic() < settle:
            time.sleep(0.1)  # poll: keep the load on a few seconds after the last step
        outcomes = {n: load.stop() for n, load in loads.items()}
        self.stopped.set()
        sampler.join(5)
        summary = self.summarise(outcomes, began)
        return {**summary, "grace_seconds": grace, "interval_seconds": interval, "timeline": self.timeline}

    def summarise(self, outcomes: dict[str, list[Outcome]], began: float) -> dict[str, Any]:
        direct = [o.seconds for o in outcomes["direct"] if o.ok]
        direct_p50, direct_p99 = percentile(direct, 0.5), percentile(direct, 0.99)
        served = {name: worker.served for name, worker in self.every_stand_in.items()}
        result: dict[str, Any] = {
            "direct": {"requests": len(direct), "p50_ms": ms(direct_p50), "p99_ms": ms(direct_p99)},
        }
        for gateway in GATEWAYS:
            mine = outcomes[gateway]
            ok = [o.seconds for o in mine if o.ok]
            first_traffic = []
            for step in self.replacements:
                tag = f"via {gateway}"
                hits = [t for t, content in served.get(step.new, []) if content == tag and t >= step.ready_at]
                first_traffic.append(round(min(hits) - step.ready_at, 3) if hits else None)
            taken = [t for t in first_traffic if t is not None]
            result[gateway] = {
                "requests": len(mine),
                "failed": len(mine) - len(ok),
                "failures": dict(failures(mine)),
                "p50_ms": ms(percentile(ok, 0.5)),
                "p99_ms": ms(percentile(ok, 0.99)),
                "p99_added_ms": ms(percentile(ok, 0.99) - direct_p99),
                "new_worker_first_request_s": first_traffic,
                "new_worker_first_request_median_s": round(statistics.median(taken), 3) if taken else None,
                "new_worker_first_request_max_s": max(taken) if taken else None,
                "requests_over_time": [[round(o.started - began, 3), round(o.seconds * 1000, 2), o.ok] for o in mine],
            }
        result["steps"] = [
            {
                "new": r.new,
                "old": r.old,
                "ready_s": round(r.ready_at - began, 2),
                "deleted_s": round(r.deleted_at - began, 2),
                "stopped_s": round(r.stopped_at - began, 2),
            }
            for r in self.replacements
        ]
        return result


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


# -- the report ---------------------------------------------------------------------------------------------------
def plot(phases: dict[str, dict[str, Any]], path: pathlib.Path) -> None:
    """Per phase (a column): every request's latency over the rollout, failures marked; below, how many
    workers each gateway still listed after their engine had stopped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        2, len(phases), figsize=(5.5 * len(phases), 6.5), sharex="col", height_ratios=[3, 2], squeeze=False
    )
    colours = {"smg-kubernetes": "tab:orange", "smg-via-sidecar": "tab:blue"}
    for column, (phase, result) in enumerate(phases.items()):
        top, bottom = axes[0][column], axes[1][column]
        for gateway in GATEWAYS:
            rows = result[gateway]["requests_over_time"]
            good = [(t, m) for t, m, ok in rows if ok]
            bad = [(t, m) for t, m, ok in rows if not ok]
            top.scatter(
                [t for t, _ in good], [m for _, m in good], s=3, alpha=0.4, color=colours[gateway], label=gateway
            )
            if bad:
                top.scatter(
                    [t for t, _ in bad],
                    [m for _, m in bad],
                    s=30,
                    marker="x",
                    color=colours[gateway],
                    label=f"{gateway}: failed ({len(bad)})",
                )
            timeline = result["timeline"]
            bottom.step(
                [row["t"] for row in timeline],
                [row[gateway]["dead"] for row in timeline],
                where="post",
                color=colours[gateway],
                label=gateway,
            )
        for step in result["steps"]:
            for axis in (top, bottom):
                axis.axvline(step["deleted_s"], color="grey", linewidth=0.6, linestyle=":")
        top.set_yscale("log")
        top.set_ylabel("request latency (ms)")
        top.legend(loc="upper right", fontsize=8)
        top.set_title(f"{phase} (old engine serves {result['grace_seconds']:.0f} s after its delete)", fontsize=10)
        bottom.set_ylabel("stopped engines in /workers")
        bottom.set_xlabel("seconds (dotted: an old pod deleted); SMG drains a removed worker 5 s", fontsize=9)
        bottom.legend(loc="upper right", fontsize=8)
    figure.suptitle("Rolling replacement under load: SMG's own discovery vs fed by the sidecar (one run)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def report(phases: dict[str, dict[str, Any]], settings: Settings, versions: dict[str, str]) -> str:
    def first(data: dict[str, Any]) -> str:
        median, worst = data["new_worker_first_request_median_s"], data["new_worker_first_request_max_s"]
        missed = sum(1 for t in data["new_worker_first_request_s"] if t is None)
        text = f"{median:.2f} s (max {worst:.2f} s)" if median is not None else "never"
        return text + (f", {missed} never" if missed else "")

    def fails(data: dict[str, Any]) -> str:
        share = 100 * data["failed"] / data["requests"] if data["requests"] else 0
        return f"**{data['failed']}** of {data['requests']} ({share:.2f} %)"

    rows = []
    for phase, result in phases.items():
        k8s, sidecar, direct = result["smg-kubernetes"], result["smg-via-sidecar"], result["direct"]
        rows += [
            (f"{phase}: failed requests", fails(k8s), fails(sidecar)),
            (f"{phase}: p50 / p99 latency", *(f"{d['p50_ms']:.1f} / {d['p99_ms']:.1f} ms" for d in (k8s, sidecar))),
            (
                f"{phase}: p99 added over the engine's own ({direct['p99_ms']:.1f} ms)",
                *(f"{d['p99_added_ms']:.1f} ms" for d in (k8s, sidecar)),
            ),
            (f"{phase}: new worker Ready to its first request, median", first(k8s), first(sidecar)),
        ]
    some = next(iter(phases.values()))
    lines = [
        SECTION,
        "",
        "## With traffic: failed requests through a rolling replacement",
        "",
        "Generated by `python -m bench.smg_traffic` (raw numbers: `bench/smg-traffic-results.json`; plot:",
        "`bench/plots/smg-traffic.png`). Both gateways the real `smg` 1.13, side by side in one run under the",
        f"same load ({settings.clients} client threads each, back to back), `--policy round_robin`, SMG's",
        f"default retries. {settings.workers} stand-in engines (OpenAI-compatible, {settings.service * 1000:.0f} ms",
        f"per request) are replaced {settings.rounds} times over ({len(some['steps'])} replacements per phase) as a",
        "Deployment with `maxSurge: 1, maxUnavailable: 0` does: a new pod Ready, then an old one deleted, the",
        f"next step at least {settings.interval:.0f} s later (a new pod's start-up).",
        f"**Graceful drain**: the old engine keeps serving for its grace period ({settings.grace:.0f} s), then",
        "stops. **No drain**: it stops at the delete (an engine that exits on SIGTERM, no `preStop`). **Back to",
        "back**: the same, the next step at once (new pods that are Ready at once: the fastest rollout). A failed",
        "request is any answer that is not a complete chat completion, after SMG's own retries. The engine's own",
        "latency comes from a third load sent straight to a reference engine in the same phase.",
        "",
        "| | smg-kubernetes | smg-via-sidecar |",
        "| --- | --- | --- |",
        *[f"| {name} | {a} | {b} |" for name, a, b in rows],
        "",
    ]
    for phase, result in phases.items():
        reasons = {g: result[g]["failures"] for g in GATEWAYS if result[g]["failures"]}
        if reasons:
            lines += [f"{phase}, failures by reason: " + "; ".join(f"{g}: {json.dumps(r)}" for g, r in reasons.items())]
            lines += [""]
    lines += [
        "![latency and stopped engines still listed, over each rollout](plots/smg-traffic.png)",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())),
        "",
    ]
    return "\n".join(lines)


def compact(phases: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The raw results as written to the repository: each request's row (what the plot draws) becomes one row
    per second (requests, failed, p99 ms), and the failed requests are kept whole with their reason."""
    out: dict[str, dict[str, Any]] = {}
    for phase, result in phases.items():
        out[phase] = dict(result)
        for gateway in GATEWAYS:
            data = dict(result[gateway])
            rows = data.pop("requests_over_time")
            seconds: dict[int, list[tuple[float, bool]]] = {}
            for t, latency, ok in rows:
                seconds.setdefault(int(t), []).append((latency, ok))
            data["per_second"] = [
                [second, len(items), sum(1 for _, ok in items if not ok), percentile([m for m, _ in items], 0.99)]
                for second, items in sorted(seconds.items())
            ]
            data["failed_requests"] = [[t, latency] for t, latency, ok in rows if not ok]
            out[phase][gateway] = data
    return out


def dump(raw: dict[str, Any]) -> str:
    """JSON with one line per row: the innermost lists and the timeline's small objects are kept on one line."""
    text = json.dumps(raw, indent=1)
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
    text = re.sub(r"\{\s+([^\[\]{}]*?)\s+\}", lambda m: "{" + re.sub(r"\s+", " ", m.group(1)) + "}", text)
    return text + "\n"


def write_section(path: pathlib.Path, section: str) -> None:
    """Replace this benchmark's section of ``path`` (everything from ``SECTION`` on), keeping the rest."""
    text = path.read_text() if path.exists() else ""
    head = text.split(SECTION)[0].rstrip("\n")
    path.write_text((head + "\n\n" if head else "") + section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.smg_traffic", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workers", type=int, default=Settings.workers)
    parser.add_argument("--rounds", type=int, default=Settings.rounds)
    parser.add_argument("--grace", type=float, default=Settings.grace, help="seconds a terminating engine serves")
    parser.add_argument("--interval", type=float, default=Settings.interval, help="least seconds between steps")
    args = parser.parse_args(argv)
    settings = Settings(workers=args.workers, rounds=args.rounds, grace=args.grace, interval=args.interval)
    work = pathlib.Path(tempfile.mkdtemp(prefix="smg-traffic-"))  # kept: the gateways' logs are in logs/
    run = Run(work, settings)
    phases: dict[str, dict[str, Any]] = {}
    try:
        run.start()
        phases["graceful drain"] = run.measure(settings.grace, settings.interval)
        phases["no drain"] = run.measure(0.0, settings.interval)
        phases["no drain, back to back"] = run.measure(0.0, 0.0)
    finally:
        run.stop()
    say(f"logs: {work / 'logs'}")
    versions = dict(pinned_versions())
    versions["smg"] = importlib.metadata.version("smg")
    plot(phases, BENCH_DIR / "plots" / "smg-traffic.png")
    raw = {"versions": versions, "settings": settings.__dict__, "phases": compact(phases)}
    (BENCH_DIR / "smg-traffic-results.json").write_text(dump(raw))
    write_section(BENCH_DIR / "SMG.md", report(phases, settings, versions))
    for phase, result in phases.items():
        for gateway in GATEWAYS:
            data = result[gateway]
            say(
                f"{phase}, {gateway}: {data['failed']} of {data['requests']} failed, p99 {data['p99_ms']} ms, "
                f"new worker's first request after {data['new_worker_first_request_median_s']} s (median)"
            )
    say("wrote bench/SMG.md (With traffic), bench/smg-traffic-results.json, bench/plots/smg-traffic.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
