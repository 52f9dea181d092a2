"""A Dynamo deployment that serves requests: Dynamo's own OpenAI frontend and mocker workers as pods.

The interop tests of ``devcluster.dynamo`` prove discovery with a bare runtime; an operator judges it by
requests. This deployment runs what serves them in a real Dynamo cluster, from ``ai-dynamo`` 1.6.1 on
PyPI, against the project's control plane:

* **workers**: ``python -m dynamo.mocker``, Dynamo's GPU-free engine (the real worker runtime, a simulated
  forward pass), each the main container of a pod behind a Service labelled as Dynamo's operator labels
  component Services, so its pod is in an EndpointSlice labelled ``nvidia.com/dynamo-discovery-enabled``;
* **the frontend**: ``python -m dynamo.frontend``, Dynamo's OpenAI-compatible HTTP server and router,
  which discovers the workers and their model through Kubernetes (EndpointSlices joined with the
  workers' ``DynamoWorkerMetadata``), exactly what a sidecar watches;
* **a sidecar beside each** (unless ``with_sidecars=False``), watch-only as documented for a pod whose
  main container runs Dynamo's runtime (``DISCOVERY_REGISTER=never``): the workers' sidecars watch
  nothing until asked (``DISCOVERY_WATCH=auto``), the frontend's watches from the start (``always``) and
  is the one the tests compare with the frontend.

Every process runs as a pod's container would: its pod's identity in ``POD_*``, a kubeconfig with a real
pod-bound token, ``DYN_DISCOVERY_BACKEND=kubernetes``, ``DYN_REQUEST_PLANE=tcp`` (no NATS, no separate
etcd). What 1.6.1 needs beyond that, found by running it:

* a model directory with ``config.json``, ``tokenizer.json`` and a ``tokenizer_config.json`` holding a
  ``chat_template`` (without it the frontend never lists the model); no weights. ``write_tiny_model``
  makes one at test time: a 1,000-word WordLevel tokenizer built with the ``tokenizers`` library;
* ``DYN_SYSTEM_PORT`` on the workers, so the frontend fetches the model files from the worker's own
  HTTP server (self-hosted metadata, as across machines) instead of reading the worker's filesystem.
  1.6.1 parses it as a signed 16-bit integer: the port must be below 32768 (``free_low_port``);
* the mocker emits random token ids, so an answer's text is empty: judge its status, ``object``,
  ``model``, ``finish_reason`` and ``usage`` (``devcluster.traffic.chat_completion``).

There is no kubelet: this class plays it. A pod is reported Ready once its main container answers its
readiness probe (the worker's ``/health`` on the system port) and its sidecar its own (``/readyz``),
as the kubelet gates a pod on a native sidecar's readiness; a sidecar that dies makes the pod unready
until it is back. A graceful delete marks the pod terminating, then SIGTERMs the main container, then
the sidecar (the native sidecar stops last), then removes the Pod object.
"""

from __future__ import annotations

import contextlib
import functools
import json
import pathlib
import random
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from devcluster.cluster import ControlPlane, free_port
from devcluster.dynamo import DynamoProcess, launch_dynamo
from devcluster.objects import PODS, SERVICES, WORKER_METADATA, Cluster
from devcluster.sidecars import SidecarProcess, launch_sidecar
from devcluster.traffic import Outcome, chat_completion
from devcluster.waiting import wait_for

