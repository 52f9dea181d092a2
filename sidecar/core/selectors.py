"""Kubernetes label selectors: the ``kubectl get -l`` filter language, parsed and evaluated.

Two things in the sidecar speak this language. Clients of the gRPC API send a selector to narrow the
peers they list or watch, and the sidecar's own configuration names the EndpointSlices it follows with
one. Both must mean exactly what they would mean to ``kubectl`` and the API server, or a selector that
works against the cluster would silently select different peers here, so the syntax and the matching
rules follow apimachinery's ``labels`` package (see the notes on ``parse_selector`` for the few places
where this is deliberately stricter).

Text from clients is untrusted, and a rejected selector is answered with gRPC ``INVALID_ARGUMENT``
carrying the ``SelectorError`` message verbatim. The messages therefore say what is wrong and where:
they quote the offending token and give its 0-based character position in the selector text. Nothing
in this module raises anything but ``SelectorError`` for bad selector text.

A parsed selector is a canonical, immutable value: requirements sorted and de-duplicated, so two
selectors that are written differently but say the same thing (order, ``==`` vs ``=``, repeated
values) compare and hash equal, and ``str`` gives text that parses back to an equal selector.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "EVERYTHING",
    "LabelSelector",
    "Operator",
    "Requirement",
    "SelectorError",
    "parse_selector",
    "selector_from_labels",
]


class SelectorError(ValueError):
    """A selector (or a label key or value) is invalid.

    The message is written for the client that sent the selector and is safe to return verbatim.
    ``position`` is the 0-based character offset of the problem in the parsed text, or ``None`` when
    the error did not come from parsing text (a ``Requirement`` built in code, a label mapping).
    """

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


class Operator(enum.Enum):
    """How a requirement relates a label key to its values. The values are the selector spellings."""

    EQUALS = "="
    NOT_EQUALS = "!="
    IN = "in"
    NOT_IN = "notin"
    EXISTS = "exists"
    DOES_NOT_EXIST = "!"


# --------------------------------------------------------------------------------------------------
# Label key and value validation (apimachinery's IsQualifiedName and IsValidLabelValue)
# --------------------------------------------------------------------------------------------------

_MAX_NAME_LENGTH = 63
_MAX_VALUE_LENGTH = 63
_MAX_PREFIX_LENGTH = 253

_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_NAME_CHARS = _ALNUM | frozenset("-_.")
_DNS_LABEL_EDGE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_DNS_LABEL_CHARS = _DNS_LABEL_EDGE | frozenset("-")

_NAME_RULE = "alphanumerics, '-', '_' or '.', beginning and ending with an alphanumeric character"


def _name_like_problem(text: str, what: str, max_length: int) -> str | None:
    """Why ``text`` is not a valid label name / value body, or ``None``. ``text`` is non-empty."""
    if len(text) > max_length:
        return f"{what} must be no more than {max_length} characters (got {len(text)})"
    for char in text:
        if char not in _NAME_CHARS:
            return f"{what} contains invalid character {char!r}; it must consist of {_NAME_RULE}"
    if text[0] not in _ALNUM or text[-1] not in _ALNUM:
        return f"{what} must begin and end with an alphanumeric character"
    return None


def _prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` is not a DNS-1123 subdomain, or ``None``."""
    if not prefix:
        return "prefix part must not be empty"
    if len(prefix) > _MAX_PREFIX_LENGTH:
        return f"prefix part must be no more than {_MAX_PREFIX_LENGTH} characters (got {len(prefix)})"
    rule = (
        f"prefix part {prefix!r} must be a lowercase RFC 1123 subdomain: lowercase alphanumerics, '-' "
        "and '.', each '.'-separated part beginning and ending with an alphanumeric character"
    )
    for part in prefix.split("."):
        if not part or part[0] not in _DNS_LABEL_EDGE or part[-1] not in _DNS_LABEL_EDGE:
            return rule
        if any(char not in _DNS_LABEL_CHARS for char in part):
            return rule
    return None


