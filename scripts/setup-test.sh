#!/usr/bin/env bash
# Installs what the test run needs beyond the machine's Rust, Python, pip and maturin:
# clippy for the lint step. Safe to run again; it only installs what is missing.
set -euo pipefail

if ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add clippy
fi