MODEL = "tiny-chat"  # the served model's name (its model card's display_name)
DYNAMO_NAMESPACE = "dynamo"  # the mocker's default endpoint: dyn://dynamo.backend.generate
ENDPOINT = f"{DYNAMO_NAMESPACE}.backend.generate"
SERVICE = "mocker"
WORKER_LABELS = {"app": "mocker"}
FRONTEND_LABELS = {"app": "frontend"}
# What Dynamo's operator puts on every component Service (EndpointSlices inherit Service labels).
DYNAMO_SERVICE_LABELS = {
    "nvidia.com/dynamo-discovery-enabled": "true",
    "nvidia.com/dynamo-discovery-backend": "kubernetes",
}
SIDECAR_SELECTOR = "nvidia.com/dynamo-discovery-enabled=true"  # what a Dynamo pod watches
VOCABULARY = 1000
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def write_tiny_model(directory: pathlib.Path, vocabulary: int = VOCABULARY) -> pathlib.Path:
    """A model directory the mocker and the frontend accept: config, a WordLevel tokenizer, a chat template.

    No weights (the mocker simulates the forward pass); the config's sizes only feed the mocker's KV-cache
    arithmetic. Words are ``w0`` ... ``w996`` plus three special tokens.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers  # the dev extra's; only the fixture needs it

    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>"]
    words = specials + [f"w{i}" for i in range(vocabulary - len(specials))]
    tokenizer = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "hidden_size": 64,
        "vocab_size": vocabulary,
        "max_position_embeddings": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float16",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory


def free_low_port(low: int = 20000, high: int = 32767) -> int:
    """A free loopback port below 32768 (Dynamo 1.6.1 reads ``DYN_SYSTEM_PORT`` as a signed 16-bit int)."""
    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{high} on 127.0.0.1")


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)


@dataclass
class Worker:
    """One worker pod: the mocker as its main container, maybe a sidecar, the port of its health probe."""

    pod: dict[str, Any]
    mocker: DynamoProcess
    system_port: int
    sidecar: SidecarProcess | None = None

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    def healthy(self) -> bool:
        """The main container's readiness probe: the mocker's ``/health`` on its system port."""
        self.mocker.check_alive()
        return _http_get(f"http://127.0.0.1:{self.system_port}/health")[0] == 200


@dataclass
class Frontend:
    """The frontend pod: Dynamo's OpenAI HTTP server on ``port`` and the sidecar that watches beside it."""

    pod: dict[str, Any]
    process: DynamoProcess
    port: int
    sidecar: SidecarProcess | None = None

    def models(self) -> list[str] | None:
        """``GET /v1/models``: the model ids the frontend serves (None while it does not answer)."""
        status, body = _http_get(f"http://127.0.0.1:{self.port}/v1/models")
        if status != 200:
            return None
        return sorted(str(m["id"]) for m in json.loads(body).get("data", ()))

    def instance_ids(self, endpoint: str = ENDPOINT) -> set[int] | None:
        """The worker instances the frontend routes ``endpoint`` to (its ``/health``), None if it does not answer."""
        status, body = _http_get(f"http://127.0.0.1:{self.port}/health")
        if status not in (200, 503):
            return None
        namespace, component, name = endpoint.split(".")
        return {
            int(i["instance_id"])
            for i in json.loads(body).get("instances", ())
            if (i.get("namespace"), i.get("component"), i.get("endpoint")) == (namespace, component, name)
        }

    def chat(self, content: str = "w1 w2 w3", max_tokens: int = 4, stream: bool = False) -> Outcome:
        self.process.check_alive()
        return chat_completion(self.port, MODEL, content=content, max_tokens=max_tokens, stream=stream)


