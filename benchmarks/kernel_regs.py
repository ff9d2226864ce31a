"""Registers, spills and shared memory of every Triton kernel a forward + backward launches.

    python benchmarks/kernel_regs.py [--T 4096] [--kinds gdn mamba2] [--D 128 64]

Launch configs are the library's (prefill.CONFIG, backward.CONFIG). A kernel that spills
(ptxas moves registers to local memory) is usually latency-bound far from its roofline: this is the
first thing to read before tuning one (benchmarks/NOTES_backward.md). GPU only.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
from triton.runtime.jit import JITFunction

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

C.import_ahn_ops()
from bench_backward import make_inputs  # noqa: E402

SEEN: dict = {}
_run = JITFunction.run


def _spy(self, *args, **kwargs):
    k = _run(self, *args, **kwargs)
    try:
        if hasattr(k, "_init_handles"):
            k._init_handles()
        md = k.metadata
        key = (self.fn.__name__, getattr(md, "num_warps", None), getattr(md, "num_stages", None))
        SEEN[key] = (getattr(k, "n_regs", None), getattr(k, "n_spills", None), getattr(md, "shared", None))
    except Exception as e:  # noqa: BLE001
        SEEN[(self.fn.__name__, None, None)] = (None, None, f"{type(e).__name__}: {e}")
    return k


JITFunction.run = _spy


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--kinds", nargs="+", default=["gdn", "mamba2"])
    ap.add_argument("--D", nargs="+", type=int, default=[128, 64])
    a = ap.parse_args()
    for kind in a.kinds:
        for D in a.D:
            SEEN.clear()
            inp = make_inputs(kind, 1, a.T, 8, 2, D, torch.bfloat16, 0)
            leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in inp]
            out = torch.ops.ahn.prefill_fwd(*leaves, 1024, 64, kind, None, None, False)[0]
            out.backward(torch.randn_like(out))
            torch.cuda.synchronize()
            print(f"\n== {kind} D={D} (T={a.T}, H=8/2, W=1024, S=64, bf16; triton {triton.__version__})")
            print(f"  {'kernel':28s} {'warps':>5s} {'stages':>6s} {'regs':>5s} {'spills(B)':>9s} {'smem(B)':>8s}")
            for (name, nw, ns), (regs, spills, smem) in sorted(SEEN.items(), key=lambda kv: kv[0][0]):
                print(f"  {name:28s} {nw!s:>5s} {ns!s:>6s} {regs!s:>5s} {spills!s:>9s} {smem!s:>8s}")


if __name__ == "__main__":
    main()
