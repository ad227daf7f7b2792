# The README's commands. Everything runs from .venv, created on first use; nothing needs activating.
#   make sandbox   set up .venv if needed, then run the sandbox end to end (the README's main job)
#   make test      set up .venv if needed, then run every test (the README's test command; CI runs it)
#   make lab       open the notebooks in JupyterLab
#   make export    notebooks -> package (nbdev_export) and clean notebook metadata (nbdev_clean)
#   make outputs   re-execute notebooks so their committed outputs match the code (N=nbs/00_core.ipynb for one)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
N      ?= nbs/[0-9]*.ipynb nbs/index.ipynb

.PHONY: install sandbox reward-study dpo-study bench-sandbox gpu-smoke test sync-check nbtest pytest export outputs lab

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# reinstall only when the dependencies change
$(VENV)/.installed: settings.ini setup.py | $(BIN)/python
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/pip check
	touch $@

install: $(VENV)/.installed

test: sync-check nbtest pytest

# speed of the shipped sandbox generator: 64 images at the shipped settings (target: <= 30 s on 2 CPU cores)
bench-sandbox: install
	$(BIN)/python -c "from instructengine.sandbox_generator import benchmark_generation; print(benchmark_generation(64, repeats=3))"

# speed only, on a GPU: the whole batch on an SD v1.5-architecture pipeline with random weights (configs/sd15-smoke.yaml),
# saved once to runs/sd15-random; report.md gives the wall time of every stage (ARCH=sdxl for SDXL's architecture)
ARCH ?= sd15
gpu-smoke: install
	test -d runs/$(ARCH)-random || $(BIN)/python -c "from instructengine.bench_diffusion import random_pipeline; random_pipeline('runs/$(ARCH)-random', '$(ARCH)')"
	$(BIN)/instructengine batch sd15-smoke --name $(ARCH)-smoke --set generate.model=runs/$(ARCH)-random --set dpo.model=runs/$(ARCH)-random --set evaluate.model=runs/$(ARCH)-random

# the main job: the whole sandbox pipeline through the batch runner (configs/sandbox.yaml) into runs/sandbox/: the executed
# notebooks, instructions, images, annotations, pairs and quads, the reward model, the LoRA, eval/, metrics.json and report.md,
# which it prints (the ShapesBench table before and after alignment at its end). A rerun skips the stages that finished.
sandbox: install
	$(BIN)/instructengine batch sandbox

# the reward model's sandbox study (configs/reward-study.yaml): a second run with 6 images per side of every pair (oracle-
# annotated), then MPS and its ablations (no condition mask, no cross-attention, one model per dimension) trained with one
# recipe, about 30 min on 2 CPU cores; a rerun skips the stages that finished with the same parameters.
# The data's size and the training are variables: make reward-study STUDY=runs/reward-big PAIRS=20 IMAGES=4 STEPS=3000 ABLATIONS=False
STUDY ?= runs/reward-study
PAIRS ?= 5
IMAGES ?= 6
STEPS ?= 1000
ABLATIONS ?= True
study := $(patsubst %/,%,$(STUDY))
reward-study: install
	$(BIN)/instructengine batch reward-study --runs $(dir $(study)) --name $(notdir $(study)) \
		--set taxonomy.pairs_per_subtopic=$(PAIRS) --set generate.images_per_instruction=$(IMAGES) \
		--set reward.max_steps=$(STEPS) --set reward.ablations=$(ABLATIONS)
	@$(BIN)/python -c "import json, pandas as pd; m = json.load(open('$(study)/reward/metrics.json')); \
		print(pd.DataFrame(m['ablations']).round(3).to_string() if 'ablations' in m else pd.Series(m['accuracy']).round(3).to_string())"

# cross-validation DPO's sandbox study (configs/sandbox-ablation.yaml): a data run with 10 instruction pairs a subtopic and
# 4 images a side, every image pair that passes the oracle's follows_own rule a quad, then cross-validation, plain
# Diffusion-DPO (image side), the text side and SFT on the winners, each for 3 seeds at an equal image budget, scored on
# ShapesBench; runs/sandbox-ablation/report.md holds the table (about 1 h on 2 CPU cores)
dpo-study: install
	$(BIN)/instructengine batch sandbox-ablation

# the package and the notebooks must be in sync: exporting and cleaning must not change the tree
sync-check: install
	tools/sync_check.sh $(BIN)

# The stage notebooks (02_taxonomy onwards) feed one another through ../runs/smoke, so they run one at a time, in
# order; the others run in parallel beside them.
nbtest: install
	@$(BIN)/nbdev_test --skip_file_re '^(_|\.|0[2-9])' & other=$$!; \
	$(BIN)/nbdev_test --file_re '^0[2-9].*\.ipynb$$' --n_workers 1; stages=$$?; \
	wait $$other; rest=$$?; \
	if [ $$stages -ne 0 ] || [ $$rest -ne 0 ]; then echo "nbdev_test failed (stage notebooks: $$stages, others: $$rest)"; exit 1; fi

# pytest exits 5 when it collects nothing: fine only while tests/ holds no test files
pytest: install
	@$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ] && ! ls tests/test_*.py >/dev/null 2>&1; then echo "pytest: tests/ holds no tests yet"; rc=0; fi; \
	exit $$rc

export: install
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean

outputs: install
	$(BIN)/python tools/run_notebooks.py $(N)
	$(BIN)/nbdev_clean

lab: install
	$(BIN)/jupyter lab nbs $(if $(filter 0,$(shell id -u)),--allow-root)
