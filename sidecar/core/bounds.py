"""The bounds every peer's metadata must keep, whoever wrote it: depth, size, and real JSON numbers.

Peers' data is untrusted input that the sidecar re-encodes for every client. Without bounds one pod
can break discovery for all: protobuf decoders refuse messages nested past about 100 levels (a
``Struct`` spends three per JSON level), Python's JSON decoder raises ``RecursionError`` past about
1,000, and a large document of small numbers grows about six-fold as a ``Struct`` (9 bytes a number),
past gRPC's default 4 MiB message limit. So:

* ``MAX_DEPTH`` levels of nesting (``spec.data`` itself is level 1): Dynamo's own documents use 5.
* ``MAX_BYTES`` of JSON: a peer's message then stays under about 1.6 MiB, which fits any default
  client with room for the rest of the peer, and large snapshots go out in parts.
* Numbers must be finite: JSON has no NaN or Infinity, and Python's encoder would write them anyway.

``measure_metadata`` checks all three in one walk without recursion (a hostile document may be far
deeper than the interpreter's stack).
"""

from __future__ import annotations

import math
from typing import Any

MAX_DEPTH = 32
MAX_BYTES = 256 * 1024

# JSON text of a scalar is at most this long (an int64 or a float's repr, with a separating comma).
_NUMBER_BYTES = 25


def metadata_problem(data: Any, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_BYTES) -> str | None:
    """Why ``data`` breaks a bound, or None."""
    return measure_metadata(data, max_depth, max_bytes)[0]


def measure_metadata(data: Any, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_BYTES) -> tuple[str | None, int]:
    """(why ``data`` breaks a bound or None, its estimated size in bytes).

    Sizes are an estimate of the compact JSON text that counts characters, not bytes, and every number
    as its longest form. The walk goes level by level (no recursion) and looks at scalars in place,
    which keeps it about as fast as encoding the document once.
    """
    size = 0
    level: list[Any] = [data]
    depth = 1
    while level:
        if depth > max_depth:
            return f"is nested deeper than {max_depth} levels", size
        deeper: list[Any] = []
        for container in level:
            items: Any
            if type(container) is dict:
                size += 2 + sum(len(key) + 4 for key in container)
                items = container.values()
            elif type(container) is list:
                size += 2
                items = container
            else:  # a scalar at the top: the caller's type check reports it
                size += _scalar_size(container)
                continue
            for item in items:
                kind = type(item)
                if kind is dict or kind is list:
                    deeper.append(item)
                elif kind is str:
                    size += len(item) + 3
                elif kind is float and not math.isfinite(item):
                    return f"contains {item!r}, which is not a JSON number", size
                else:
                    size += _NUMBER_BYTES
            if size > max_bytes:
                return f"is larger than {max_bytes // 1024} KiB of JSON", size
        level = deeper
        depth += 1
    return None, size


def _scalar_size(value: Any) -> int:
    return len(value) + 3 if isinstance(value, str) else _NUMBER_BYTES
