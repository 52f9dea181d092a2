"""The proto contract's checks are real: buf (built from its pinned Go module) lints protos/ and refuses an
incompatible change against the last release's image (what `make lint` runs; see docs/api.md)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

from devcluster.build import ROOT, ensure_tool

pytestmark = pytest.mark.integration
PROTOS = ROOT / "protos"
PROTO = pathlib.Path("discovery/v1/discovery.proto")


@pytest.fixture(scope="module")
def buf() -> pathlib.Path:
    return ensure_tool("buf")


def last_release() -> pathlib.Path:
    images = sorted(PROTOS.glob("releases/v*.binpb"), key=lambda p: [int(n) for n in p.stem[1:].split(".")])
    assert images, "protos/releases/ holds the image of every release"
    return images[-1]


def breaking(buf: pathlib.Path, module: pathlib.Path) -> subprocess.CompletedProcess[str]:
    argv = [str(buf), "breaking", str(module), "--against", str(last_release())]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def edited_copy(tmp_path: pathlib.Path, *edits: tuple[str, str]) -> pathlib.Path:
    module = tmp_path / "protos"
    shutil.copytree(PROTOS, module, ignore=shutil.ignore_patterns("releases"))
    proto = module / PROTO
    text = proto.read_text()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    proto.write_text(text)
    return module


def test_protos_pass_lint_and_are_compatible_with_the_last_release(buf: pathlib.Path) -> None:
    lint = subprocess.run([str(buf), "lint", str(PROTOS)], capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    result = breaking(buf, PROTOS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_breaking_refuses_a_renumbered_field_and_a_renamed_rpc(buf: pathlib.Path, tmp_path: pathlib.Path) -> None:
    module = edited_copy(
        tmp_path,
        ("uint64 resume_revision = 3;", "uint64 resume_revision = 30;"),
        ("rpc WatchPeers(", "rpc FollowPeers("),
    )
    result = breaking(buf, module)
    assert result.returncode != 0
    assert "resume_revision" in result.stdout and "WatchPeers" in result.stdout, result.stdout


def test_an_added_field_is_compatible(buf: pathlib.Path, tmp_path: pathlib.Path) -> None:
    module = edited_copy(tmp_path, ("  string container = 25;\n", "  string container = 25;\n  string rack = 26;\n"))
    result = breaking(buf, module)
    assert result.returncode == 0, result.stdout + result.stderr


def test_lint_still_guards_names(buf: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """The one exception (SERVICE_SUFFIX) leaves the other STANDARD rules on."""
    module = edited_copy(
        tmp_path, ("message PeerGroup {", "message peer_group {"), ("PeerGroup groups", "peer_group groups")
    )
    lint = subprocess.run([str(buf), "lint", str(module)], capture_output=True, text=True, timeout=60)
    assert lint.returncode != 0 and "PascalCase" in lint.stdout, lint.stdout + lint.stderr
