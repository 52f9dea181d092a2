"""Tests for sidecar.core.selectors: Kubernetes label-selector parsing and matching."""

from __future__ import annotations

import string
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.selectors import (
    EVERYTHING,
    LabelSelector,
    Operator,
    Requirement,
    SelectorError,
    parse_selector,
    selector_from_labels,
)

# --------------------------------------------------------------------------------------------------
# Example tables
# --------------------------------------------------------------------------------------------------

MATCH_CASES: list[tuple[str, dict[str, str], bool]] = [
    # = and ==
    ("a=b", {"a": "b"}, True),
    ("a=b", {"a": "c"}, False),
    ("a=b", {}, False),
    ("a=b", {"x": "b"}, False),
    ("a==b", {"a": "b"}, True),
    ("a==b", {"a": "c"}, False),
    ("a==b", {}, False),
    ("a=B", {"a": "b"}, False),
    ("A=b", {"a": "b"}, False),
    # !=
    ("a!=b", {}, True),
    ("a!=b", {"x": "b"}, True),
    ("a!=b", {"a": "b"}, False),
    ("a!=b", {"a": "c"}, True),
    # in
    ("a in (b,c)", {"a": "c"}, True),
    ("a in (b,c)", {"a": "b"}, True),
    ("a in (b,c)", {"a": "d"}, False),
    ("a in (b,c)", {}, False),
    # notin
    ("a notin (b,c)", {}, True),
    ("a notin (b,c)", {"a": "b"}, False),
    ("a notin (b,c)", {"a": "d"}, True),
    # exists / does not exist
    ("a", {"a": ""}, True),
    ("a", {"a": "x"}, True),
    ("a", {}, False),
    ("a", {"b": "a"}, False),
    ("!a", {}, True),
    ("!a", {"b": "a"}, True),
    ("!a", {"a": "x"}, False),
    ("!a", {"a": ""}, False),
    ("! a", {}, True),
    # empty values
    ("a=", {"a": ""}, True),
    ("a=", {}, False),
    ("a=", {"a": "x"}, False),
    ("a==", {"a": ""}, True),
    ("a!=", {}, True),
    ("a!=", {"a": ""}, False),
    ("a!=", {"a": "x"}, True),
    ("a=,b=x", {"a": "", "b": "x"}, True),
    ("a in (b,)", {"a": ""}, True),
    ("a in (b,)", {"a": "b"}, True),
    ("a in (b,)", {"a": "c"}, False),
    ("a in (,b)", {"a": ""}, True),
    ("a in (b,,c)", {"a": ""}, True),
    ("a in (,)", {"a": ""}, True),
    ("a in (,)", {"a": "x"}, False),
    ("a notin (,b)", {"a": ""}, False),
    ("a notin (,b)", {"a": "c"}, True),
    ("a notin (,b)", {}, True),
    # prefixed keys
    ("app.kubernetes.io/name=x", {"app.kubernetes.io/name": "x"}, True),
    ("app.kubernetes.io/name=x", {"name": "x"}, False),
    ("app.kubernetes.io/name=x", {"app.kubernetes.io/name": "y"}, False),
    ("!example.com/Drain_Me", {"example.com/Drain_Me": "1"}, False),
    ("example.com/tier in (web, db)", {"example.com/tier": "db"}, True),
    # conjunction
    ("a=b,c", {"a": "b", "c": "1"}, True),
    ("a=b,c", {"a": "b"}, False),
    ("a=b,a=c", {"a": "b"}, False),
    ("a=b,a!=c", {"a": "b"}, True),
    ("a,!b", {"a": "1"}, True),
    ("a,!b", {"a": "1", "b": "2"}, False),
    # empty selector
    ("", {}, True),
    ("", {"a": "b"}, True),
    ("   ", {"a": "b"}, True),
    (" \t\r\n", {}, True),
    # whitespace variations
    ("  a  =  b  ,  c  in  (  d  ,  e  )  ", {"a": "b", "c": "e"}, True),
    ("  a  =  b  ,  c  in  (  d  ,  e  )  ", {"a": "b", "c": "f"}, False),
    ("\ta\n=\r\nb", {"a": "b"}, True),
    ("a in(b)", {"a": "b"}, True),
    ("a notin(b)", {"a": "b"}, False),
    # keywords are only keywords after a key
    ("in in (in)", {"in": "in"}, True),
    ("notin notin (notin)", {"notin": "x"}, True),
    ("in=notin", {"in": "notin"}, True),
    ("!in", {}, True),
]


