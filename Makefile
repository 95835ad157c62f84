# dinoscale front door. Every target installs what it needs on first use (a venv in .venv).
#   make sweep MODALITY=xray              demo profile (phantom data, random weights, CPU, minutes)
#   make sweep MODALITY=xray PROFILE=paper  paper profile (real data + weights, GPUs)
#   make test                             the test suite (what CI runs)

MODALITY ?= xray
PROFILE  ?= demo
SPEC     ?= $(if $(filter paper,$(PROFILE)),sweeps/$(MODALITY).yaml,sweeps/demo/$(MODALITY).yaml)
ADDRESS  ?=
RESUME   ?=
PORT     ?= 5000
PYTHON   ?= python3
VENV     ?= .venv
# Dev/CI constraints pin this machine's torch build; on a GPU box: make install CONSTRAINTS=
CONSTRAINTS ?= constraints/cpu-dev.txt
TRACKING_URI ?= sqlite:///$(CURDIR)/mlruns.db
PYTEST_ARGS ?=

BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install sweep plan validate analyze ui test test-fast lint format clean help protocol

help:
	@sed -n '1,5p' Makefile

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	touch $@

install: $(STAMP)

sweep: $(STAMP)
	$(BIN)/dinoscale sweep $(SPEC) $(if $(ADDRESS),--address $(ADDRESS)) $(if $(RESUME),--resume) \
		$(if $(DINOSCALE_TRACKING_URI),--tracking-uri $(DINOSCALE_TRACKING_URI))

plan: $(STAMP)
	$(BIN)/dinoscale plan $(SPEC)

validate: $(STAMP)
	$(BIN)/dinoscale validate $(SPEC)

# sweeps/PROTOCOL.md: every protocol constant of the paper profiles (tests check it is current)
protocol: $(STAMP)
	$(BIN)/dinoscale protocol sweeps/xray.yaml sweeps/ct.yaml sweeps/mri.yaml sweeps/wsi.yaml sweeps/em.yaml \
		sweeps/petct.yaml --out sweeps/PROTOCOL.md

analyze: $(STAMP)
	$(BIN)/dinoscale analyze $(SPEC)

ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri $(TRACKING_URI) \
		--host 127.0.0.1 --port $(PORT) --workers 1

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# ruff: lint rules and formatting in pyproject.toml ([tool.ruff]); CI runs this before the tests
lint: $(STAMP)
	$(BIN)/ruff check dinoscale tests benchmarks
	$(BIN)/ruff format --check dinoscale tests benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix dinoscale tests benchmarks
	$(BIN)/ruff format dinoscale tests benchmarks

clean:
	rm -rf .dinoscale mlruns.db mlartifacts reports

# ================================================================ clusters (cluster/README.md)
# Owned by the cluster work (issue 8); the targets above are the front door.
#   make cluster-up CLOUD=aws|gcp [IMAGE=...]    Ray cluster launcher (CLOUD=k8s: KubeRay RayCluster)
#   make cluster-submit MODALITY=xray PROFILE=paper [RESUME=1]   the sweep as a Ray job on that cluster
#   make cluster-down CLOUD=aws|gcp
CLOUD         ?= aws
CLUSTER_YAML  ?= cluster/launcher/$(CLOUD).yaml
IMAGE         ?=
BASE_IMAGE    ?= pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
K8S_NAMESPACE ?= dinoscale
# The head's job server: `make cluster-dashboard` (launcher) or
# `kubectl port-forward svc/dinoscale-head-svc 8265:8265` (KubeRay) forward it here.
RAY_ADDRESS   ?= http://127.0.0.1:8265
# Where the job runs on the head: the image's project folder (specs under sweeps/).
CLUSTER_WORKDIR ?= /opt/dinoscale
# Default: the tracking server named in cluster/cluster.env, read on the head.
CLUSTER_TRACKING_URI ?= $$DINOSCALE_TRACKING_URI
JOB_ID        ?=
CLUSTER_RENDERED := .dinoscale/cluster-$(CLOUD).yaml

.PHONY: cluster-image cluster-up cluster-down cluster-dashboard cluster-submit cluster-job cluster-status

cluster-image:
	@test -n "$(IMAGE)" || { echo "set IMAGE=<registry>/dinoscale:<tag>"; exit 2; }
	docker build -f cluster/Dockerfile --build-arg BASE_IMAGE=$(BASE_IMAGE) -t $(IMAGE) .
	docker push $(IMAGE)

cluster-up: $(STAMP)
ifeq ($(CLOUD),k8s)
	kubectl create namespace $(K8S_NAMESPACE) --dry-run=client -o yaml | kubectl apply -f -
	kubectl -n $(K8S_NAMESPACE) create configmap dinoscale-config --from-env-file=cluster/cluster.env \
		--dry-run=client -o yaml | kubectl apply -f -
	kubectl -n $(K8S_NAMESPACE) apply -f cluster/kuberay/storage.yaml -f cluster/kuberay/raycluster.yaml
else
	@mkdir -p .dinoscale
	sed $(if $(IMAGE),-e 's#^  image: .*#  image: $(IMAGE)#') $(CLUSTER_YAML) > $(CLUSTER_RENDERED)
	$(BIN)/ray up -y $(CLUSTER_RENDERED)
endif

cluster-down: $(STAMP)
ifeq ($(CLOUD),k8s)
	kubectl -n $(K8S_NAMESPACE) delete -f cluster/kuberay/raycluster.yaml --ignore-not-found
else
	$(BIN)/ray down -y $(if $(wildcard $(CLUSTER_RENDERED)),$(CLUSTER_RENDERED),$(CLUSTER_YAML))
endif

cluster-dashboard: $(STAMP)
	$(BIN)/ray dashboard $(if $(wildcard $(CLUSTER_RENDERED)),$(CLUSTER_RENDERED),$(CLUSTER_YAML))

cluster-status: $(STAMP)
	$(BIN)/ray job list --address $(RAY_ADDRESS)

# The driver runs on the head (it sees the shared storage); the tracking URI is passed through.
# No --working-dir: the code is in the image (see cluster/README.md, 'Custom specs').
cluster-submit: $(STAMP)
	$(BIN)/ray job submit --address $(RAY_ADDRESS) $(if $(JOB_ID),--submission-id $(JOB_ID)) -- \
		sh -c 'cd $(CLUSTER_WORKDIR) && dinoscale sweep $(SPEC) --address auto --tracking-uri "$(CLUSTER_TRACKING_URI)" $(if $(RESUME),--resume)'

# KubeRay: the sweep as a RayJob on its own cluster, deleted when it ends.
cluster-job:
	sed -e 's#sweeps/xray.yaml#$(SPEC)#' -e 's#name: dinoscale-xray#name: dinoscale-$(MODALITY)#' \
		$(if $(RESUME),-e 's#--address auto#--address auto --resume#') cluster/kuberay/rayjob.yaml \
		| kubectl -n $(K8S_NAMESPACE) apply -f -
