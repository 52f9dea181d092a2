"""What both demos share: how a story is told (``say``), where its logs go, and how it is run.

A demo is a class made from a work directory and a pace, with ``run`` (the story) and ``cleanup``
(always called, also after Ctrl-C). ``run_story`` parses the common flags and does the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

from devcluster.waiting import wait_for


class Story(Protocol):
    def run(self) -> None: ...

    def cleanup(self) -> None: ...


@contextlib.contextmanager
def work_dir(keep: bool, prefix: str, say: Callable[[str], None]) -> Iterator[pathlib.Path]:
    """A temporary directory for the demo's logs, or a kept one (its path said) with ``--keep-logs``."""
    if keep:
        path = pathlib.Path(tempfile.mkdtemp(prefix=prefix))
        say(f"work directory (kept): {path}")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as path:
        yield pathlib.Path(path)


def run_story(
    prog: str,
    description: str,
    make: Callable[[pathlib.Path, float], Story],
    say: Callable[[str], None],
    argv: list[str] | None = None,
) -> int:
    """Parse ``--pace`` and ``--keep-logs``, run the story, always clean up; the process's exit code."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--pace",
        type=float,
        default=float(os.environ.get("DEMO_PACE", "1.5")),
        help="seconds to pause between steps (0 for tests)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the work directory with all logs")
    args = parser.parse_args(argv)
    with work_dir(args.keep_logs, f"discovery-{prog.split()[-1].replace('.', '-')}-", say) as path:
        story = make(path, args.pace)
        try:
            story.run()
        except KeyboardInterrupt:
            say("interrupted")
            return 130
        finally:
            story.cleanup()
    say("done")
    return 0


DIM, RESET = ("\x1b[2m", "\x1b[0m") if sys.stdout.isatty() else ("", "")


class PeerWatch:
    """``discovery-sidecar peers --watch`` as a subprocess, its lines echoed (dimmed) and kept to wait on.

    Owns the process and its reader thread; ``stop`` ends both.
    """

    def __init__(self, target: str, *extra: str) -> None:
        self.argv = [sys.executable, "-m", "sidecar.app.cli", "peers", "--watch", "--target", target, *extra]
        self.lines: list[str] = []
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> PeerWatch:
        self.process = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._echo, daemon=True).start()
        return self

    def _echo(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            print(f"   {DIM}peers --watch |{RESET} {line.rstrip()}", flush=True)

    def wait_line(self, fragment: str, timeout: float = 60.0) -> None:
        wait_for(lambda: any(fragment in line for line in self.lines), timeout, what=f"watch output {fragment!r}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
