"""The client distribution declares what its committed stubs need, and nothing of the daemon."""

from __future__ import annotations

import pathlib
import re
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "python"
STUBS = CLIENT / "discovery_client" / "api" / "discovery" / "v1"


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    return {Requirement(r).name: Requirement(r) for r in project["dependencies"]}


def test_it_depends_on_grpcio_and_protobuf_only() -> None:
    assert set(_requirements()) == {"grpcio", "protobuf"}


def test_the_grpcio_floor_admits_no_version_the_stubs_refuse() -> None:
    """The generated service module raises at import on a grpcio older than the one that generated it."""
    generated = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", (STUBS / "discovery_pb2_grpc.py").read_text())
    assert generated
    floor = Version(generated.group(1))
    specifier = _requirements()["grpcio"].specifier
    assert floor in specifier, f"grpcio {floor} (the generator) must be allowed: {specifier}"
    assert all(s.operator != ">=" or Version(s.version) >= floor for s in specifier), (
        f"the floor in {specifier} is below {floor}, which the committed stubs require"
    )


def test_the_protobuf_floor_admits_no_version_the_stubs_refuse() -> None:
    """The generated message module validates the protobuf runtime against its gencode version."""
    text = (STUBS / "discovery_pb2.py").read_text()
    found = re.search(r"ValidateProtobufRuntimeVersion\(\s*\S+PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", text)
    assert found
    gencode = Version(".".join(found.groups()))
    specifier = _requirements()["protobuf"].specifier
    assert gencode in specifier
    assert all(s.operator != ">=" or Version(s.version) >= gencode for s in specifier), (
        f"the floor in {specifier} is below {gencode}, which the committed stubs require"
    )


def test_the_sidecar_pins_the_client_of_its_own_release() -> None:
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    pins = [Requirement(r) for r in root["dependencies"] if Requirement(r).name == "discovery-sidecar-client"]
    assert [str(p.specifier) for p in pins] == [f"=={client['version']}"] and client["version"] == root["version"]