@pytest.mark.parametrize(("text", "labels", "expected"), MATCH_CASES)
def test_matches_examples(text: str, labels: dict[str, str], expected: bool) -> None:
    assert parse_selector(text).matches(labels) is expected


CANONICAL_CASES: list[tuple[str, str]] = [
    ("", ""),
    ("   ", ""),
    ("a==b", "a=b"),
    ("a = b", "a=b"),
    ("b=1,a=2", "a=2,b=1"),
    ("x in (c, a, b)", "x in (a,b,c)"),
    ("x notin (c,a)", "x notin (a,c)"),
    ("x in (b,)", "x in (,b)"),
    ("x in (,)", "x in (,)"),
    ("x in (,,)", "x in (,)"),
    ("x in (a,a)", "x in (a)"),
    ("a,a", "a"),
    ("a=b,a==b", "a=b"),
    (" ! a ", "!a"),
    ("k=", "k="),
    ("k!=", "k!="),
    ("a,a=b", "a=b,a"),
    ("a notin (x),a in (x),a,a=b,a!=b,!a", "!a,a!=b,a=b,a,a in (x),a notin (x)"),
    ("app.kubernetes.io/name=x", "app.kubernetes.io/name=x"),
]


@pytest.mark.parametrize(("text", "canonical"), CANONICAL_CASES)
def test_canonical_text(text: str, canonical: str) -> None:
    selector = parse_selector(text)
    assert str(selector) == canonical
    assert parse_selector(canonical) == selector


def test_parsed_structure() -> None:
    selector = parse_selector("tier notin (a, ), !drain, app.kubernetes.io/name == web, zone")
    assert selector.requirements == (
        Requirement("app.kubernetes.io/name", Operator.EQUALS, frozenset({"web"})),
        Requirement("drain", Operator.DOES_NOT_EXIST, frozenset()),
        Requirement("tier", Operator.NOT_IN, frozenset({"a", ""})),
        Requirement("zone", Operator.EXISTS, frozenset()),
    )


def test_spelling_variants_are_equal_and_hash_equal() -> None:
    a = parse_selector("b in (y, x), a==1")
    b = parse_selector("a=1,b in (x,y),b in (x,y,x)")
    assert a == b
    assert hash(a) == hash(b)
    assert parse_selector("a=1") != parse_selector("a!=1")


def test_requirement_str_forms() -> None:
    assert str(Requirement("k", Operator.EQUALS, frozenset({"v"}))) == "k=v"
    assert str(Requirement("k", Operator.NOT_EQUALS, frozenset({"v"}))) == "k!=v"
    assert str(Requirement("k", Operator.IN, frozenset({"b", "a"}))) == "k in (a,b)"
    assert str(Requirement("k", Operator.NOT_IN, frozenset({"b", "a"}))) == "k notin (a,b)"
    assert str(Requirement("k", Operator.EXISTS, frozenset())) == "k"
    assert str(Requirement("k", Operator.DOES_NOT_EXIST, frozenset())) == "!k"
    assert str(Requirement("k", Operator.IN, frozenset({""}))) == "k in (,)"