def _key_problem(key: str) -> str | None:
    """Why ``key`` is not a valid label key (``[prefix/]name``), or ``None``."""
    prefix, slash, name = key.partition("/")
    if not slash:
        prefix, name = "", key
    elif "/" in name:
        return "a label key may contain at most one '/' (between the prefix and the name)"
    elif (problem := _prefix_problem(prefix)) is not None:
        return problem
    if not name:
        return "name part must not be empty"
    return _name_like_problem(name, "name part", _MAX_NAME_LENGTH)


def _value_problem(value: str) -> str | None:
    """Why ``value`` is not a valid label value, or ``None``. The empty value is valid."""
    if not value:
        return None
    return _name_like_problem(value, "value", _MAX_VALUE_LENGTH)


def _invalid_key(key: str, problem: str, position: int | None = None) -> SelectorError:
    where = "" if position is None else f" at position {position}"
    return SelectorError(f"invalid label key {key!r}{where}: {problem}", position)


def _invalid_value(value: str, key: str, problem: str, position: int | None = None) -> SelectorError:
    where = "" if position is None else f" at position {position}"
    return SelectorError(f"invalid label value {value!r} for key {key!r}{where}: {problem}", position)


# --------------------------------------------------------------------------------------------------
# The selector model
# --------------------------------------------------------------------------------------------------

_SINGLE_VALUE = frozenset({Operator.EQUALS, Operator.NOT_EQUALS})
_SET_VALUED = frozenset({Operator.IN, Operator.NOT_IN})
_VALUELESS = frozenset({Operator.EXISTS, Operator.DOES_NOT_EXIST})


@dataclass(frozen=True)
class Requirement:
    """One comma-separated term of a selector: a condition on a single label key.

    Construction validates everything (key, values, how many values the operator takes), so a
    ``Requirement`` that exists is always one the parser could have produced and ``str`` of it always
    parses back. ``values`` may be given as any iterable of strings; it is stored as a frozenset.
    """

    key: str
    operator: Operator
    values: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if not isinstance(self.key, str):
            raise TypeError(f"label key must be a str, not {type(self.key).__name__}")
        if not isinstance(self.operator, Operator):
            raise TypeError(f"operator must be an Operator, not {type(self.operator).__name__}")
        values: object = self.values
        if isinstance(values, str | bytes) or not isinstance(values, Iterable):
            raise TypeError(f"values must be an iterable of str, not {type(values).__name__}")
        if not isinstance(values, frozenset):
            values = frozenset(values)
            object.__setattr__(self, "values", values)
        for value in self.values:
            if not isinstance(value, str):
                raise TypeError(f"label values must be str, not {type(value).__name__}")

        if (problem := _key_problem(self.key)) is not None:
            raise _invalid_key(self.key, problem)
        for value in sorted(self.values):
            if (problem := _value_problem(value)) is not None:
                raise _invalid_value(value, self.key, problem)

        count = len(self.values)
        spelled = self.operator.value
        if self.operator in _SINGLE_VALUE and count != 1:
            raise SelectorError(f"operator {spelled!r} on key {self.key!r} takes exactly one value, got {count}")
        if self.operator in _SET_VALUED and count == 0:
            raise SelectorError(f"operator {spelled!r} on key {self.key!r} takes at least one value")
        if self.operator in _VALUELESS and count != 0:
            raise SelectorError(f"operator {spelled!r} on key {self.key!r} takes no values, got {count}")

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether ``labels`` satisfy this requirement. ``!=`` and ``notin`` hold when the key is absent."""
        op = self.operator
        if op is Operator.EXISTS:
            return self.key in labels
        if op is Operator.DOES_NOT_EXIST:
            return self.key not in labels
        if self.key not in labels:
            return op in (Operator.NOT_EQUALS, Operator.NOT_IN)
        listed = labels[self.key] in self.values
        return listed if op in (Operator.EQUALS, Operator.IN) else not listed

    def __str__(self) -> str:
        op = self.operator
        if op is Operator.EXISTS:
            return self.key
        if op is Operator.DOES_NOT_EXIST:
            return f"!{self.key}"
        if op in _SINGLE_VALUE:
            (value,) = self.values
            return f"{self.key}{op.value}{value}"
        # A lone empty value is written "(,)": "()" is rejected as a list with no values at all.
        listed = ",".join(sorted(self.values)) if self.values != {""} else ","
        return f"{self.key} {op.value} ({listed})"


def _canonical_order(requirement: Requirement) -> tuple[str, str, tuple[str, ...]]:
    """The order of requirements within a selector: key, operator spelling, sorted values."""
    return (requirement.key, requirement.operator.value, tuple(sorted(requirement.values)))


@dataclass(frozen=True)
class LabelSelector:
    """A conjunction of requirements; the empty selector matches every label set.

    ``requirements`` is canonicalised on construction (sorted by key, operator spelling and sorted
    values; exact duplicates dropped), so equality is equality of meaning as far as spelling goes.
    """

    requirements: tuple[Requirement, ...] = ()

    def __post_init__(self) -> None:
        requirements = tuple(self.requirements)
        for requirement in requirements:
            if not isinstance(requirement, Requirement):
                raise TypeError(f"requirements must be Requirement objects, not {type(requirement).__name__}")
        canonical = tuple(sorted(set(requirements), key=_canonical_order))
        object.__setattr__(self, "requirements", canonical)

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether ``labels`` satisfy every requirement."""
        return all(requirement.matches(labels) for requirement in self.requirements)

    def is_empty(self) -> bool:
        """Whether this selector has no requirements (and so selects everything)."""
        return not self.requirements

    def and_(self, other: LabelSelector) -> LabelSelector:
        """The selector matching exactly the label sets both ``self`` and ``other`` match."""
        return LabelSelector(self.requirements + other.requirements)

    def __str__(self) -> str:
        return ",".join(str(requirement) for requirement in self.requirements)


