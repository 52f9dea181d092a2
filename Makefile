# Everyday commands. The two a newcomer needs: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# Every install comes from uv.lock (exact versions and hashes), made and read by one pinned uv. uv itself is
# the one thing installed without it: pip, by hash, from hack/uv.requirements, into ~/.cache.
UV_VERSION := 0.13.8
CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/discovery-sidecar
UV_HOME := $(CACHE_DIR)/uv-$(UV_VERSION)
UV := $(UV_HOME)/bin/uv
# The machine's own Python (never a download), the venv where the Makefile expects it.
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: venv lock lock-upgrade demo demo-etcd test unit integration lint proto-lint proto-release rust-client rust-lint protos version controlplane image cluster-up cluster-down bench bench-check bench-cost bench-rollout clean

$(UV): hack/uv.requirements
	$(PYTHON) -m venv $(UV_HOME)
	$(UV_HOME)/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes -r hack/uv.requirements
	touch $@

# --locked: install exactly uv.lock, and fail (naming `make lock`) if pyproject.toml asks for something else.
$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml uv.lock $(UV)
	$(UV) sync --locked --all-extras --python $(PYTHON)
	touch $@

venv: $(VENV)/.installed

lock: $(UV)           ## re-resolve uv.lock from pyproject.toml, keeping locked versions that still fit
	$(UV) lock --python $(PYTHON)

lock-upgrade: $(UV)   ## re-resolve uv.lock taking the newest versions pyproject.toml allows (then `make protos test`)
	$(UV) lock --upgrade --python $(PYTHON)

demo: venv            ## build/start a local control plane and show live discovery
	$(PY) -m demo

demo-etcd: venv       ## the same on Dynamo's etcd backend: a real etcd, sidecars and a Dynamo worker
	$(PY) -m demo.etcd

test: venv            ## the whole suite, unit and integration (builds the control plane and the Rust client once)
	hack/debian-packages.sh
	$(PY) -m devcluster build
	$(PY) -m devcluster.rust_client
	$(PY) -m pytest

unit: venv
	$(PY) -m pytest tests/unit

integration: venv
	hack/debian-packages.sh
	$(PY) -m devcluster build
	$(PY) -m devcluster.rust_client
	$(PY) -m pytest tests/integration

lint: venv            ## ruff, mypy --strict on sidecar/, actionlint on .github/workflows, the proto contract, the Rust client
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	hack/debian-packages.sh
	$(PY) -m devcluster tool actionlint
	@$(MAKE) --no-print-directory proto-lint rust-lint

# The last released API, as a buf image (protos/releases/vX.Y.Z.binpb, recorded by `make proto-release`).
PROTO_RELEASE = $(lastword $(shell ls protos/releases/v*.binpb | sort -V))
BUF := $(PY) -m devcluster tool buf

proto-lint: venv      ## buf lint protos/, and buf breaking against the last release (builds buf into ~/.cache once)
	$(BUF) lint protos
	$(BUF) breaking protos --against $(PROTO_RELEASE)
	@echo "buf: protos/ passes lint and is compatible with $(PROTO_RELEASE)"

proto-release: venv   ## at a release: record protos/ as the image later versions must stay compatible with
	@test -n "$(VERSION)" || { echo "usage: make proto-release VERSION=x.y.z"; exit 2; }
	$(BUF) build protos --exclude-source-info -o protos/releases/v$(VERSION).binpb

# Cargo builds share one target directory under ~/.cache (every worktree, and CI, reuse what is built).
CARGO_TARGET_DIR ?= $(CACHE_DIR)/cargo-target
export CARGO_TARGET_DIR
# rustup's cargo; ~/.cargo/bin is not on every non-login shell's PATH.
CARGO ?= $(or $(shell command -v cargo),$(HOME)/.cargo/bin/cargo)

rust-client: venv     ## build the Rust example client (clients/rust) into ~/.cache; prints the binary's path
	@$(PY) -m devcluster.rust_client

rust-lint:            ## rustfmt and clippy (warnings are errors) on clients/rust
	cd clients/rust && $(CARGO) fmt --check && $(CARGO) clippy --locked --all-targets -- -D warnings

protos: venv          ## regenerate clients/python/discovery_client/api from protos/ (with the locked grpcio-tools)
	$(PY) scripts/gen_protos.py

version: venv         ## set the release version everywhere: make version VERSION=x.y.z
	$(PY) scripts/set_version.py $(VERSION)

controlplane: venv    ## build kube-apiserver, kube-controller-manager, kubectl, etcd and the Go tools into ~/.cache
	$(PY) -m devcluster build

image: venv           ## build the sidecar's image without Docker into ~/.cache (docs/image.md); prints its reference
	$(PY) -m devcluster.image build

cluster-up: venv      ## leave a control plane running; prints its kubeconfig path
	@$(PY) -m devcluster up

cluster-down: venv
	@$(PY) -m devcluster down

bench: venv
	$(PY) -m bench

# BASE: another checkout (a worktree of main) measured alternately with this one; CHECK_ARGS: --profile, --strict, ...
bench-check: venv     ## the hot path against bench/budget.json in a few minutes (BASE=DIR: before/after); bench/comparisons/
	$(PY) -m devcluster build
	$(PY) -m bench.check $(if $(BASE),--base $(BASE)) $(CHECK_ARGS)

COST_SIZES ?= 100 300 1000
bench-cost: venv      ## API server cost at P pods, every pod watching vs 10 routers (bench/results/COST.md)
	$(PY) -m devcluster build
	$(PY) -m bench.cost --sizes $(COST_SIZES) --max-restarts 100

ROLLOUT_SIZES ?= 100 300 1000
bench-rollout: venv   ## a real rollout through kwok: every pod watching vs 10 routers (bench/results/ROLLOUT.md)
	$(PY) -m devcluster build
	$(PY) -m bench.rollout --sizes $(ROLLOUT_SIZES)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis .ruff_cache .mypy_cache
