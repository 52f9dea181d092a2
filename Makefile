# Everyday commands. The two a newcomer needs: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo demo-etcd test unit integration lint protos controlplane cluster-up cluster-down bench bench-cost clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $@

venv: $(VENV)/.installed

demo: venv            ## build/start a local control plane and show live discovery
	$(PY) -m demo

demo-etcd: venv       ## the same on Dynamo's etcd backend: a real etcd, sidecars and a Dynamo worker
	$(PY) -m demo.etcd

test: venv            ## the whole suite, unit and integration (builds the control plane once)
	$(PY) -m devcluster build
	$(PY) -m pytest

unit: venv
	$(PY) -m pytest tests/unit

integration: venv
	$(PY) -m devcluster build
	$(PY) -m pytest tests/integration

lint: venv            ## ruff, then mypy --strict on sidecar/ (settings in pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

protos: venv          ## regenerate sidecar/api from protos/
	$(PY) scripts/gen_protos.py

controlplane: venv    ## build kube-apiserver, kube-controller-manager, kubectl, etcd into ~/.cache
	$(PY) -m devcluster build

cluster-up: venv      ## leave a control plane running; prints its kubeconfig path
	@$(PY) -m devcluster up

cluster-down: venv
	@$(PY) -m devcluster down

bench: venv
	$(PY) -m bench

COST_SIZES ?= 100 300 1000
bench-cost: venv      ## API server cost at P pods, every pod watching vs 10 routers (bench/results/COST.md)
	$(PY) -m devcluster build
	$(PY) -m bench.cost --sizes $(COST_SIZES) --max-restarts 100

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis .ruff_cache .mypy_cache
