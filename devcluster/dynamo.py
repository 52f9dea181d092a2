"""Run NVIDIA Dynamo's real runtime (``ai-dynamo-runtime`` from PyPI) as a pod's main container would.

The interop tests need the real peer, not a re-implementation of it: a Dynamo *worker* that creates a
``DistributedRuntime`` on the Kubernetes discovery backend and serves an endpoint (optionally with a
model card), and a Dynamo *client* that reports the instances it discovers for an endpoint. Each runs
as its own process with exactly what Dynamo's operator gives a pod's main container: ``POD_NAME``,
``POD_NAMESPACE``, ``POD_UID``, ``DYN_DISCOVERY_BACKEND=kubernetes``, and (no kubelet here, so no
in-cluster config) a ``KUBECONFIG`` holding a real pod-bound service-account token, made the way
``devcluster.sidecars`` makes one for a sidecar.

What the released runtime (1.6.1) needs, found by running it: nothing but the API server. The
Kubernetes discovery backend with the TCP request plane starts without NATS or etcd (the event plane
is not touched by serving an endpoint, registering a model card or listing instances). It reads the
pod identity from ``/etc/podinfo/{pod_name,pod_uid,pod_namespace}`` first, then the variables, so a
machine that has ``/etc/podinfo`` (a test run inside a pod) would hand every process that pod's
identity; ``launch_*`` refuses to run then. ``DYN_TCP_RPC_HOST=127.0.0.1`` keeps the request plane's
listener on loopback (by default it binds the host's first non-loopback address); the address only
appears in the endpoint's ``transport``, which nothing here dials.

Each process prints machine-readable JSON lines on stdout (one file per process); the runtime's own
logs (``DYN_LOGGING_JSONL``) go to a second file, whose tail is quoted when something fails. Worker
events: ``{"event": "runtime", "instance_id": N}`` once the runtime exists (Dynamo's instance ID,
``endpoint.connection_id()``), ``{"event": "model_registered", ...}``, ``{"event": "serving", ...}``.
Client events: ``{"event": "client_ready"}``, then ``{"event": "instances", "instance_ids": [...],
"instances": [{"instance_id", "transport": {"kind", "address"}, "device_type"}]}`` each time what
``Client.instance_ids()`` / ``Client.instances()`` return changes (polled every 0.1 s).

On the etcd backend (``launch_dynamo_etcd``) the same program runs with ``DYN_DISCOVERY_BACKEND=etcd``
and ``ETCD_ENDPOINTS`` and no kubeconfig: 1.6.1 then needs nothing but etcd (found by running it), and
``DistributedRuntime(loop, "etcd", "tcp")`` registers under ``v1/instances`` and ``v1/mdc`` on its
primary lease, whose ID ``endpoint.connection_id()`` reports.

The processes are tied to the Python process that starts them (``PR_SET_PDEATHSIG``, own process
group), like the control plane's: an interrupted test run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import pathlib
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from devcluster.cluster import ControlPlane, _die_with_parent
from devcluster.objects import Cluster
from devcluster.sidecars import SIDECAR_SERVICE_ACCOUNT, write_token_kubeconfig
from devcluster.waiting import wait_for

DISTRIBUTION = "ai-dynamo-runtime"
TESTED_VERSION = "1.6.1"
"""The release these tests were written against; ``pyproject.toml`` pins the compatible range."""
PODINFO_DIR = pathlib.Path("/etc/podinfo")  # fixed in Dynamo's runtime: read before the POD_* variables
DEFAULT_ENDPOINT = "ns.comp.ep"

# Variables that must not leak from the test's own environment into a "pod": identity, discovery and
# transport settings of Dynamo (DYN_*, NATS_*, ETCD_*) and of the sidecar (DISCOVERY_*).
_SCRUBBED_PREFIXES = ("POD_", "DYN_", "NATS_", "ETCD_", "DISCOVERY_", "CONTAINER_NAME", "KUBECONFIG")

# The program a Dynamo pod's main container runs: `python -c PROGRAM MODE OPTIONS_JSON`.
PROGRAM = r"""
import asyncio, json, os, sys

