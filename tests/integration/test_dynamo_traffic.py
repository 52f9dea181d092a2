"""Real traffic through real peers: Dynamo's own frontend serving chat completions from mocker workers.

``devcluster.dynamo_serving`` runs ``ai-dynamo`` 1.6.1 from PyPI as a serving deployment on the real control
plane: ``python -m dynamo.frontend`` and ``python -m dynamo.mocker`` workers as pods, Kubernetes discovery,
the TCP request plane, a sidecar beside each (watch-only, as documented beside Dynamo's runtime). What an
operator judges discovery by is requests, so these tests send them:

* the frontend answers plain and streaming chat completions routed to the workers, and the frontend's
  sidecar lists the same workers;
* **parity**: the frontend's sidecar's ``WatchPeers`` filtered by the model equals the frontend's own
  ``/v1/models`` and worker set after each step of scale-up, a worker unready and ready again, a worker
  deleted, and a rolling replacement of every worker; how long each side took after the readiness change
  is recorded (``build/test-results/dynamo-parity.json``), never asserted;
* **no failed request caused by the sidecar**: a bounded load of chat completions through the frontend
  while every sidecar is killed -9 and restarted, and while every sidecar is upgraded (restarted from a new
  build): every request succeeds; and during a rolling replacement of all workers, failed requests are
  counted with and without sidecars in the pods (``build/test-results/dynamo-rollout.json``): none with them.

The kubelet's part is played by ``DynamoDeployment``: a pod is Ready when its main container's readiness
probe (the worker's ``/health``) and its sidecar's (``/readyz``) pass; a sidecar that dies makes its pod
unready until it is back, as a native sidecar's readiness gates its pod. Processes' logs are under the
test's tmp_path, quoted when something fails.
"""

from __future__ import annotations

import json
import pathlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from devcluster.build import ROOT
from devcluster.cluster import ControlPlane
from devcluster.dynamo_serving import MODEL, DynamoDeployment, Frontend
from devcluster.objects import Cluster
from devcluster.sidecars import build_sidecar
from devcluster.traffic import Load, Outcome, failures, percentile
from devcluster.waiting import wait_for
from discovery_client.client import make_filter
from tests.conftest import MANIFESTS, kubectl
from tests.integration.streams import StreamRecorder

pytestmark = pytest.mark.integration

TIMEOUT = 60.0
SAMPLE = 0.025  # how often the parity observer samples both views (the lags' resolution)
RESULTS = ROOT / "build" / "test-results"


