"""Runs every tests/multidevice/test_*.py in a subprocess with 8 simulated CPU devices."""
import os
import pathlib
import subprocess
import sys

import pytest

MULTIDEVICE_DIR = pathlib.Path(__file__).parent / "multidevice"
FILES = sorted(p.name for p in MULTIDEVICE_DIR.glob("test_*.py"))


@pytest.mark.parametrize("name", FILES)
def test_on_eight_cpu_devices(name):
  # These tests are compile-bound: LLVM -O0 (code generation only) halves XLA's CPU compile time.
  env = dict(os.environ, LINMOE_MULTIDEVICE="1", JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(MULTIDEVICE_DIR / name)],
      env=env, capture_output=True, text=True, check=False)
  assert result.returncode == 0, f"{name} on 8 devices:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
