"""The release workflow (.github/workflows/release.yml) is valid and does what docs/image.md promises.

actionlint (built from its pinned Go module by devcluster.build, as `make lint` runs it) checks that it is
a valid workflow; it cannot know this project's policy, which is checked here: tags only, the two
platforms, push, SBOM and provenance, keyless signing, every action pinned by commit, least privilege.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
from typing import Any

import pytest
import yaml

from devcluster.build import ROOT, ensure_tool
from devcluster.dockerfile import load

WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"


@pytest.fixture(scope="module")
def workflow() -> dict[Any, Any]:
    loaded: dict[Any, Any] = yaml.safe_load(WORKFLOW.read_text())
    return loaded


def steps(workflow: dict[Any, Any], job: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = workflow["jobs"][job]["steps"]
    return found


def test_actionlint_accepts_the_workflows_and_rejects_a_broken_one(tmp_path: pathlib.Path) -> None:
    actionlint = str(ensure_tool("actionlint"))
    result = subprocess.run([actionlint], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / ".github" / "workflows" / "broken.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    steps:\n"
        "      - run: echo ${{ github.nonexistent_context_field }}\n      - uses: actions/checkout@v4\n"
        "        with:\n          no-such-input: 1\n"
    )
    result = subprocess.run([actionlint, str(broken)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "no-such-input" in result.stdout, result.stdout


def test_runs_on_version_tags_only(workflow: dict[Any, Any]) -> None:
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert triggers == {"push": {"tags": ["v*"]}}
    assert workflow["permissions"] == {}, "no permission unless a job asks for it"


def test_every_action_is_pinned_by_commit(workflow: dict[Any, Any]) -> None:
    lines = [line for line in WORKFLOW.read_text().splitlines() if re.match(r"\s*(- )?uses:", line)]
    assert lines
    for line in lines:
        assert re.search(r"@[0-9a-f]{40} # v\d+(\.\d+)*$", line), f"pin by commit, tag in a comment: {line.strip()}"


def test_image_is_multi_arch_pushed_with_sbom_and_signed(workflow: dict[Any, Any]) -> None:
    job = workflow["jobs"]["image"]
    assert job["permissions"] == {"contents": "read", "packages": "write", "id-token": "write"}
    build = next(s for s in job["steps"] if s.get("id") == "build")
    assert build["uses"].startswith("docker/build-push-action@")
    options = build["with"]
    assert options["platforms"] == "linux/amd64,linux/arm64"
    assert options["push"] is True and options["sbom"] is True and options["provenance"] == "mode=max"
    assert options["build-args"] == "VERSION=${{ needs.version.outputs.version }}", "the image label's version"
    runs = "\n".join(s.get("run", "") for s in job["steps"])
    assert 'cosign sign --yes "${IMAGE}@${DIGEST}"' in runs, "keyless signing of the pushed digest"
    assert "ghcr.io/${GITHUB_REPOSITORY,,}" in runs


def test_base_digest_check_reads_the_dockerfiles_pin(workflow: dict[Any, Any]) -> None:
    check = next(s for s in steps(workflow, "image") if "base image" in s.get("name", ""))
    assert "sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile" in check["run"]
    assert load().global_args["PYTHON_IMAGE"].partition("@")[2].startswith("sha256:")
    pinned = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("ARG PYTHON_IMAGE=")]
    assert len(pinned) == 1, "the workflow's sed expects one ARG PYTHON_IMAGE= line"


def test_python_distributions_are_built_by_the_pinned_uv_and_published(workflow: dict[Any, Any]) -> None:
    build = "\n".join(s.get("run", "") for s in steps(workflow, "python"))
    assert "--require-hashes -r hack/uv.requirements" in build and "uv build --all-packages" in build
    publish = workflow["jobs"]["pypi"]
    assert publish["permissions"] == {"id-token": "write"} and publish["environment"] == "pypi"
    runs = "\n".join(s.get("run", "") for s in publish["steps"])
    client, sidecar = runs.index("dist/discovery_sidecar_client-"), runs.index("dist/discovery_sidecar-")
    assert client < sidecar, "the client first: the sidecar requires it at the same version"
