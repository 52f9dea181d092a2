"""Regenerate ``sidecar/etcd/_pb/`` from ``sidecar/etcd/protos/`` (``python -m sidecar.etcd.generate``).

The stubs are committed so the package installs without a code-generation step, and
``tests/unit/test_etcd_protos.py`` regenerates them into a temporary directory and fails when the
committed files drift from the .proto. Only messages are generated (no services: the client spells
out etcd's method paths). Each file gets a header that exempts it from the linters' rules for
hand-written code: protoc writes long lines, and its .pyi writes bare ``Mapping`` for message fields,
which strict mypy would call a missing type argument.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE / "protos"
PROTO_FILES = ("etcd_v3.proto",)
OUT_DIR = HERE / "_pb"
NOTICE = "# Generated from sidecar/etcd/protos by `python -m sidecar.etcd.generate`; do not edit.\n"
HEADERS = {
    "_pb2.py": "# ruff: noqa\n" + NOTICE,
    "_pb2.pyi": "# ruff: noqa\n# mypy: disable-error-code=\"type-arg\"\n" + NOTICE,
}


def generate(out_dir: pathlib.Path = OUT_DIR) -> list[pathlib.Path]:
    """Run protoc into ``out_dir``; return the files written."""
    from grpc_tools import protoc  # type: ignore[import-untyped]

    with tempfile.TemporaryDirectory() as raw:
        raw_dir = pathlib.Path(raw)
        args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={raw_dir}", f"--pyi_out={raw_dir}", *PROTO_FILES]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written = []
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(raw_dir.iterdir()):
            suffix = next((s for s in HEADERS if path.name.endswith(s)), None)
            if suffix is None:
                continue
            target = out_dir / path.name
            target.write_text(HEADERS[suffix] + path.read_text())
            written.append(target)
    init = out_dir / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated from sidecar/etcd/protos by `python -m sidecar.etcd.generate`; do not edit."""\n')
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
