"""``python -m bench.footprint``: what an install weighs, from the lock, side by side in one run.

Three installs, each a fresh venv holding exactly what ``uv.lock`` pins for it (by hash), made by the
pinned uv:

* ``daemon, before``: the sidecar as it was installed until 0.1.0, with ``grpcio-tools`` (protoc and its
  bundled well-known protos) among the runtime dependencies;
* ``daemon``: the sidecar now (runtime dependencies only, ``grpcio-tools`` in the dev extra);
* ``client``: ``discovery-sidecar-client`` alone, as a main container installs it.

For each: the installed size (site-packages and scripts, bytes on disk) and the peak RSS of importing what
the process imports at start (the daemon: the CLI, the daemon and the Kubernetes backend; the client: the
package; and the bare interpreter, ``import sys``, for the floor), the median of five interpreters.
Writes bench/results/footprint.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import tomllib

from devcluster.build import ROOT, uv_binary

DAEMON_IMPORTS = "import sidecar.app.cli, sidecar.app.daemon, sidecar.kube.backend"
CLIENT_IMPORTS = "import discovery_client"
PROBE = "import resource; {imports}; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"


def _run(argv: list[str], **kwargs: object) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{result.stderr}")
    return str(result.stdout)


def _locked_version(name: str) -> str:
    return next(p["version"] for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"] if p["name"] == name)


def _install(work: pathlib.Path, label: str, package: str, extra_requirements: list[str]) -> pathlib.Path:
    """A venv with ``package`` (a workspace member) and its locked dependencies, plus ``extra_requirements``."""
    uv = str(uv_binary())
    requirements = work / f"{label}.txt"
    _run(
        [uv, "export", "--frozen", "--package", package, "--no-emit-workspace", "--no-dev"]
        + ["--format", "requirements-txt", "--output-file", str(requirements)],
        cwd=ROOT,
    )
    venv = work / label
    base_python = getattr(sys, "_base_executable", sys.executable)
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    _run([uv, "venv", "--quiet", "--python", base_python, str(venv)], env=env)
    python = str(venv / "bin" / "python")
    _run([uv, "pip", "install", "--quiet", "--python", python, "--require-hashes", "-r", str(requirements)], env=env)
    if extra_requirements:
        _run([uv, "pip", "install", "--quiet", "--python", python, *extra_requirements], env=env)
    members = [str(ROOT / "clients" / "python")] + ([str(ROOT)] if package == "discovery-sidecar" else [])
    _run([uv, "pip", "install", "--quiet", "--python", python, "--no-deps", *members], env=env)
    return venv


def _installed_bytes(venv: pathlib.Path) -> int:
    total = 0
    for directory in (venv / "lib", venv / "bin"):
        for path in directory.rglob("*"):
            if path.is_file() and not path.is_symlink() and "__pycache__" not in path.parts:
                total += path.stat().st_size
    return total


def _import_rss_kib(venv: pathlib.Path, imports: str, runs: int = 5) -> float:
    python = str(venv / "bin" / "python")
    _run([python, "-c", imports], cwd="/")  # the first run writes the bytecode caches
    samples = [int(_run([python, "-c", PROBE.format(imports=imports)], cwd="/").strip()) for _ in range(runs)]
    return statistics.median(samples)


def measure() -> dict[str, dict[str, float | str]]:
    tools = f"grpcio-tools=={_locked_version('grpcio-tools')}"
    installs = [
        ("daemon, before", "discovery-sidecar", [tools], DAEMON_IMPORTS),
        ("daemon", "discovery-sidecar", [], DAEMON_IMPORTS),
        ("client", "discovery-sidecar-client", [], CLIENT_IMPORTS),
    ]
    results: dict[str, dict[str, float | str]] = {}
    with tempfile.TemporaryDirectory(prefix="footprint-") as raw:
        work = pathlib.Path(raw)
        for index, (label, package, extra, imports) in enumerate(installs):
            venv = _install(work, f"venv{index}", package, extra)
            results[label] = {
                "installed_mib": round(_installed_bytes(venv) / 2**20, 1),
                "import_rss_mib": round(_import_rss_kib(venv, imports) / 1024, 1),
                "imports": imports,
            }
            print(f"[footprint] {label}: {results[label]}", file=sys.stderr, flush=True)
        results["interpreter alone (floor)"] = {
            "installed_mib": 0.0,
            "import_rss_mib": round(_import_rss_kib(venv, "import sys") / 1024, 1),
            "imports": "import sys",
        }
    return results


def table(results: dict[str, dict[str, float | str]]) -> str:
    rows = ["| install | installed size | import RSS |", "| --- | --- | --- |"]
    for label, figures in results.items():
        size = f"{figures['installed_mib']} MiB" if figures["installed_mib"] else "-"
        rows.append(f"| {label} | {size} | {figures['import_rss_mib']} MiB |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results" / "footprint.json")
    args = parser.parse_args(argv)
    results = measure()
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
