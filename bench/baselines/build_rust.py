"""Build the ``kube-rs-watch`` Rust baseline (bench/baselines/kube-rs-watch) once, into ``~/.cache``.

``cargo build --release --locked`` runs with ``CARGO_TARGET_DIR=~/.cache/discovery-sidecar/bench/kube-rs-target``
(so incremental artefacts survive across work-tree checkouts), and the finished binary is copied to
``~/.cache/discovery-sidecar/bench/kube-rs-watch-<key>/kube-rs-watch``. ``<key>`` is the first 12 hex
digits of the SHA-256 over Cargo.toml, Cargo.lock and the ``src/*.rs`` files (sorted by name), so a
source edit or a dependency bump yields a new binary while an unchanged tree reuses the cached one
without invoking cargo at all.

Run as ``python bench/baselines/build_rust.py`` to build (if needed) and print the binary's path.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import time

CRATE_DIR = pathlib.Path(__file__).resolve().parent / "kube-rs-watch"
BINARY_NAME = "kube-rs-watch"
CACHE_ROOT = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "discovery-sidecar"
BENCH_CACHE = CACHE_ROOT / "bench"
TARGET_DIR = BENCH_CACHE / "kube-rs-target"


def _say(message: str) -> None:
    print(f"[build_rust] {message}", file=sys.stderr, flush=True)


def _cargo() -> str:
    """Locate cargo on PATH, or in rustup's default ``~/.cargo/bin``; raise a clear error if absent."""
    found = shutil.which("cargo")
    if found is None:
        fallback = pathlib.Path(os.environ.get("CARGO_HOME", pathlib.Path.home() / ".cargo")) / "bin" / "cargo"
        if fallback.is_file() and os.access(fallback, os.X_OK):
            found = str(fallback)
    if found is None:
        raise RuntimeError(
            "the Rust toolchain is required to build the kube-rs-watch baseline: `cargo` is not on PATH "
            "(nor in ~/.cargo/bin); install Rust (rustup or the distribution's cargo package) and retry"
        )
    return found


def source_files() -> list[pathlib.Path]:
    """The files whose content decides the binary: Cargo.toml, Cargo.lock, then src/*.rs by name."""
    files = [CRATE_DIR / "Cargo.toml", CRATE_DIR / "Cargo.lock"]
    files += sorted((CRATE_DIR / "src").glob("*.rs"))
    return files


def source_key() -> str:
    """First 12 hex digits of the SHA-256 over :func:`source_files` (each prefixed by its relative name)."""
    digest = hashlib.sha256()
    for path in source_files():
        digest.update(path.relative_to(CRATE_DIR).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def binary_path() -> pathlib.Path:
    """Where the binary for the current sources lives (whether or not it has been built yet)."""
    return BENCH_CACHE / f"{BINARY_NAME}-{source_key()}" / BINARY_NAME


def ensure_kube_rs_watch() -> pathlib.Path:
    """Return the path of the kube-rs-watch binary, building it with cargo first if it is not cached.

    Raises ``RuntimeError`` when cargo is missing or the build fails; cargo's own progress goes to stderr.
    """
    target = binary_path()
    if target.is_file() and os.access(target, os.X_OK):
        return target
    cargo = _cargo()
    _say(
        f"building {BINARY_NAME} into {target} with CARGO_TARGET_DIR={TARGET_DIR} "
        "(a cold build on 2 cores takes several minutes; later builds reuse the target dir)"
    )
    started = time.monotonic()
    env = dict(os.environ, CARGO_TARGET_DIR=str(TARGET_DIR))
    # --locked: build exactly the committed Cargo.lock; stdout to stderr so our stdout stays the path only.
    result = subprocess.run(
        [cargo, "build", "--release", "--locked"], cwd=CRATE_DIR, env=env, stdout=sys.stderr, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"`cargo build --release --locked` in {CRATE_DIR} failed (exit {result.returncode})")
    built = TARGET_DIR / "release" / BINARY_NAME
    if not built.is_file():
        raise RuntimeError(f"cargo reported success but {built} does not exist")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(BINARY_NAME + ".partial")
    shutil.copy2(built, partial)
    partial.chmod(0o755)
    partial.replace(target)  # atomic: a concurrent caller sees either no binary or a complete one
    size_mb = target.stat().st_size / 1e6
    _say(f"built {BINARY_NAME} ({size_mb:.1f} MB) in {time.monotonic() - started:.0f}s")
    return target


if __name__ == "__main__":
    print(ensure_kube_rs_watch())
