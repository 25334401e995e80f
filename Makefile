# Two entry points that work on a fresh machine (Python 3.11, package registries reachable):
#   make demo   installs spot-fast and runs the main job on the built-in synthetic dataset
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
	$(BIN)/spot-fast data synthetic --out $(DEMO_DIR)/data
	$(BIN)/spot-fast cache synthetic --root $(DEMO_DIR)/data --split both --preset tiny --image-size 64 \
		--random-init --split-block 2 --out $(DEMO_DIR)/cache
	rm -rf $(DEMO_DIR)/teacher $(DEMO_DIR)/spot
	$(BIN)/spot-fast train --stage 1 --cache $(DEMO_DIR)/cache --preset tiny --epochs 30 --batch-size 16 \
		--allow-random-init --log-every 20 --out $(DEMO_DIR)/teacher
	$(BIN)/spot-fast train --stage 2 --cache $(DEMO_DIR)/cache --preset tiny --teacher $(DEMO_DIR)/teacher \
		--epochs 10 --batch-size 16 --allow-random-init --log-every 20 --out $(DEMO_DIR)/spot
	$(BIN)/spot-fast eval $(DEMO_DIR)/spot --cache $(DEMO_DIR)/cache --orders all --allow-random-init

clean:
	rm -rf $(DEMO_DIR)
