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

.PHONY: install sweep plan validate analyze ui test test-fast clean help

help:
	@sed -n '1,5p' Makefile

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	touch $@

install: $(STAMP)

sweep: $(STAMP)
	$(BIN)/dinoscale sweep $(SPEC) $(if $(ADDRESS),--address $(ADDRESS)) $(if $(RESUME),--resume)

plan: $(STAMP)
	$(BIN)/dinoscale plan $(SPEC)

validate: $(STAMP)
	$(BIN)/dinoscale validate $(SPEC)

analyze: $(STAMP)
	$(BIN)/dinoscale analyze $(SPEC)

ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri $(TRACKING_URI) \
		--host 127.0.0.1 --port $(PORT) --workers 1

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf .dinoscale mlruns.db mlartifacts reports
