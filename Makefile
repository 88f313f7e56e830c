# Two commands on a fresh machine:
#   make demo   - the main job on built-in data (export -> extract -> compare -> fit-head -> score)
#   make test   - the test suite (this is what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo venv bench clean lint

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Lint + types on the public modules (widen LINTED / TYPED module by module as they are cleaned up).
LINTED := tlpipe backbones/choice.py backbones/atomic.py backbones/onnx_metadata.py features/stream.py \
          features/decoder.py features/extract.py pipeline/score_ray.py pipeline/score.py features/ray_engine.py \
          features/calibration.py features/fastdecode.py
# New modules are ruff-formatted; older ones are not reformatted (it would conflict with every merge).
FORMATTED := tlpipe backbones/choice.py backbones/atomic.py backbones/onnx_metadata.py features/stream.py \
             features/decoder.py features/extract.py pipeline/score_ray.py features/fastdecode.py
TYPED  := tlpipe tlpipe.backbones.choice tlpipe.backbones.atomic tlpipe.backbones.onnx_metadata \
          tlpipe.features.stream tlpipe.features.decoder tlpipe.features.cache tlpipe.features.extract \
          tlpipe.pipeline.score_ray tlpipe.pipeline.score tlpipe.features.ray_engine tlpipe.features.calibration \
          tlpipe.features.fastdecode
lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(FORMATTED)
	rm -rf .mypy-src && mkdir -p .mypy-src/tlpipe
	ln -s ../../tlpipe/__init__.py .mypy-src/tlpipe/__init__.py
	for p in backbones features pipeline; do ln -s ../../$$p .mypy-src/tlpipe/$$p; done
	cd .mypy-src && ../$(BIN)/mypy --config-file ../pyproject.toml $(addprefix -m ,$(TYPED))

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
	rm -rf $(VENV) .pytest_cache .mypy-src .mypy_cache .ruff_cache
