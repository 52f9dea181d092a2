"""Regenerate the committed Python stubs from protos/ (``make protos``).

The stubs are committed so the client installs without a code-generation step; they live in the client
distribution (``clients/python``, package ``discovery_client.api``), which the sidecar depends on. The
test ``tests/unit/test_protos_in_sync.py`` regenerates them into a temporary directory and fails when the
committed files have drifted from the .proto. The generator is the grpcio-tools pinned in ``uv.lock``
(the dev extra), so the comparison changes only when the lock does. protoc writes imports relative to the
proto root (``from discovery.v1 import ...``); they are rewritten to live under ``discovery_client.api``.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_FILES = ["discovery/v1/discovery.proto"]
PACKAGE_ROOT = "discovery_client.api"
STUBS_DIR = ROOT / "clients" / "python" / "discovery_client" / "api"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Run protoc into ``out_dir`` (the directory standing for ``STUBS_DIR``); return the files."""
    import grpc_tools

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as raw:
        raw_dir = pathlib.Path(raw)
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={raw_dir}",
            f"--pyi_out={raw_dir}",
            f"--grpc_python_out={raw_dir}",
            *PROTO_FILES,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written = []
        for path in sorted(raw_dir.rglob("*")):
            if not path.name.endswith(GENERATED_SUFFIXES):
                continue
            text = re.sub(r"^from discovery\.", f"from {PACKAGE_ROOT}.discovery.", path.read_text(), flags=re.M)
            target = out_dir / path.relative_to(raw_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            written.append(target)
    for directory in {p.parent for p in written} | {out_dir / "discovery"}:
        init = directory / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated from protos/ by scripts/gen_protos.py; do not edit."""\n')
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=STUBS_DIR)
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
