"""The version is one: every place that repeats pyproject.toml's version agrees with it."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tomllib

import pytest

import discovery_client
import sidecar

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import set_version  # noqa: E402

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_every_written_version_is_pyprojects() -> None:
    written = set_version.written_versions()
    assert len(written) >= 4, written  # pyproject (twice), the client, the image label at least
    assert {place: v for place, v in written.items() if v != VERSION} == {}


def test_installed_packages_report_it() -> None:
    assert sidecar.__version__ == VERSION
    assert discovery_client.__version__ == VERSION


def test_the_command_reports_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.app.cli", "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == f"discovery-sidecar {VERSION}"


def test_the_lock_records_it() -> None:
    locked = {p["name"]: p["version"] for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]}
    assert locked["discovery-sidecar"] == VERSION and locked["discovery-sidecar-client"] == VERSION


def test_set_version_rewrites_every_place(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bump rewrites each place exactly once (run on a copy of the files)."""
    for name, _ in set_version.PLACES:
        source = ROOT / name
        if source.exists():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(source.read_text())
    monkeypatch.setattr(set_version, "ROOT", tmp_path)
    changed = set_version.set_version("9.8.7")
    assert "pyproject.toml" in changed and "clients/python/pyproject.toml" in changed
    assert set(set_version.written_versions().values()) == {"9.8.7"}
    with pytest.raises(SystemExit):
        set_version.set_version("latest")
