"""devcluster.build's Go tools: kwok is one row, with a cache key of its own apart from the control plane's."""

from __future__ import annotations

from devcluster import build


def test_every_tool_pins_its_module_in_a_module_of_its_own() -> None:
    for tool in build.GO_TOOLS:
        assert (tool.module_dir / "go.mod").is_file() and (tool.module_dir / "go.sum").is_file()
        assert tool.version().startswith("v")
        assert tool.module_dir != build.MODULE_DIR


def test_kwoks_cache_key_is_its_own() -> None:
    """Bumping kwok never changes where the control plane is cached, and the reverse."""
    (kwok,) = [tool for tool in build.GO_TOOLS if tool.binary == "kwok"]
    assert kwok.version_of == "sigs.k8s.io/kwok"
    path = build.tool_path(kwok)
    assert path.name == "kwok"
    assert path.parent.name.startswith(f"kwok-{kwok.version()}-")
    assert build.CACHE_ROOT / "tools" in path.parents
    assert build.CACHE_ROOT / "controlplane" not in path.parents
