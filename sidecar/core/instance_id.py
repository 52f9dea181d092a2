"""Dynamo-compatible instance IDs.

Dynamo derives a worker's instance ID from its ``DynamoWorkerMetadata`` name (the pod name) with
Rust's ``DefaultHasher`` (SipHash-1-3 with both keys zero). Rust's ``Hash for str`` feeds the UTF-8
bytes followed by a single ``0xFF`` terminator byte, and Dynamo masks the result to 53 bits so that
the ID survives a round trip through a JSON double. A mixed deployment only interoperates if every
process computes the very same number, so this is implemented from the algorithm's definition and
pinned by the values Dynamo publishes.
"""

from __future__ import annotations

import functools

_MASK64 = 0xFFFF_FFFF_FFFF_FFFF
INSTANCE_ID_MASK = 0x1F_FFFF_FFFF_FFFF
"""Low 53 bits: the largest integer range a JSON double represents exactly."""

_STR_TERMINATOR = b"\xff"
"""What Rust's ``impl Hash for str`` writes after the bytes, so ``("ab", "c")`` != ``("a", "bc")``."""


def _rotl(value: int, shift: int) -> int:
    return ((value << shift) | (value >> (64 - shift))) & _MASK64


def _sip_round(v0: int, v1: int, v2: int, v3: int) -> tuple[int, int, int, int]:
    v0 = (v0 + v1) & _MASK64
    v1 = _rotl(v1, 13) ^ v0
    v0 = _rotl(v0, 32)
    v2 = (v2 + v3) & _MASK64
    v3 = _rotl(v3, 16) ^ v2
    v0 = (v0 + v3) & _MASK64
    v3 = _rotl(v3, 21) ^ v0
    v2 = (v2 + v1) & _MASK64
    v1 = _rotl(v1, 17) ^ v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def siphash13(data: bytes, k0: int = 0, k1: int = 0) -> int:
    """SipHash-1-3 (one compression round, three finalisation rounds) of ``data``, as a u64."""
    v0 = k0 ^ 0x736F6D6570736575
    v1 = k1 ^ 0x646F72616E646F6D
    v2 = k0 ^ 0x6C7967656E657261
    v3 = k1 ^ 0x7465646279746573
    full_blocks = len(data) - len(data) % 8
    for offset in range(0, full_blocks, 8):
        m = int.from_bytes(data[offset : offset + 8], "little")
        v3 ^= m
        v0, v1, v2, v3 = _sip_round(v0, v1, v2, v3)
        v0 ^= m
    tail = data[full_blocks:]
    m = ((len(data) & 0xFF) << 56) | int.from_bytes(tail, "little")
    v3 ^= m
    v0, v1, v2, v3 = _sip_round(v0, v1, v2, v3)
    v0 ^= m
    v2 ^= 0xFF
    for _ in range(3):
        v0, v1, v2, v3 = _sip_round(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


@functools.lru_cache(maxsize=65536)
def instance_id(name: str) -> int:
    """The Dynamo instance ID of the worker whose ``DynamoWorkerMetadata`` (and pod) is ``name``.

    Cached: the join asks for it on every change of a peer, and pure-Python SipHash costs ~50 µs.
    """
    return siphash13(name.encode("utf-8") + _STR_TERMINATOR) & INSTANCE_ID_MASK


def instance_id_hex(name: str) -> str:
    """The ID as Dynamo prints it in metadata keys (``namespace/component/endpoint/{id:x}``)."""
    return format(instance_id(name), "x")
