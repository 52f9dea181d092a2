"""A thin JSON transport over the official ``kubernetes`` client.

The official client supplies what is easy to get wrong (kubeconfig and in-cluster loading, TLS,
bearer-token refresh, proxies); this module sends raw requests through it and returns plain dicts.
Skipping the generated model classes matters on the watch path: deserialising every event into typed
models costs more than the rest of the sidecar together, and the join only needs a handful of fields.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from sidecar.core import json_decode

Query = Sequence[tuple[str, str]]

CONNECTION_ERRORS = (urllib3.exceptions.HTTPError, OSError)
"""Failures that mean "could not talk to the API server" (refused, reset, timed out, TLS)."""


class ApiError(Exception):
    """A non-2xx answer from the API server, with the Status object's reason and message."""

    def __init__(self, status: int, reason: str, message: str, body: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.body = body or {}

    @classmethod
    def from_response(cls, status: int, raw: bytes) -> ApiError:
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {"message": raw.decode("utf-8", "replace")[:500]}
        if not isinstance(body, dict):
            body = {"message": str(body)[:500]}
        return cls(status, str(body.get("reason", "")), str(body.get("message", "")), body)

    @property
    def is_transient(self) -> bool:
        """Worth retrying as is: throttling, timeouts, server errors, conflicts."""
        return self.status in (409, 429) or self.status >= 500 or self.status == 0


@dataclass(frozen=True)
class ResourcePath:
    """Where a namespaced resource lives in the REST API."""

    group: str  # "" for the core group
    version: str
    plural: str

    def collection(self, namespace: str) -> str:
        """The objects of one namespace, or of all namespaces when ``namespace`` is empty."""
        prefix = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if not namespace:
            return f"{prefix}/{self.plural}"
        return f"{prefix}/namespaces/{quote(namespace, safe='')}/{self.plural}"

    def item(self, namespace: str, name: str) -> str:
        return f"{self.collection(namespace)}/{quote(name, safe='')}"


def load_api_client(kubeconfig: str | None = None) -> k8s_client.ApiClient:
    """In a pod, the service account; elsewhere ``kubeconfig`` or ``$KUBECONFIG`` or ``~/.kube/config``."""
    configuration = k8s_client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        k8s_config.load_incluster_config(client_configuration=configuration)
    else:
        k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return k8s_client.ApiClient(configuration)


RequestObserver = Callable[[str, int], None]
"""Called with the Kubernetes verb and the status code (0: no answer) of every request."""
HTTP_VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
"""Called with (HTTP method, status code) for every request sent (status 0: no answer)."""
BytesObserver = Callable[[int], None]
"""Called with the number of response-body bytes received (watch streams included)."""


def _ignore(*_: object) -> None:
    return None


class KubeApi:
    """Raw JSON requests to the API server through an official ``ApiClient``.

    ``on_request`` and ``on_bytes`` let the owner count what the sidecar costs the API server; requests
    are counted by Kubernetes verb (get, list, watch, create, patch, delete), so "this pod never listed
    or watched anything" is visible in its metrics.
    """

    def __init__(self, api_client: k8s_client.ApiClient, request_timeout: float = 15.0) -> None:
        self.api_client = api_client
        self.request_timeout = request_timeout
        self.on_request: RequestObserver = _ignore
        self.on_bytes: BytesObserver = _ignore

    @classmethod
    def from_kubeconfig(cls, kubeconfig: str | None = None, request_timeout: float = 15.0) -> KubeApi:
        return cls(load_api_client(kubeconfig), request_timeout)

    def close(self) -> None:
        self.api_client.close()

    def bearer_token(self) -> str:
        """The token this client presents to the API server ("" when it authenticates otherwise, e.g. with a
        client certificate). In a pod, the projected service-account token, read again after it rotates
        (the official client's refresh hook); elsewhere the kubeconfig's. A relay is shown the same one."""
        value = self.api_client.configuration.get_api_key_with_prefix("BearerToken") or ""
        scheme, _, token = value.strip().partition(" ")
        return token.strip() if token and scheme.lower() == "bearer" else value.strip()

    def _send(
        self,
        method: str,
        path: str,
        query: Query = (),
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | tuple[float, float] | None = None,
        verb: str = "",
    ) -> urllib3.BaseHTTPResponse:
        verb = verb or HTTP_VERBS.get(method, method.lower())
        headers = {"Accept": "application/json"}
        if body is not None:
            # The REST layer serialises dict bodies itself for */json, */*+json and */*+yaml
            # (JSON is YAML, so that covers server-side apply too).
            headers["Content-Type"] = content_type
        method_, url, header_params, body_, post = self.api_client.param_serialize(
            method, path, query_params=list(query), header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        try:
            response = self.api_client.call_api(
                method_, url, header_params, body_, post, _request_timeout=timeout or self.request_timeout
            )
        except ApiException as exc:  # the REST layer raises these for TLS failures (status 0)
            self.on_request(verb, exc.status or 0)
            raise ApiError(exc.status or 0, exc.reason or "", str(exc)) from exc
        except CONNECTION_ERRORS:
            self.on_request(verb, 0)
            raise
        self.on_request(verb, response.status)
        # RESTResponse wraps the urllib3 response (preload_content=False) without annotating it
        raw_response: urllib3.BaseHTTPResponse = response.response
        return raw_response

    def request(
        self,
        method: str,
        path: str,
        query: Query = (),
        body: Any = None,
        content_type: str = "application/json",
        verb: str = "",
    ) -> dict[str, Any]:
        response = self._send(method, path, query, body, content_type, verb=verb)
        try:
            raw = response.data
        finally:
            response.release_conn()
        self.on_bytes(len(raw or b""))
        if not 200 <= response.status < 300:
            raise ApiError.from_response(response.status, raw)
        return json_decode.loads(raw) if raw else {}

    def get(self, path: str, query: Query = (), verb: str = "get") -> dict[str, Any]:
        """GET one object, or (``verb="list"``) a page of a collection."""
        return self.request("GET", path, query, verb=verb)

    def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, body=body)

    def delete(self, path: str, body: Mapping[str, Any] | None = None, query: Query = ()) -> dict[str, Any]:
        return self.request("DELETE", path, query, body=body)

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", path, body=patch, content_type="application/merge-patch+json")

    def apply(self, path: str, body: Mapping[str, Any], field_manager: str, force: bool = True) -> dict[str, Any]:
        """Server-side apply: the body goes out as JSON under the apply content type."""
        query = [("fieldManager", field_manager)] + ([("force", "true")] if force else [])
        return self.request("PATCH", path, query, body=body, content_type="application/apply-patch+yaml")

    def stream(self, path: str, query: Query, read_timeout: float) -> WatchStream:
        """Open a watch; the caller iterates lines. ``read_timeout`` bounds silence between bytes."""
        response = self._send(
            "GET", path, query, timeout=(min(10.0, self.request_timeout), read_timeout), verb="watch"
        )
        if not 200 <= response.status < 300:
            try:
                raw = response.data
            finally:
                response.release_conn()
            raise ApiError.from_response(response.status, raw)
        return WatchStream(response, self.on_bytes)


class WatchStream:
    """The body of a watch response, decoded line by line, closable from another thread."""

    def __init__(self, response: urllib3.BaseHTTPResponse, on_bytes: BytesObserver = _ignore) -> None:
        self._response = response
        self._on_bytes = on_bytes
        self._closed = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        buffer = b""
        for chunk in self._response.stream(65536, decode_content=True):
            self._on_bytes(len(chunk))
            buffer += chunk
            while True:
                newline = buffer.find(b"\n")
                if newline < 0:
                    break
                line, buffer = buffer[:newline], buffer[newline + 1 :]
                if line.strip():
                    yield json_decode.loads(line)
        if buffer.strip() and not self._closed:
            yield json_decode.loads(buffer)

    def close(self) -> None:
        """Unblock a reader stuck in a read (shutdown, or a silent watch being abandoned)."""
        self._closed = True
        shutdown = getattr(self._response, "shutdown", None)
        if shutdown is not None:
            # Not connected yet, already closed or already back in the pool: nothing to unblock.
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                shutdown()
        self._response.release_conn()
