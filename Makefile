# ptm — the two set-up commands are `make demo` and `make test`; each installs what it needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
EXTRAS := operator,serve,convert,dev
PYTEST_ARGS ?=

.PHONY: help venv helm node-deps images image-layers cluster-bins cluster-up cluster-down cluster-status crd lint test test-unit demo demo-down down clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP) ## create .venv with every extra (torch included; reused when pyproject.toml is unchanged)

cluster-bins: ## build etcd, the control plane, kubelet, kube-proxy, kubectl, kwok (cached)
	dev/k8s/build.sh etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok kubelet kube-proxy

node-deps: ## containerd, runc, CNI plugins, iptables, debootstrap from Debian's packages (once)
	dev/node/install.sh

image-layers: venv node-deps ## build the pause, convert and serve image layers without Docker (cached by content)
	$(PY) -m ptm_operator.devcluster.images build

images: venv cluster-bins node-deps ## build the images and load them into the real node (starts it)
	$(PY) -m ptm_operator.devcluster images

helm: ## build helm and the chart's monitoring-object checker from their Go modules (cached)
	dev/helm/build.sh
	dev/helm/monitoringcheck/build.sh

cluster-up: venv cluster-bins node-deps ## start the local cluster on 127.0.0.1 with its real node (no-op when up)
	$(PY) -m ptm_operator.devcluster up --real-node

cluster-down: venv ## stop the local cluster (exactly the PIDs it started)
	$(PY) -m ptm_operator.devcluster down

cluster-status: venv ## show the local cluster's components
	$(PY) -m ptm_operator.devcluster status

lint: venv ## ruff + mypy --strict on both packages, and the committed CRD is current
	$(VENV)/bin/ruff check operator runtime_image tests bench
	$(VENV)/bin/ruff format --check operator runtime_image tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/ptm crd --check

crd: venv ## regenerate crds/ and the chart's copy from the pydantic models
	$(VENV)/bin/ptm crd

test: venv cluster-bins helm node-deps lint image-layers ## lint, then every test (starts the cluster itself)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-unit: venv ## the fast tests that need no cluster
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

demo: venv cluster-bins node-deps ## the local cluster with a real node, the operator, and the MiniLM story
	$(PY) -m ptm_operator.demo

demo-down: venv ## stop what `make demo` started (the operator, the real node's pods, the cluster)
	$(PY) -m ptm_operator.demo down

down: demo-down ## alias of demo-down

clean: ## remove the venv and caches (the cluster binary cache in ~/.cache/ptm stays)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
