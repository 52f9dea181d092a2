"""The committed stubs in clients/python/discovery_client/api are exactly what the locked protoc generates."""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import gen_protos  # noqa: E402


def test_committed_stubs_match_the_proto(tmp_path: pathlib.Path) -> None:
    generated = gen_protos.generate(tmp_path)
    assert generated, "protoc produced nothing"
    committed_root = gen_protos.STUBS_DIR
    for path in generated:
        relative = path.relative_to(tmp_path)
        committed = committed_root / relative
        assert committed.exists(), f"{relative} is not committed: run `make protos`"
        assert committed.read_text() == path.read_text(), f"{relative} drifted from the proto: run `make protos`"


def test_readme_documents_every_setting() -> None:
    """The configuration table (docs/configuration.md, linked from the README) names every setting."""
    from sidecar.app.config import OPTIONS

    page = ROOT / "docs" / "configuration.md"
    assert "docs/configuration.md" in (ROOT / "README.md").read_text(), "the README links the configuration page"
    text = page.read_text()
    for option in OPTIONS:
        row = next((line for line in text.splitlines() if line.startswith(f"| `{option.env}` |")), None)
        assert row is not None, f"{page.name}'s configuration table lacks {option.env}"
        assert f"`{option.flag}`" in row, f"{page.name} gives another flag for {option.env}"
        if option.default and option.env not in ("DISCOVERY_POD_LABELS",):
            assert f"`{option.default}`" in row, f"{page.name} gives another default for {option.env}"