def emit(event, **fields):
    print(json.dumps({"event": event, **fields}, sort_keys=True), flush=True)

async def worker(runtime, options):
    endpoint = runtime.endpoint(options["endpoint"])
    emit("runtime", instance_id=endpoint.connection_id(), endpoint=options["endpoint"])

    async def generate(request, context=None):
        yield {"pod": os.environ["POD_NAME"], "echo": request}

    serving = endpoint.serve_endpoint(generate)  # a Future: registers, then serves until shutdown
    model = options.get("model")
    if model:
        from dynamo.llm import ModelInput, ModelType, WorkerType, register_model
        await register_model(ModelInput.Text, ModelType.Chat, endpoint, model, model,
                             worker_type=WorkerType.Aggregated, skip_model_assets=True)
        emit("model_registered", model=model)
    if options.get("kv_events"):  # a KV event publisher: registers an event channel and an event source
        from dynamo.llm import KvEventPublisher
        kv_events = KvEventPublisher(endpoint, kv_block_size=16)  # kept alive by this frame
        emit("kv_events", publisher=repr(kv_events))
    emit("serving", endpoint=options["endpoint"])
    await serving

async def client(runtime, options):
    client = await runtime.endpoint(options["endpoint"]).client()
    emit("client_ready", endpoint=options["endpoint"])
    last = None
    while True:
        ids = sorted(client.instance_ids())
        instances = sorted(
            ({"instance_id": i.instance_id, "device_type": i.device_type,
              "transport": {"kind": i.transport.kind, "address": i.transport.address}}
             for i in client.instances()),
            key=lambda item: item["instance_id"])
        if (ids, instances) != last:
            emit("instances", instance_ids=ids, instances=instances)
            last = (ids, instances)
        await asyncio.sleep(options.get("interval", 0.1))

async def main(mode, options):
    from dynamo._core import DistributedRuntime
    loop = asyncio.get_running_loop()
    runtime = DistributedRuntime(loop, os.environ["DYN_DISCOVERY_BACKEND"], os.environ["DYN_REQUEST_PLANE"])
    await {"worker": worker, "client": client}[mode](runtime, options)

asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
"""


def runtime_version() -> str:
    """The installed ``ai-dynamo-runtime`` version, or a clear error saying how to get it."""
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"{DISTRIBUTION} is not installed in {sys.prefix}: the Dynamo interop tests run NVIDIA Dynamo's "
            f"real runtime; install the dev extra (`pip install -e '.[dev]'`, or `make venv`)"
        ) from None
    return version


def _check_machine() -> None:
    if PODINFO_DIR.exists():
        raise RuntimeError(
            f"{PODINFO_DIR} exists on this machine: Dynamo's runtime reads the pod identity from it before "
            "POD_NAME/POD_UID/POD_NAMESPACE, so every Dynamo process started here would claim that pod; "
            "run the interop tests where there is no downward-API volume"
        )


@dataclass
class DynamoProcess:
    """One Dynamo runtime process (a worker or a client) standing for one pod's main container."""

    pod: Mapping[str, Any]
    kubeconfig: pathlib.Path
    mode: str  # "worker" or "client"
    work_dir: pathlib.Path
    endpoint: str = DEFAULT_ENDPOINT
    model: str | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    etcd_endpoints: str = ""  # set: the etcd backend (no kubeconfig)
    kv_events: bool = False  # the worker also publishes KV events (an event channel and an event source)
    module: tuple[str, ...] = ()  # set: run `python -m MODULE ARGS...` (Dynamo's own programs) instead of PROGRAM

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    @property
    def file_stem(self) -> str:
        """The pod name, and the container in Dynamo's container mode (several processes per pod)."""
        container = self.extra_env.get("CONTAINER_NAME", "")
        return f"{self.name}-{container}" if container else self.name

    @property
    def events_path(self) -> pathlib.Path:
        return self.work_dir / f"{self.file_stem}.dynamo-{self.mode}.jsonl"

    @property
    def log_path(self) -> pathlib.Path:
        return self.work_dir / f"{self.file_stem}.dynamo-{self.mode}.log"

    def env(self) -> dict[str, str]:
        meta = self.pod["metadata"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
        env.update(
            POD_NAME=meta["name"],
            POD_NAMESPACE=meta["namespace"],
            POD_UID=meta["uid"],
            KUBECONFIG=str(self.kubeconfig),
            DYN_DISCOVERY_BACKEND="kubernetes",
            DYN_REQUEST_PLANE="tcp",
            DYN_TCP_RPC_HOST="127.0.0.1",
            DYN_LOGGING_JSONL="true",
            DYN_LOG="info",
            PYTHONUNBUFFERED="1",
        )
        if self.etcd_endpoints:
            del env["KUBECONFIG"]
            env.update(DYN_DISCOVERY_BACKEND="etcd", ETCD_ENDPOINTS=self.etcd_endpoints)
        env.update(self.extra_env)
        return env

    def start(self) -> DynamoProcess:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        options: dict[str, Any] = {"endpoint": self.endpoint}
        if self.model:
            options["model"] = self.model
        if self.kv_events:
            options["kv_events"] = True
        argv = [sys.executable, "-m", *self.module] if self.module else [sys.executable, "-c", PROGRAM, self.mode]
        if not self.module:
            argv.append(json.dumps(options))
        with self.events_path.open("ab") as out, self.log_path.open("ab") as err:
            self.process = subprocess.Popen(
                argv,
                env=self.env(),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        return self

    # -- what it printed --------------------------------------------------------------------------
    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        with contextlib.suppress(OSError):
            for line in self.events_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict) and (kind is None or event.get("event") == kind):
                        found.append(event)
        return found

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.describe()} exited with {self.process.returncode}:\n{self.log_tail()}")

    def wait_event(self, kind: str, timeout: float = 30.0) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            self.check_alive()
            events = self.events(kind)
            return events[-1] if events else None

        event: dict[str, Any] = self._wait(found, timeout, f"{self.describe()} to print a {kind!r} event")
        return event

    # -- worker -----------------------------------------------------------------------------------
    @property
    def instance_id(self) -> int:
        """Dynamo's own instance ID for this process (waits for the runtime to exist)."""
        return int(self.wait_event("runtime")["instance_id"])

    # -- client -----------------------------------------------------------------------------------
    def instances(self) -> list[dict[str, Any]]:
        """What ``Client.instances()`` returned last (empty before the first report)."""
        events = self.events("instances")
        return list(events[-1]["instances"]) if events else []

    def instance_ids(self) -> list[int]:
        """What ``Client.instance_ids()`` returned last (empty before the first report)."""
        events = self.events("instances")
        return [int(i) for i in events[-1]["instance_ids"]] if events else []

    def wait_instance_ids(
        self, condition: Callable[[set[int]], bool], timeout: float = 30.0, what: str = ""
    ) -> set[int]:
        """Wait until ``condition(set(instance_ids()))`` holds; the client must have reported at least once."""

        def check() -> tuple[set[int]] | None:  # a tuple: truthy even when the awaited set is empty
            self.check_alive()
            if not self.events("instances"):
                return None
            ids = set(self.instance_ids())
            return (ids,) if condition(ids) else None

        result: tuple[set[int]] = self._wait(check, timeout, what or "instance_ids() to reach the expected state")
        return result[0]

    # -- lifecycle --------------------------------------------------------------------------------
    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM to the process group, as the kubelet would; SIGKILL after ``timeout``."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def describe(self) -> str:
        what = f"`python -m {' '.join(self.module[:1])}`" if self.module else f"({self.endpoint})"
        return f"Dynamo {self.mode} of pod {self.name} {what}"

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for path in (self.events_path, self.log_path):
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path}:\n" + "\n".join(tail))
        return "\n".join(parts)

    def _wait(self, condition: Callable[[], Any], timeout: float, what: str) -> Any:
        try:
            return wait_for(condition, timeout, what=what)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None