EVERYTHING = LabelSelector(())
"""The empty selector: matches every label set, including the empty one."""


def selector_from_labels(labels: Mapping[str, str]) -> LabelSelector:
    """The selector requiring each ``key=value`` of ``labels`` (what ``matchLabels`` means).

    Keys and values are validated like parsed ones; an empty mapping gives ``EVERYTHING``.
    """
    requirements = []
    for key, value in labels.items():
        if not isinstance(key, str):
            raise SelectorError(f"label key {key!r} must be a string")
        if not isinstance(value, str):
            raise SelectorError(f"label value {value!r} for key {key!r} must be a string")
        if (problem := _key_problem(key)) is not None:
            raise _invalid_key(key, problem)
        if (problem := _value_problem(value)) is not None:
            raise _invalid_value(value, key, problem)
        requirements.append(Requirement(key, Operator.EQUALS, frozenset({value})))
    return LabelSelector(tuple(requirements))


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


class _Kind(enum.Enum):
    """The lexical classes of the selector grammar."""

    WORD = "word"  # a key, a value, or the keywords in / notin (which are only keywords after a key)
    OPERATOR = "operator"  # a maximal run of operator characters, e.g. "=", "!=", "=~"
    OPEN = "("
    CLOSE = ")"
    COMMA = ","
    END = "end of input"


@dataclass(frozen=True)
class _Token:
    """One lexeme with its position, for error messages that point at the offending character."""

    kind: _Kind
    text: str
    position: int

    def describe(self) -> str:
        return "end of input" if self.kind is _Kind.END else repr(self.text)


