"""How a setting is declared and read, for every options table (the common one and each backend's).

A table is a tuple of ``Option`` rows (environment variable, flag, help, default). ``sidecar.app.config``
resolves the rows of every table with one precedence (flag, then environment, then the downward-API
file, then the default) behind ``OptionReader``; each table's loader (``sidecar.kube.settings.load``,
``sidecar.etcd.settings.load``, the common settings in ``sidecar.app.config``) reads its own rows through
that protocol, records every problem instead of raising, and builds its settings record. The parsers here
are the ones more than one table uses; each raises ``ValueError`` with what was expected and what was
found, which the reader prefixes with the variable and the flag.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, TypeVar, overload

from sidecar.core.selectors import LabelSelector, SelectorError, parse_selector

T = TypeVar("T")
E = TypeVar("E", bound=StrEnum)


@dataclass(frozen=True)
class Option:
    """One setting: its environment variable, its flag, how to parse it and what it means."""

    env: str
    flag: str
    help: str
    default: str | None = None
    podinfo_file: str | None = None  # read from the downward-API volume first (Dynamo's order)
    # What the setting chooses, when setting it under another backend would silently mean nothing
    # (e.g. "Kubernetes objects"): that backend then refuses it, naming this.
    chooses: str = ""


class OptionReader(Protocol):
    """The resolved values of every option, as each table's loader reads them.

    ``get`` returns the parsed value, or None when the option is unset (and has no default) or its
    value does not parse; either way a problem is recorded when it matters, so a loader goes on reading
    and every problem is reported at once.
    """

    @property
    def problems(self) -> list[str]:
        """Every problem found so far, one sentence each (appended to by ``get`` and by the loaders)."""
        ...

    @property
    def raw(self) -> dict[str, str]:
        """The text of every option read so far that was set (or defaulted), by environment variable."""
        ...

    def where(self, env: str) -> str:
        """How to name the option to an operator: ``ENV (--flag)``."""
        ...

    @overload
    def get(self, env: str, *, required: str | None = None) -> str | None: ...

    @overload
    def get(self, env: str, parse: Callable[[str], T], required: str | None = None) -> T | None: ...


def known(value: T | None) -> T:
    """A setting that is required or has a default: ``get`` gave None only with a problem recorded."""
    assert value is not None, "a missing setting must have been reported as a problem"
    return value


# -- parsers shared by more than one table ------------------------------------------------------------
def parse_duration(text: str) -> float:
    """Seconds from ``"30"``, ``"30s"``, ``"500ms"``, ``"2m"``, ``"1h"``; must be positive."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if not match:
        raise ValueError(f"expected a duration such as 30s, 500ms or 2m, got {text!r}")
    value = float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    if value <= 0:
        raise ValueError(f"expected a positive duration, got {text!r}")
    return value


def parse_positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise ValueError(f"expected a number of at least 1, got {value}")
    return value


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_port(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise ValueError(f"expected a port in 1-65535, got {value}")
    return value


def parse_selector_value(text: str) -> LabelSelector:
    try:
        return parse_selector(text)
    except SelectorError as exc:
        raise ValueError(f"invalid label selector: {exc}") from None


def parse_choice(choices: type[E]) -> Callable[[str], E]:
    """A parser for one of an enum's values (case-insensitive): a mode is parsed once, into its enum."""

    def parse(text: str) -> E:
        value = text.strip().lower()
        for choice in choices:
            if choice.value == value:
                return choice
        raise ValueError(f"expected one of {', '.join(c.value for c in choices)}, got {text!r}")

    return parse
