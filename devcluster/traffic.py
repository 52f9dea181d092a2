"""Bounded request load against a local OpenAI-compatible server, every request's outcome recorded.

What an operator judges discovery by is failed requests, so the traffic tests and benchmarks send real
requests while peers come and go, and count what failed and why. ``Load`` runs a few client threads
that each send one request after another (a closed loop: a slow server slows the load instead of piling
it up) until ``stop()``, a request budget or a time budget, whichever comes first: it always stops by
itself. Only loopback addresses are ever targeted (the servers are this machine's processes).

``chat_completion`` is one OpenAI chat completion over HTTP/1.1, judged the way the tests judge Dynamo's
mocker (whose text is empty: random token ids): HTTP 200, ``object == "chat.completion"``, the model
asked for, a ``finish_reason`` and ``usage``. Anything else is a failure with its reason.
"""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Outcome:
    """One request: when it started (monotonic), how long it took, and whether it succeeded."""

    started: float
    seconds: float
    ok: bool
    reason: str = ""  # why it failed: an HTTP status and body excerpt, or the connection error
    body: Mapping[str, Any] = field(default_factory=dict)


def chat_completion(
    port: int,
    model: str,
    content: str = "w1 w2 w3",
    max_tokens: int = 4,
    host: str = "127.0.0.1",
    timeout: float = 15.0,
    stream: bool = False,
) -> Outcome:
    """POST ``/v1/chat/completions`` to ``host:port`` and judge the answer (see the module docstring)."""
    if not host.startswith("127."):
        raise ValueError(f"only loopback servers are loaded here, not {host}")
    request = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    if stream:  # usage comes in a last chunk only when asked for (OpenAI's semantics)
        request.update(stream=True, stream_options={"include_usage": True})
    started = time.monotonic()
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(request), {"Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read().decode(errors="replace")
        status = response.status
    except (OSError, http.client.HTTPException) as exc:
        return Outcome(started, time.monotonic() - started, False, f"{type(exc).__name__}: {exc}")
    finally:
        connection.close()
    seconds = time.monotonic() - started
    if status != 200:
        return Outcome(started, seconds, False, f"HTTP {status}: {raw[:200]}")
    body = _streamed(raw) if stream else _json(raw)
    problem = _judge(body, model, "chat.completion.chunk" if stream else "chat.completion")
    return Outcome(started, seconds, not problem, problem, body)


def _json(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _streamed(raw: str) -> dict[str, Any]:
    """Server-sent events folded into one answer: the chunks' object and model, the last finish_reason and usage."""
    folded: dict[str, Any] = {"chunks": 0}
    for line in raw.splitlines():
        if not line.startswith("data:") or line.strip() == "data: [DONE]":
            continue
        chunk = _json(line[len("data:") :].strip())
        folded["chunks"] += 1
        for key in ("object", "model"):
            if key in chunk:
                folded[key] = chunk[key]
        if chunk.get("usage"):
            folded["usage"] = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if choice.get("finish_reason"):
                folded["choices"] = [{"finish_reason": choice["finish_reason"]}]
    return folded


def _judge(body: Mapping[str, Any], model: str, kind: str) -> str:
    """Empty when ``body`` is a complete answer for ``model``; else what is wrong with it."""
    choices = body.get("choices") or [{}]
    if body.get("object") != kind:
        return f"object is {body.get('object')!r}, not {kind!r}: {json.dumps(body)[:200]}"
    if body.get("model") != model:
        return f"model is {body.get('model')!r}, not {model!r}"
    if not choices[0].get("finish_reason"):
        return f"no finish_reason: {json.dumps(body)[:200]}"
    if not (body.get("usage") or {}).get("completion_tokens"):
        return f"no usage: {json.dumps(body)[:200]}"
    return ""


class Load:
    """Client threads sending ``send()`` back to back until stopped or out of budget; owns its threads.

    ``max_requests`` and ``max_seconds`` bound every run (the tests' load cannot run away); ``pause`` is
    the think time between one thread's requests (``# poll``-like pacing, not synchronisation).
    """

    def __init__(
        self,
        send: Callable[[], Outcome],
        clients: int = 3,
        max_requests: int = 20_000,
        max_seconds: float = 300.0,
        pause: float = 0.0,
    ) -> None:
        self._send = send
        self._clients = clients
        self._max_requests = max_requests
        self._max_seconds = max_seconds
        self._pause = pause
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards _outcomes
        self._outcomes: list[Outcome] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> Load:
        deadline = time.monotonic() + self._max_seconds
        for index in range(self._clients):
            thread = threading.Thread(target=self._run, args=(deadline,), name=f"load-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self, deadline: float) -> None:
        while not self._stop.is_set() and time.monotonic() < deadline:
            with self._lock:
                if len(self._outcomes) >= self._max_requests:
                    return
            outcome = self._send()
            with self._lock:
                self._outcomes.append(outcome)
            if self._pause:
                self._stop.wait(self._pause)  # think time between requests

    def stop(self) -> list[Outcome]:
        """Stop sending, wait for the requests in flight, and return every outcome in start order."""
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        return self.outcomes()

    def outcomes(self) -> list[Outcome]:
        with self._lock:
            return sorted(self._outcomes, key=lambda o: o.started)

    def count(self) -> int:
        with self._lock:
            return len(self._outcomes)

    def wait_for_more(self, requests: int, timeout: float = 60.0) -> None:
        """Wait until ``requests`` more outcomes than now are recorded (the load is really flowing)."""
        target = self.count() + requests
        deadline = time.monotonic() + timeout
        while self.count() < target:
            if time.monotonic() > deadline or not any(t.is_alive() for t in self._threads):
                raise TimeoutError(f"the load made {self.count()} of {target} requests in {timeout:.0f}s")
            time.sleep(0.05)  # poll


def failures(outcomes: list[Outcome]) -> Counter[str]:
    """Failed requests by reason (the reason's first 80 characters)."""
    return Counter(o.reason[:80] for o in outcomes if not o.ok)


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile by the nearest-rank method (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(fraction * len(ordered)))) - 1]