# Each row: text, a fragment the message must contain, and the 0-based position reported.
MALFORMED_CASES: list[tuple[str, str, int]] = [
    # operators
    ("a=~b", "'=~'", 1),
    ("a===b", "'==='", 1),
    ("a=!b", "'=!'", 1),
    ("a>1", "'>'", 1),
    ("a<1", "'<'", 1),
    ("a gt 1", "'gt'", 2),
    ("a IN (b)", "'IN'", 2),
    ("a b", "'b'", 2),
    ("a ! = b", "'!'", 2),
    ("=b", "'='", 0),
    ("!=a", "'!='", 0),
    ("!!a", "'!!'", 0),
    ("! =a", "'='", 2),
    ("!a=b", "'='", 2),
    ("!a!=b", "'!='", 2),
    ("!a in (b)", "'in'", 3),
    ("!", "end of input", 1),
    # set syntax
    ("a in ()", "'a in'", 5),
    ("a notin ( )", "'a notin'", 8),
    ("a in a", "'a'", 5),
    ("a notin b", "'b'", 8),
    ("a in", "end of input", 4),
    ("a in )", "')'", 5),
    ("a in (", "never closed", 5),
    ("a in (b", "never closed", 5),
    ("a in (b,", "never closed", 5),
    ("a in (b c)", "'c'", 8),
    ("a in (b,(c))", "'('", 8),
    ("a in (b,=)", "'='", 8),
    ("a in (b))", "')'", 8),
    ("in (a)", "'('", 3),
    # values and structure
    ("a=(b)", "'('", 2),
    ("a=b c", "'c'", 4),
    ("a=b)", "')'", 3),
    ("(a=b)", "'('", 0),
    ("a=b,", "end of input", 4),
    ("a,", "end of input", 2),
    ("a,,b", "','", 2),
    (",a", "','", 0),
    (",", "','", 0),
    ("a = b , , c", "','", 8),
    ("a=b;c=d", "'b;c'", 2),
    # invalid keys
    ("Foo/bar=x", "'Foo/bar'", 0),
    ("/a", "prefix", 0),
    ("a/", "name", 0),
    ("a/b/c", "'a/b/c'", 0),
    ("-a", "'-a'", 0),
    ("a-", "'a-'", 0),
    ("a..b/c", "'a..b/c'", 0),
    ("a_b/c", "'a_b/c'", 0),
    ("-a.b/c", "'-a.b/c'", 0),
    ("x" * 64, "63", 0),
    ("p" * 254 + "/a", "253", 0),
    ("b, café=x", "'café'", 3),
    ("\u3000", "'\\u3000'", 0),
    ("a\u00a0=b", "'a\\xa0'", 0),
    # invalid values
    ("a=-b", "'-b'", 2),
    ("a=b-", "'b-'", 2),
    ("a=" + "v" * 64, "63", 2),
    ("a=b/c", "'b/c'", 2),
    ("a in (ok, b@d)", "'b@d'", 10),
    ("a=b\x00", "'b\\x00'", 2),
]


@pytest.mark.parametrize(("text", "fragment", "position"), MALFORMED_CASES)
def test_malformed_selectors_raise(text: str, fragment: str, position: int) -> None:
    with pytest.raises(SelectorError) as info:
        parse_selector(text)
    message = str(info.value)
    assert fragment in message
    assert f"position {position}" in message
    assert info.value.position == position


def test_selector_error_is_value_error() -> None:
    with pytest.raises(ValueError, match="'=~'"):
        parse_selector("a=~b")


def test_key_and_value_errors_name_the_rule() -> None:
    with pytest.raises(SelectorError, match="RFC 1123 subdomain"):
        parse_selector("Example.com/a")
    with pytest.raises(SelectorError, match="begin and end with an alphanumeric"):
        parse_selector("a=_b")
    with pytest.raises(SelectorError, match="invalid character '@'"):
        parse_selector("a@b")
    with pytest.raises(SelectorError, match="at most one '/'"):
        parse_selector("a/b/c")


def test_non_string_selector_text_raises_selector_error() -> None:
    with pytest.raises(SelectorError, match="must be a string"):
        parse_selector(None)  # type: ignore[arg-type]


def test_length_limits_are_inclusive() -> None:
    name, value, prefix = "n" * 63, "v" * 63, ".".join(["p" * 63] * 3) + "." + "q" * 61
    assert len(prefix) == 253
    selector = parse_selector(f"{prefix}/{name}={value}")
    assert selector.matches({f"{prefix}/{name}": value})


# --------------------------------------------------------------------------------------------------
# Requirement construction, LabelSelector, selector_from_labels
# --------------------------------------------------------------------------------------------------

BAD_REQUIREMENTS: list[tuple[str, Operator, frozenset[str], str]] = [
    ("a", Operator.EQUALS, frozenset(), "exactly one"),
    ("a", Operator.NOT_EQUALS, frozenset({"x", "y"}), "exactly one"),
    ("a", Operator.IN, frozenset(), "at least one"),
    ("a", Operator.NOT_IN, frozenset(), "at least one"),
    ("a", Operator.EXISTS, frozenset({"x"}), "no values"),
    ("a", Operator.DOES_NOT_EXIST, frozenset({""}), "no values"),
    ("Bad/a", Operator.EXISTS, frozenset(), "'Bad/a'"),
    ("", Operator.EXISTS, frozenset(), "must not be empty"),
    ("a", Operator.EQUALS, frozenset({"-x"}), "'-x'"),
    ("a", Operator.IN, frozenset({"ok", "x y"}), "'x y'"),
]


