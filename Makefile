# Two commands: `make reproduce` (main job) and `make test` (tests + lint).
# Both create .venv on first use and install the pinned versions of constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: reproduce test benchmark accelerator-check

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

benchmark: $(STAMP)
	$(BIN)/python -m benchmarks.curvature_speed
	$(BIN)/python -m benchmarks.landscape_batch

# On a GPU/TPU machine: the --full experiments, the sweeps and the benchmarks, in resumable
# stages (docs/accelerators.md). Uses .venv when there is one, else the machine's python3
# (an accelerator image with JAX already installed); ARGS="--budget-s 540" etc. pass through.
ACCEL_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
accelerator-check:
	PYTHONPATH=. $(ACCEL_PY) -m benchmarks.accelerator_check $(ARGS)