# apimachinery treats only these four as whitespace; anything else is part of a word (and then fails
# key/value validation with the character named).
_WHITESPACE = frozenset(" \t\r\n")
# '~' is not a Kubernetes operator character; it is lexed as one so that "=~" is reported as an
# unknown operator rather than as a value starting with '~'.
_OPERATOR_CHARS = frozenset("=!<>~")
_PUNCTUATION = {"(": _Kind.OPEN, ")": _Kind.CLOSE, ",": _Kind.COMMA}
_WORD_STOP = _WHITESPACE | _OPERATOR_CHARS | frozenset(_PUNCTUATION)


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    index, length = 0, len(text)
    while index < length:
        char = text[index]
        if char in _WHITESPACE:
            index += 1
            continue
        start = index
        if char in _PUNCTUATION:
            tokens.append(_Token(_PUNCTUATION[char], char, start))
            index += 1
            continue
        kind = _Kind.OPERATOR if char in _OPERATOR_CHARS else _Kind.WORD
        if kind is _Kind.OPERATOR:
            while index < length and text[index] in _OPERATOR_CHARS:
                index += 1
        else:
            while index < length and text[index] not in _WORD_STOP:
                index += 1
        tokens.append(_Token(kind, text[start:index], start))
    tokens.append(_Token(_Kind.END, "", length))
    return tokens


# --------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------

_EQUALITY_OPERATORS = {"=": Operator.EQUALS, "==": Operator.EQUALS, "!=": Operator.NOT_EQUALS}
_SET_KEYWORDS = {"in": Operator.IN, "notin": Operator.NOT_IN}
_OPERATOR_CHOICES = "'=', '==', '!=', 'in' or 'notin'"


