#!/usr/bin/env bash
# Installs what the test run needs beyond the machine's Rust, Python, pip and maturin:
# Debian's redis-server (the Redis tests start their own servers), faketime and clippy.
# Safe to run again; it only installs what is missing.
set -euo pipefail

# faketime (libfaketime) moves a test process's wall clock, for the clock-jump tests.
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1 || ! command -v faketime >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server faketime >/dev/null
fi
# Debian may start a system-wide server on 6379 after installing: the README test uses it
# when it is there (a pasted `redis.Redis()` reaches it), else starts its own on 6379; the
# other tests start their own servers on free ports.

if ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add clippy
fi
