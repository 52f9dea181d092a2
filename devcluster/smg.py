"""The real SGLang Model Gateway (``smg`` from PyPI) and stand-in workers for it, on loopback.

SMG probes a worker before it registers it (``/health``, ``/v1/models``, ...), so a test that wants
SMG's view of the peer set needs something answering at each worker URL. ``StandInWorker`` is that:
a tiny HTTP server on a loopback address of its own (127.0.0.N), which tests also write as the pod's
IP (pod-label discovery accepts loopback pod IPs; there is no kubelet). It also answers what SMG routes,
OpenAI chat completions (after a configurable service time), and records each one it served.

``SmgGateway`` runs ``smg launch`` as a pod's main container would next to the sidecar: with
``--discovery-provider file`` reading the manifest the sidecar writes (``smg_file``), or with SMG's own
Kubernetes discovery against the real API server (``smg_kubernetes``, for the comparison in bench/).
``workers()`` is SMG's ``GET /workers``: what it routes to.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from devcluster.cluster import free_port
from devcluster.processes import local_get
from devcluster.waiting import wait_for

MODEL = "stand-in-model"


class _Handler(BaseHTTPRequestHandler):
    """Answers the calls SMG makes while registering and health-checking a worker."""

    server: _WorkerServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's spelling
        path = self.path.split("?")[0]
        bodies: dict[str, Any] = {
            "/health": "OK",
            "/health_generate": "OK",
            "/v1/models": {
                "object": "list",
                "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "sglang", "root": MODEL}],
            },
            "/version": {"version": "0.0.0-stand-in"},
            "/server_info": {"model_path": MODEL, "served_model_name": MODEL, "version": "0.0.0-stand-in"},
            "/get_server_info": {"model_path": MODEL, "served_model_name": MODEL},
            "/model_info": {"model_path": MODEL, "is_generation": True},
            "/get_model_info": {"model_path": MODEL, "is_generation": True},
            "/loads": {"timestamp": "", "dp_rank_count": 1, "loads": [{"dp_rank": 0, "num_running_reqs": 0}]},
            "/v1/loads": {"timestamp": "", "dp_rank_count": 1, "loads": [{"dp_rank": 0, "num_running_reqs": 0}]},
        }
        body = bodies.get(path)
        self.server.calls.append(path)
        if body is None:
            self.send_error(404)
            return
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 - http.server's spelling
        """An OpenAI chat completion, after the engine's service time; the request's first message is recorded
        (the benchmarks tag it with who sent the request, to see which gateway routed it here)."""
        path = self.path.split("?")[0]
        length = int(self.headers.get("Content-Length") or 0)
        try:
            request = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            request = {}
        self.server.calls.append(path)
        if path != "/v1/chat/completions" or not isinstance(request, dict):
            self.send_error(404)
            return
        messages = request.get("messages") or [{}]
        tag = str(messages[0].get("content", "")) if isinstance(messages[0], dict) else ""
        if self.server.service_seconds:
            time.sleep(self.server.service_seconds)  # the engine's own time per request
        self.server.served.append((time.monotonic(), tag))
        answer = {
            "id": f"chatcmpl-{len(self.server.served)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", MODEL),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        return  # quiet: SMG health-checks often


class _WorkerServer(ThreadingHTTPServer):
    daemon_threads = True
    calls: list[str]
    served: list[tuple[float, str]]  # (monotonic time, first message) of each chat completion answered
    service_seconds: float


class StandInWorker:
    """One worker process of a pod: an HTTP server at ``host:port``; ``url`` is what SMG registers."""

    def __init__(self, host: str, port: int, service_seconds: float = 0.0) -> None:
        self.host = host
        self.port = port
        self._server = _WorkerServer((host, port), _Handler)
        self._server.calls = []
        self._server.served = []
        self._server.service_seconds = service_seconds
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"worker-{host}:{port}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def calls(self) -> list[str]:
        return list(self._server.calls)

    @property
    def served(self) -> list[tuple[float, str]]:
        """Chat completions answered: (monotonic time, the request's first message)."""
        return list(self._server.served)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def smg_binary() -> str:
    """``smg`` next to this interpreter (the dev extra installs it), else on PATH."""
    candidate = pathlib.Path(sys.executable).parent / "smg"
    found = str(candidate) if candidate.exists() else shutil.which("smg")
    if not found:
        raise RuntimeError("smg is not installed: `pip install -e '.[dev]'` (it is in the dev extra)")
    return found


class SmgGateway:
    """One ``smg launch`` process on free loopback ports; always ``stop()`` it."""

    def __init__(self, args: Sequence[str], log_path: pathlib.Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.log_path = log_path
        argv = [
            smg_binary(),
            "launch",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(self.metrics_port),
            # Probe and admit workers quickly: the tests watch convergence, not SMG's patience.
            "--worker-startup-check-interval",
            "1",
            "--worker-startup-timeout-secs",
            "30",
            "--health-check-interval-secs",
            "1",
            *args,
        ]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "NO_COLOR": "1", **(env or {})},
            )
        wait_for(self.up, 30, what="smg listening")

    @classmethod
    def with_file(
        cls,
        manifest: pathlib.Path,
        log_path: pathlib.Path,
        pd: bool = False,
        epd: bool = False,
        extra: Sequence[str] = (),
    ) -> SmgGateway:
        """SMG fed by the sidecar: ``--discovery-provider file`` on the manifest it writes; ``pd``/``epd``
        turn on SMG's prefill-decode (or encode-prefill-decode) mode; ``extra`` are more flags (a policy)."""
        args = [
            "--discovery-provider",
            "file",
            "--discovery-file",
            str(manifest),
            "--discovery-check-interval-secs",
            "1",
        ]
        if pd:
            args.append("--pd-disaggregation")
        if epd:
            args.append("--epd-disaggregation")
        return cls([*args, *extra], log_path)

    def _get(self, path: str) -> tuple[int, str]:
        if self.process.poll() is not None:
            raise RuntimeError(f"smg exited with {self.process.returncode}:\n{self.log_tail()}")
        return local_get(self.port, path, timeout=3)

    def up(self) -> bool:
        return self._get("/workers")[0] == 200

    def workers(self) -> list[dict[str, Any]]:
        """SMG's registered workers (``GET /workers``)."""
        code, text = self._get("/workers")
        if code != 200:
            raise RuntimeError(f"GET /workers answered {code}: {text[:300]}")
        body = json.loads(text)
        return list(body.get("workers", body) if isinstance(body, dict) else body)

    def urls(self) -> dict[str, str]:
        """URL -> worker type, as SMG has them (``http://`` prefix kept)."""
        out = {}
        for worker in self.workers():
            out[str(worker.get("url"))] = str(worker.get("worker_type", "regular")).lower()
        return out

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)  # its graceful shutdown waits seconds for nothing here
        self.process.wait(10)
