# quire: `make serve` and `make test` each build everything they need from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.quire-installed
# The torch build to install when the venv has none. On machines without a GPU this
# pin resolves to the CPU wheel; GPU users install their CUDA torch into .venv first
# (or pass TORCH=...), and an existing torch is kept.
TORCH  ?= torch==2.13.0
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: install serve test fuzz protos clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[test]"
	touch $(STAMP)

serve: install
	$(BIN)/quire serve $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The fuzz tests of both frontends (tests/test_fuzz.py, part of `make test`) at length.
fuzz: install
	QUIRE_FUZZ_EXAMPLES=10000 $(BIN)/python -m pytest -q tests/test_fuzz.py $(PYTEST_ARGS)

protos: install
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
