"""The demo (the README's "try it locally") runs to the end and shows every step of the story, including a chat
completion answered by Dynamo's own frontend from mocker workers that the frontend's sidecar lists."""

from __future__ import annotations

import subprocess
import sys

import pytest

from devcluster.build import ROOT

pytestmark = pytest.mark.integration


def test_demo_runs_and_shows_live_changes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "demo", "--pace", "0"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    expected_in_order = [
        "# snapshot at revision",
        "added\tdecode-1",
        "removed\tprefill-1",
        "added\tprefill-1",
        "updated\tdecode-0",
        "removed\tdecode-1",
        "status\tdegraded",
        "status\tconnected",
        "discovery-sidecar peers --watch --model tiny-chat",
        '"object": "chat.completion", "model": "tiny-chat", "finish_reason": "length", "usage": {',
        "removed\tworker-1",
        "the next chat completion goes to worker-0: ok",
        "cleaned up",
    ]
    positions = [out.find(fragment) for fragment in expected_in_order]
    assert all(p >= 0 for p in positions), dict(zip(expected_in_order, positions, strict=True))
    assert positions == sorted(positions), "the watch must show the steps in the order they happened"
    final_table = out[out.rfind("final peer set") :]
    assert (
        "decode-0" in final_table and "prefill-1" in final_table and "decode-1" not in final_table.split("kubectl")[0]
    )
