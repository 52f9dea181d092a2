"""Set the release version everywhere it is written (``make version VERSION=x.y.z``).

``pyproject.toml``'s ``[project] version`` is the version; the others repeat it because their formats
cannot read it: the client distribution (released in lockstep, and pinned by the sidecar's dependency),
the image label's default, the Helm chart's ``version``/``appVersion`` and image tag where the chart
exists. ``tests/unit/test_version.py`` fails when any of them disagrees, so a hand edit cannot drift.
"""

from __future__ import annotations

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
VERSION = re.compile(r"\d+\.\d+\.\d+(?:[-.]?(?:a|b|rc|dev)\d+)?")

# (file, pattern whose group 1 is the version); every pattern must match exactly once where the file exists.
PLACES: list[tuple[str, str]] = [
    ("pyproject.toml", r'(?m)^version = "([^"]+)"'),
    ("pyproject.toml", r'"discovery-sidecar-client==([^"]+)"'),
    ("clients/python/pyproject.toml", r'(?m)^version = "([^"]+)"'),
    ("Dockerfile", r"(?m)^ARG VERSION=(\S+)$"),
    ("charts/discovery-sidecar/Chart.yaml", r"(?m)^version: (\S+)$"),
    ("charts/discovery-sidecar/Chart.yaml", r'(?m)^appVersion: "?([^"\s]+)"?$'),
    # the injected sidecar's default image (the template, and the kustomize component generated from it)
    ("sidecar/app/injection/template.yaml", r"(?m)^  image: ghcr\.io/example/discovery-sidecar:(\S+)$"),
    ("manifests/components/injection/injection.yaml", r"(?m)^  image: ghcr\.io/example/discovery-sidecar:(\S+)$"),
    # the relay's image (the component, and the chart's copy of it)
    ("manifests/components/relay/relay.yaml", r"(?m)^          image: ghcr\.io/example/discovery-sidecar:(\S+)$"),
    ("charts/discovery-sidecar/files/relay.yaml", r"(?m)^          image: ghcr\.io/example/discovery-sidecar:(\S+)$"),
]


def written_versions() -> dict[str, str]:
    """Where the version is written and what it says there (``file: pattern`` -> version)."""
    found = {}
    for name, pattern in PLACES:
        path = ROOT / name
        if not path.exists():
            continue
        matches = re.findall(pattern, path.read_text())
        if len(matches) != 1:
            raise SystemExit(f"{name}: expected one match of {pattern!r}, found {len(matches)}")
        found[f"{name}: {pattern}"] = matches[0]
    return found


def set_version(version: str) -> list[str]:
    if not VERSION.fullmatch(version):
        raise SystemExit(f"not a release version: {version!r} (expected e.g. 1.2.3 or 1.2.3rc1)")
    changed = []
    for name, pattern in PLACES:
        path = ROOT / name
        if not path.exists():
            continue
        text = path.read_text()
        new = re.sub(pattern, lambda m: m.group(0).replace(m.group(1), version), text)
        if new != text:
            path.write_text(new)
            changed.append(name)
    return sorted(set(changed))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: make version VERSION=x.y.z", file=sys.stderr)
        return 2
    for name in set_version(argv[0]):
        print(f"wrote {argv[0]} to {name}")
    print("now: make lock (the lock records both packages' versions), add a CHANGELOG.md section, commit")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
