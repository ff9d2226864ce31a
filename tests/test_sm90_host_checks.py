"""The sm_90a kernels (csrc/cuda/sm90/) checked on the host: their register and shared-memory layouts and
their block plans.

The kernels turn one product's accumulator into the next product's register A operand (``acc_to_a``), read
accumulators as (row, column) views (``acc_rowcol``) and use transposed shared-memory views of their tiles;
which key blocks a CTA visits and which pairs it masks come from band_plan.h. CuTe's layout algebra and the
plans run on the host, so tests/csrc/sm90_host_checks.cu checks them with nvcc and the CUTLASS headers, no
GPU: every layout element, and every (query, key) pair of thousands of (T, W, S, P) kept exactly once. A
wrong register order and a plan off by one key are run through the checks too and must be caught.
"""

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cutlass_include():
    env = os.environ.get("AHN_OPS_CUTLASS_INCLUDE")
    if env:
        return env if (Path(env) / "cute" / "tensor.hpp").exists() else None
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    inc = Path(list(spec.submodule_search_locations)[0]) / "source" / "include"
    return str(inc) if (inc / "cute" / "tensor.hpp").exists() else None


def _cudart_static_dir(nvcc):
    """A folder with libcudart_static.a: the toolkit's, else a pip CUDA runtime's (a toolkit installed without
    its runtime libraries has none)."""
    home = Path(nvcc).resolve().parents[1]
    dirs = [home / "lib64", home / "lib", home / "targets" / "x86_64-linux" / "lib"]
    for site in sys.path:
        dirs += [Path(p) for p in glob.glob(os.path.join(site, "nvidia", "*", "lib"))]
    for d in dirs:
        if (d / "libcudart_static.a").exists():
            return str(d)
    return None


def test_sm90_host_checks(tmp_path):
    nvcc, inc = _nvcc(), _cutlass_include()
    if nvcc is None or inc is None:
        pytest.skip(f"needs nvcc ({nvcc}) and the CUTLASS headers ({inc}: pip install --no-deps nvidia-cutlass)")
    lib = _cudart_static_dir(nvcc)
    if lib is None:
        pytest.skip("no libcudart_static.a next to nvcc or in a pip CUDA runtime")
    exe = tmp_path / "sm90_host_checks"
    # host code only: PTX for a virtual architecture, no ptxas
    cmd = [nvcc, "-O2", "-std=c++17", "--expt-relaxed-constexpr", "-gencode", "arch=compute_90a,code=compute_90a",
           "-cudart", "static", f"-L{lib}", f"-I{ROOT / 'csrc' / 'cuda'}", f"-I{inc}",
           str(ROOT / "tests" / "csrc" / "sm90_host_checks.cu"), "-o", str(exe)]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-4000:]
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    out = ran.stdout
    assert "all host checks passed" in out and "FAIL" not in out, out
    # every check ran (both dtypes, both plans), and the negative controls caught their faults
    assert out.count(" ok (") == 32 + 2, out
    assert out.count("negative control: swapped registers caught") == 2
    assert "negative control: plans off by one key caught" in out
