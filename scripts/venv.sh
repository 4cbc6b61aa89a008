#!/usr/bin/env bash
# Creates the project's virtual environment (.venv) with the machine's python3 if it is
# not there yet. Debian and Ubuntu refuse `pip install` into the system Python (PEP 668),
# and their python3 may come without the venv module: then python3-venv is installed.
set -euo pipefail
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    exit 0
fi
rm -rf "$VENV"
if ! "$PY" -m venv "$VENV" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    ver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "python${ver}-venv" >/dev/null 2>&1 \
        || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
