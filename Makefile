# dinoscale front door. Every target installs what it needs on first use (a venv in .venv).
#   make sweep MODALITY=xray              demo profile (phantom data, random weights, CPU, minutes)
#   make sweep MODALITY=xray PROFILE=paper  paper profile (real data + weights, GPUs)
#   make rehearse MODALITY=xray           the paper profile on a replica of its dataset (CPU, under a minute)
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
# make ui: the store of `dinoscale ui` (default: --tracking-uri > DINOSCALE_TRACKING_URI > MLFLOW_TRACKING_URI >
# sqlite:///mlruns.db in this folder, the specs' default)
TRACKING_URI ?=
PYTEST_ARGS ?=

BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install sweep rehearse plan validate analyze ui test test-fast lint format clean help protocol

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

# A rehearsal runs a paper spec (PROFILE defaults to paper here) on a replica of its dataset's published layout:
#   make rehearse MODALITY=xray [VARIANT=corrupt_file|bad_label|mask_shape]   (MODALITY: any sweeps/<name>.yaml)
REHEARSE_PROFILE := $(if $(filter command line environment,$(origin PROFILE)),$(PROFILE),paper)
REHEARSE_SPEC    := $(if $(filter command line,$(origin SPEC)),$(SPEC),$(if $(filter paper,$(REHEARSE_PROFILE)),sweeps/$(MODALITY).yaml,sweeps/demo/$(MODALITY).yaml))
rehearse: $(STAMP)
	$(BIN)/dinoscale rehearse $(REHEARSE_SPEC) $(if $(VARIANT),--variant $(VARIANT)) \
		$(if $(DINOSCALE_TRACKING_URI),--tracking-uri $(DINOSCALE_TRACKING_URI))

plan: $(STAMP)
	$(BIN)/dinoscale plan $(SPEC)

validate: $(STAMP)
	$(BIN)/dinoscale validate $(SPEC)

# sweeps/PROTOCOL.md: every protocol constant of the paper profiles (tests check it is current)
protocol: $(STAMP)
	$(BIN)/dinoscale protocol sweeps/xray.yaml sweeps/ct.yaml sweeps/mri.yaml sweeps/wsi.yaml sweeps/em.yaml \
		sweeps/petct.yaml sweeps/kvasir-capsule.yaml sweeps/autolaparo.yaml sweeps/endovis2018.yaml \
		sweeps/camus.yaml sweeps/mri-acdc.yaml sweeps/wsi-bcnb.yaml sweeps/endoscopy-edd2020.yaml \
		sweeps/petct-hecktor.yaml sweeps/em-ac3ac4.yaml sweeps/ct-msd-spleen.yaml sweeps/mri-msd-heart.yaml \
		sweeps/ct-msd-liver.yaml sweeps/mri-msd-hippocampus.yaml sweeps/mri-msd-prostate.yaml sweeps/ct-msd-lung.yaml \
		sweeps/ct-msd-pancreas.yaml sweeps/ct-msd-hepaticvessel.yaml sweeps/ct-msd-colon.yaml --out sweeps/PROTOCOL.md

# The latest sweep of SPEC, reported in reports/<spec name>/ (SWEEP=<parent run id> for another sweep of it)
analyze: $(STAMP)
	$(BIN)/dinoscale analyze $(SPEC) $(if $(SWEEP),--sweep $(SWEEP))

# = dinoscale ui: each sweep's runs-table link first (MLflow 3.17 otherwise opens an experiment on its
# GenAI page), then the MLflow UI (one worker, no job runner)
ui: $(STAMP)
	$(BIN)/dinoscale ui $(if $(TRACKING_URI),--tracking-uri $(TRACKING_URI)) --port $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# ruff: lint rules and formatting in pyproject.toml ([tool.ruff]); CI runs this before the tests
lint: $(STAMP)
	$(BIN)/ruff check dinoscale tests benchmarks cluster
	$(BIN)/ruff format --check dinoscale tests benchmarks cluster

