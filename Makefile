# p2pnat: UDP hole punching through a rendezvous server.
PYTHON ?= python3

.PHONY: test lint demo lab bench clean dev-deps

test: dev-deps lint
	$(PYTHON) -m pytest -q

lint: dev-deps
	$(PYTHON) -m flake8

# pytest and flake8 are for development only: the programs need nothing
# beyond the standard library.
dev-deps:
	@$(PYTHON) -c 'import pytest, flake8' 2>/dev/null || \
		$(PYTHON) -m pip install --quiet pytest flake8

demo:
	$(PYTHON) demo.py

lab:
	$(PYTHON) tests/labreport.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
