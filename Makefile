# The README's two commands are `make lab` and `make test`; both set the machine up first.
CACHE ?= $(HOME)/.cache/lbappliance
VENV  ?= $(CACHE)/venv
PY    := $(VENV)/bin/python

.PHONY: setup test unit lint lab lab-down render-sample golden bench

setup:
	bash scripts/setup.sh

test: setup
	$(MAKE) lint
	$(PY) -m pytest -q

unit:
	$(PY) -m pytest -q tests/unit

lint:
	$(VENV)/bin/ruff check lbappliance tests bench
	$(VENV)/bin/mypy --strict lbappliance/core lbappliance/daemon

golden:
	$(PY) -m pytest -q tests/unit/test_render_golden.py tests/unit/test_bgp.py --update-golden
	git diff --stat tests/golden

lab: setup
	$(VENV)/bin/lbappliance lab up

lab-down:
	$(VENV)/bin/lbappliance lab down

render-sample: setup
	$(VENV)/bin/lbappliance render --services examples/offline/services.yaml --nodes examples/offline/nodes.yaml \
		--config examples/offline/config.yaml --pools examples/offline/pools.yaml --out /tmp/lbappliance-render

bench:
	$(PY) bench/render.py
	$(PY) bench/api_writes.py
	$(PY) bench/dataplane.py
	$(PY) bench/convergence.py
