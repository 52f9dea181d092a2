"""Tests for sidecar.core.instance_id: Dynamo-compatible SipHash-1-3 instance IDs."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.instance_id import INSTANCE_ID_MASK, instance_id, instance_id_hex, siphash13

# Values published by Dynamo (lib/runtime discovery tests).
DYNAMO_VALUES = [
    ("worker-0", 1186445869714687),
    ("worker-99999", 7410589986301036),
    ("fake-name-1-0-worker-nrdfv", 1009006049675451),
]


@pytest.mark.parametrize(("name", "expected"), DYNAMO_VALUES)
def test_published_dynamo_values(name: str, expected: int) -> None:
    assert instance_id(name) == expected


@pytest.mark.parametrize(("name", "expected"), DYNAMO_VALUES)
def test_hex_form_is_lowercase_hex_of_the_id(name: str, expected: int) -> None:
    text = instance_id_hex(name)
    assert text == format(expected, "x")
    assert int(text, 16) == expected
    assert text == text.lower() and not text.startswith("0x")


def test_mask_is_53_bits() -> None:
    assert INSTANCE_ID_MASK == 2**53 - 1


def test_str_terminator_is_fed_after_the_bytes() -> None:
    # Rust's Hash for str writes the bytes then 0xFF; the ID is the masked hash of exactly that.
    assert instance_id("worker-0") == siphash13(b"worker-0\xff") & INSTANCE_ID_MASK
    assert instance_id("worker-0") != siphash13(b"worker-0") & INSTANCE_ID_MASK


def test_keys_change_the_hash() -> None:
    # The zero key is what Dynamo uses; k0 and k1 must both actually take part.
    assert siphash13(b"abc", 0, 0) != siphash13(b"abc", 1, 0)
    assert siphash13(b"abc", 0, 0) != siphash13(b"abc", 0, 1)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_name_gives_a_53_bit_id_deterministically(name: str) -> None:
    value = instance_id(name)
    assert 0 <= value < 2**53
    assert instance_id(name) == value
    assert instance_id_hex(name) == format(value, "x")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_siphash13_is_a_u64(data: bytes) -> None:
    value = siphash13(data)
    assert 0 <= value < 2**64
    assert siphash13(data) == value


def test_distinct_names_rarely_collide() -> None:
    names = [f"worker-{i}" for i in range(5000)]
    assert len({instance_id(n) for n in names}) == len(names)


_ORACLE = """
import sys
assert sys.hash_info.algorithm == "siphash13", sys.hash_info.algorithm
for line in sys.stdin.read().split():
    print(hash(bytes.fromhex(line)))
"""


def _as_python_hash(u64: int) -> int:
    """CPython's hash of bytes: the u64 SipHash read as signed 64-bit, with -1 reserved (mapped to -2)."""
    signed = u64 - 2**64 if u64 >= 2**63 else u64
    return -2 if signed == -1 else signed


def test_siphash13_matches_cpython_hash_of_bytes() -> None:
    """CPython 3.11 hashes bytes with SipHash-1-3; PYTHONHASHSEED=0 makes its key all zeros."""
    assert sys.hash_info.algorithm == "siphash13"
    assert sys.hash_info.width == 64
    rng = random.Random(20240531)
    samples = [rng.randbytes(rng.randint(1, 40)) for _ in range(300)]
    # Every tail length and block boundary at least once, plus the Dynamo names with their terminator.
    samples += [bytes(range(n)) for n in range(1, 41)]
    samples += [name.encode() + b"\xff" for name, _ in DYNAMO_VALUES]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    env["PYTHONHASHSEED"] = "0"
    result = subprocess.run(
        [sys.executable, "-c", _ORACLE],
        input="\n".join(s.hex() for s in samples),
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    )
    oracle = [int(line) for line in result.stdout.split()]
    assert len(oracle) == len(samples)
    mismatches = [
        (s.hex(), expected, _as_python_hash(siphash13(s)))
        for s, expected in zip(samples, oracle, strict=True)
        if _as_python_hash(siphash13(s)) != expected
    ]
    assert mismatches == []


def test_python_hash_mapping_helper() -> None:
    assert _as_python_hash(2**64 - 1) == -2
    assert _as_python_hash(2**64 - 2) == -2
    assert _as_python_hash(2**63) == -(2**63)
    assert _as_python_hash(5) == 5
