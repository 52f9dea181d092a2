"""JSON value -> ``google.protobuf.Struct`` wire bytes, written directly.

Every peer message carries ``spec.data`` as a Struct. protobuf's own ``Struct.update()`` builds it
one Python-level message at a time and was the largest single cost of sending an event. The Struct
wire format is small and fixed (``Struct{map<string, Value> fields = 1}``; ``Value`` is a oneof of
null, double, string, bool, Struct and ListValue), so this encodes it straight to bytes, which the
C (upb) runtime then parses. ``tests/unit/test_struct_codec.py`` checks it against ``Struct.update()``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

_DOUBLE = struct.Struct("<d")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_value(value: Any) -> bytes:
    """A ``google.protobuf.Value`` message body."""
    if value is None:
        return b"\x08\x00"  # null_value = NULL_VALUE (field 1, varint 0)
    if value is True:
        return b"\x20\x01"  # bool_value (field 4)
    if value is False:
        return b"\x20\x00"
    if isinstance(value, (int, float)):
        return b"\x11" + _DOUBLE.pack(float(value))  # number_value (field 2, fixed64)
    if isinstance(value, str):
        return _field(3, value.encode("utf-8"))
    if isinstance(value, Mapping):
        return _field(5, encode_struct(value))
    if isinstance(value, (list, tuple)):
        return _field(6, b"".join(_field(1, encode_value(item)) for item in value))
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def encode_struct(document: Mapping[str, Any]) -> bytes:
    """A ``google.protobuf.Struct`` message body (map entries in the document's key order)."""
    return b"".join(
        _field(1, _field(1, key.encode("utf-8")) + _field(2, encode_value(value))) for key, value in document.items()
    )