@pytest.mark.parametrize(("key", "operator", "values", "fragment"), BAD_REQUIREMENTS)
def test_invalid_requirements_raise(key: str, operator: Operator, values: frozenset[str], fragment: str) -> None:
    with pytest.raises(SelectorError) as info:
        Requirement(key, operator, values)
    assert fragment in str(info.value)
    assert info.value.position is None


def test_requirement_type_errors() -> None:
    with pytest.raises(TypeError):
        Requirement("a", "=", frozenset({"b"}))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Requirement("a", Operator.IN, "abc")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Requirement("a", Operator.IN, frozenset({1}))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        LabelSelector(("a=b",))  # type: ignore[arg-type]


def test_requirement_values_coerced_to_frozenset() -> None:
    requirement = Requirement("a", Operator.IN, ["x", "y", "x"])  # type: ignore[arg-type]
    assert requirement.values == frozenset({"x", "y"})
    assert isinstance(requirement.values, frozenset)


def test_label_selector_canonicalises_on_construction() -> None:
    b = Requirement("b", Operator.EXISTS, frozenset())
    a = Requirement("a", Operator.EQUALS, frozenset({"1"}))
    selector = LabelSelector((b, a, b))
    assert selector.requirements == (a, b)
    assert selector == LabelSelector((a, b))
    assert str(selector) == "a=1,b"


def test_everything() -> None:
    assert EVERYTHING.is_empty()
    assert str(EVERYTHING) == ""
    assert EVERYTHING.matches({})
    assert EVERYTHING.matches({"a": "b"})
    assert parse_selector("") == EVERYTHING
    assert not parse_selector("a").is_empty()


def test_and_examples() -> None:
    a = parse_selector("app=web")
    b = parse_selector("tier notin (db), app=web")
    both = a.and_(b)
    assert str(both) == "app=web,tier notin (db)"
    assert both.matches({"app": "web"})
    assert not both.matches({"app": "web", "tier": "db"})
    assert EVERYTHING.and_(a) == a
    assert a.and_(EVERYTHING) == a


def test_selector_from_labels_examples() -> None:
    selector = selector_from_labels({"tier": "", "app.kubernetes.io/name": "web"})
    assert str(selector) == "app.kubernetes.io/name=web,tier="
    assert selector.matches({"tier": "", "app.kubernetes.io/name": "web", "extra": "x"})
    assert not selector.matches({"app.kubernetes.io/name": "web"})
    assert selector_from_labels({}) == EVERYTHING


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [
        ({"Bad/k": "v"}, "'Bad/k'"),
        ({"k": "-v"}, "'-v'"),
        ({"k": "v" * 64}, "63"),
        ({"": "v"}, "must not be empty"),
        ({"k": 1}, "'k'"),
        ({1: "v"}, "1"),
    ],
)
def test_selector_from_labels_rejects_invalid(labels: Mapping[object, object], fragment: str) -> None:
    with pytest.raises(SelectorError) as info:
        selector_from_labels(labels)  # type: ignore[arg-type]
    assert fragment in str(info.value)


# --------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------

_LOWER_ALNUM = string.ascii_lowercase + string.digits
_ALNUM = string.ascii_letters + string.digits


def _edged(edge: str, inner: str, max_inner: int) -> st.SearchStrategy[str]:
    """Strings of ``edge`` characters at both ends and up to ``max_inner`` ``inner`` ones between."""
    edges = st.sampled_from(edge)
    longer = st.builds(lambda a, mid, b: a + mid + b, edges, st.text(inner, max_size=max_inner), edges)
    return st.one_of(edges, longer)


_names = _edged(_ALNUM, _ALNUM + "-_.", 61)  # 1..63 characters
_dns_labels = _edged(_LOWER_ALNUM, _LOWER_ALNUM + "-", 10)
_prefixes = st.lists(_dns_labels, min_size=1, max_size=4).map(".".join)
_keywords = st.sampled_from(["in", "notin"])
wide_keys = st.one_of(
    _names,
    st.builds(lambda prefix, name: f"{prefix}/{name}", _prefixes, _names),
    _keywords,
)
wide_values = st.one_of(st.just(""), _names, _keywords)

# Small pools so that generated selectors and label sets actually talk about the same keys and values.
POOL_KEYS = ["app", "tier", "app.kubernetes.io/name", "in"]
POOL_VALUES = ["", "web", "db", "notin"]
pool_keys = st.sampled_from(POOL_KEYS)
pool_values = st.sampled_from(POOL_VALUES)
pool_labels = st.dictionaries(pool_keys, pool_values, max_size=len(POOL_KEYS))


