"""JSON decoding that survives documents nested deeper than the interpreter's stack.

The API server stores custom resources nested far deeper than Python's JSON decoder can follow (it
raises ``RecursionError`` past about 1,000 levels; a 7 KB CR is enough). Such an object must not stop
a watch, nor a list of the whole namespace: it is one peer's problem. So decoding first tries the
fast C decoder, and only when that runs out of stack decodes again with every container nested deeper
than ``CUT_DEPTH`` replaced by the string ``TRUNCATED``. The rest of the document (the object's
name, owners, the other items of a list page) decodes as usual, and the truncated part is still
far deeper than any bound of ``sidecar.core.bounds``, so the object is rejected there, by name.
"""

from __future__ import annotations

import json
import re
from typing import Any

CUT_DEPTH = 200
TRUNCATED = "<nested too deeply to decode>"

# A JSON string (skipped whole, so brackets inside strings do not count), or one bracket.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)
_OPEN = frozenset(b"[{")
_QUOTE = ord('"')


def loads(raw: bytes | str) -> Any:
    """``json.loads``, except that containers deeper than ``CUT_DEPTH`` become ``TRUNCATED``."""
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
