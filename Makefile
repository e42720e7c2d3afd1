# The two commands a newcomer runs, as root on Debian 12:
#   make demo   - sets everything up, brings up a lab and shows mailgate intercepting mail
#   make test   - sets everything up and runs lint, type check and the whole test suite
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup lint typecheck unit lab bench clean

setup:
	@scripts/setup-host.sh

demo: setup
	$(VENV)/bin/mailgate demo

test: setup lint typecheck
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check interceptor proxies netsetup tests bench

typecheck: setup
	$(VENV)/bin/mypy

unit: setup
	$(PY) -m pytest -q tests/unit

lab: setup
	$(PY) -m pytest -q tests/lab

bench: setup
	$(PY) -m bench

clean:
	-$(VENV)/bin/mailgate lab down --all
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
