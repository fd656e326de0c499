"""Building the extension: KVMEM_NATIVE=0, a failed build, and the CUDA sources under nvcc."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmem import native

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import numpy as np, torch
from kvmem import native
s = native.status()
src = torch.arange(64, dtype=torch.uint8)
dst = torch.zeros(64, dtype=torch.uint8)
native.copy_segments(src, dst, np.array([[0, 32, 8]]))
assert dst[32:40].tolist() == list(range(8))
print("STATUS", s.enabled, s.reason)
"""


def _probe(**env: str) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-c", PROBE], env=e, capture_output=True, text=True, timeout=300
    )


def test_kvmem_native_0_forces_python():
    r = _probe(KVMEM_NATIVE="0")
    assert r.returncode == 0, r.stderr
    assert "STATUS False disabled by KVMEM_NATIVE=0" in r.stdout
    assert "compiling" not in r.stderr


def test_a_failed_build_falls_back_with_its_reason(tmp_path):
    r = _probe(KVMEM_NATIVE="1", KVMEM_NATIVE_CACHE=str(tmp_path), CXX="/bin/false")
    assert r.returncode == 0, r.stderr
    assert "STATUS False build failed" in r.stdout
    assert "compiling the native extension" in r.stderr
    assert "native extension unavailable" in r.stderr


def test_status_says_which_path():
    s = native.status()
    assert str(s).startswith("on (" if s.enabled else "off (")
    assert s.enabled == native.enabled()
    if s.enabled:
        assert s.path and Path(s.path).exists()
    else:
        assert s.reason


def test_cuda_sources_compile_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None
    )
    if nvcc is None:
        pytest.skip("nvcc not found")
    out = tmp_path / "kvmem_cuda.o"
    r = subprocess.run(
        [nvcc, "-c", "-O2", "-std=c++17", str(native.CSRC / "kvmem_cuda.cu"), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    syms = subprocess.run(["nm", str(out)], capture_output=True, text=True).stdout
    for name in ("kvmem_cuda_copy_segments", "kvmem_cuda_map_pages", "kvmem_cuda_unmap_pages"):
        assert f" T {name}" in syms