def record(name: str, data: dict[str, Any]) -> pathlib.Path:
    """Write measured figures (never asserted) where a developer finds them after ``make test``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


@pytest.fixture
def deployments(
    control_plane: ControlPlane, cluster: Cluster, namespace: str, tmp_path: pathlib.Path
) -> Iterator[list[DynamoDeployment]]:
    """Dynamo deployments made by a test (``deploy``), all stopped at its end."""
    made: list[DynamoDeployment] = []
    yield made
    for deployment in made:
        deployment.stop()


def deploy(
    made: list[DynamoDeployment],
    plane: ControlPlane,
    cluster: Cluster,
    namespace: str,
    work_dir: pathlib.Path,
    workers: int,
    with_sidecars: bool = True,
) -> DynamoDeployment:
    """``workers`` ready mocker pods and a frontend routing to all of them (and, by default, sidecars)."""
    deployment = DynamoDeployment(plane, cluster, namespace, work_dir, with_sidecars=with_sidecars)
    made.append(deployment)
    frontend = deployment.start_frontend()
    deployment.add_workers([f"worker-{index}" for index in range(workers)])
    expected = {deployment.instance_id(name) for name in deployment.workers}
    routing(deployment, frontend, expected)
    return deployment


def routing(deployment: DynamoDeployment, frontend: Frontend, expected: set[int | None]) -> None:
    """Wait until the frontend lists the model and routes to exactly ``expected``."""
    try:
        wait_for(
            lambda: frontend.models() == [MODEL] and frontend.instance_ids() == expected,
            TIMEOUT,
            what=f"the frontend to list {MODEL} served by {sorted(i or 0 for i in expected)}",
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{deployment.log_tails()}") from None


# -- the sidecar's view and the frontend's, sampled side by side --------------------------------------------------
@dataclass(frozen=True)
class View:
    """What one side shows at one moment: instance IDs serving the model, and the models listed."""

    instance_ids: frozenset[int]
    models: tuple[str, ...]


@dataclass
class Sample:
    """One sample of both sides; each side's time is when its view was read (the frontend's: when its last
    answer arrived, so its lag includes that HTTP round trip, a few ms)."""

    sidecar_at: float
    sidecar: View
    frontend_at: float
    frontend: View | None  # None: the frontend did not answer


@dataclass
class ParityObserver:
    """Samples the frontend sidecar's WatchPeers (filtered by the model) and the frontend's ``/v1/models`` and
    ``/health`` every ``SAMPLE`` seconds on a thread of its own, so a step's lag is measured while the step
    (a graceful delete, say) is still being carried out."""

    frontend: Frontend
    stream: StreamRecorder
    samples: list[Sample] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards samples
    stopped: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name="parity-observer", daemon=True)
        self.thread.start()

    def sidecar_view(self) -> View:
        peers = self.stream.peers().values()
        serving = [m for p in peers for m in p.models if m.name == MODEL]
        return View(frozenset(m.instance_id for m in serving), tuple(sorted({m.name for m in serving})))

    def frontend_view(self) -> View | None:
        models, ids = self.frontend.models(), self.frontend.instance_ids()
        return None if ids is None or models is None else View(frozenset(ids), tuple(models))

    def _run(self) -> None:
        while not self.stopped.wait(SAMPLE):  # poll: the sampling interval of the measurement
            sidecar_at, sidecar = time.monotonic(), self.sidecar_view()
            frontend = self.frontend_view()
            sample = Sample(sidecar_at, sidecar, time.monotonic(), frontend)
            with self.lock:
                self.samples.append(sample)

    def wait_lags(self, since: float, expected: set[int], what: str) -> dict[str, float]:
        """Wait until both sides show ``expected`` (and the model iff it is served); return each side's
        lag after ``since``: the first sample from then on that shows it."""
        want = View(frozenset(expected), (MODEL,) if expected else ())

        def lags() -> dict[str, float] | None:
            with self.lock:
                samples = list(self.samples)
            found: dict[str, float] = {}
            for side in ("sidecar", "frontend"):
                times = [getattr(s, f"{side}_at") for s in samples if getattr(s, side) == want]
                later = [t for t in times if t >= since]
                if later:
                    found[side] = round(later[0] - since, 3)
            return found if len(found) == 2 else None

        try:
            result: dict[str, float] = wait_for(lags, TIMEOUT, what=f"both sides to show {what}")
        except TimeoutError as exc:
            with self.lock:
                last = self.samples[-1] if self.samples else None
            raise AssertionError(f"{exc}\nexpected {want}\nlast sample {last}") from None
        return result

    def agree_now(self) -> bool:
        return self.frontend_view() == self.sidecar_view()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(5)


# -- 1. the deployment serves --------------------------------------------------------------------------------------
def test_frontend_answers_chat_completions_from_workers_its_sidecar_lists(
    deployments: list[DynamoDeployment],
    control_plane: ControlPlane,
    cluster: Cluster,
    namespace: str,
    tmp_path: pathlib.Path,
) -> None:
    """Dynamo's frontend serves plain and streaming chat completions routed to mocker workers it found through
    Kubernetes discovery, and the sidecar beside it lists the same workers, with their model."""
    deployment = deploy(deployments, control_plane, cluster, namespace, tmp_path, workers=2)
    frontend = deployment.frontend
    assert frontend is not None and frontend.sidecar is not None

    plain = frontend.chat()
    assert plain.ok, plain.reason
    assert plain.body["object"] == "chat.completion" and plain.body["model"] == MODEL
    assert plain.body["choices"][0]["finish_reason"] in ("length", "stop")
    assert plain.body["usage"]["completion_tokens"] >= 1
    streamed = frontend.chat(stream=True)
    assert streamed.ok, streamed.reason
    assert streamed.body["chunks"] >= 1 and streamed.body["object"] == "chat.completion.chunk"

    stream = StreamRecorder(frontend.sidecar.target, make_filter(model=MODEL))
    try:
        ids = {deployment.instance_id(name) for name in deployment.workers}
        stream.wait_until(lambda r: set(r.names()) == set(deployment.workers), TIMEOUT, "both workers")
        listed = {m.instance_id for p in stream.peers().values() for m in p.models if m.name == MODEL}
        assert listed == ids == frontend.instance_ids()
    finally:
        stream.close()
    for worker in deployment.workers.values():
        assert worker.sidecar is not None and "watch-only" in worker.sidecar.http_get("/readyz")[1]


# -- 2. parity with Dynamo's own frontend ---------------------------------------------------------------------------
def test_sidecar_watch_equals_the_frontend_models_and_workers_after_each_step(
    deployments: list[DynamoDeployment],
    control_plane: ControlPlane,
    cluster: Cluster,
    namespace: str,
    tmp_path: pathlib.Path,
) -> None:
    """After scale-up, a worker unready and ready again, a worker deleted and a rolling replacement of every
    worker, the frontend's sidecar shows exactly the instances (and the model) that the frontend itself lists
    and routes to. Each side's lag after the readiness change is recorded, not asserted."""
    deployment = deploy(deployments, control_plane, cluster, namespace, tmp_path, workers=2)
    frontend = deployment.frontend
    assert frontend is not None and frontend.sidecar is not None
    # ready_only: a terminating worker is a DRAINING peer until its pod is gone; Dynamo routes to ready ones only.
    stream = StreamRecorder(frontend.sidecar.target, make_filter(model=MODEL, ready_only=True))
    observer = ParityObserver(frontend, stream)
    steps: list[dict[str, Any]] = []
    ready: dict[str, int] = {}

    def serving() -> set[int]:
        return set(ready.values())

    def step(name: str, since: float) -> None:
        lags = observer.wait_lags(since, serving(), name)
        steps.append({"step": name, "instances": len(ready), "lag_seconds": lags})

    def add(name: str) -> None:
        worker = deployment.add_worker(name, ready=False)
        instance_id = deployment.instance_id(worker.name)
        assert instance_id is not None
        since = deployment.set_ready(name, True)
        ready[name] = instance_id
        step(f"ready: {name}", since)

    def delete(name: str) -> None:
        del ready[name]
        deleting = Background(lambda: deployment.delete_worker(name))
        step(f"deleted: {name}", deleting.started)
        deleting.join()

    try:
        ready.update({name: deployment.instance_id(name) or 0 for name in deployment.workers})
        observer.wait_lags(time.monotonic(), serving(), "the initial two workers")

        add("worker-2")  # scale up
        del ready["worker-1"]
        step("unready: worker-1", deployment.set_ready("worker-1", False))
        ready["worker-1"] = deployment.instance_id("worker-1") or 0
        step("ready again: worker-1", deployment.set_ready("worker-1", True))
        delete("worker-0")
        for old in sorted(deployment.workers):  # rolling replacement: a new pod ready, then the old one goes
            add(f"{old}-b")
            delete(old)
        assert observer.agree_now()
    finally:
        observer.stop()
        stream.close()
    path = record("dynamo-parity", {"sample_seconds": SAMPLE, "steps": steps})
    print(f"lags recorded in {path}: " + "; ".join(f"{s['step']} {s['lag_seconds']}" for s in steps))


