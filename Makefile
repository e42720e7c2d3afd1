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

# Benchmarks are not tests: each compares with a peer in the same lab and prints ratios.
bench: setup
	$(PY) -m bench.smtp
	$(PY) -m bench.filtering
	$(PY) -m bench.pop3
	$(PY) -m bench.interceptor

clean:
	-$(VENV)/bin/mailgate lab down --all
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The appliance image (images/README.md): a bootable Debian 12 disk with mailgate, clamd and
# spamd, and its boot test under qemu (a lab on each side of the booted image; minutes of TCG).
.PHONY: image image-test

image: setup
	@images/setup-build-host.sh
	@images/build.sh

image-test: image
	MAILGATE_IMAGE_TEST=1 $(PY) -m pytest -q -s -p no:cacheprovider tests/image
