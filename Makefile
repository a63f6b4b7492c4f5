# The two set-up commands of the README: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Without a GPU, torch 2.13's CPU wheel; a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.5,<2.15" || echo "torch==2.13.0")

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/clipmesh generate "a lighthouse on a cliff at dusk, waves rolling in" \
		--frames 17 --workers 2 --output out/demo.mp4

test: install
	$(PY) -m pytest -q

proto: install
	$(PY) proto/generate.py

.PHONY: install demo test proto
