"""The package path is the architecture: app -> {kube, etcd, serve} -> peers -> core, nothing points back up.

Every import in ``sidecar/`` (at module level, inside functions and under ``TYPE_CHECKING`` alike) is
read from the source and checked against the layers; docs/design.md draws the same map.
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys
from dataclasses import dataclass

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "sidecar"
LAYER = {"core": 0, "peers": 1, "kube": 2, "etcd": 2, "serve": 2, "app": 3}
"""Each subpackage's layer: a module may import its own layer's package and any lower layer's."""
BACKENDS = ("kube", "etcd")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. "sidecar.app.daemon"
    target: str  # what it imports, e.g. "sidecar.peers.hub"
    line: int
    lazy: bool  # inside a function (imported when called, not when the module is)


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path) -> list[Import]:
    name = module_name(path)
    tree = ast.parse(path.read_text(), str(path))
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(name, alias.name, child.lineno, lazy) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append(Import(name, child.module, child.lineno, lazy))
                # "from sidecar.kube import settings" imports sidecar.kube.settings
                found.extend(Import(name, f"{child.module}.{alias.name}", child.lineno, lazy) for alias in child.names)
            visit(child, inner)

    visit(tree, False)
    return [i for i in found if i.target == "sidecar" or i.target.startswith("sidecar.")]


def subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYER else None


ALL_IMPORTS = [i for path in sorted(PACKAGE.rglob("*.py")) if "_pb" not in path.parts for i in imports_of(path)]


def test_the_walker_sees_the_imports_it_must_judge() -> None:
    """The rules below could fail: the walker finds lazy imports and ``from package import module``."""
    daemon = [i for i in ALL_IMPORTS if i.module == "sidecar.app.backends"]
    assert any(i.target == "sidecar.kube.backend" and i.lazy for i in daemon)
    assert any(i.target == "sidecar.kube.settings" and not i.lazy for i in daemon)
    assert {subpackage(i.module) for i in ALL_IMPORTS} >= set(LAYER)


def test_nothing_imports_a_higher_layer() -> None:
    upward = [
        i
        for i in ALL_IMPORTS
        if (src := subpackage(i.module)) and (dst := subpackage(i.target)) and LAYER[dst] > LAYER[src]
    ]
    assert not upward, "\n".join(f"{i.module}:{i.line} imports {i.target} (a higher layer)" for i in upward)


def test_siblings_do_not_import_each_other() -> None:
    """kube, etcd and serve share a layer and never import one another: a backend knows no other backend
    and no consumer, and the pod-facing layer knows no backend."""
    sideways = [
        i
        for i in ALL_IMPORTS
        if (src := subpackage(i.module))
        and (dst := subpackage(i.target))
        and src != dst
        and LAYER[src] == LAYER[dst] == 2
    ]
    assert not sideways, "\n".join(f"{i.module}:{i.line} imports {i.target}" for i in sideways)


def test_serve_imports_no_backend() -> None:
    found = [i for i in ALL_IMPORTS if subpackage(i.module) == "serve" and subpackage(i.target) in BACKENDS]
    assert not found, found


def test_the_core_imports_only_the_core() -> None:
    found = [i for i in ALL_IMPORTS if subpackage(i.module) == "core" and subpackage(i.target) != "core"]
    assert not found, found


def test_only_the_backend_choice_names_a_backend_and_imports_its_build_lazily() -> None:
    """In app/, only ``sidecar.app.backends`` imports ``sidecar.kube``/``sidecar.etcd``: their settings
    modules (the options tables, no client library) at once, anything else only inside ``build``."""
    from_app = [i for i in ALL_IMPORTS if subpackage(i.module) == "app" and subpackage(i.target) in BACKENDS]
    elsewhere = [i for i in from_app if i.module != "sidecar.app.backends"]
    assert not elsewhere, "\n".join(f"{i.module}:{i.line} imports {i.target}" for i in elsewhere)
    tables = ("sidecar.kube", "sidecar.etcd", "sidecar.kube.settings", "sidecar.etcd.settings")
    eager = [i.target for i in from_app if not i.lazy and i.target not in tables]
    assert not eager, f"imported before the choice: {eager}"


@pytest.mark.parametrize("backend", ["kubernetes", "etcd"])
def test_a_backend_is_imported_only_when_chosen(backend: str, tmp_path: pathlib.Path) -> None:
    """Building the daemon for one backend loads that backend's modules and client, never the other's."""
    program = f"""
import json, sys
from sidecar.app.config import load_settings
from sidecar.app.daemon import Sidecar
before = {{m for m in sys.modules if m.startswith(("sidecar.kube.", "sidecar.etcd.", "kubernetes"))}}
settings = load_settings(environ={{
    "POD_NAME": "w", "POD_NAMESPACE": "ns", "POD_UID": "u", "DYN_DISCOVERY_BACKEND": "{backend}",
    "DISCOVERY_SERVICE_NAME": "s" if "{backend}" == "kubernetes" else "",
    "KUBECONFIG": "{tmp_path / "kubeconfig"}", "ETCD_ENDPOINTS": "http://127.0.0.1:1",
    "DISCOVERY_GRPC_LISTEN": "127.0.0.1:0", "DISCOVERY_HTTP_LISTEN": "off", "DISCOVERY_PODINFO_DIR": "{tmp_path}",
}})
sidecar = Sidecar(settings)
after = {{m for m in sys.modules if m.startswith(("sidecar.kube.", "sidecar.etcd.", "kubernetes"))}}
sidecar.grpc.stop(0.1)
sidecar.backend.close()
print(json.dumps(sorted(before))); print(json.dumps(sorted(after)))
"""
    (tmp_path / "kubeconfig").write_text(KUBECONFIG)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    before, after = (set(json.loads(line)) for line in result.stdout.splitlines()[-2:])
    assert before == {"sidecar.kube.settings", "sidecar.etcd.settings"}  # the options tables only
    chosen, other = ("sidecar.kube.", "sidecar.etcd.")
    if backend == "etcd":
        chosen, other = other, chosen
    assert f"{chosen}backend" in after
    assert not {m for m in after - before if m.startswith(other)}
    assert ("kubernetes" in after) == (backend == "kubernetes")


KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""
