# p2pnat: UDP hole punching through a rendezvous server.
PYTHON ?= python3

.PHONY: test lint demo lab bench clean dev-deps

test: dev-deps lint
	$(PYTHON) -m pytest -q

lint: dev-deps
	$(PYTHON) -m flake8

# pytest, flake8 and wheel (tests/test_install.py builds the package) are
# for development only: the programs need nothing beyond the standard library.
dev-deps:
	@$(PYTHON) -c 'import pytest, flake8, wheel' 2>/dev/null || \
		$(PYTHON) -m pip install --quiet pytest flake8 wheel

demo:
	$(PYTHON) demo.py

lab:
	$(PYTHON) tests/labreport.py

# Benchmarks, not tests: they print tables (bench/README.md) and assert
# nothing.  Their tools are for benchmarking only and never a dependency of
# the programs: aioice from PyPI, coturn from Debian, a C compiler for the
# load generator.  connect.py and transfer.py need root (the NAT lab).
bench:
	@$(PYTHON) -c 'import aioice' 2>/dev/null || $(PYTHON) -m pip install --quiet aioice
	@command -v turnserver >/dev/null && command -v cc >/dev/null || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq coturn gcc libc6-dev >/dev/null; }
	mkdir -p bench/build
	cc -O2 -Wall -Wextra -o bench/build/loadgen bench/loadgen.c
	$(PYTHON) bench/connect.py
	$(PYTHON) bench/server.py
	$(PYTHON) bench/transfer.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
