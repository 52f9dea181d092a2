"""The etcd demo (``make demo-etcd``) runs to the end and shows every step of its story, in order."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from devcluster.build import ROOT

pytestmark = pytest.mark.integration


def test_etcd_demo_runs_and_shows_live_changes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "demo.etcd", "--pace", "0"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    ids = dict(re.findall(r"\[demo-etcd\]\s+(\S+): its sidecar holds lease ([0-9a-f]+)", out))
    dynamo = re.search(r"Dynamo's worker: instance ID \d+ \(its lease ([0-9a-f]+)\)", out)
    assert set(ids) == {"router-0", "prefill-0", "decode-0", "decode-1"} and dynamo is not None, out[-3000:]
    expected_in_order = [
        "# snapshot at revision",
        f"added\t{ids['decode-1']}",
        f"updated\t{ids['decode-0']}",
        f"added\t{dynamo.group(1)}",
        f"removed\t{ids['decode-1']}",
        "status\tdegraded",
        "status\tconnected",
        "cleaned up",
    ]
    positions = [out.find(fragment) for fragment in expected_in_order]
    assert all(p >= 0 for p in positions), dict(zip(expected_in_order, positions, strict=True))
    assert positions == sorted(positions), "the watch must show the steps in the order they happened"
    final = out[out.rfind("final peer set") :]
    for name in ("prefill-0", "decode-0"):  # kept their leases across the etcd restart
        assert f"v1/instances/demo/{name.split('-')[0]}/generate/{ids[name]}" in final
    assert f"v1/instances/demo/backend/generate/{dynamo.group(1)}" in final
    assert ids["decode-1"] not in final
