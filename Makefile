# The README's two set-up commands: `make demo` (the main job) and `make test`.
# Both create the virtualenv and install what they need.
PY ?= python3
VENV ?= .venv
RAY_VERSION ?= 2.60.0
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-ray-$(RAY_VERSION)
PYTEST_ARGS ?=

.PHONY: install demo test docs bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q "$(TORCH)" "ray[rllib]==$(RAY_VERSION)" matplotlib
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/reward-audit demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

docs: $(STAMP)
	$(VENV)/bin/python -m reward_audit.docsgen

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_overhead.py

clean:
	rm -rf $(VENV) .venv-* .pytest_cache