class Background:
    """One step carried out on a thread (a graceful delete takes seconds) while its effect is measured; owns
    the thread, and ``join`` re-raises what the step raised."""

    def __init__(self, action: Callable[[], object]) -> None:
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, args=(action,), name="step", daemon=True)
        self.thread.start()

    def _run(self, action: Callable[[], object]) -> None:
        try:
            action()
        except BaseException as exc:  # noqa: BLE001 - re-raised by join
            self.error = exc

    def join(self, timeout: float = TIMEOUT) -> None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"the step did not finish within {timeout:.0f}s")
        if self.error is not None:
            raise self.error


# -- 3. zero failed requests caused by the sidecar ------------------------------------------------------------------
def summary(outcomes: list[Outcome]) -> dict[str, Any]:
    latencies = [o.seconds for o in outcomes if o.ok]
    return {
        "requests": len(outcomes),
        "failed": sum(1 for o in outcomes if not o.ok),
        "failures": dict(failures(outcomes)),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
    }


def test_no_request_fails_while_every_sidecar_is_killed_restarted_and_upgraded(
    deployments: list[DynamoDeployment],
    control_plane: ControlPlane,
    cluster: Cluster,
    namespace: str,
    tmp_path: pathlib.Path,
) -> None:
    """Chat completions flow through the frontend while each pod's sidecar in turn is killed -9 and restarted
    (its pod unready meanwhile, as its readiness gates the pod), then while each is upgraded: stopped and
    started from a new build of another version. Every request succeeds, and Dynamo's CRs are never written."""
    deployment = deploy(deployments, control_plane, cluster, namespace, tmp_path, workers=3)
    frontend = deployment.frontend
    assert frontend is not None
    build = build_sidecar("0.0.0+upgrade.test", tmp_path / "upgrade")
    crs_before = {name: deployment.worker_cr(name) for name in deployment.workers}
    every = set(deployment.workers)
    ids = {deployment.instance_id(name) for name in every}

    load = Load(frontend.chat, clients=2, max_requests=20_000, max_seconds=240, pause=0.02).start()
    try:
        load.wait_for_more(20)
        for name in sorted(every):
            deployment.restart_sidecar(name, kill=True)
            routing(deployment, frontend, ids)  # back in the frontend's set before the next one
            load.wait_for_more(10)
        killed = load.count()
        deployment.restart_frontend_sidecar(kill=True)
        load.wait_for_more(10)
        frontend_killed = load.count()
        for name in sorted(every):
            sidecar = deployment.restart_sidecar(name, kill=False, build=build)
            assert sidecar.version() == "0.0.0+upgrade.test", sidecar.log_tail()
            routing(deployment, frontend, ids)
            load.wait_for_more(10)
    finally:
        outcomes = load.stop()
    result = {
        "every worker's sidecar killed -9 and restarted": summary(outcomes[:killed]),
        "the frontend's sidecar killed -9 and restarted": summary(outcomes[killed:frontend_killed]),
        "every worker's sidecar upgraded": summary(outcomes[frontend_killed:]),
    }
    record("dynamo-sidecar-restarts", result)
    assert not failures(outcomes), f"failed requests: {failures(outcomes)}\n{result}"
    assert len(outcomes) >= 60, result
    for name, before in crs_before.items():
        after = deployment.worker_cr(name)
        assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"], (
            f"{name}'s DynamoWorkerMetadata was written while its sidecar restarted"
        )


