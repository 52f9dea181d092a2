"""RFC 7386 JSON Merge Patch, for ``PublishMetadata`` in merge mode.

A main container usually owns only part of its metadata (say ``endpoints``) and should not have to
resend the rest; merge patch is the standard, well-understood way to say "change these keys, delete
those (null), keep everything else".
"""

from __future__ import annotations

import copy
from typing import Any


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """Return ``target`` with ``patch`` applied. Neither argument is modified."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result
