"""Build the ``go-watch`` Go baseline (bench/baselines/go-watch) once, into ``~/.cache``.

The binary lands in ``~/.cache/discovery-sidecar/bench/go-watch-<key>/go-watch``, where ``<key>`` is the
first 12 hex digits of the SHA-256 of go.mod, go.sum and main.go, so an edit to the program or a
dependency bump builds a fresh binary and an unchanged tree reuses the cached one.

Run as ``python bench/baselines/build_go.py`` to build (if needed) and print the binary's path.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys
import time

from devcluster.build import go_toolchain

SOURCE_DIR = pathlib.Path(__file__).resolve().parent / "go-watch"
SOURCE_FILES = ("go.mod", "go.sum", "main.go")
CACHE_ROOT = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "discovery-sidecar"
BINARY_NAME = "go-watch"


def _say(message: str) -> None:
    print(f"[build_go] {message}", file=sys.stderr, flush=True)


def source_key() -> str:
    """First 12 hex digits of the SHA-256 over go.mod, go.sum and main.go, in that order."""
    digest = hashlib.sha256()
    for name in SOURCE_FILES:
        digest.update((SOURCE_DIR / name).read_bytes())
    return digest.hexdigest()[:12]


def binary_path() -> pathlib.Path:
    return CACHE_ROOT / "bench" / f"go-watch-{source_key()}" / BINARY_NAME


def ensure_go_watch() -> pathlib.Path:
    """Return the path of the go-watch binary, building it first if it is not cached yet."""
    target = binary_path()
    if target.is_file():
        return target
    go = go_toolchain("the go-watch baseline")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(BINARY_NAME + ".partial")
    _say(f"building go-watch into {target} (a cold Go build cache takes a few minutes; later runs reuse it)")
    started = time.monotonic()
    # -buildvcs=false: the module sits inside the project's repository; the binary needs no VCS stamp.
    env = dict(os.environ, GOFLAGS="-buildvcs=false")
    result = subprocess.run(
        [go, "build", "-o", str(partial), "."], cwd=SOURCE_DIR, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"`go build` of {SOURCE_DIR} failed (exit {result.returncode}):\n{result.stderr.strip()}")
    partial.replace(target)
    size_mb = target.stat().st_size / 1e6
    _say(f"built go-watch ({size_mb:.1f} MB) in {time.monotonic() - started:.0f}s")
    return target


if __name__ == "__main__":
    print(ensure_go_watch())