def rollout_under_load(deployment: DynamoDeployment) -> dict[str, Any]:
    """Replace every worker (a new pod ready, then the old one deleted gracefully) under a bounded load."""
    frontend = deployment.frontend
    assert frontend is not None
    load = Load(frontend.chat, clients=2, max_requests=20_000, max_seconds=240, pause=0.02).start()
    started = time.monotonic()
    pod_ready: list[float] = []  # from a new pod's creation to its Ready: the sidecar starts first, if any
    try:
        load.wait_for_more(20)
        for old in sorted(deployment.workers):
            creating = time.monotonic()
            deployment.add_worker(f"{old}-b")
            pod_ready.append(round(time.monotonic() - creating, 2))
            routing(deployment, frontend, {deployment.instance_id(n) for n in deployment.workers})
            deployment.delete_worker(old)
            routing(deployment, frontend, {deployment.instance_id(n) for n in deployment.workers})
            load.wait_for_more(10)
    finally:
        outcomes = load.stop()
    return {**summary(outcomes), "seconds": round(time.monotonic() - started, 1), "new_pod_ready_seconds": pod_ready}


def test_rolling_replacement_fails_no_more_requests_with_sidecars_than_without(
    deployments: list[DynamoDeployment],
    control_plane: ControlPlane,
    cluster: Cluster,
    namespace: str,
    tmp_path: pathlib.Path,
) -> None:
    """The same rolling replacement of three workers under the same load, once with a sidecar in every pod and
    once without: the failed requests of both are recorded, and with sidecars there are none."""
    with_sidecars = deploy(deployments, control_plane, cluster, namespace, tmp_path / "with", workers=3)
    measured = {"with sidecars": rollout_under_load(with_sidecars)}
    with_sidecars.stop()
    bare = f"{namespace}-bare"  # a namespace of its own: the first deployment's objects stay where they are
    cluster.create_namespace(bare)
    try:
        kubectl(control_plane, "apply", "-f", str(MANIFESTS / "rbac.yaml"), namespace=bare)  # for Dynamo's tokens
        cluster.wait_for_service_account(bare, "discovery-sidecar")
        without = deploy(
            deployments, control_plane, cluster, bare, tmp_path / "without", workers=3, with_sidecars=False
        )
        measured["without sidecars"] = rollout_under_load(without)
    finally:
        cluster.delete_namespace(bare)
    record("dynamo-rollout", measured)
    print(f"rolling replacement of 3 workers under load: {measured}")
    assert measured["with sidecars"]["requests"] >= 50, measured
    assert measured["with sidecars"]["failed"] == 0, measured
