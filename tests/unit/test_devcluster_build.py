"""devcluster.build's Go tools: each is one row, with a cache key of its own apart from the control plane's."""

from __future__ import annotations

import pytest

from devcluster import build
from devcluster.__main__ import main


def test_every_tool_pins_its_module_in_a_module_of_its_own() -> None:
    for tool in build.GO_TOOLS.values():
        assert (tool.module_dir / "go.mod").is_file() and (tool.module_dir / "go.sum").is_file()
        assert build.tool_version(tool).startswith("v")
        assert tool.module_dir != build.MODULE_DIR


def test_a_tools_cache_key_is_its_own() -> None:
    """Bumping a tool never changes where the control plane is cached, and the reverse."""
    kwok = build.GO_TOOLS["kwok"]
    path = build.tool_path(kwok)
    assert path.name == "kwok"
    assert path.parent.name.startswith(f"kwok-{build.tool_version(kwok)}-")
    assert build.CACHE_ROOT / "tools" in path.parents
    assert build.CACHE_ROOT / "controlplane" not in path.parents


def test_build_refuses_an_unknown_target(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["build", "kubelet"])
    assert exited.value.code == 2
    assert "unknown build target(s) kubelet: expected controlplane, kwok" in capsys.readouterr().err
