# Two commands do all set-up on a fresh machine:
#   make demo   venv + install + tiny random-weight checkpoint + plan, export for a Pi 5, verify, bench
#   make test   venv + install + the test suite
#   make test-arm   the device install on aarch64 under QEMU (root; builds .cache/arm64-root once)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= out

.PHONY: setup test test-arm demo clean

setup: $(VENV)/.installed

# torch is pinned to 2.13.0: pip takes the CPU build; a bare `torch` pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[export,audio,dev]'
	touch $@

test: setup
	$(BIN)/python -m pytest -q

test-arm: setup
	$(BIN)/python -m pytest -q -m arm_emulation tests/test_arm_emulation.py

demo: setup
	$(BIN)/edgekit make-checkpoint tiny-e2b $(DEMO)/tiny-e2b --overwrite
	$(BIN)/edgekit plan $(DEMO)/tiny-e2b --device pi5-8gb
	$(BIN)/edgekit export $(DEMO)/tiny-e2b --device pi5-8gb --output $(DEMO)/tiny-e2b-pi5.edgekit --overwrite
	$(BIN)/edgekit verify $(DEMO)/tiny-e2b-pi5.edgekit --reference $(DEMO)/tiny-e2b --steps 16
	$(BIN)/edgekit bench $(DEMO)/tiny-e2b-pi5.edgekit --prompt-tokens 32 --decode-tokens 16
	@echo "The checkpoint's weights are random, so its answers are noise: export a real checkpoint to chat (README)."

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
