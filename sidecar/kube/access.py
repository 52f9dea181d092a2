"""Who may read peers through a relay, as the API server says: TokenReview, then SubjectAccessReview.

A relay serves what its own watches see, which is more than any one client may see. So every client
presents the token it uses for the API server (``authorization: Bearer``); the relay asks the API server
who that is (a TokenReview: an expired token, or a bound token whose pod was deleted, is refused there)
and whether that identity may ``list`` each peer resource the relay watches, in each namespace the
client asks for (a SubjectAccessReview per resource). A client is served exactly the namespaces it may
list; one it may not is refused, by name, with nothing of it sent.

Answers are kept for ``ttl`` (``sidecar.core.access.ExpiringCache``), so reconnects and many streams of
one pod cost the API server nothing more; open streams are checked again when they expire
(``sidecar.serve.grpc_service``). The relay's own service account needs ``create`` on
``tokenreviews.authentication.k8s.io`` and ``subjectaccessreviews.authorization.k8s.io``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from sidecar.core.access import ExpiringCache, Reviewed, scope_problem, token_key
from sidecar.kube.api import CONNECTION_ERRORS, ApiError, KubeApi, ResourcePath
from sidecar.peers.ports import AccessDenied, AccessUnavailable, Grant, NotServed, Unauthenticated

TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
ACCESS_REVIEWS = "/apis/authorization.k8s.io/v1/subjectaccessreviews"


class KubeAccess:
    """The relay's ``Access``: reviews by the API server, cached. ``_lock`` guards both caches (calls are
    checked in several threads at once); reviews themselves are sent outside it."""

    def __init__(
        self,
        api: KubeApi,
        served: Sequence[str],
        resources: Sequence[ResourcePath],
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.served = tuple(served)  # the namespaces the relay watches; ("",): all
        self.resources = tuple(dict.fromkeys(resources))  # what a client must be allowed to list
        self.clock = clock
        self.log = structlog.get_logger("sidecar.relay.access")
        self._lock = threading.Lock()
        self._identities: ExpiringCache[str, Reviewed | str] = ExpiringCache(ttl)  # token digest -> who, or why not
        # (user, groups, namespace) -> "" when allowed, else why not
        self._decisions: ExpiringCache[tuple[str, tuple[str, ...], str], str] = ExpiringCache(ttl)

    def admit(self, token: str, namespaces: Sequence[str] | None) -> Grant:
        if not token:
            raise Unauthenticated(
                "no bearer token: a relay serves only clients that present their service-account token "
                "(metadata authorization: Bearer <token>)"
            )
        wanted = tuple(dict.fromkeys(namespaces)) if namespaces else self.served
        problem = scope_problem(wanted, self.served)
        if problem:
            raise NotServed(problem)
        who, expires = self._review(token)
        for namespace in wanted:
            expires = min(expires, self._authorise(who, namespace))
        return Grant(namespaces=None if "" in wanted else frozenset(wanted), expires=expires, user=who.user)

    # -- TokenReview -----------------------------------------------------------------------------------
    def _review(self, token: str) -> tuple[Reviewed, float]:
        key = token_key(token)
        with self._lock:
            cached = self._identities.get(key, self.clock())
        if cached is None:
            answer = self._ask_token_review(token)
            with self._lock:
                cached = self._identities.put(key, answer, self.clock())
        if isinstance(cached.value, str):
            raise Unauthenticated(cached.value)
        return cached.value, cached.expires

    def _ask_token_review(self, token: str) -> Reviewed | str:
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}
        status = self._create(TOKEN_REVIEWS, body, "tokenreviews.authentication.k8s.io").get("status", {})
        if not status.get("authenticated"):
            error = status.get("error") or "the token is not valid"
            return (
                f"the API server does not accept this token ({error}): expired, or its pod or service account deleted"
            )
        user = status.get("user") or {}
        extra = {str(k): tuple(str(v) for v in vs or ()) for k, vs in (user.get("extra") or {}).items()}
        return Reviewed(
            user=str(user.get("username", "")),
            uid=str(user.get("uid", "")),
            groups=tuple(str(g) for g in user.get("groups") or ()),
            extra=extra,
        )

    # -- SubjectAccessReview ---------------------------------------------------------------------------
    def _authorise(self, who: Reviewed, namespace: str) -> float:
        key = (who.user, who.groups, namespace)
        with self._lock:
            cached = self._decisions.get(key, self.clock())
        if cached is None:
            answer = self._ask_access_reviews(who, namespace)
            with self._lock:
                cached = self._decisions.put(key, answer, self.clock())
        if cached.value:
            raise AccessDenied(cached.value)
        return cached.expires

    def _ask_access_reviews(self, who: Reviewed, namespace: str) -> str:
        where = f"namespace {namespace}" if namespace else "all namespaces"
        for resource in self.resources:
            attributes: dict[str, Any] = {"verb": "list", "group": resource.group, "resource": resource.plural}
            if namespace:
                attributes["namespace"] = namespace
            body = {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {
                    "resourceAttributes": attributes,
                    "user": who.user,
                    "uid": who.uid,
                    "groups": list(who.groups),
                    "extra": {k: list(v) for k, v in who.extra.items()},
                },
            }
            status = self._create(ACCESS_REVIEWS, body, "subjectaccessreviews.authorization.k8s.io").get("status", {})
            if not status.get("allowed"):
                noun = f"{resource.plural}.{resource.group}" if resource.group else resource.plural
                self.log.info("refused a client", user=who.user, namespace=namespace or "*", resource=noun)
                return (
                    f"{who.user} may not list {noun} in {where}, so this relay serves it nothing of {where}: "
                    f"grant it list on {noun} there (a Role and RoleBinding), or leave {where} out of its "
                    "DISCOVERY_NAMESPACES"
                )
        return ""

    def _create(self, path: str, body: dict[str, Any], what: str) -> dict[str, Any]:
        try:
            return self.api.create(path, body)
        except ApiError as exc:
            if exc.status == 403:
                raise AccessUnavailable(
                    f"the relay may not create {what} ({exc.message}): grant its service account create on "
                    "tokenreviews.authentication.k8s.io and subjectaccessreviews.authorization.k8s.io "
                    "(a ClusterRole, see docs/relay.md)"
                ) from None
            raise AccessUnavailable(f"the API server could not review the client ({exc}); retry") from None
        except CONNECTION_ERRORS as exc:
            raise AccessUnavailable(f"the API server cannot be reached to review the client ({exc}); retry") from None
