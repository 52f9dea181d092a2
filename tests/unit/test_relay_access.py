"""A relay's access checks: the review cache (``sidecar.core.access``) and ``KubeAccess`` on a fake API.

The real API server's answers (TokenReview, SubjectAccessReview) are exercised by
``tests/integration/test_relay.py``; here, what the relay does with them: the scope it serves, what it
caches and for how long, what it says when refused, and that a failure to ask is not a refusal.
"""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.core.access import ExpiringCache, scope_problem, token_key
from sidecar.kube.access import ACCESS_REVIEWS, TOKEN_REVIEWS, KubeAccess
from sidecar.kube.api import ApiError, ResourcePath
from sidecar.peers.ports import AccessDenied, AccessUnavailable, NotServed, Unauthenticated

SLICES = ResourcePath("discovery.k8s.io", "v1", "endpointslices")
CRS = ResourcePath("nvidia.com", "v1alpha1", "dynamoworkermetadatas")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class ReviewingApi:
    """Answers reviews as a table says: tokens -> user, (user, namespace, resource) allowed."""

    def __init__(self, tokens: dict[str, str], allowed: set[tuple[str, str, str]]) -> None:
        self.tokens = tokens
        self.allowed = allowed
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail: ApiError | None = None

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((path, body))
        if self.fail is not None:
            raise self.fail
        if path == TOKEN_REVIEWS:
            user = self.tokens.get(body["spec"]["token"])
            if user is None:
                return {"status": {"authenticated": False, "error": "invalid bearer token"}}
            return {"status": {"authenticated": True, "user": {"username": user, "groups": ["system:serviceaccounts"]}}}
        assert path == ACCESS_REVIEWS
        spec = body["spec"]
        attributes = spec["resourceAttributes"]
        key = (spec["user"], attributes.get("namespace", "*"), attributes["resource"])
        return {"status": {"allowed": key in self.allowed}}


def access(api: ReviewingApi, clock: Clock, served: tuple[str, ...] = ("a", "b")) -> KubeAccess:
    return KubeAccess(api, served, [SLICES, CRS], ttl=30, clock=clock)  # type: ignore[arg-type]


ALICE = "system:serviceaccount:a:discovery-sidecar"


@pytest.fixture
def api() -> ReviewingApi:
    return ReviewingApi({"t-alice": ALICE}, {(ALICE, "a", "endpointslices"), (ALICE, "a", "dynamoworkermetadatas")})


class TestScope:
    def test_a_relay_of_all_namespaces_serves_any(self) -> None:
        assert scope_problem(("x", ""), ("",)) is None

    def test_a_namespace_not_watched_is_named(self) -> None:
        problem = scope_problem(("a", "c"), ("a", "b"))
        assert problem is not None and "does not watch namespace c" in problem

    def test_every_namespace_from_a_relay_of_some(self) -> None:
        problem = scope_problem(("",), ("a",))
        assert problem is not None and "not every namespace" in problem


class TestExpiringCache:
    def test_an_answer_is_kept_until_it_expires(self) -> None:
        cache: ExpiringCache[str, str] = ExpiringCache(ttl=10)
        cache.put("k", "v", now=0)
        assert cache.get("k", now=9.9) is not None
        assert cache.get("k", now=10) is None

    def test_beyond_capacity_the_soonest_to_expire_go(self) -> None:
        cache: ExpiringCache[int, int] = ExpiringCache(ttl=10, capacity=2)
        for i in range(3):
            cache.put(i, i, now=i)
        assert len(cache) == 2 and cache.get(0, now=3) is None and cache.get(2, now=3) is not None

    def test_tokens_are_kept_as_digests(self) -> None:
        assert "t-alice" not in token_key("t-alice") and len(token_key("t-alice")) == 64


class TestKubeAccess:
    def test_granted_namespaces_and_until_when(self, api: ReviewingApi) -> None:
        clock = Clock()
        grant = access(api, clock).admit("t-alice", ["a"])
        assert grant.namespaces == frozenset({"a"}) and grant.expires == clock.now + 30 and grant.user == ALICE

    def test_a_namespace_it_may_not_list_is_refused_by_name(self, api: ReviewingApi) -> None:
        with pytest.raises(AccessDenied, match="in namespace b") as refused:
            access(api, Clock()).admit("t-alice", ["a", "b"])
        assert "endpointslices.discovery.k8s.io" in str(refused.value)

    def test_no_namespaces_asked_means_every_one_the_relay_watches(self, api: ReviewingApi) -> None:
        with pytest.raises(AccessDenied, match="namespace b"):
            access(api, Clock()).admit("t-alice", None)

    def test_no_token_or_an_unknown_one_is_unauthenticated(self, api: ReviewingApi) -> None:
        with pytest.raises(Unauthenticated, match="no bearer token"):
            access(api, Clock()).admit("", ["a"])
        with pytest.raises(Unauthenticated, match="invalid bearer token"):
            access(api, Clock()).admit("t-mallory", ["a"])

    def test_a_namespace_not_watched_is_not_served(self, api: ReviewingApi) -> None:
        with pytest.raises(NotServed):
            access(api, Clock()).admit("t-alice", ["c"])

    def test_answers_are_cached_for_the_ttl_then_asked_again(self, api: ReviewingApi) -> None:
        clock = Clock()
        checker = access(api, clock)
        checker.admit("t-alice", ["a"])
        asked = len(api.calls)
        assert asked == 3  # one TokenReview, one SubjectAccessReview per resource
        clock.now += 29
        checker.admit("t-alice", ["a"])
        assert len(api.calls) == asked, "within the TTL: nothing asked"
        del api.tokens["t-alice"]  # the pod was deleted: its token is no longer accepted
        clock.now += 1
        with pytest.raises(Unauthenticated):
            checker.admit("t-alice", ["a"])
        assert len(api.calls) == asked + 1

    def test_refusals_are_cached_too(self, api: ReviewingApi) -> None:
        clock = Clock()
        checker = access(api, clock)
        for _ in range(3):
            with pytest.raises(AccessDenied):
                checker.admit("t-alice", ["b"])
        assert len(api.calls) == 2  # one TokenReview, one SubjectAccessReview (the first resource refused)

    def test_a_relay_that_may_not_review_says_what_to_grant(self, api: ReviewingApi) -> None:
        api.fail = ApiError(403, "Forbidden", "cannot create tokenreviews")
        with pytest.raises(AccessUnavailable, match="grant its service account create on tokenreviews"):
            access(api, Clock()).admit("t-alice", ["a"])

    def test_an_api_server_that_cannot_answer_is_unavailable_not_a_refusal(self, api: ReviewingApi) -> None:
        api.fail = ApiError(503, "ServiceUnavailable", "etcd is gone")
        with pytest.raises(AccessUnavailable, match="retry"):
            access(api, Clock()).admit("t-alice", ["a"])
