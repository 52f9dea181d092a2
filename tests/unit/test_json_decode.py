"""Tests for sidecar.core.json_decode: decoding survives nesting deeper than the interpreter's stack."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.json_decode import CUT_DEPTH, TRUNCATED, loads, truncate_deep


def nested(depth: int, leaf: object = 1) -> str:
    return '{"a":' * depth + json.dumps(leaf) + "}" * depth


class TestOrdinaryDocuments:
    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(),
            lambda children: st.lists(children) | st.dictionaries(st.text(), children),
        )
    )
    def test_same_as_json_loads(self, value: object) -> None:
        """Anything the C decoder can decode decodes exactly as it does (strings with brackets included)."""
        text = json.dumps(value)
        assert loads(text) == json.loads(text)
        assert loads(text.encode()) == json.loads(text)


class TestTooDeep:
    def test_a_document_deeper_than_the_stack_decodes_with_the_deep_part_truncated(self) -> None:
        """A CR nested 100,000 levels deep inside a list page: the other items and the CR's name survive."""
        deep = '{"metadata":{"name":"evil"},"spec":{"data":' + nested(100_000) + "}}"
        page = '{"items":[{"metadata":{"name":"good"}},' + deep + ',{"metadata":{"name":"[also {good}"}}]}'
        decoded = loads(page.encode())
        names = [item["metadata"]["name"] for item in decoded["items"]]
        assert names == ["good", "evil", "[also {good}"]
        inner = decoded["items"][1]["spec"]["data"]
        depth = 3  # items list, the item, spec: data is one level deeper than spec
        while isinstance(inner, dict):
            inner = inner.get("a", inner)
            depth += 1
            if inner == TRUNCATED:
                break
        assert inner == TRUNCATED
        assert depth <= CUT_DEPTH + 1

    def test_truncate_deep_cuts_whole_containers_at_the_level(self) -> None:
        """Containers opening past the cut are replaced whole; shallower structure and strings are kept."""
        text = b'{"x":[1,{"y":[2]}],"s":"]}{[","z":{}}'
        assert json.loads(truncate_deep(text, 2)) == {"x": [1, TRUNCATED], "s": "]}{[", "z": {}}
        assert json.loads(truncate_deep(text, 1)) == {"x": TRUNCATED, "s": "]}{[", "z": TRUNCATED}
        assert truncate_deep(text, 10) == text
