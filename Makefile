# Two entry points that work on a fresh machine (Python 3.11, package registries reachable):
#   make demo   installs spot-fast and runs `spot-fast demo` (synthetic data -> cache -> stage 1, stage 2,
#               DINOSAUR -> one table against trivial baselines + report) in $(DEMO_DIR)
#   make test   installs spot-fast with its test extras and runs the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.14.1 + torchvision 0.29.1 (timm needs torchvision); the package itself asks only torch>=2.4.
TORCH ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= runs/demo

.PHONY: install test demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: install
	$(BIN)/spot-fast demo --out $(DEMO_DIR)

clean:
	rm -rf $(DEMO_DIR)