@st.composite
def requirements(draw: st.DrawFn, keys: st.SearchStrategy[str], values: st.SearchStrategy[str]) -> Requirement:
    operator = draw(st.sampled_from(Operator))
    key = draw(keys)
    if operator in (Operator.EXISTS, Operator.DOES_NOT_EXIST):
        chosen: frozenset[str] = frozenset()
    elif operator in (Operator.EQUALS, Operator.NOT_EQUALS):
        chosen = frozenset({draw(values)})
    else:
        chosen = frozenset(draw(st.lists(values, min_size=1, max_size=4)))
    return Requirement(key, operator, chosen)


wide_requirement_lists = st.lists(requirements(wide_keys, wide_values), max_size=6)
pool_requirement_lists = st.lists(requirements(pool_keys, pool_values), max_size=6)


def reference_matches(terms: list[Requirement], labels: Mapping[str, str]) -> bool:
    """An independent reading of the Kubernetes rules, term by term, from the operator spellings."""
    for term in terms:
        present = term.key in labels
        value = labels.get(term.key)
        spelled = term.operator.value
        if spelled == "exists":
            ok = present
        elif spelled == "!":
            ok = not present
        elif spelled in ("=", "in"):
            ok = present and value in term.values
        elif spelled in ("!=", "notin"):
            ok = not present or value not in term.values
        else:  # pragma: no cover - a new operator must be added here
            raise AssertionError(spelled)
        if not ok:
            return False
    return True


@given(wide_requirement_lists)
def test_round_trip_through_text(terms: list[Requirement]) -> None:
    selector = LabelSelector(tuple(terms))
    assert parse_selector(str(selector)) == selector
    for term in terms:
        assert parse_selector(str(term)).requirements == (term,)


@given(pool_requirement_lists, pool_labels)
def test_matches_agrees_with_reference(terms: list[Requirement], labels: dict[str, str]) -> None:
    selector = LabelSelector(tuple(terms))
    assert selector.matches(labels) == reference_matches(terms, labels)
    assert parse_selector(str(selector)).matches(labels) == reference_matches(terms, labels)


@given(pool_requirement_lists, pool_requirement_lists, pool_labels)
def test_and_is_conjunction(a_terms: list[Requirement], b_terms: list[Requirement], labels: dict[str, str]) -> None:
    a, b = LabelSelector(tuple(a_terms)), LabelSelector(tuple(b_terms))
    both = a.and_(b)
    assert both.matches(labels) == (a.matches(labels) and b.matches(labels))
    assert both == b.and_(a)
    assert a.and_(a) == a


@given(st.lists(requirements(pool_keys, pool_values), max_size=6).flatmap(st.permutations))
def test_requirement_order_does_not_matter(terms: list[Requirement]) -> None:
    assert LabelSelector(tuple(terms)) == LabelSelector(tuple(reversed(terms)))
    assert parse_selector(",".join(str(term) for term in terms)) == LabelSelector(tuple(terms))


@given(st.dictionaries(wide_keys, wide_values, max_size=6))
def test_selector_from_labels_matches_its_labels(labels: dict[str, str]) -> None:
    selector = selector_from_labels(labels)
    assert selector.matches(labels)
    assert len(selector.requirements) == len(labels)
    assert all(requirement.operator is Operator.EQUALS for requirement in selector.requirements)


_FRAGMENTS = [
    "a", "b", "app", "x.io/", "/", "in", "notin", " ", "\t", "(", ")", ",", "=", "==", "!=", "!",
    "~", "<", ">", "-", "_", ".", "A", "é", "\x00", "\u3000",
]  # fmt: skip
selectorish_text = st.lists(st.sampled_from(_FRAGMENTS), max_size=20).map("".join)


def _parse_or_error(text: str) -> LabelSelector | SelectorError:
    try:
        return parse_selector(text)
    except SelectorError as error:
        return error


@settings(max_examples=300)
@given(st.one_of(st.text(), selectorish_text))
def test_arbitrary_text_parses_or_raises_selector_error(text: str) -> None:
    result = _parse_or_error(text)  # any other exception type fails the test
    if isinstance(result, SelectorError):
        assert str(result)
        assert result.position is not None
        assert 0 <= result.position <= len(text)
    else:
        assert isinstance(result, LabelSelector)
        assert parse_selector(str(result)) == result
