"""What server-side apply stores for a document, as far as the Kubernetes publisher's ``spec.data`` goes.

Found by running the API server (Kubernetes 1.36, a CRD with ``x-kubernetes-preserve-unknown-fields``):
an apply stores what it is sent, with one exception. An object the applying manager *emptied* (``{}`` now,
members it had applied before) is stored as ``null``, at any depth (``spec.data.endpoints``,
``model_cards[k].card_json``, ``endpoints[k].transport``): removing the last member the manager owned
leaves the field null. Applying the same document once more stores it as sent (``{}``): nothing is
removed that time.

So the publisher applies twice when the first apply stores something else than it sent (readers may see
the intermediate revision), and refuses a publish whose intermediate form Dynamo could not decode.
``intermediate_form`` says what that revision holds, from what the manager applied before.
"""

from __future__ import annotations

from typing import Any


def intermediate_form(before: Any, sent: Any) -> Any:
    """What one server-side apply of ``sent`` stores when the same manager last applied ``before``.

    Every object that is empty in ``sent`` and had members in ``before`` (at the same path) becomes None;
    everything else is ``sent`` as it is. Neither argument is modified.
    """
    if not isinstance(sent, dict):
        return sent
    if not sent:
        return None if isinstance(before, dict) and before else {}
    previous = before if isinstance(before, dict) else {}
    return {key: intermediate_form(previous.get(key), value) for key, value in sent.items()}


def emptied_paths(before: Any, sent: Any, path: str = "spec.data") -> list[str]:
    """The paths ``intermediate_form`` turns into null (for the operator's message)."""
    if not isinstance(sent, dict):
        return []
    if not sent:
        return [path] if isinstance(before, dict) and before else []
    previous = before if isinstance(before, dict) else {}
    found: list[str] = []
    for key, value in sent.items():
        found += emptied_paths(previous.get(key), value, f"{path}.{key}" if path else key)
    return found


def emptied_to_null(stored: Any, sent: Any) -> bool:
    """Whether ``stored`` holds null where ``sent`` has an empty object (one more apply stores it as sent)."""
    if isinstance(sent, dict) and not sent:
        return stored is None
    if not isinstance(sent, dict) or not isinstance(stored, dict):
        return False
    return any(key in stored and emptied_to_null(stored[key], value) for key, value in sent.items())