format: $(STAMP)
	$(BIN)/ruff check --fix dinoscale tests benchmarks cluster
	$(BIN)/ruff format dinoscale tests benchmarks cluster

clean:
	rm -rf .dinoscale mlruns.db mlartifacts reports

# ================================================================ clusters (cluster/README.md)
# Owned by the cluster work (issues 8, 19); the targets above are the front door.
#   make cluster-image IMAGE=<registry>/dinoscale:<tag>   build + push the runtime image
#   make cluster-up CLOUD=aws|gcp [IMAGE=...] [MULTI_GPU_NODES=1]   Ray cluster launcher (CLOUD=k8s: KubeRay RayCluster)
#   make cluster-costs                      what Ray would launch for each paper profile, and its $/h
#   make cluster-check                      one-screen check of a live cluster (GPU, storage, tracking, token)
#   make cluster-submit MODALITY=xray PROFILE=paper [RESUME=1]   the sweep as a Ray job on that cluster
#   make cluster-job MODALITY=xray [RESUME=1]   KubeRay: the sweep as a new RayJob (fresh name each time)
#   make cluster-down CLOUD=aws|gcp|k8s
# The Ray job client needs RAY_AUTH_TOKEN in your environment; these targets set RAY_AUTH_MODE=token.
CLOUD         ?= aws
CLUSTER_YAML  ?= cluster/launcher/$(CLOUD).yaml
IMAGE         ?=
# The runtime image's torch is the base image's; by default the build insists on the version CI
# tests (constraints/cpu-dev.txt). TORCH_VERSION= (empty) accepts any base image's torch.
TORCH_VERSION ?= $(shell sed -n 's/^torch==//p' constraints/cpu-dev.txt)
BASE_IMAGE    ?= pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
# 8xA100 node types are off unless asked for (fine-tuning sweeps): cluster/README.md 'Costs'
MULTI_GPU_NODES ?= 0
# AWS: another region than the launcher file's (the AMI is looked up there, secrets read there)
REGION        ?=
K8S_NAMESPACE ?= dinoscale
# Kubernetes: the manifests' placeholder image is replaced by IMAGE (required), and pods get the
# tracking server by its in-cluster Service name (cluster.env's name resolves only on the VMs' private zone).
K8S_IMAGE_SED = -e 's\#ghcr.io/your-org/dinoscale:latest\#$(IMAGE)\#g'
K8S_TRACKING_URI ?= http://mlflow.$(K8S_NAMESPACE).svc.cluster.local:5000
KUBECTL       ?= kubectl
# What the cluster targets need first (the venv); tests run them with CLUSTER_DEPS= and their own BIN.
CLUSTER_DEPS  ?= $(STAMP)
# The head's job server: `make cluster-dashboard` (launcher) or
# `kubectl port-forward svc/dinoscale-head-svc 8265:8265` (KubeRay) forward it here.
RAY_ADDRESS   ?= http://127.0.0.1:8265
# Where the job runs on the head: the image's project folder (specs under sweeps/).
CLUSTER_WORKDIR ?= /opt/dinoscale
# Default: the tracking server named in cluster/cluster.env, read on the head.
CLUSTER_TRACKING_URI ?= $$DINOSCALE_TRACKING_URI
JOB_ID        ?=
# cluster-check: seconds to wait for the autoscaler to bring up a GPU worker
CHECK_GPU_WAIT ?= 900
# KubeRay: a finished RayJob is never rerun, so every submission gets a new name.
ifndef RAYJOB_NAME
RAYJOB_NAME   := dinoscale-$(MODALITY)-$(shell od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
endif
CLUSTER_RENDERED := .dinoscale/cluster-$(CLOUD).yaml

.PHONY: cluster-image cluster-up cluster-down cluster-dashboard cluster-submit cluster-job cluster-status cluster-check cluster-token \
	cluster-costs

# The Ray job client sends the token only with the mode set (else: 401 from the job server).
cluster-submit cluster-status cluster-check: export RAY_AUTH_MODE = token

cluster-token:
	@test -n "$$RAY_AUTH_TOKEN" || { echo "export RAY_AUTH_TOKEN=... (the cluster's token, from your secret store: cluster/README.md 'Secrets')"; exit 2; }

cluster-image:
	@test -n "$(IMAGE)" || { echo "set IMAGE=<registry>/dinoscale:<tag>"; exit 2; }
	docker build -f cluster/Dockerfile --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg TORCH_VERSION=$(TORCH_VERSION) -t $(IMAGE) .
	docker push $(IMAGE)

cluster-up: $(CLUSTER_DEPS)
ifeq ($(CLOUD),k8s)
	$(KUBECTL) create namespace $(K8S_NAMESPACE) --dry-run=client -o yaml | $(KUBECTL) apply -f -
	@test -n "$(IMAGE)" || { echo "set IMAGE=<registry>/dinoscale:<tag> (the image make cluster-image pushed)"; exit 2; }
	@mkdir -p .dinoscale
	sed 's#^DINOSCALE_TRACKING_URI=.*#DINOSCALE_TRACKING_URI=$(K8S_TRACKING_URI)#' cluster/cluster.env > .dinoscale/cluster-k8s.env
	$(KUBECTL) -n $(K8S_NAMESPACE) create configmap dinoscale-config --from-env-file=.dinoscale/cluster-k8s.env \
		--dry-run=client -o yaml | $(KUBECTL) apply -f -
	$(KUBECTL) -n $(K8S_NAMESPACE) apply -f cluster/kuberay/storage.yaml
	sed $(K8S_IMAGE_SED) cluster/kuberay/raycluster.yaml | $(KUBECTL) -n $(K8S_NAMESPACE) apply -f -
else
	@mkdir -p .dinoscale
	$(BIN)/python cluster/scripts/render_launcher.py $(CLUSTER_YAML) $(if $(IMAGE),--image $(IMAGE)) \
		--multi-gpu-nodes $(MULTI_GPU_NODES) $(if $(REGION),--region $(REGION)) \
		$(if $(filter aws,$(CLOUD)),--resolve-ami) > $(CLUSTER_RENDERED)
	$(BIN)/ray up -y $(CLUSTER_RENDERED)
endif

cluster-down: $(CLUSTER_DEPS)
ifeq ($(CLOUD),k8s)
	$(KUBECTL) -n $(K8S_NAMESPACE) delete -f cluster/kuberay/raycluster.yaml --ignore-not-found
else
	$(BIN)/ray down -y $(if $(wildcard $(CLUSTER_RENDERED)),$(CLUSTER_RENDERED),$(CLUSTER_YAML))
endif

cluster-dashboard: $(CLUSTER_DEPS)
	$(BIN)/ray dashboard $(if $(wildcard $(CLUSTER_RENDERED)),$(CLUSTER_RENDERED),$(CLUSTER_YAML))

cluster-status: $(CLUSTER_DEPS) cluster-token
	$(BIN)/ray job list --address $(RAY_ADDRESS)

# What Ray's own autoscaler would launch for each paper profile, and its $/h (prices: cluster/costs.yaml).
cluster-costs: $(CLUSTER_DEPS)
	$(BIN)/python cluster/check/costs.py --ray

# Is the cluster usable? GPU in a worker container, the same shared storage on every node, the
# tracking server from a worker by the cluster's host name, the token. One screen; exit 1 on a problem.
cluster-check: $(CLUSTER_DEPS) cluster-token
	$(BIN)/python cluster/check/cluster_check.py submit --address $(RAY_ADDRESS) --gpu-wait $(CHECK_GPU_WAIT)

# The driver runs on the head (it sees the shared storage); the tracking URI is passed through.
# No --working-dir: the code is in the image (see cluster/README.md, 'Custom specs').
cluster-submit: $(CLUSTER_DEPS) cluster-token
	$(BIN)/ray job submit --address $(RAY_ADDRESS) $(if $(JOB_ID),--submission-id $(JOB_ID)) -- \
		sh -c 'cd $(CLUSTER_WORKDIR) && dinoscale sweep $(SPEC) --address auto --tracking-uri "$(CLUSTER_TRACKING_URI)" $(if $(RESUME),--resume)'

# KubeRay: the sweep as a NEW RayJob on its own cluster, deleted when it ends. `create`, not `apply`:
# a name that exists already fails loudly instead of leaving a finished job "unchanged".
cluster-job:
	@test -n "$(IMAGE)" || { echo "set IMAGE=<registry>/dinoscale:<tag> (the image make cluster-image pushed)"; exit 2; }
	sed $(K8S_IMAGE_SED) -e 's#sweeps/xray.yaml#$(SPEC)#' -e 's#^  name: dinoscale-xray$$#  name: $(RAYJOB_NAME)#' \
		$(if $(RESUME),-e 's#--address auto#--address auto --resume#') cluster/kuberay/rayjob.yaml \
		| $(KUBECTL) -n $(K8S_NAMESPACE) create -f -
	@echo "follow it: $(KUBECTL) -n $(K8S_NAMESPACE) get rayjob $(RAYJOB_NAME) -w"

# Slurm (cluster/README.md 'Slurm'): the sweep as a batch job on a university/hospital cluster, from a
# login node, in this checkout on the shared filesystem. The spec's resources become
# --gres/--cpus-per-task/--mem (cluster/slurm/slurm_ray.py options); a job stopped by its time limit
# submits its follow-up, which resumes (RESUME=auto; 1 always, 0 a new sweep).
#   make slurm-submit SPEC=sweeps/xray.yaml [NODES=2] [GPUS=4] [CPUS=] [MEM_GB=] [TIME=24:00:00] [PARTITION=] [ACCOUNT=]
#   make slurm-options SPEC=...   only print the sbatch options
NODES     ?= 1
GPUS      ?=
CPUS      ?=
MEM_GB    ?=
TIME      ?= 24:00:00
PARTITION ?=
ACCOUNT   ?=
SLURM_ENV = NODES=$(NODES) GPUS=$(GPUS) CPUS=$(CPUS) MEM_GB=$(MEM_GB) TIME=$(TIME) PARTITION=$(PARTITION) \
	ACCOUNT=$(ACCOUNT) PYTHON=$(BIN)/python PATH="$(abspath $(BIN)):$$PATH" $(if $(RESUME),RESUME=$(RESUME))

.PHONY: slurm-submit slurm-options
slurm-submit: $(CLUSTER_DEPS)
	$(SLURM_ENV) cluster/slurm/submit.sh $(SPEC)

slurm-options: $(CLUSTER_DEPS)
	$(BIN)/python cluster/slurm/slurm_ray.py options $(SPEC) --nodes $(NODES) $(if $(GPUS),--gpus $(GPUS)) \
		$(if $(CPUS),--cpus $(CPUS)) $(if $(MEM_GB),--mem-gb $(MEM_GB)) --time $(TIME) \
		$(if $(PARTITION),--partition $(PARTITION)) $(if $(ACCOUNT),--account $(ACCOUNT))

# The Apptainer image for Slurm, converted from the Docker image `make cluster-image` pushed.
SIF ?= dinoscale.sif
.PHONY: slurm-image
slurm-image:
	@test -n "$(IMAGE)" || { echo "set IMAGE=<registry>/dinoscale:<tag> (the image make cluster-image pushed)"; exit 2; }
	apptainer build --build-arg IMAGE=$(IMAGE) $(SIF) cluster/slurm/dinoscale.def
