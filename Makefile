# Two commands: `make reproduce` (main job) and `make test` (tests + lint; `make test-full`
# adds the slower tier).
# Both create .venv on first use and install the pinned versions of constraints.txt.
# `make compare` (not part of `make test`) runs the side-by-side with alignment-risk in
# its own .venv-compare (torch); without torch it prints one line and exits 0.
PYTHON ?= python3
VENV := .venv
COMPARE_VENV := .venv-compare
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: reproduce test test-full benchmark compare accelerator-check

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

reproduce: $(STAMP)
	$(BIN)/python -m experiments.reproduce

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 --dist loadfile

# Every test, the `full` tier too: end-to-end runs of the experiments, SIGKILL and process
# robustness, the benchmarks' own runs, redraws of committed figures (docs/testing.md).
test-full: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 --dist loadfile --full

benchmark: $(STAMP)
	$(BIN)/python -m benchmarks.curvature_speed
	$(BIN)/python -m benchmarks.landscape_batch

# alignment-risk 1.14.1 declares torch<2.7 and matplotlib<3.11 (stricter than it needs):
# installed with --no-deps beside the `compare` extra's torch 2.13.0. A failed install is
# not an error: the benchmark then says what is missing and exits 0.
compare:
	test -x $(COMPARE_VENV)/bin/python || $(PYTHON) -m venv $(COMPARE_VENV)
	-$(COMPARE_VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[compare]' \
	  && $(COMPARE_VENV)/bin/python -m pip install --quiet --no-deps alignment-risk==1.14.1
	$(COMPARE_VENV)/bin/python -m benchmarks.compare_alignment_risk

# On a GPU/TPU machine: the --full experiments, the sweeps and the benchmarks, in resumable
# stages (docs/accelerators.md). Uses .venv when there is one, else the machine's python3
# (an accelerator image with JAX already installed); ARGS="--budget-s 540" etc. pass through.
ACCEL_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
accelerator-check:
	PYTHONPATH=. $(ACCEL_PY) -m benchmarks.accelerator_check $(ARGS)
