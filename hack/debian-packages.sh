#!/usr/bin/env bash
# Installs the Debian packages the tests and lint need when they are missing (idempotent, quiet when all are
# there). Called by `make test`, `make integration` and `make lint`, so the README's two commands work on a
# fresh machine of this kind (Debian, root). The image test builds the sidecar's image without Docker and
# runs it with podman (docs/image.md); actionlint runs shellcheck on the workflows' scripts.
set -euo pipefail
missing=()
for tool in mmdebstrap umoci skopeo podman runc shellcheck; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ "${#missing[@]}" -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "missing tools: ${missing[*]}; install Debian's packages of the same names (as root: apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "[debian-packages] installing ${missing[*]} (about 40 s on a fresh machine)" >&2
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
