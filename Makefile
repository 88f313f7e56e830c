# Two commands on a fresh machine:
#   make demo   - the main job on built-in data (export -> extract -> compare -> fit-head -> score)
#   make test   - the test suite (this is what .ci/run calls)
#   make test-min - the head tests on the lowest versions pyproject.toml allows (core deps only)
#   make docs   - the documentation site (mkdocs build --strict into site/; offline)
#   make browser - Debian's chromium for the HTML reports' browser tests (installed once; they skip without it)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test test-min demo venv bench clean lint docs browser

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# A real browser for the HTML reports' tests (tests/pipeline/reports): Debian's chromium, installed only when
# missing (apt-get, as root or through sudo). Where it cannot be installed this says so and the tests skip,
# naming why; set TLPIPE_CHROMIUM to use another Chromium.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || [ -n "$$TLPIPE_CHROMIUM" ]; then \
		echo "browser: $$(command -v chromium || command -v chromium-browser || echo $$TLPIPE_CHROMIUM)"; \
	else \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		{ $$sudo apt-get update -q && $$sudo apt-get install -y -q --no-install-recommends chromium; } \
		|| echo "browser: could not install chromium (apt-get failed); the browser tests will skip"; \
	fi

# The dependency floors, proved: every core dependency at the lowest version pyproject.toml allows
# (`>=X` -> `==X`), plus pytest, in a separate venv; then the head tests. pip's wheel cache makes a rerun
# quick and the venv is kept until pyproject.toml changes. No extras: the head tests need none.
MIN_VENV  ?= .venv-min
MIN_BIN   := $(MIN_VENV)/bin
MIN_STAMP := $(MIN_VENV)/.installed
MIN_TESTS ?= tests/pipeline/heads/test_estimators.py tests/pipeline/heads/test_selection.py tests/pipeline/heads/test_evaluate.py tests/pipeline/heads/test_persistence.py

$(MIN_STAMP): pyproject.toml
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(PYTHON) -c 'import re, tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; \
		print("\n".join(re.sub(r"\s*>=\s*", "==", d) for d in deps))' > $(MIN_VENV)/floors.txt
	$(MIN_BIN)/python -m pip install -q --only-binary=:all: -r $(MIN_VENV)/floors.txt "pytest>=8"
	$(MIN_BIN)/python -m pip install -q --no-deps -e .
	touch $(MIN_STAMP)

test-min: $(MIN_STAMP)
	$(MIN_BIN)/python -m pip list --format=freeze | grep -iE '^(numpy|h5py|scikit-learn|scipy|joblib)=='
	$(MIN_BIN)/python -m pytest -q -p no:cacheprovider $(MIN_TESTS)

# Lint and types on the whole tree: ruff check + ruff format --check (relaxations named in pyproject.toml),
# mypy on every package module.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -rf .mypy-src && mkdir -p .mypy-src/tlpipe
	ln -s ../../tlpipe/__init__.py .mypy-src/tlpipe/__init__.py
	ln -s ../../tlpipe/errors.py .mypy-src/tlpipe/errors.py
	for p in backbones features pipeline; do ln -s ../../$$p .mypy-src/tlpipe/$$p; done
	cd .mypy-src && ../$(BIN)/mypy --config-file ../pyproject.toml -p tlpipe

# The documentation site: pages in docs/, the CLI reference and the API page generated from the code by
# docs/_hooks/reference.py. --strict: a broken link or anchor, or any warning, fails the build.
SITE_DIR ?= site
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(SITE_DIR)

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
	rm -rf $(VENV) $(MIN_VENV) .pytest_cache .mypy-src .mypy_cache .ruff_cache site
