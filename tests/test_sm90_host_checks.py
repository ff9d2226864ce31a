"""The sm_90a kernels (csrc/cuda/sm90/) checked on the host: their register and shared-memory layouts and
their block plans.

The kernels turn one product's accumulator into the next product's register A operand (``acc_to_a``), read
accumulators as (row, column) views (``acc_rowcol``) and use transposed shared-memory views of their tiles;
which key blocks a CTA visits and which pairs it masks come from band_plan.h. CuTe's layout algebra and the
plans run on the host, so tests/csrc/sm90_host_checks.cu checks them with nvcc and the CUTLASS headers, no
GPU: every layout element, and every (query, key) pair of thousands of (T, W, S, P) kept exactly once. A
wrong register order and a plan off by one key are run through the checks too and must be caught.
"""

import subprocess
from pathlib import Path

import pytest

from .utils import REPO, setup_py


def _cudart_static_dir(build, nvcc):
    """A folder with libcudart_static.a: the toolkit's, else a pip CUDA runtime's (a toolkit installed without
    its runtime libraries has none)."""
    home = Path(nvcc).resolve().parents[1]
    dirs = [home / "lib64", home / "lib", home / "targets" / "x86_64-linux" / "lib"]
    dirs += [Path(d) for d in build._pip_cuda_dirs("lib")]
    return next((str(d) for d in dirs if (d / "libcudart_static.a").exists()), None)


def test_sm90_host_checks(tmp_path):
    build = setup_py()  # the extension build's own finders of nvcc and the CUTLASS headers
    nvcc, (inc, why) = build._nvcc(), build._cutlass_include()
    if nvcc is None or inc is None:
        pytest.skip(f"needs nvcc ({nvcc}) and the CUTLASS headers ({why})")
    lib = _cudart_static_dir(build, nvcc)
    if lib is None:
        pytest.skip("no libcudart_static.a next to nvcc or in a pip CUDA runtime")
    exe = tmp_path / "sm90_host_checks"
    # host code only: PTX for a virtual architecture, no ptxas
    cmd = [nvcc, "-O2", "-std=c++17", "--expt-relaxed-constexpr", "-gencode", "arch=compute_90a,code=compute_90a",
           "-cudart", "static", f"-L{lib}", f"-I{REPO / 'csrc' / 'cuda'}", f"-I{inc}",
           str(REPO / "tests" / "csrc" / "sm90_host_checks.cu"), "-o", str(exe)]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-4000:]
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    out = ran.stdout
    assert "all host checks passed" in out and "FAIL" not in out, out
    # every check ran (both dtypes, both plans), and the negative controls caught their faults
    assert out.count(" ok (") == 36 + 2, out
    assert out.count("negative control: swapped registers caught") == 2
    assert "negative control: plans off by one key caught" in out
