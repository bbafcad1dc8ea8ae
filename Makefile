# All set-up happens here: `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint bench clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is installed first and pinned so pip never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The page's browser test (tests/serving/test_page_browser.py) drives Debian's chromium + chromium-driver. They are
# installed with apt when missing and this user is root or has password-less sudo; otherwise (no apt, no network,
# no rights) nothing fails here and the test skips itself, saying why.
browser:
	-@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if ! command -v apt-get >/dev/null 2>&1; then echo "note: no apt-get; the browser test will be skipped"; \
	  else \
	    if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
	    if [ "$$SUDO" = none ]; then echo "note: not root and no sudo; the browser test will be skipped"; \
	    else \
	      echo "installing chromium and chromium-driver for the browser test"; \
	      $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
	      || { $$SUDO apt-get update -q >/dev/null 2>&1 \
	           && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
	      || echo "note: apt could not install chromium; the browser test will be skipped"; \
	    fi; \
	  fi; \
	fi

test: $(STAMP) browser
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest tests

demo: $(STAMP)
	$(BIN)/vlbridge demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/generation.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
