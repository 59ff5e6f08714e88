# GNU make. Everything runs in ./.venv, made on first use; `make help` lists the targets.
#
#   make demo     tinytales -> a 4-layer GPT trained on the CPU -> samples and out/tiny/loss.png
#   make test     the test suite (what CI runs)
#
# torch: a torch already in .venv is kept, so to use a CUDA/ROCm/MPS build, pip install it into .venv first.
# Otherwise the build $(TORCH_LOCAL) is taken if it lies on local disk (pip's find-links: on our dev and CI
# machines, a CPU build), else requirements.txt's torch from your index.

PYTHON ?= python3
PY := .venv/bin/python
PIP := $(PY) -m pip
TORCH_LOCAL ?= torch==2.13.0
OUT := out/tiny
DATA := data/tinytales
PROMPT ?= Once upon a time
TRAIN_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help demo test clean

help:
	@echo "make demo    install into .venv, prepare data/tinytales, train the tiny preset on the CPU (minutes),"
	@echo "             print samples and write $(OUT)/loss.png; run again, it reuses all that and is quick"
	@echo "             (extra train.py flags: make demo TRAIN_ARGS='--max-steps 300')"
	@echo "make test    install requirements-test.txt into .venv and run the tests (python -m pytest -q -n auto)"
	@echo "make clean   delete the demo's $(OUT) and $(DATA) and caches; other runs, datasets and .venv stay"
	@echo "make help    this list"

$(PY):
	$(PYTHON) -m venv .venv

# The stamps are newer than the requirements they installed: a second make installs nothing.
.venv/.requirements.stamp: requirements.txt | $(PY)
	@if v=$$($(PY) -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null); then \
		echo "torch $$v is in .venv: kept"; \
	elif $(PIP) install -q --no-index --no-deps "$(TORCH_LOCAL)" >/dev/null 2>&1; then \
		echo "installed $(TORCH_LOCAL) from local disk (its dependencies from the index)"; \
		$(PIP) install -q "$(TORCH_LOCAL)"; \
	else \
		echo "torch: none in .venv and $(TORCH_LOCAL) is not on local disk; requirements.txt's torch will be installed"; \
	fi
	@echo "installing requirements.txt into .venv (the first time takes a few minutes)"
	$(PIP) install -q -r requirements.txt
	@touch $@

.venv/.requirements-test.stamp: requirements-test.txt .venv/.requirements.stamp
	@echo "installing requirements-test.txt into .venv"
	$(PIP) install -q -r requirements-test.txt
	@touch $@

demo: .venv/.requirements.stamp
	$(PY) prepare_data.py --dataset tinytales
	@# --resume continues from the newest checkpoint: none is a fresh run, the final one has nothing left to do.
	$(PY) train.py --config tiny --resume $(TRAIN_ARGS)
	$(PY) generate.py --checkpoint $(OUT) --prompt "$(PROMPT)" --num-samples 3 --max-new-tokens 120
	@$(PY) plot.py $(OUT) || echo "no $(OUT)/loss.png: see the line above, then: $(PY) plot.py $(OUT)"
	@ckpt=$$(ls -d $(OUT)/ckpt_* 2>/dev/null | tail -n 1); \
	echo; \
	echo "checkpoint  $${ckpt:-none}"; \
	echo "log         $(OUT)/log.jsonl"; \
	echo "plot        $(OUT)/loss.png"; \
	echo "samples     $(PY) generate.py --checkpoint $(OUT) --prompt \"...\""; \
	echo "continue    an interrupted run: make demo again (it resumes); longer: a new run with"; \
	echo "            $(PY) train.py --config tiny --lr-schedule wsd --max-steps 1000 --out-dir out/tiny-wsd,"; \
	echo "            which extends later with --resume --resume-step N --max-steps M (see README)"

test: .venv/.requirements-test.stamp
	$(PY) -m pytest -q -n auto

clean:
	rm -rf $(OUT) $(DATA) .pytest_cache __pycache__ tests/__pycache__
