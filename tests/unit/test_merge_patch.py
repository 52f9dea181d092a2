"""Tests for sidecar.core.merge_patch: RFC 7386 JSON Merge Patch."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.merge_patch import apply_merge_patch

# RFC 7386, Appendix A: (original, patch, result).
RFC_7386_EXAMPLES: list[tuple[Any, Any, Any]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]

# RFC 7386, section 3's worked example.
RFC_7386_SECTION_3 = (
    {
        "title": "Goodbye!",
        "author": {"givenName": "John", "familyName": "Doe"},
        "tags": ["example", "sample"],
        "content": "This will be unchanged",
    },
    {"title": "Hello!", "phoneNumber": "+01-123-456-7890", "author": {"familyName": None}, "tags": ["example"]},
    {
        "title": "Hello!",
        "author": {"givenName": "John"},
        "tags": ["example"],
        "content": "This will be unchanged",
        "phoneNumber": "+01-123-456-7890",
    },
)


@pytest.mark.parametrize(("target", "patch", "expected"), [*RFC_7386_EXAMPLES, RFC_7386_SECTION_3])
def test_rfc_7386_examples(target: Any, patch: Any, expected: Any) -> None:
    assert apply_merge_patch(target, patch) == expected


def test_missing_target() -> None:
    assert apply_merge_patch(None, {"a": {"b": None, "c": 1}}) == {"a": {"c": 1}}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text("abc", max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("abcd"), inner, max_size=4),
    max_leaves=12,
)


def reference(target: Any, patch: Any) -> Any:
    """RFC 7386 section 2's pseudocode, transliterated."""
    if isinstance(patch, dict):
        if not isinstance(target, dict):
            target = {}
        target = dict(target)
        for name, value in patch.items():
            if value is None:
                target.pop(name, None)
            else:
                target[name] = reference(target.get(name), value)
        return target
    return patch


@settings(max_examples=300, deadline=None)
@given(json_values, json_values)
def test_matches_rfc_pseudocode_and_mutates_nothing(target: Any, patch: Any) -> None:
    target_copy, patch_copy = copy.deepcopy(target), copy.deepcopy(patch)
    result = apply_merge_patch(target, patch)
    assert target == target_copy
    assert patch == patch_copy
    assert result == reference(target_copy, patch_copy)


@settings(max_examples=200, deadline=None)
@given(json_values, json_values)
def test_idempotent(target: Any, patch: Any) -> None:
    once = apply_merge_patch(target, patch)
    assert apply_merge_patch(once, patch) == once


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from("abcd"), json_values, max_size=4), json_values)
def test_result_shares_nothing_with_inputs(target: dict[str, Any], patch: Any) -> None:
    target_copy, patch_copy = copy.deepcopy(target), copy.deepcopy(patch)
    result = apply_merge_patch(target, patch)

    def scramble(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                scramble(v)
            value["zz-mutated"] = 1
        elif isinstance(value, list):
            for v in value:
                scramble(v)
            value.append("mutated")

    scramble(result)
    assert target == target_copy
    assert patch == patch_copy
