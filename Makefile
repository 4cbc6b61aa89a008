# Entry points. `make help` lists them.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: help install install-test bench test test-rust test-python lint bench-suite clean

help:
	@echo "make bench        build, install and run 'nexus-limits bench' (the main job)"
	@echo "make test         install what the tests need, then run every test (Rust, Python, lint, stubs)"
	@echo "make bench-suite  the pytest-benchmark suites in benches/"
	@echo "make clean        remove build products"

install:
	$(PIP) install --quiet --disable-pip-version-check '.[bench]'

install-test:
	bash scripts/setup-test.sh
	$(PIP) install --quiet --disable-pip-version-check -e '.[test,bench]'

bench: install
	nexus-limits bench

test: install-test test-rust lint test-python

test-rust:
	cargo test --locked --quiet

lint:
	cargo clippy --locked --quiet --all-targets --features python -- -D warnings
	$(PYTHON) -m ruff check python tests benches
	$(PYTHON) -m mypy

test-python:
	$(PYTHON) -m pytest --cov=nexus_limits --cov-report=term-missing

bench-suite: install-test
	$(PYTHON) -m pytest benches/ --benchmark-only -p no:cacheprovider -s --benchmark-columns=min,median,rounds

clean:
	cargo clean
	rm -rf build dist .pytest_cache .coverage python/nexus_limits/*.so