@dataclass
class DynamoDeployment:
    """One namespace of a serving Dynamo deployment; owns every process it starts (``stop`` ends them)."""

    plane: ControlPlane
    cluster: Cluster
    namespace: str
    work_dir: pathlib.Path
    with_sidecars: bool = True
    sidecar_env: Mapping[str, str] = field(default_factory=dict)  # added to every sidecar's environment
    mocker_args: Sequence[str] = ()
    workers: dict[str, Worker] = field(default_factory=dict)
    frontend: Frontend | None = None
    retired: list[Worker] = field(default_factory=list)  # deleted workers, kept for their logs

    def __post_init__(self) -> None:
        self.model_dir = write_tiny_model(self.work_dir / "model")
        self.home = self.work_dir / "home"  # Dynamo caches model cards under $HOME/.cache/dynamo
        self.home.mkdir(parents=True, exist_ok=True)
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": SERVICE, "labels": dict(DYNAMO_SERVICE_LABELS)},
            "spec": {
                "clusterIP": "None",
                "selector": dict(WORKER_LABELS),
                "ports": [{"name": "http", "port": 8000, "targetPort": 8000, "protocol": "TCP"}],
            },
        }
        self.cluster.api.create(SERVICES.collection(self.namespace), service)
        self.cluster.ensure_node("node-a", "zone-a")

    # -- pods ---------------------------------------------------------------------------------------
    def _sidecar(self, pod: dict[str, Any], env: Mapping[str, str]) -> SidecarProcess | None:
        if not self.with_sidecars:
            return None
        extra = {
            "DISCOVERY_ENDPOINTSLICE_SELECTOR": SIDECAR_SELECTOR,
            "DISCOVERY_REGISTER": "never",  # Dynamo's runtime in the main container registers the pod
            **env,
            **self.sidecar_env,
        }
        return launch_sidecar(self.plane, self.cluster, pod, "", self.work_dir / "sidecars", extra_env=extra)

    def _dynamo(self, pod: dict[str, Any], mode: str, module: Sequence[str], env: Mapping[str, str]) -> DynamoProcess:
        return launch_dynamo(
            self.plane,
            self.cluster,
            pod,
            mode,
            self.work_dir / "dynamo",
            # HF_HUB_OFFLINE: the model is local; nothing may reach for a hub (this machine reaches none).
            extra_env={"HOME": str(self.home), "DYN_LOG": "warn", "HF_HUB_OFFLINE": "1", **env},
            module=module,
        )

    def start_frontend(self, name: str = "frontend-0", timeout: float = 60.0) -> Frontend:
        """The frontend pod: its sidecar (watching from the start), then Dynamo's frontend on a free port."""
        pod = self.cluster.start_pod(self.namespace, name, FRONTEND_LABELS)
        sidecar = self._sidecar(pod, {"DISCOVERY_WATCH": "always"})
        if sidecar is not None:
            sidecar.wait_ready(timeout)
        port = free_port()
        argv = [
            "dynamo.frontend",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(port),
            "--discovery-backend",
            "kubernetes",
            "--request-plane",
            "tcp",
            "--router-mode",
            "round-robin",
            # Dynamo's request migration, as a deployment whose workers can leave runs it: without it the frontend
            # fails a request still waiting on a worker at the instant the worker leaves its set ("Cancelled stream
            # registrations for removed instance", then 503 "no backend worker available"), however it left: a
            # pod deleted, or unready because its sidecar restarted (a native sidecar's readiness gates its pod's).
            # Seen once in ~1,300 requests of test_dynamo_traffic (docs/dynamo.md).
            "--migration-limit",
            "3",
        ]
        process = self._dynamo(pod, "frontend", argv, {})
        self.frontend = Frontend(pod, process, port, sidecar)
        wait_for(lambda: self.frontend is not None and self.frontend.models() is not None, timeout, what="frontend up")
        return self.frontend

    def add_worker(self, name: str, ready: bool = True, timeout: float = 60.0) -> Worker:
        """A worker pod: created unready, its sidecar started and ready, the mocker started and healthy, and
        then (``ready``) reported Ready, as the kubelet would once both probes pass."""
        return self.add_workers([name], ready, timeout)[0]

    def add_workers(self, names: Sequence[str], ready: bool = True, timeout: float = 60.0) -> list[Worker]:
        """``add_worker`` for several pods at once, as a scheduler starts a ReplicaSet's pods side by side."""
        pods = []
        for name in names:
            self.cluster.create_pod(self.namespace, name, WORKER_LABELS)
            pods.append(self.cluster.set_pod_status(self.namespace, name, ready=False))
        sidecars = [self._sidecar(pod, {}) for pod in pods]
        for sidecar in sidecars:  # a native sidecar is started (and ready) before the main container
            if sidecar is not None:
                sidecar.wait_ready(timeout)
        workers = [self._start_mocker(pod, sidecar) for pod, sidecar in zip(pods, sidecars, strict=True)]
        for worker in workers:
            wait_for(worker.healthy, timeout, what=f"{worker.name}'s mocker healthy (its readiness probe)")
            wait_for(
                functools.partial(self.instance_id, worker.name),
                timeout,
                what=f"{worker.name}'s DynamoWorkerMetadata with its endpoint",
            )
        if ready:
            for worker in workers:
                self.set_ready(worker.name, True)
        return workers

    def _start_mocker(self, pod: dict[str, Any], sidecar: SidecarProcess | None) -> Worker:
        system_port = free_low_port()
        argv = [
            "dynamo.mocker",
            "--model-path",
            str(self.model_dir),
            "--model-name",
            MODEL,
            "--discovery-backend",
            "kubernetes",
            "--request-plane",
            "tcp",
            *self.mocker_args,
        ]
        env = {
            "DYN_SYSTEM_PORT": str(system_port),
            "DYN_SYSTEM_HOST": "127.0.0.1",
            # As Dynamo's operator sets it for workers: /health is "ready" once the generate endpoint serves.
            "DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS": json.dumps(["generate"]),
        }
        worker = Worker(pod, self._dynamo(pod, "mocker", argv, env), system_port, sidecar)
        self.workers[worker.name] = worker
        return worker

    def set_ready(self, name: str, ready: bool) -> float:
        """Report the pod's readiness; returns the monotonic time the API server confirmed the write."""
        self.cluster.set_pod_status(self.namespace, name, ready=ready)
        return time.monotonic()

    def instance_id(self, name: str) -> int | None:
        """The instance ID under which the worker's CR registers ``ENDPOINT`` (None before it does)."""
        cr = self.cluster.get_or_none(WORKER_METADATA.item(self.namespace, name))
        endpoints = ((cr or {}).get("spec") or {}).get("data", {}).get("endpoints") or {}
        prefix = ENDPOINT.replace(".", "/") + "/"
        for key, entry in endpoints.items():
            if key.startswith(prefix):
                return int(entry["instance_id"])
        return None

    def delete_worker(self, name: str, grace_seconds: int = 30, timeout: float = 60.0) -> float:
        """A graceful delete, as the kubelet carries it out: the pod is marked terminating (its endpoint
        turns not ready), the main container gets SIGTERM and exits, then the sidecar, then the Pod object
        goes. Returns the monotonic time the API server accepted the delete."""
        worker = self.workers.pop(name)
        self.cluster.delete_pod(self.namespace, name, grace_seconds=grace_seconds)
        deleted = time.monotonic()
        worker.mocker.terminate(timeout=grace_seconds)
        if worker.sidecar is not None:
            worker.sidecar.terminate(timeout=timeout)
        self.cluster.delete_pod(self.namespace, name, grace_seconds=0)
        wait_for(
            lambda: self.cluster.get_or_none(PODS.item(self.namespace, name)) is None, timeout, what=f"{name} gone"
        )
        self.retired.append(worker)
        return deleted

    def restart_sidecar(
        self, name: str, kill: bool = True, build: pathlib.Path | None = None, timeout: float = 60.0
    ) -> SidecarProcess:
        """The kubelet restarting one worker's sidecar container: SIGKILL (``kill``) or SIGTERM, the pod
        unready while it is down (its readiness gates the pod's), then the same or a new ``build``."""
        return self._restart(self.workers[name].pod, self.workers[name].sidecar, kill, build, timeout)

    def restart_frontend_sidecar(
        self, kill: bool = True, build: pathlib.Path | None = None, timeout: float = 60.0
    ) -> SidecarProcess:
        """The same for the frontend pod's sidecar (the one that watches)."""
        if self.frontend is None:
            raise ValueError("no frontend was started")
        return self._restart(self.frontend.pod, self.frontend.sidecar, kill, build, timeout)

    def _restart(
        self,
        pod: Mapping[str, Any],
        sidecar: SidecarProcess | None,
        kill: bool,
        build: pathlib.Path | None,
        timeout: float,
    ) -> SidecarProcess:
        name = str(pod["metadata"]["name"])
        if sidecar is None:
            raise ValueError(f"{name} runs no sidecar")
        if kill:
            sidecar.kill()
        else:
            sidecar.terminate(timeout)
        self.set_ready(name, False)
        if build is not None:
            sidecar.build = build
        sidecar.start().wait_ready(timeout)
        self.set_ready(name, True)
        return sidecar

    def worker_cr(self, name: str) -> dict[str, Any]:
        """The worker's ``DynamoWorkerMetadata`` as the API server has it now (Dynamo's runtime writes it)."""
        cr = self.cluster.get_or_none(WORKER_METADATA.item(self.namespace, name))
        if cr is None:
            raise AssertionError(f"{name} has no DynamoWorkerMetadata")
        return cr

    # -- lifecycle ----------------------------------------------------------------------------------
    def processes(self) -> list[DynamoProcess | SidecarProcess]:
        found: list[DynamoProcess | SidecarProcess] = []
        for worker in [*self.workers.values(), *self.retired]:
            found.append(worker.mocker)
            if worker.sidecar is not None:
                found.append(worker.sidecar)
        if self.frontend is not None:
            found.append(self.frontend.process)
            if self.frontend.sidecar is not None:
                found.append(self.frontend.sidecar)
        return found

    def stop(self) -> None:
        """Stop every process started here (Dynamo's first, sidecars last), whatever state it is in."""
        everything = self.processes()
        for process in everything:
            if isinstance(process, DynamoProcess):
                with contextlib.suppress(Exception):
                    process.terminate(timeout=5)
        for process in everything:
            if isinstance(process, SidecarProcess):
                try:
                    process.terminate(timeout=15)
                except Exception:  # noqa: BLE001 - teardown must reach every process
                    process.kill()

    def log_tails(self, lines: int = 15) -> str:
        """The last lines of every process's logs, for a failure message."""
        parts = []
        for process in self.processes():
            parts.append(process.log_tail(lines))
        return "\n".join(parts)
