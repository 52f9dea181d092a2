"""The demo's Dynamo scene: Dynamo's own frontend answering a chat completion routed to mocker workers.

Run by ``make demo`` after the main story, on the same control plane, in a namespace of its own: a Dynamo
deployment from ``ai-dynamo`` 1.6.1 (``devcluster.dynamo_serving``: ``python -m dynamo.frontend`` and two
``python -m dynamo.mocker`` workers as pods, a sidecar beside each, watch-only beside Dynamo's runtime).
The scene sends a chat completion through the frontend and prints what the answer says (the mocker's text
is random token ids, so its ``object``, ``model``, ``finish_reason`` and ``usage``), follows the frontend
pod's sidecar (``discovery-sidecar peers --watch --model ...``) listing the same workers the frontend routes
to, then turns a worker unready and shows both stop listing it.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import subprocess
from collections.abc import Callable

from demo.story import PeerWatch
from devcluster.build import ROOT
from devcluster.cluster import ControlPlane
from devcluster.dynamo_serving import ENDPOINT, MODEL, DynamoDeployment, Frontend
from devcluster.objects import Cluster
from devcluster.waiting import wait_for

NAMESPACE = "dynamo-demo"
TIMEOUT = 90.0


class DynamoScene:
    """Owns the scene's deployment and its watch; ``stop`` ends both (always called by the demo's cleanup)."""

    def __init__(
        self,
        plane: ControlPlane,
        cluster: Cluster,
        work_dir: pathlib.Path,
        say: Callable[[str], None],
        pause: Callable[[], None],
    ) -> None:
        self.plane = plane
        self.cluster = cluster
        self.work_dir = work_dir
        self.say = say
        self.pause = pause
        self.deployment: DynamoDeployment | None = None
        self.watch: PeerWatch | None = None

    def run(self) -> None:
        self.say(
            f"a Dynamo deployment in namespace {NAMESPACE} (ai-dynamo 1.6.1 from PyPI): two mocker workers "
            "(Dynamo's GPU-free engine) and Dynamo's OpenAI frontend, each pod with a watch-only sidecar"
        )
        self.cluster.create_namespace(NAMESPACE)
        rbac = ROOT / "manifests" / "rbac.yaml"
        kubectl = [str(self.plane.kubectl), f"--kubeconfig={self.plane.kubeconfig}", "-n", NAMESPACE]
        subprocess.run([*kubectl, "apply", "-f", str(rbac)], check=True, capture_output=True)
        self.cluster.wait_for_service_account(NAMESPACE, "discovery-sidecar")
        deployment = self.deployment = DynamoDeployment(self.plane, self.cluster, NAMESPACE, self.work_dir)
        frontend = deployment.start_frontend(timeout=TIMEOUT)
        deployment.add_workers(["worker-0", "worker-1"], timeout=TIMEOUT)
        assert frontend.sidecar is not None
        expected = {deployment.instance_id(name) for name in deployment.workers}
        wait_for(
            lambda: frontend.models() == [MODEL] and frontend.instance_ids() == expected,
            TIMEOUT,
            what="the frontend routing to both workers",
        )
        self.say(f"following the frontend pod's sidecar: discovery-sidecar peers --watch --model {MODEL} --ready-only")
        self.watch = PeerWatch(frontend.sidecar.target, "--model", MODEL, "--ready-only").start()
        self.watch.wait_line("# snapshot")
        self.show_frontend(frontend)
        self.pause()

        self.say(f"POST /v1/chat/completions to Dynamo's frontend (model {MODEL}):")
        answer = frontend.chat(content="w1 w2 w3 w4", max_tokens=8)
        if not answer.ok:
            raise RuntimeError(f"the frontend did not answer: {answer.reason}")
        shown = {key: answer.body.get(key) for key in ("object", "model")}
        shown["finish_reason"] = answer.body["choices"][0]["finish_reason"]
        shown["usage"] = answer.body.get("usage")
        print(f"   {json.dumps(shown)}", flush=True)
        self.say("(the mocker emits random token ids, so the text is empty: the answer's shape is the point)")
        self.pause()

        self.say("worker-1 fails its readiness probe: the frontend and its sidecar both stop listing it")
        deployment.set_ready("worker-1", False)
        remaining = {deployment.instance_id("worker-0")}
        self.watch.wait_line("removed\tworker-1", TIMEOUT)
        wait_for(lambda: frontend.instance_ids() == remaining, TIMEOUT, what="the frontend to drop worker-1")
        self.show_frontend(frontend)
        answer = frontend.chat()
        self.say(f"the next chat completion goes to worker-0: {'ok' if answer.ok else answer.reason}")
        self.pause()

    def show_frontend(self, frontend: Frontend) -> None:
        ids = sorted(frontend.instance_ids() or ())
        names = {deployment_id: name for name in self.names() if (deployment_id := self.instance_id(name))}
        routed = ", ".join(f"{names.get(i, '?')} ({i:x})" for i in ids)
        print(f"   frontend GET /v1/models: {frontend.models()}; routes {ENDPOINT} to: {routed}", flush=True)

    def names(self) -> list[str]:
        return sorted(self.deployment.workers) if self.deployment is not None else []

    def instance_id(self, name: str) -> int | None:
        return self.deployment.instance_id(name) if self.deployment is not None else None

    def stop(self) -> None:
        if self.watch is not None:
            self.watch.stop()
        if self.deployment is not None:
            with contextlib.suppress(Exception):
                self.deployment.stop()
