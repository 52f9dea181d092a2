"""The direct Struct encoder produces exactly what protobuf's own conversion produces."""

from __future__ import annotations

import math

from google.protobuf import struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.struct_codec import encode_struct

json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
documents = st.dictionaries(st.text(max_size=10), json_values, max_size=6)


def reference(document: dict) -> struct_pb2.Struct:
    expected = struct_pb2.Struct()
    expected.update(document)
    return expected


@settings(max_examples=300, deadline=None)
@given(documents)
def test_matches_struct_update(document: dict) -> None:
    ours = struct_pb2.Struct.FromString(encode_struct(document))
    assert ours == reference(document)


def test_examples_cover_every_value_kind() -> None:
    document = {
        "null": None,
        "t": True,
        "f": False,
        "int": 1186445869714687,
        "neg": -3,
        "float": 2.5,
        "inf": math.inf,
        "text": "ünïcode ✓",
        "empty": {},
        "list": [1, "a", None, [True], {"k": "v"}],
        "nested": {"a": {"b": [1.5]}},
    }
    ours = struct_pb2.Struct.FromString(encode_struct(document))
    assert ours == reference(document)
    assert ours["int"] == 1186445869714687.0  # exactly representable: below 2**53
    assert ours["list"][4]["k"] == "v"
