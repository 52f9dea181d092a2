"""``python -m devcluster build|up|down|status|tool`` (behind ``make cluster-up`` / ``make cluster-down``).

``tool NAME ARGS...`` runs one of the Go tools (``devcluster.build.GO_TOOLS``, e.g. actionlint for
``make lint``), building only that tool first if it is missing.

``up`` leaves a control plane running in the background, detached from this process, and prints
the path of its kubeconfig; ``down`` stops it. The running one is described by a state file, so a
second ``up`` says where the first one is instead of starting another.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import time

from devcluster.build import CACHE_ROOT, ensure_built, ensure_tool
from devcluster.cluster import ControlPlane

RUN_DIR = CACHE_ROOT / "cluster"
STATE_FILE = RUN_DIR / "state.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _running_state() -> dict | None:
    if not STATE_FILE.exists():
        return None
    state = json.loads(STATE_FILE.read_text())
    return state if any(_alive(pid) for pid in state["pids"].values()) else None


def up() -> int:
    state = _running_state()
    if state is not None:
        print(f"a control plane is already running; kubeconfig: {state['kubeconfig']}", file=sys.stderr)
        print(state["kubeconfig"])
        return 0
    bin_dir = ensure_built()
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    plane = ControlPlane(bin_dir=bin_dir, work_dir=RUN_DIR, tie_to_parent=False)
    plane.start()
    state = {"kubeconfig": str(plane.kubeconfig), "server": plane.server, "pids": plane.pids(), "bin_dir": str(bin_dir)}
    STATE_FILE.write_text(json.dumps(state, indent=2))
    print(f"control plane running at {plane.server}; stop it with `make cluster-down`", file=sys.stderr)
    print(f"  export KUBECONFIG={plane.kubeconfig}; export PATH={bin_dir}:$PATH", file=sys.stderr)
    print(plane.kubeconfig)
    return 0


def down() -> int:
    if not STATE_FILE.exists():
        print("no control plane is running", file=sys.stderr)
        return 0
    state = json.loads(STATE_FILE.read_text())
    for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
        pid = state["pids"].get(name)
        if pid is None:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)  # poll: not our child, so there is nothing to wait() on
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    print("control plane stopped", file=sys.stderr)
    return 0


def status() -> int:
    state = _running_state()
    if state is None:
        print("no control plane is running")
        return 1
    print(json.dumps(state, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster", description=__doc__)
    parser.add_argument("command", choices=["build", "up", "down", "status", "tool"])
    parser.add_argument("tool_args", nargs=argparse.REMAINDER, help="tool: its name, then its arguments")
    args = parser.parse_args(argv)
    if args.command == "build":
        print(ensure_built())
        return 0
    if args.command == "tool":
        if not args.tool_args:
            parser.error("tool: name the tool (e.g. actionlint)")
        name, *rest = args.tool_args
        executable = ensure_tool(name)
        sys.stdout.flush()
        os.execv(executable, [name, *rest])
    elif args.tool_args:
        parser.error(f"{args.command} takes no arguments")
    return {"up": up, "down": down, "status": status}[args.command]()


if __name__ == "__main__":
    sys.exit(main())
