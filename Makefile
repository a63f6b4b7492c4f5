# The two set-up commands of the README: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Without a GPU, torch 2.13's CPU wheel; a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.6,<2.15" || echo "torch==2.13.0")

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[worker,test]"
	touch $@

install: $(VENV)/.installed

# toy-wan: the preset trained on the toy world (python -m clipmesh.toytrain); its detector then
# says what the video shows.
DEMO_PROMPT ?= a red circle moving right
demo: install
	$(VENV)/bin/clipmesh generate "$(DEMO_PROMPT)" --model toy-wan --frames 17 --workers 2 --output out/demo.mp4
	$(PY) -m clipmesh.toyworld read out/demo.mp4 "$(DEMO_PROMPT)"

# System packages tests need, where missing and we may install them (root with apt):
# iproute2 for tests/test_netns.py (each host in its own network namespace), chromium and its
# driver for tests/test_dashboard.py (the dashboard in a real headless browser).
SYSTEM_DEPS := ip:iproute2 chromium:chromium chromedriver:chromium-driver
system-deps:
	@for dep in $(SYSTEM_DEPS); do cmd=$${dep%%:*}; pkg=$${dep#*:}; \
	  if ! command -v $$cmd >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkg) >/dev/null 2>&1 \
	      || echo "could not install $$pkg: the tests that need it will skip, saying why"; fi; done

test: install system-deps
	$(PY) -m pytest -q

proto: install
	$(PY) proto/generate.py

.PHONY: install demo test proto system-deps
