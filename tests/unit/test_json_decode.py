"""Tests for sidecar.core.json_decode: decoding survives nesting deeper than the interpreter's stack, and the
fast decoder tried first (msgspec) decodes, accepts and refuses exactly what the standard library does."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.json_decode import CUT_DEPTH, TRUNCATED, loads, standard_loads, truncate_deep


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

    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
            lambda children: st.lists(children) | st.dictionaries(st.text(), children),
        )
    )
    def test_the_fast_decoder_and_the_fallback_agree(self, value: object) -> None:
        """Whichever decoder answers, the value is the same, types included (1.0 stays a float, 1 an int)."""
        for text in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
            expected = json.loads(text)
            for decoded in (loads(text), loads(text.encode("utf-8", "surrogatepass")), standard_loads(text)):
                assert decoded == expected
                assert repr(decoded) == repr(expected)


def outcome(decode: Any, raw: bytes) -> tuple[str, str]:
    try:
        return "value", repr(decode(raw))
    except Exception as exc:  # noqa: BLE001 - the error's type and text are what is compared
        return type(exc).__name__, str(exc)


HOSTILE = [
    b"NaN",
    b'{"a": -Infinity}',
    b"1e400",
    b"123456789012345678901234567890",
    b"-9223372036854775809",
    b"1" + b"0" * 5000,  # past the interpreter's limit on digits
    b'"\\ud800"',  # a lone surrogate, escaped
    b'"\xed\xa0\x80"',  # ... and encoded
    b"\xef\xbb\xbf{}",  # a byte-order mark
    b"\xff",
    b'{"a":1,"a":2}',
    b'{"a":1} trailing',
    b"",
    b'"\x01"',
    b"[" * 5000,
    b"[" * 1500 + b"]" * 1500,
]


class TestHostileInput:
    @pytest.mark.parametrize("raw", HOSTILE, ids=lambda raw: repr(raw[:24]))
    def test_same_value_or_same_error_as_the_standard_decoder(self, raw: bytes) -> None:
        """What the fast decoder refuses is decoded by the standard path: the same value, or the same error."""
        assert outcome(loads, raw) == outcome(standard_loads, raw)

    def test_msgspec_refuses_what_it_would_not_decode_like_json(self) -> None:
        """The premise of the fallback: on these msgspec raises (rather than decoding something else)."""
        for raw in (b"NaN", b"1e400", b'"\\ud800"', b"\xef\xbb\xbf{}", b"[" * 1500 + b"]" * 1500):
            with pytest.raises((msgspec.DecodeError, RecursionError)):
                msgspec.json.decode(raw)


class TestTooDeep:
    def test_deeper_than_the_stack_is_truncated_at_the_cut(self) -> None:
        """1,500 levels, beyond both decoders' stack: the depth limit applies (``CUT_DEPTH``) as before."""
        decoded = loads(nested(1500).encode())
        depth = 0
        while isinstance(decoded, dict):
            decoded = decoded["a"]
            depth += 1
        assert decoded == TRUNCATED
        assert depth == CUT_DEPTH

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
