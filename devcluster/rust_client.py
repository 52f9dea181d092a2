"""Build and run the Rust example client (``clients/rust``, binary ``discovery-watch``) for tests and demos.

cargo builds it from ``Cargo.lock`` (``--locked``: a dependency moves only when the lock is updated) into a
target directory under ``~/.cache/discovery-sidecar`` shared by every worktree and by CI, so only the first
build on a machine compiles tonic, prost and tokio; later ones take seconds. The code is generated from
``protos/`` by the crate's build script (protox, pure Rust), so nothing but cargo is needed.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from devcluster.build import CACHE_ROOT, ROOT, Log, _say
from devcluster.waiting import wait_for

CRATE_DIR = ROOT / "clients" / "rust"
TARGET_DIR = CACHE_ROOT / "cargo-target"
BINARY = "discovery-watch"


def cargo() -> str:
    """The ``cargo`` command (rustup puts it in ~/.cargo/bin, which a non-login shell may not have on PATH)."""
    found = shutil.which("cargo") or shutil.which("cargo", path=str(pathlib.Path.home() / ".cargo" / "bin"))
    if found is None:
        raise RuntimeError("cargo is required to build clients/rust (https://rustup.rs); `cargo` is not on PATH")
    return found


def cargo_env() -> dict[str, str]:
    return dict(os.environ, CARGO_TARGET_DIR=str(TARGET_DIR), CARGO_TERM_COLOR="never")


def build(log: Log = _say) -> pathlib.Path:
    """Build ``discovery-watch`` (dev profile) and return its path; cargo skips what is up to date.

    ``make test`` calls this before pytest (as it builds the control plane), so a cold build (1.7 CPU-minutes,
    longer on a busy machine) never counts against a test's timeout."""
    binary = TARGET_DIR / "debug" / BINARY
    if not binary.exists():
        log(f"building clients/rust with cargo into {TARGET_DIR}; a cold build takes minutes, later runs reuse it")
    started = time.monotonic()
    result = subprocess.run(
        [cargo(), "build", "--locked", "--bin", BINARY],
        cwd=CRATE_DIR,
        env=cargo_env(),
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"cargo build of {CRATE_DIR} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    compiled = result.stderr.count("Compiling ")
    if compiled:
        log(f"clients/rust: compiled {compiled} crates in {time.monotonic() - started:.0f}s into {TARGET_DIR}")
    return binary


class RustWatch:
    """One ``discovery-watch`` process, its JSON lines read back in the background.

    Owns the process and two reader threads; ``lines`` (one dict per update printed on stdout) and
    ``notices`` (stderr's retry notices, or raw text) are appended by those threads under ``_lock``, which
    also guards ``_peers``, the set the lines describe (applied as the README says a consumer applies them).
    """

    def __init__(self, binary: pathlib.Path, target: str, args: Sequence[str] = ()) -> None:
        self._lock = threading.Lock()
        self.lines: list[dict[str, Any]] = []
        self.notices: list[dict[str, Any] | str] = []
        self._peers: dict[str, dict[str, Any]] = {}
        self.process = subprocess.Popen(
            [str(binary), "--target", target, "--max-backoff", "0.5", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for text in self.process.stdout:
            line = json.loads(text)
            with self._lock:
                for peer in line["added"] + line["updated"]:
                    self._peers[peer["uid"]] = peer
                for peer in line["removed"]:
                    self._peers.pop(peer["uid"], None)
                self.lines.append(line)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for text in self.process.stderr:
            try:
                notice: dict[str, Any] | str = json.loads(text)
            except ValueError:
                notice = text.rstrip()
            with self._lock:
                self.notices.append(notice)

    def names(self) -> dict[str, str]:
        """peer name -> state (``PEER_STATE_*``), as the printed lines say."""
        with self._lock:
            return {p["name"]: p["state"] for p in self._peers.values()}

    def peers(self) -> dict[str, dict[str, Any]]:
        """peer name -> the printed peer."""
        with self._lock:
            return {p["name"]: p for p in self._peers.values()}

    def printed(self) -> list[dict[str, Any]]:
        """The update lines printed so far (a copy)."""
        with self._lock:
            return list(self.lines)

    def wait_until(self, condition: Callable[[RustWatch], object], timeout: float, what: str) -> None:
        def check() -> object:
            if self.process.poll() is not None:
                raise AssertionError(f"discovery-watch exited with {self.process.returncode}: {self.notices[-5:]}")
            with self._lock:
                started = bool(self.lines)
            return started and condition(self)

        try:
            wait_for(check, timeout, what=what)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; discovery-watch shows {self.names()}; stderr {self.notices[-5:]}") from None

    def close(self) -> int:
        """SIGTERM (it exits 0 on it); the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            code = self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(5)
        for thread in self._threads:
            thread.join(5)
        return code


if __name__ == "__main__":
    print(build())
