"""A daemon of this project run as a subprocess: a sidecar (``devcluster.sidecars``) or a relay
(``devcluster.relays``).

Both are driven the same way by tests, the demo and the benchmarks: started with an environment of
``DISCOVERY_*`` settings and a JSON log file, judged ready by their own ``/readyz``, stopped by SIGTERM as
a kubelet stops a container (or SIGKILL, a death without a word), and read back through their log lines.
Only what they run and with which settings differs, so that is all a subclass says.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any, Self

from devcluster.waiting import wait_for

SETTING_PREFIXES = ("DISCOVERY_", "POD_", "ETCD_", "DYN_")
"""Variables a launched daemon must not inherit from this process: it gets exactly the settings it is given."""

BYTECODE_CACHE = pathlib.Path.home() / ".cache" / "discovery-sidecar" / "pycache"
"""Where launched daemons keep their modules' bytecode (``PYTHONPYCACHEPREFIX``), outside the checkout."""

WARM_IMPORTS = (
    "import sidecar.app.cli, sidecar.app.daemon, sidecar.app.relay, sidecar.kube.backend, sidecar.etcd.backend"
)
"""What a daemon imports at start-up, imported once ahead of the first start so that its bytecode is cached."""


def inherited_environment() -> dict[str, str]:
    """This process's environment less any daemon setting it holds (a test's own, a developer's shell's), and
    with bytecode written and read.

    The image ships its venv's bytecode (docs/image.md), and a plain install writes it at the first start. A
    shell with ``PYTHONDONTWRITEBYTECODE`` (this project's CI and tool machines have it) would otherwise make
    every daemon compile the ~450 modules it imports at every start, about 1.3 CPU-s: the benchmarks would
    count that as the sidecar's start-up, and the tests would pay it hundreds of times."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SETTING_PREFIXES)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("PYTHONPYCACHEPREFIX", str(BYTECODE_CACHE))
    return env


@functools.cache
def warm_bytecode(python: str = sys.executable) -> None:
    """Import what a daemon imports, once per interpreter and test or bench process, with the daemons' bytecode
    settings: the first daemon then starts as every later one does, from bytecode (mtime-checked, so an edited
    module is compiled again)."""
    subprocess.run([python, "-c", WARM_IMPORTS], env=inherited_environment(), check=False, capture_output=True)


def local_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    """Status and body of a GET of ``path`` on a local process's HTTP port, an error status included; (0, the
    error) when nothing answers: for probes that poll until something is up."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


class DaemonProcess:
    """Start, probe, stop and read one daemon subprocess.

    A subclass (a dataclass) provides ``name``, ``log_path``, ``http_port`` and ``process`` as fields, and
    ``command()`` and ``env()``; ``kind`` names it in errors."""

    kind = "daemon"
    name: str
    log_path: pathlib.Path
    http_port: int
    process: subprocess.Popen[bytes] | None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        raise NotImplementedError

    def working_directory(self) -> pathlib.Path | None:
        """Where the process starts (None: here)."""
        return None

    def start(self) -> Self:
        warm_bytecode()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                env=self.env(),
                cwd=self.working_directory(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    def http_get(self, path: str) -> tuple[int, str]:
        """Status and body of ``path`` on the daemon's HTTP port; (0, the error) when nothing answers."""
        return local_get(self.http_port, path)

    def ready(self) -> bool:
        """``/readyz`` answers 200; a process that has exited raises, with its log's tail, instead of waiting on."""
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.kind} {self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
        return self.http_get("/readyz")[0] == 200

    def wait_ready(self, timeout: float = 30.0) -> Self:
        wait_for(self.ready, timeout, what=f"{self.kind} {self.name} ready")
        return self

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, as the kubelet sends it; return the exit code (SIGKILL and raise after ``timeout``)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise

    def kill(self) -> None:
        """SIGKILL: a daemon that dies without a word (its streams break, nothing is said or cleaned up)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def log_events(self) -> list[dict[str, Any]]:
        """Every JSON line of its log so far (other lines, such as a traceback, are left out)."""
        events = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
        return events

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""
