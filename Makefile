# The README's two set-up commands: `make demo` (the main job) and `make test`.
# Both create the virtualenv and install what they need.
PY ?= python3
VENV ?= .venv
RAY_VERSION ?= 2.60.0
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-ray-$(RAY_VERSION)
PYTEST_ARGS ?=

.PHONY: install demo test test-versions docs bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q "$(TORCH)" "ray[rllib]==$(RAY_VERSION)"
	$(VENV)/bin/pip install -q -e ".[test,report]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/reward-audit demo

# The Ray $(RAY_VERSION) suite; tests/versions/ runs under `make test-versions`, one venv per Ray.
test: $(STAMP)
	$(VENV)/bin/python -m pytest --ignore=tests/versions $(PYTEST_ARGS)

# ---------------------------------------------------------------- reference Ray versions
# `make test-versions`: for each reference Ray, its own virtualenv .venv-ray<ver> (built once;
# the stamp is reused until pyproject.toml changes), then `pytest -m ray<MMm> tests/versions/`
# there (2.12.0 -> ray212). Every version runs; `make -k test-versions` keeps going past a
# failure. pytest's exit 5 (no tests collected) fails the target like any other non-zero exit.
RAY_REFERENCE_VERSIONS ?= 2.12.0 2.53.0 2.60.0
# Ray 2.12 predates numpy 2 / pyarrow 17 / pandas 2.3.
EXTRA_PINS_2.12.0 := "numpy<2" "pyarrow<17" "pandas<2.3"
ray_marker = ray$(subst .,,$(basename $(1)))
VERSION_STAMPS := $(foreach v,$(RAY_REFERENCE_VERSIONS),.venv-ray$(v)/.installed)
VERSION_TESTS := $(addprefix test-ray-,$(RAY_REFERENCE_VERSIONS))
.PHONY: $(VERSION_TESTS)

# Static pattern rules: the stamps are explicit targets, so make never deletes them as intermediates.
$(VERSION_STAMPS): .venv-ray%/.installed: pyproject.toml
	@start=$$(date +%s); \
	$(PY) -m venv .venv-ray$* && \
	.venv-ray$*/bin/pip install -q "$(TORCH)" "ray[rllib]==$*" $(EXTRA_PINS_$*) && \
	.venv-ray$*/bin/pip install -q -e ".[test,report]" $(EXTRA_PINS_$*) && \
	.venv-ray$*/bin/python -c "import ray, sys; sys.exit(None if ray.__version__ == '$*' else f'.venv-ray$*: ray {ray.__version__} installed, expected $*')" && \
	echo "== .venv-ray$*: install took $$(( $$(date +%s) - start )) s"
	touch $@

$(VERSION_TESTS): test-ray-%: .venv-ray%/.installed
	@start=$$(date +%s); rc=0; \
	echo "== Ray $*: pytest -m $(call ray_marker,$*) tests/versions/"; \
	.venv-ray$*/bin/python -m pytest -q -rs -p no:cacheprovider -m $(call ray_marker,$*) tests/versions/ || rc=$$?; \
	echo "== Ray $*: tests took $$(( $$(date +%s) - start )) s (pytest exit $$rc$$( [ $$rc -eq 5 ] && echo ': no tests collected'))"; \
	exit $$rc

test-versions: $(VERSION_TESTS)

# ---------------------------------------------------------------- real games
# `make test-envs`: tests/envs/ — RLlib's own multi-agent example envs, OpenSpiel, PettingZoo
# and mpe2 games under tiny PPO runs (docs/tested_environments.md) — in its own virtualenv
# $(ENVS_VENV) with the `envs` extra (built once; rebuilt when pyproject.toml changes).
ENVS_VENV ?= .venv-envs
ENVS_STAMP := $(ENVS_VENV)/.installed
.PHONY: test-envs

$(ENVS_STAMP): pyproject.toml
	@start=$$(date +%s); \
	$(PY) -m venv $(ENVS_VENV) && \
	$(ENVS_VENV)/bin/pip install -q "$(TORCH)" "ray[rllib]==$(RAY_VERSION)" && \
	$(ENVS_VENV)/bin/pip install -q -e ".[test,envs]" && \
	echo "== $(ENVS_VENV): install took $$(( $$(date +%s) - start )) s"
	touch $@

test-envs: $(ENVS_STAMP)
	@start=$$(date +%s); rc=0; \
	$(ENVS_VENV)/bin/python -m pytest -q -rs -p no:cacheprovider --durations=5 tests/envs/ $(PYTEST_ARGS) || rc=$$?; \
	echo "== test-envs: tests took $$(( $$(date +%s) - start )) s (pytest exit $$rc)"; \
	exit $$rc

docs: $(STAMP)
	$(VENV)/bin/python -m reward_audit.docsgen

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_overhead.py

clean:
	rm -rf $(VENV) .venv-* .pytest_cache
