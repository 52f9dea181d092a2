"""JSON decoding that survives documents nested deeper than the interpreter's stack.

The API server stores custom resources nested far deeper than Python's JSON decoder can follow (it
raises ``RecursionError`` past about 1,000 levels; a 7 KB CR is enough). Such an object must not stop
a watch, nor a list of the whole namespace: it is one peer's problem. So decoding first tries the
fast C decoder, and only when that runs out of stack decodes again with every container nested deeper
than ``CUT_DEPTH`` replaced by the string ``TRUNCATED``. The rest of the document (the object's
name, owners, the other items of a list page) decodes as usual, and the truncated part is still
far deeper than any bound of ``sidecar.core.bounds``, so the object is rejected there, by name.

Every watch event and list page goes through ``loads``, so its speed is a large part of the cost of an
event. msgspec's decoder builds the same values (dicts, lists, str, int, float, bool, None) about three
times as fast as the standard library's, and is tried first. It refuses, where the standard decoder
accepts, a few things the API server never sends (NaN, numbers beyond a double's range, lone UTF-16
surrogates, a byte-order mark), and it too runs out of stack on deep nesting: on any refusal the document
is decoded again exactly as before, so what is accepted, what is truncated and which error is raised
stay those of the standard library.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec

CUT_DEPTH = 200
TRUNCATED = "<nested too deeply to decode>"

# A JSON string (skipped whole, so brackets inside strings do not count), or one bracket.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)
_OPEN = frozenset(b"[{")
_QUOTE = ord('"')


_FAST = msgspec.json.Decoder()  # untyped: the values json.loads makes (thread-safe since msgspec 0.16)


def loads(raw: bytes | str) -> Any:
    """``json.loads``, except that containers deeper than ``CUT_DEPTH`` become ``TRUNCATED``."""
    try:
        return _FAST.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # ValidationError (out of range) is a DecodeError
        return standard_loads(raw)


def standard_loads(raw: bytes | str) -> Any:
    """``loads`` with the standard library's decoder alone."""
    try:
        return json.loads(raw)
    except RecursionError:
        data = raw.encode() if isinstance(raw, str) else raw
        return json.loads(truncate_deep(data, CUT_DEPTH))


def truncate_deep(text: bytes, cut: int) -> bytes:
    """``text`` with each container that opens at nesting level ``cut + 1`` replaced by ``TRUNCATED``."""
    pieces: list[bytes] = []
    kept_until = 0
    depth = 0
    skipping_from = -1
    marker = json.dumps(TRUNCATED).encode()
    for match in _TOKEN.finditer(text):
        first = text[match.start()]
        if first == _QUOTE:
            continue
        if first in _OPEN:
            depth += 1
            if depth == cut + 1:
                skipping_from = match.start()
        else:
            if depth == cut + 1 and skipping_from >= 0:
                pieces.append(text[kept_until:skipping_from])
                pieces.append(marker)
                kept_until = match.end()
                skipping_from = -1
            depth -= 1
    pieces.append(text[kept_until:])
    return b"".join(pieces)
