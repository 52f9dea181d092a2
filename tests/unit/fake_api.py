"""A scripted stand-in for ``sidecar.kube.api.KubeApi``, and a ``SourceStore`` that records what it is told.

``ScriptedApi`` answers the calls the reflector and the registrar make (``get``, ``stream``, ``apply``,
``merge_patch``, ``delete``) from a script per method, and records every call, so a test says what the API server
answers and then asserts exactly what was sent (the resourceVersion a watch resumed from, continue
tokens, label selectors, DeleteOptions preconditions).

A step of a script is one of:

* a value, returned as is (deep-copied, so the code under test never shares a test's objects);
* an exception instance (or class), raised;
* a ``Responder``: a function of the recorded ``Call`` whose result is the answer (it may raise, or
  block, as ``gated`` does, to hold the caller at a known point);
* for ``stream`` only, a ``ScriptedStream``: the events and exceptions the watch yields in order,
  and then either the end of the watch (the server closed it) or a block until ``close()``.

When a method's script runs out, ``stream`` hands out an idle watch (open, silent, ended by
``close()``: what a reflector normally sits in), and the other methods raise ``ScriptExhausted`` at
once and remember it in ``exhausted``, so an under-scripted test fails with the call that was not
expected instead of spinning or hanging.

The store a reflector writes into is ``tests.unit.fake_store.RecordingStore``, shared with the etcd
source's tests (``tests.unit.fake_etcd``).
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from sidecar.kube.api import ApiError, BytesObserver, KubeApi, Query, RequestObserver
from tests.unit.fake_store import DEADLINE

Method = Literal["get", "stream", "apply", "merge_patch", "delete"]
METHODS: tuple[Method, ...] = ("get", "stream", "apply", "merge_patch", "delete")
_HTTP_METHOD: dict[Method, str] = {
    "get": "GET",
    "stream": "GET",
    "apply": "PATCH",
    "merge_patch": "PATCH",
    "delete": "DELETE",
}


class ScriptExhausted(AssertionError):
    """The code under test made a call the test did not script."""


@dataclass(frozen=True)
class Call:
    """One request as the code under test sent it."""

    method: Method
    path: str
    query: tuple[tuple[str, str], ...] = ()
    body: Any = None
    field_manager: str = ""
    force: bool | None = None
    read_timeout: float | None = None

    @property
    def params(self) -> dict[str, str]:
        """The query as a dict (the last value wins for a repeated name)."""
        return dict(self.query)


Responder = Callable[[Call], Any]
"""A step computed from the request; its return value is the answer, and it may raise."""


class ScriptedStream:
    """A watch: yields ``items`` in order (raising the exceptions among them), then ends or blocks.

    ``then="block"`` keeps the watch open and silent until ``close()`` (what ``Reflector.stop()`` calls);
    ``then="end"`` ends it, as the server does at ``timeoutSeconds``. After ``close()`` no more items are
    yielded.
    """

    def __init__(self, *items: Mapping[str, Any] | BaseException, then: Literal["block", "end"] = "block") -> None:
        self.items: tuple[Mapping[str, Any] | BaseException, ...] = items
        self.then = then
        self._closed = threading.Event()
        self.yielded = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for item in self.items:
            if self._closed.is_set():
                return
            if isinstance(item, BaseException):
                raise item
            self.yielded += 1
            yield copy.deepcopy(dict(item))
        if self.then == "block":
            self._closed.wait()

    def close(self) -> None:
        self._closed.set()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def wait_closed(self, timeout: float = DEADLINE) -> bool:
        return self._closed.wait(timeout)


def gated(gate: threading.Event, step: Any, timeout: float = DEADLINE) -> Responder:
    """A step that holds the caller until ``gate`` is set, then answers with ``step``.

    The call is recorded before it blocks, so a test that waited for the call knows where the caller is.
    """

    def respond(call: Call) -> Any:
        if not gate.wait(timeout):
            raise ScriptExhausted(f"the gate on {call.method} {call.path} was never opened")
        return _answer(step, call)

    return respond


def _answer(step: Any, call: Call) -> Any:
    if isinstance(step, type) and issubclass(step, BaseException):
        raise step()
    if isinstance(step, BaseException):
        raise step
    if callable(step) and not isinstance(step, ScriptedStream):
        return _answer(step(call), call)
    if isinstance(step, ScriptedStream):
        return step
    return copy.deepcopy(step)


def _ignore(*_: object) -> None:
    return None


class ScriptedApi:
    """Duck-typed like ``KubeApi`` for what the reflector and the registrar call; see the module docstring."""

    def __init__(self) -> None:
        self.on_request: RequestObserver = _ignore
        self.on_bytes: BytesObserver = _ignore
        self.calls: list[Call] = []
        self.exhausted: list[Call] = []
        self.streams: list[ScriptedStream] = []
        self._scripts: dict[Method, deque[Any]] = {method: deque() for method in METHODS}
        self._cond = threading.Condition()
        self._closed = False

    def as_kube_api(self) -> KubeApi:
        """This fake, typed as what the code under test expects."""
        return cast(KubeApi, self)

    # -- scripting --------------------------------------------------------------------------------
    def script(self, method: Method, *steps: Any) -> ScriptedApi:
        with self._cond:
            self._scripts[method].extend(steps)
        return self

    def on_get(self, *steps: Any) -> ScriptedApi:
        return self.script("get", *steps)

    def on_stream(self, *steps: ScriptedStream | BaseException | type[BaseException] | Responder) -> ScriptedApi:
        return self.script("stream", *steps)

    def on_apply(self, *steps: Any) -> ScriptedApi:
        return self.script("apply", *steps)

    def on_merge_patch(self, *steps: Any) -> ScriptedApi:
        return self.script("merge_patch", *steps)

    def on_delete(self, *steps: Any) -> ScriptedApi:
        return self.script("delete", *steps)

    def pending(self, method: Method) -> int:
        """Scripted steps not used yet."""
        with self._cond:
            return len(self._scripts[method])

    # -- what was sent ----------------------------------------------------------------------------
    def calls_of(self, method: Method) -> list[Call]:
        with self._cond:
            return [c for c in self.calls if c.method == method]

    def methods(self) -> list[Method]:
        with self._cond:
            return [c.method for c in self.calls]

    def wait_for_calls(self, method: Method, count: int, timeout: float = DEADLINE) -> list[Call]:
        """Block until ``method`` was called at least ``count`` times; return those calls."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(calls := [c for c in self.calls if c.method == method]) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"expected {count} {method} call(s) within {timeout}s, got {len(calls)}: {self.calls}"
                    )
                self._cond.wait(remaining)
            return calls

    # -- the KubeApi surface ----------------------------------------------------------------------
    def get(self, path: str, query: Query = (), verb: str = "get") -> dict[str, Any]:
        return cast(dict[str, Any], self._serve(Call("get", path, tuple(query))))

    def stream(self, path: str, query: Query, read_timeout: float) -> ScriptedStream:
        return cast(ScriptedStream, self._serve(Call("stream", path, tuple(query), read_timeout=read_timeout)))

    def apply(self, path: str, body: Mapping[str, Any], field_manager: str, force: bool = True) -> dict[str, Any]:
        call = Call("apply", path, body=copy.deepcopy(dict(body)), field_manager=field_manager, force=force)
        return cast(dict[str, Any], self._serve(call))

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        call = Call("merge_patch", path, body=copy.deepcopy(dict(patch)))
        return cast(dict[str, Any], self._serve(call))

    def delete(self, path: str, body: Mapping[str, Any] | None = None, query: Query = ()) -> dict[str, Any]:
        call = Call("delete", path, tuple(query), body=copy.deepcopy(dict(body)) if body is not None else None)
        return cast(dict[str, Any], self._serve(call))

    def close(self) -> None:
        """End the test: open watches end, and further calls fail."""
        with self._cond:
            self._closed = True
            streams = list(self.streams)
            self._cond.notify_all()
        for stream in streams:
            stream.close()

    # -- internals --------------------------------------------------------------------------------
    def _serve(self, call: Call) -> Any:
        with self._cond:
            self.calls.append(call)
            script = self._scripts[call.method]
            exhausted = not script or self._closed
            step: Any = None
            if exhausted:
                if call.method != "stream" or self._closed:
                    self.exhausted.append(call)
            else:
                step = script.popleft()
            self._cond.notify_all()
        if exhausted:
            if call.method == "stream" and not self._closed:
                step = ScriptedStream()  # an idle watch, until stop() or close()
            else:
                raise ScriptExhausted(f"unscripted {call.method} {call.path} {list(call.query)} body={call.body}")
        try:
            answer = _answer(step, call)
        except ApiError as exc:
            self.on_request(_HTTP_METHOD[call.method], exc.status)
            raise
        except Exception:
            self.on_request(_HTTP_METHOD[call.method], 0)
            raise
        self.on_request(_HTTP_METHOD[call.method], 200)
        if isinstance(answer, ScriptedStream):
            with self._cond:
                self.streams.append(answer)
                closed = self._closed
            if closed:
                answer.close()
        return answer
