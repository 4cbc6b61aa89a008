# Entry points. `make help` lists them. Everything runs in the project's virtual
# environment (.venv, created with the machine's python3 on first use), so the system
# Python is never changed (Debian and Ubuntu refuse that: PEP 668).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: help venv install install-test bench test test-rust test-python lint wheel-smoke bench-suite clean

help:
	@echo "make bench        build, install and run 'nexus-limits bench' (the main job)"
	@echo "make test         install what the tests need, then run every test (Rust, Python, lint, stubs, wheel)"
	@echo "make bench-suite  the pytest-benchmark suites in benches/"
	@echo "make clean        remove build products"

venv:
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/venv.sh

install: venv
	$(PIP) install --quiet '.[bench]'

install-test: venv
	bash scripts/setup-test.sh
	$(PIP) install --quiet maturin
	$(PIP) install --quiet -e '.[test,bench]'

bench: install
	$(VENV)/bin/nexus-limits bench

test: install-test test-rust lint test-python wheel-smoke

test-rust:
	cargo test --locked --quiet

lint:
	cargo clippy --locked --quiet --all-targets --features python -- -D warnings
	$(PY) -m ruff check python tests benches
	$(PY) -m ruff format --check python tests benches
	$(PY) -m mypy

test-python:
	$(PY) -m pytest --cov=nexus_limits --cov-report=term-missing

# The wheel users install, built as they get it and installed into a clean virtual
# environment with no Rust toolchain on PATH, then a smoke test.
wheel-smoke:
	bash scripts/wheel-smoke.sh $(PY)

bench-suite: install-test
	$(PY) -m pytest benches/ --benchmark-only -p no:cacheprovider -s --benchmark-columns=min,median,rounds

clean:
	cargo clean
	rm -rf build dist .pytest_cache .coverage python/nexus_limits/*.so
