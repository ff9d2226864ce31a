"""The memory's prep pass (``_prep_kernel``: gates, l2norm, the WY inverse, w, u and the decayed keys) alone.

    python benchmarks/bench_prep.py                  # launch settings x kinds x shapes, then the fused forward
    python benchmarks/bench_prep.py --ncu-target     # one warm-up and one timed-for-ncu prep launch at T=32768
    python benchmarks/bench_prep.py --cpu            # harness check in the interpreter (tiny shape, no timing claim)

The pass runs before anything else in the forward (0.44 ms of 2.64 at T=32k on an H100) and again in the
backward's recompute, so its time is the forward's serial prefix. Per (64-token chunk, head) it reads the
chunk's keys and values (shared by the G heads of a group, mostly from L2) and writes w, u and kd in the input
dtype (3 x T x H x D x 2 bytes: 402 MB at T=32k, H=16, D=128; 0.13 ms at 3 TB/s), so most of its time is the
latency of each program's chain: the products, then the inverse's 15 substitution steps, then two more
products. Mamba2's pass has no inverse (w = 0, u = dt v): the difference between the kinds is the inverse's
share. Settings: ``prefill.CONFIG`` keys ``prep_warps`` and ``prep_maxnreg`` (a register cap, 168 by default: at
212 registers two programs of 4 warps fit an SM; at 168, three; None: no cap).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--cpu" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

C.import_ahn_ops()

from bench_prefill import make  # noqa: E402

from ahn_ops.ops.ahn_attention import prefill as P  # noqa: E402

SHAPES = {32768: 4096, 131072: 32640}  # T: W (S = 128, H = 16, HKV = 2, D = 128, bf16)
SETTINGS = (dict(), dict(prep_maxnreg=None), dict(prep_maxnreg=128), dict(prep_warps=8, prep_maxnreg=None),
            dict(prep_warps=8, prep_maxnreg=128), dict(prep_warps=2, prep_maxnreg=None))


CPU_SHAPE = (130, 48, 4, 2, 2, 64)  # --cpu: T, W, S, H, HKV, D


def med(fn):
    if not torch.cuda.is_available():  # --cpu: one call, wall time (the interpreter: no timing claim)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def _with(setting, fn):
    with C.configured(setting, P.CONFIG):
        return fn()


def table(kinds, Ts, settings=SETTINGS, full=True, cpu=False):
    H, HKV, D, S = 16, 2, 128, 128
    rows = []
    for T in Ts:
        W = SHAPES.get(T)
        if cpu:
            T, W, S, H, HKV, D = CPU_SHAPE
        for kind in kinds:
            args = make(kind, 1, T, H, HKV, D, device="cpu" if cpu else "cuda")
            floor = (3 if kind != "mamba2" else 2) * T * H * D * 2 / 3.0e12 * 1e3  # ms of writes at 3 TB/s
            for st in settings:
                tag = " ".join(f"{k}={v}" for k, v in st.items()) or "default"
                try:
                    t = _with(st, lambda: med(lambda: P.prefill_fwd(*args, W, S, kind, stage="prep")))
                    tf = (_with(st, lambda: med(lambda: P.prefill_fwd(*args, W, S, kind)))
                          if full and (T == 32768 or cpu) else float("nan"))
                except Exception as e:  # noqa: BLE001
                    print(f"[prep] {kind} T{T} {tag} raised {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                rows.append((kind, T, tag, t, tf, floor))
                print(f"[prep] {kind} T{T} {tag}: prep {t:.3f} ms, forward {tf:.3f} ms", flush=True)
            del args
            if not cpu:
                torch.cuda.empty_cache()
    dev = "CPU interpreter (no timing claim)" if cpu else torch.cuda.get_device_name()
    print(f"\n{dev}; B=1 H={H}/{HKV} D={D} S={S} bf16; median ms")
    print("| kind | T | setting | prep pass | writes at 3 TB/s | fused forward (T = 32768 only) |")
    print("|---|---|---|---|---|---|")
    for kind, T, tag, t, tf, floor in rows:
        print(f"| {kind} | {T} | {tag} | {t:.3f} | {floor:.3f} | {tf:.3f} |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", nargs="+", default=["gdn", "mamba2"], choices=("gdn", "dn", "mamba2"))
    ap.add_argument("--T", nargs="+", type=int, default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--no-full", action="store_true", help="the prep pass only (not the fused forward at 32k)")
    ap.add_argument("--cpu", action="store_true",
                    help="harness check: the Triton interpreter on a tiny shape, the default and one register cap")
    ap.add_argument("--ncu-target", action="store_true",
                    help="two prep launches at T=32768 (gdn, default settings) for Nsight Compute: skip 1, count 1")
    a = ap.parse_args()
    if a.ncu_target:
        args = make("gdn", 1, 32768, 16, 2, 128)
        for _ in range(2):
            P.prefill_fwd(*args, SHAPES[32768], 128, "gdn", stage="prep")
        torch.cuda.synchronize()
        return
    if a.cpu:
        table(a.kinds, a.T[:1], settings=SETTINGS[:2], full=not a.no_full, cpu=True)
        return
    table(a.kinds, a.T, full=not a.no_full)


if __name__ == "__main__":
    main()
