# Two commands on a fresh machine:
#   make demo   - the main job on built-in data (export -> extract -> compare -> fit-head -> score)
#   make test   - the test suite (this is what .ci/run calls)
#   make test-min - the head tests on the lowest versions pyproject.toml allows (core deps only)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test test-min demo venv bench clean lint

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

	rm -rf $(VENV) $(MIN_VENV) .pytest_cache .mypy-src .mypy_cache .ruff_cache

# ImageNet weights for the demo when they can be had offline: a weights directory (the ordinary
# --weights-dir option). ../shared/weights is used when present; the demo never requires it.
WEIGHTS_DIR ?= $(firstword $(wildcard ../shared/weights) $(TLPIPE_WEIGHTS_DIR))
DEMO_OUT ?= demo-output

demo: $(STAMP)
	$(BIN)/tlpipe demo --out $(DEMO_OUT) $(if $(WEIGHTS_DIR),--weights-dir $(WEIGHTS_DIR))

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_export.py
	$(BIN)/python benchmarks/bench_extract.py
	$(BIN)/python benchmarks/bench_precision.py
	$(BIN)/python benchmarks/bench_score.py
	$(BIN)/python benchmarks/bench_heads.py
	$(BIN)/python benchmarks/bench_ray.py

clean:
	rm -rf $(VENV) $(MIN_VENV) .pytest_cache .mypy-src .mypy_cache .ruff_cache