class _Parser:
    """Recursive-descent parser over the token list; one method per grammar rule.

    Grammar::

        selector    := <empty> | requirement ("," requirement)*
        requirement := "!" KEY | KEY | KEY ("=" | "==" | "!=") [VALUE] | KEY ("in" | "notin") list
        list        := "(" [VALUE] ("," [VALUE])* ")"      -- but not "()" with nothing inside
    """

    def __init__(self, text: str) -> None:
        self._tokens = _tokenize(text)
        self._index = 0

    def _peek(self) -> _Token:
        return self._tokens[self._index]

    def _next(self) -> _Token:
        token = self._tokens[self._index]
        if token.kind is not _Kind.END:
            self._index += 1
        return token

    def parse(self) -> LabelSelector:
        if self._peek().kind is _Kind.END:
            return EVERYTHING
        requirements = [self._requirement()]
        while True:
            token = self._next()
            if token.kind is _Kind.END:
                return LabelSelector(tuple(requirements))
            if token.kind is not _Kind.COMMA:
                raise self._unexpected_after_requirement(token, requirements[-1])
            requirements.append(self._requirement())

    def _unexpected_after_requirement(self, token: _Token, previous: Requirement) -> SelectorError:
        hint = ""
        if token.kind is _Kind.CLOSE:
            hint = " (unbalanced parenthesis)"
        elif previous.operator is Operator.DOES_NOT_EXIST and token.kind is _Kind.OPERATOR:
            hint = " ('!key' means the key does not exist and takes no operator or value)"
        elif token.kind is _Kind.WORD and previous.operator in _SINGLE_VALUE:
            hint = " (a value may not contain whitespace)"
        return SelectorError(
            f"expected ',' or end of input after {str(previous)!r}, found {token.describe()} "
            f"at position {token.position}{hint}",
            token.position,
        )

    def _requirement(self) -> Requirement:
        token = self._peek()
        if token.kind is _Kind.OPERATOR and token.text == "!":
            self._next()
            return Requirement(self._key(after="'!'"), Operator.DOES_NOT_EXIST, frozenset())
        return self._rest_of_requirement(self._key(after=None))

    def _key(self, after: str | None) -> str:
        token = self._next()
        if token.kind is not _Kind.WORD:
            context = "" if after is None else f" after {after}"
            hint = " (empty requirement or trailing comma)" if token.kind in (_Kind.COMMA, _Kind.END) else ""
            raise SelectorError(
                f"expected a label key{context} at position {token.position}, found {token.describe()}{hint}",
                token.position,
            )
        if (problem := _key_problem(token.text)) is not None:
            raise _invalid_key(token.text, problem, token.position)
        return token.text

    def _rest_of_requirement(self, key: str) -> Requirement:
        token = self._peek()
        if token.kind in (_Kind.COMMA, _Kind.END):
            return Requirement(key, Operator.EXISTS, frozenset())
        self._next()
        if token.kind is _Kind.OPERATOR:
            operator = _EQUALITY_OPERATORS.get(token.text)
            if operator is None:
                raise SelectorError(
                    f"unknown operator {token.text!r} after key {key!r} at position {token.position}; "
                    f"expected {_OPERATOR_CHOICES}",
                    token.position,
                )
            return Requirement(key, operator, frozenset({self._single_value(key, token)}))
        if token.kind is _Kind.WORD and token.text in _SET_KEYWORDS:
            return Requirement(key, _SET_KEYWORDS[token.text], self._value_list(key, token))
        raise SelectorError(
            f"expected an operator ({_OPERATOR_CHOICES}) after key {key!r} at position {token.position}, "
            f"found {token.describe()}",
            token.position,
        )

    def _single_value(self, key: str, operator: _Token) -> str:
        token = self._peek()
        if token.kind in (_Kind.COMMA, _Kind.END):
            return ""  # "key=" selects the empty value, as in Kubernetes
        self._next()
        if token.kind is not _Kind.WORD:
            raise SelectorError(
                f"expected a value after '{key}{operator.text}' at position {token.position}, found {token.describe()}",
                token.position,
            )
        return self._value(key, token)

    def _value(self, key: str, token: _Token) -> str:
        if (problem := _value_problem(token.text)) is not None:
            raise _invalid_value(token.text, key, problem, token.position)
        return token.text

    def _value_list(self, key: str, keyword: _Token) -> frozenset[str]:
        opening = self._next()
        if opening.kind is not _Kind.OPEN:
            raise SelectorError(
                f"expected '(' after '{key} {keyword.text}' at position {opening.position}, "
                f"found {opening.describe()}; write {key} {keyword.text} (value, ...)",
                opening.position,
            )
        values: set[str] = set()
        # A slot is the space before, between or after commas; an empty slot is the empty value.
        slot_open = True
        empty = True
        while True:
            token = self._next()
            if token.kind is _Kind.WORD and slot_open:
                values.add(self._value(key, token))
                slot_open = False
            elif token.kind is _Kind.COMMA:
                if slot_open:
                    values.add("")
                slot_open = True
            elif token.kind is _Kind.CLOSE:
                if empty:
                    raise SelectorError(
                        f"empty value list after '{key} {keyword.text}' at position {opening.position}: "
                        "give at least one value (the empty value is written '(,)')",
                        opening.position,
                    )
                if slot_open:
                    values.add("")
                return frozenset(values)
            elif token.kind is _Kind.END:
                raise SelectorError(
                    f"unbalanced parenthesis: '(' at position {opening.position} is never closed",
                    opening.position,
                )
            else:
                expected = "a value, ',' or ')'" if slot_open else "',' or ')'"
                raise SelectorError(
                    f"expected {expected} in the value list for {key!r} at position {token.position}, "
                    f"found {token.describe()}",
                    token.position,
                )
            empty = False


def parse_selector(text: str) -> LabelSelector:
    """Parse selector text as ``kubectl get -l`` accepts it; raise ``SelectorError`` if it is invalid.

    Empty or all-whitespace text is ``EVERYTHING``. Deliberate differences from apimachinery: the
    set-based ``in ()`` with nothing between the parentheses is rejected (apimachinery reads it as
    the empty value; write ``(,)`` for that), and the numeric ``gt`` / ``lt`` (``>`` / ``<``)
    operators are not supported.
    """
    if not isinstance(text, str):
        raise SelectorError(f"selector must be a string, not {type(text).__name__}")
    return _Parser(text).parse()
