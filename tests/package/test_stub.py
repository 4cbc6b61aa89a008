"""The .pyi stub agrees with the native module, and the package type-checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nexus_limits as nl

ROOT = Path(__file__).resolve().parents[2]


def test_stub_matches_the_native_module():
    out = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "nexus_limits._core"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_package_is_typed_and_type_checks():
    assert (Path(nl.__file__).parent / "py.typed").exists()
    out = subprocess.run([sys.executable, "-m", "mypy"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_public_names():
    assert set(nl.__all__) <= set(dir(nl))
    assert nl.__version__ == "0.1.0"
    assert issubclass(nl.RateLimitExceeded, nl.NexusLimitsError)
    assert issubclass(nl.BackendUnavailable, nl.NexusLimitsError)
