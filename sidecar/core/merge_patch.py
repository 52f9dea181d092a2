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


def removal_patch(current: Any, wanted: Any) -> dict[str, Any] | None:
    """The merge patch that deletes from ``current`` every key ``wanted`` does not have, at any depth of
    nested objects (None when there is none). Values are left as they are: only keys someone else added go.

    The Kubernetes publisher uses it on its own ``spec.data``: server-side apply never removes keys another
    field manager added, so this is how peers come to read exactly what this pod published.
    """
    if not isinstance(current, dict) or not isinstance(wanted, dict):
        return None
    patch: dict[str, Any] = {}
    for key, value in current.items():
        if key not in wanted:
            patch[key] = None
        else:
            inner = removal_patch(value, wanted[key])
            if inner is not None:
                patch[key] = inner
    return patch or None
