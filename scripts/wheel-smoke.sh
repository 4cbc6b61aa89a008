#!/usr/bin/env bash
# Builds the release wheel (`maturin build --release`), installs it into a fresh virtual
# environment with no Rust toolchain on PATH and checks that it works: import, a check,
# the CLI's help.
set -euo pipefail
PY=${1:-.venv/bin/python}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$PY" -m maturin build --release --quiet --out "$out/dist"
"$PY" -m venv "$out/venv"
wheel=$(ls "$out"/dist/*.whl)
"$out/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel"
cd "$out"
env -i HOME="$HOME" PATH=/usr/bin:/bin "$out/venv/bin/python" - <<'PY'
import shutil
assert shutil.which("cargo") is None and shutil.which("rustc") is None, "a Rust toolchain is on PATH"
import nexus_limits as nl
assert nl.__file__.startswith(__import__("sys").prefix), nl.__file__
tb = nl.TokenBucket("2/minute")
assert tb.try_acquire("k") and tb.try_acquire("k") and not tb.try_acquire("k")
print("wheel smoke: import and checks ok,", nl.__version__)
PY
env -i HOME="$HOME" PATH=/usr/bin:/bin "$out/venv/bin/nexus-limits" --help >/dev/null
echo "wheel smoke: nexus-limits --help ok"
