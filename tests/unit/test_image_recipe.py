"""The recipe of the image built without Docker (devcluster.image): what it is made of and when it is rebuilt.

Building and running it is tests/integration/test_image.py; these check, without building, that the
recipe follows the Dockerfile (its config, its build context) and that the cache key sees every input.
"""

from __future__ import annotations

import pathlib
import shutil
import tomllib

from devcluster.build import ROOT
from devcluster.dockerfile import DockerIgnore, load
from devcluster.image import PACKAGES, SUITE, USER_ID, ImageConfig, context_files, image_key


def test_config_is_the_dockerfiles_final_stage() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    config = ImageConfig.from_dockerfile(version)
    final = load().final
    assert config.user == f"{USER_ID}:{USER_ID}"
    assert config.entrypoint == final.last("ENTRYPOINT").exec_form  # type: ignore[union-attr]
    assert config.cmd == final.last("CMD").exec_form  # type: ignore[union-attr]
    assert config.env["PATH"] == "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert config.env["DISCOVERY_LOG_FORMAT"] == "json" and config.env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert config.exposed_ports == ["8090/tcp"]
    assert config.labels["org.opencontainers.image.version"] == version, "the label takes pyproject's version"
    flags = config.umoci_flags()
    assert f"--config.user={USER_ID}:{USER_ID}" in flags and "--config.entrypoint=discovery-sidecar" in flags
    assert f"--config.label=org.opencontainers.image.version={version}" in flags


def test_base_is_debian_with_the_python_the_lock_was_made_for() -> None:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    grpcio = next(p for p in lock["package"] if p["name"] == "grpcio")
    wheels = [w["url"].rsplit("/", 1)[1] for w in grpcio["wheels"]]
    assert any("-cp311-cp311-manylinux" in w and "x86_64" in w for w in wheels), "cp311 wheels in the lock"
    assert SUITE == "bookworm" and "python3.11" in PACKAGES, "Debian 12's Python is 3.11 (13's is 3.13)"
    assert "libstdc++6" in PACKAGES, "grpcio's extension links libstdc++"


def test_context_is_what_docker_would_send() -> None:
    files = {p.as_posix() for p in context_files()}
    for needed in ("pyproject.toml", "uv.lock", "LICENSE", "sidecar/app/cli.py", "clients/python/pyproject.toml"):
        assert needed in files, needed
    assert not [f for f in files if f.startswith(("tests/", ".venv/", ".git/", "devcluster/")) or "__pycache__" in f]


def test_walk_prunes_nothing_the_patterns_would_keep(tmp_path: pathlib.Path) -> None:
    """files() skips ignored directories for speed; it must still find what a full walk would find."""
    (tmp_path / ".dockerignore").write_text("*\n!keep.txt\n!src/\n!deep/a/b/\n**/__pycache__\n!**/*.md\n")
    for name in ("keep.txt", "drop.txt", "src/x.py", "src/__pycache__/x.pyc", "deep/a/b/c.txt", "deep/a/z.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    (tmp_path / "other" / "n.md").parent.mkdir()
    (tmp_path / "other" / "n.md").write_text("md")
    ignore = DockerIgnore.load(tmp_path / ".dockerignore")
    everything = [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()]
    expected = sorted(p for p in everything if not ignore.ignored(p.as_posix()))
    assert ignore.files(tmp_path) == expected
    assert {p.as_posix() for p in expected} == {"keep.txt", "src/x.py", "deep/a/b/c.txt", "other/n.md"}


def test_cache_key_follows_the_context_only(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "repo"
    for name in (".dockerignore", "pyproject.toml", "uv.lock", "sidecar/app/cli.py", "README.md"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, root / name)
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text("x = 1\n")
    config = ImageConfig.from_dockerfile("0.0.0")
    key = image_key(config, root)
    (root / "tests" / "test_x.py").write_text("x = 2\n")
    assert image_key(config, root) == key, "a file outside the build context does not rebuild the image"
    cli = root / "sidecar" / "app" / "cli.py"
    cli.write_text(cli.read_text() + "\n# changed\n")
    changed = image_key(config, root)
    assert changed != key, "a source change rebuilds the image"
    (root / "uv.lock").write_text((root / "uv.lock").read_text() + "\n")
    assert image_key(config, root) not in (key, changed), "a lock change rebuilds the image"
    assert image_key(ImageConfig.from_dockerfile("9.9.9"), root) != image_key(config, root), "the config counts"