def launch_dynamo(
    plane: ControlPlane,
    cluster: Cluster,
    pod: Mapping[str, Any],
    mode: str,
    work_dir: pathlib.Path,
    endpoint: str = DEFAULT_ENDPOINT,
    model: str | None = None,
    extra_env: Mapping[str, str] | None = None,
    service_account: str = SIDECAR_SERVICE_ACCOUNT,
    start: bool = True,
    module: Sequence[str] = (),
) -> DynamoProcess:
    """Start a Dynamo ``mode`` ("worker"/"client") process for ``pod`` under a pod-bound token.

    The token is of ``service_account`` (default: the one of ``manifests/rbac.yaml``, which grants what
    Dynamo's Kubernetes discovery uses in pod mode: DynamoWorkerMetadata get/list/watch/create/patch/
    delete, EndpointSlices list/watch). With ``module`` (e.g. ``["dynamo.frontend", "--http-port", ...]``)
    the process is that Dynamo program instead, and ``mode`` only names its files.
    """
    if not module and mode not in ("worker", "client"):
        raise ValueError(f"mode must be 'worker' or 'client', not {mode!r}")
    runtime_version()
    _check_machine()
    name = pod["metadata"]["name"]
    token = cluster.pod_bound_token(pod["metadata"]["namespace"], service_account, pod)
    work_dir.mkdir(parents=True, exist_ok=True)
    container = (extra_env or {}).get("CONTAINER_NAME", "")
    stem = f"{name}-{container}" if container else name
    kubeconfig = write_token_kubeconfig(plane, token, work_dir / f"{stem}.dynamo-{mode}.kubeconfig")
    process = DynamoProcess(
        pod=pod,
        kubeconfig=kubeconfig,
        mode=mode,
        work_dir=work_dir,
        endpoint=endpoint,
        model=model,
        extra_env=dict(extra_env or {}),
        module=tuple(module),
    )
    return process.start() if start else process


def launch_dynamo_etcd(
    name: str,
    namespace: str,
    etcd_endpoints: str,
    mode: str,
    work_dir: pathlib.Path,
    endpoint: str = DEFAULT_ENDPOINT,
    model: str | None = None,
    extra_env: Mapping[str, str] | None = None,
    start: bool = True,
    kv_events: bool = False,
) -> DynamoProcess:
    """Start a Dynamo ``mode`` process on the etcd backend: what an etcd-backed pod's main container runs.

    ``kv_events``: the worker also creates a ``KvEventPublisher`` (ZMQ event plane), which registers an
    ``EventChannel`` and an ``EventSource`` under their own publisher ID, on the same lease.
    """
    if mode not in ("worker", "client"):
        raise ValueError(f"mode must be 'worker' or 'client', not {mode!r}")
    runtime_version()
    _check_machine()
    work_dir.mkdir(parents=True, exist_ok=True)
    process = DynamoProcess(
        pod={"metadata": {"name": name, "namespace": namespace, "uid": f"etcd-pod-{name}"}},
        kubeconfig=work_dir / "no-kubeconfig",
        mode=mode,
        work_dir=work_dir,
        endpoint=endpoint,
        model=model,
        extra_env={**({"DYN_EVENT_PLANE": "zmq"} if kv_events else {}), **(extra_env or {})},
        etcd_endpoints=etcd_endpoints,
        kv_events=kv_events,
    )
    return process.start() if start else process


class DynamoProcesses:
    """Starts Dynamo processes for a test and always stops them (a pytest fixture's object)."""

    def __init__(self, plane: ControlPlane, cluster: Cluster, work_dir: pathlib.Path) -> None:
        self.plane = plane
        self.cluster = cluster
        self.work_dir = work_dir
        self.running: list[DynamoProcess] = []

    def worker(self, pod: Mapping[str, Any], **kwargs: Any) -> DynamoProcess:
        return self._start(pod, "worker", **kwargs)

    def client(self, pod: Mapping[str, Any], **kwargs: Any) -> DynamoProcess:
        return self._start(pod, "client", **kwargs)

    def _start(self, pod: Mapping[str, Any], mode: str, **kwargs: Any) -> DynamoProcess:
        process = launch_dynamo(self.plane, self.cluster, pod, mode, self.work_dir, **kwargs)
        self.running.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.running:
            try:
                process.terminate(timeout=5)
            except Exception:  # noqa: BLE001 - teardown must reach every process
                process.kill()
