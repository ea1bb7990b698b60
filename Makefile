# Developer entry points: `make run`, `make test`, `make check` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= --timeout 300
CONFIG ?= etc/stage.json

.PHONY: run test test-fast test-busy check clean bench bench-quick bench-large

# The virtualenv with stagetx installed editable, reinstalled when setup.py changes. "compat" mode
# puts the project directory on sys.path, so twistd also finds twisted/plugins/stagetx_plugin.py.
$(VENV)/.installed-test: setup.py stagetx/stages/index/_order.c
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-test
	$(PY) -m pip install --quiet -e '.[test,dev]' --config-settings editable_mode=compat
	touch $@

run: $(VENV)/.installed-test
	exec $(VENV)/bin/twistd -n stage -c $(CONFIG)

test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

# The developer's loop (under a minute): tests/unit without the tests marked e2e or slow.
test-fast: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS) -m "not soak and not e2e and not slow" tests/unit

# The whole suite RUNS times in a row while a bounded CPU hog keeps one core busy (tools/busy.py).
RUNS ?= 1
test-busy: $(VENV)/.installed-test
	$(PY) tools/busy.py --runs $(RUNS) -- $(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-test
	$(PY) -m bench.run

bench-quick: $(VENV)/.installed-test
	$(PY) -m bench.run --quick

# Opt-in: the index stage at 10,000,000 members (about 3 GB of memory, a few minutes)
bench-large: $(VENV)/.installed-test
	$(PY) -m bench.bench_large

check: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check stagetx tests twisted setup.py bench tools
	$(VENV)/bin/ruff format --check stagetx tests twisted setup.py bench tools
	$(VENV)/bin/mypy stagetx
	$(PY) tools/check_imports.py

clean:
	rm -rf $(VENV) build *.egg-info twisted/plugins/dropin.cache stagetx/stages/index/*.so
