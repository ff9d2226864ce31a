"""Fused AHN prefill (Triton, torch.ops.ahn.prefill_fwd) against its peers, same run.

    python benchmarks/bench_prefill.py --check            # correctness vs fp32 reference, then timings
    python benchmarks/bench_prefill.py --shapes 32768      # timings only

FLOPs (reported as TFLOP/s = FLOP / median time):
  window attention: 4 * D * H * sum_t |K(t)|, |K(t)| = min(t+1, W) + min(S, max(0, t-W+1))
  memory (chunked delta rule, BT=64, per head and per stream element in a chunk with a memory
  token): 8 D^2 (v_new = u - w h, h update, q h, o_weight projection) + 10 BT D (K K^T, w, u,
  intra-chunk q k^T and its product with v_new); the triangular solve is not counted.
Bytes (floor): q, k, v, out once each in bf16.
Peers: FlexAttention (sliding window + sinks block mask, torch.compile), SDPA causal full (flash).
fla / the unfused AHN pipeline are not installed on the device: not measured here.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
try:
    import ahn_ops  # noqa: F401
except ImportError as e:  # extension not built on this machine: the Triton ops do not need it
    print(f"[bench] ahn_ops extension unavailable ({str(e).splitlines()[0][:80]}...), stubbing ahn_ops._ext")
    for m in [m for m in sys.modules if m.startswith("ahn_ops")]:
        del sys.modules[m]
    stub = types.ModuleType("ahn_ops._ext")
    stub.load_extension = lambda name=None: None
    stub.has_cuda_kernels = lambda: False
    sys.modules["ahn_ops._ext"] = stub
    import ahn_ops  # noqa: F401

import triton  # noqa: E402

from ahn_ops.ops.ahn_attention import prefill as P  # noqa: E402
from ahn_ops.ops.ahn_attention import reference as ref  # noqa: E402

DEV = "cuda"


def make(kind, B, T, H, HKV, D, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    r = lambda *s, sc=1.0: torch.randn(*s, generator=g, device=DEV) * sc  # noqa: E731
    q, k, v = r(B, T, H, D).to(dtype), r(B, T, HKV, D).to(dtype), r(B, T, HKV, D).to(dtype)
    a = None if kind == "dn" else r(B, T, H).to(dtype)
    b, z = r(B, T, H).to(dtype), r(B, T, H).to(dtype)
    b = None if kind == "mamba2" else b
    A_log = None if kind == "dn" else torch.log(torch.rand(H, device=DEV, generator=g) * 15 + 1)
    dt_bias = None if kind == "dn" else r(H, sc=0.5)
    nw = 1 + 0.1 * r(H * D if kind == "mamba2" else D)  # Mamba2's norm spans the H heads of a token
    return q, k, v, a, b, z, A_log, dt_bias, nw, r(H, D, D, sc=D ** -0.5)


def window_flops(T, W, S, H, D):
    t = torch.arange(T, dtype=torch.float64)
    nk = torch.clamp(t + 1, max=W) + torch.clamp(t - W + 1, min=0).clamp(max=S)
    return 4 * D * H * nk.sum().item()


def memory_flops(T, W, S, H, D, BT=64, kind="gdn"):
    first = (S + W) // BT * BT
    n = max(0, T - first)
    if kind == "mamba2":  # no WY inverse, no w: state kd^T u, readout q h + tril(QK^T) u, projection
        return H * n * (6 * D * D + 4 * BT * D)
    return H * n * (8 * D * D + 10 * BT * D)


def rel(x, r):
    return ((x.float() - r.float()).norm() / r.float().norm()).item()


def check():
    print("== correctness vs fp32 reference (rel L2 err; bf16 torch math err in brackets) ==")
    rows = []
    cases = [("gdn", 1, 2048, 16, 2, 128, 300, 5, None), ("dn", 1, 1000, 8, 8, 64, 129, 0, None),
             ("gdn", 1, 3000, 8, 1, 128, 100, 3, [0, 1000, 1001, 2500, 3000]),
             ("gdn", 1, 8192, 16, 2, 128, 4096, 128, None), ("dn", 2, 700, 4, 2, 128, 64, 64, None),
             ("gdn", 1, 5000, 16, 2, 64, 1, 1, None)]
    for kind, B, T, H, HKV, D, W, S, cu in cases:
        args = make(kind, B, T, H, HKV, D, seed=T)
        cs = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
        out, _ = torch.ops.ahn.prefill_fwd(*args, W, S, kind, cs, None, False)
        r = ref.ahn_attention_ref(*args, W, S, kind, cu_seqlens=cs)
        lp = ref.ahn_attention_ref(*args, W, S, kind, cu_seqlens=cs, dtype=torch.bfloat16) if T <= 3000 else None
        e = rel(out, r)
        el = rel(lp, r) if lp is not None else float("nan")
        ok = (not out.isnan().any()) and e < (2 * el + 2e-3 if lp is not None else 1.5e-2)
        rows.append(ok)
        print(f"{kind} B{B} T{T} H{H}/{HKV} D{D} W{W} S{S} varlen={cu is not None}: {e:.2e} [{el:.2e}] "
              f"{'OK' if ok else 'FAIL'}")
    # chunked continuation on a cache == one pass
    from ahn_ops.cache import AHNLayerCache
    kind, B, T, H, HKV, D, W, S = "gdn", 2, 3000, 8, 2, 128, 700, 16
    args = make(kind, B, T, H, HKV, D, seed=1)
    zz = dict(dtype=torch.bfloat16, device=DEV)
    cache = AHNLayerCache(torch.zeros(B, S, HKV, D, **zz), torch.zeros(B, S, HKV, D, **zz),
                          torch.zeros(B, W, HKV, D, **zz), torch.zeros(B, W, HKV, D, **zz),
                          torch.zeros(B, W, H, 2, device=DEV), torch.zeros(B, H, D, D, device=DEV),
                          torch.zeros(B, dtype=torch.int64, device=DEV), W, S, kind)
    outs, t0 = [], 0
    for n in (1000, 1, 999, 1000):
        xs = [None if x is None else x[:, t0:t0 + n] for x in args[:6]] + list(args[6:])
        outs.append(ahn_ops.ahn_attention(*xs, window=W, sinks=S, kind=kind, cache=cache))  # T=1: decode path
        t0 += n
    out = torch.cat(outs, 1)
    one, _ = torch.ops.ahn.prefill_fwd(*args, W, S, kind, None, None, False)
    r = ref.ahn_attention_ref(*args, W, S, kind)
    e, e1 = rel(out, r), rel(one, r)
    ok = e < 2 * e1 + 2e-3
    rows.append(ok)
    print(f"cache continuation 1000+1+999+1000 vs ref: {e:.2e} (one pass {e1:.2e}) {'OK' if ok else 'FAIL'}")
    # torch.compile(fullgraph=True) through the public API
    args = make("gdn", 1, 300, 4, 2, 128, seed=9)
    f = torch.compile(lambda *xs: ahn_ops.ahn_attention(*xs, window=70, sinks=4, kind="gdn"), fullgraph=True)
    e = rel(f(*args), ahn_ops.ahn_attention(*args, window=70, sinks=4, kind="gdn"))
    rows.append(e == 0)
    print(f"torch.compile(fullgraph=True) vs eager: {e:.1e} {'OK' if e == 0 else 'FAIL'}")
    print(f"CHECK {'PASSED' if all(rows) else 'FAILED'} ({sum(rows)}/{len(rows)})")
    return all(rows)


def bench(T, W, S, H=16, HKV=2, D=128, kind="gdn", sweep=False):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    import torch.nn.functional as F

    args = make(kind, 1, T, H, HKV, D, seed=T + 1)
    q, k, v = args[:3]
    fw, fm = window_flops(T, W, S, H, D), memory_flops(T, W, S, H, D, kind=kind)
    rep = 200 if T <= 32768 else 1000
    med = lambda f: triton.testing.do_bench(f, warmup=50, rep=rep, return_mode="median")  # noqa: E731
    res = {}
    if sweep:
        for cfg in [(64, 4, 3), (64, 2, 3), (64, 4, 4)]:
            P.CONFIG["fwd"] = cfg
            try:
                t = med(lambda: P.prefill_fwd(*args, W, S, kind, memory=False))
                print(f"  sweep window-only fwd cfg(BN,warps,stages)={cfg}: {t:.3f} ms")
                res[f"win{cfg}"] = t
            except Exception as e:  # noqa: BLE001
                print(f"  sweep cfg {cfg} failed: {type(e).__name__}: {str(e)[:100]}")
        best = min((v_, k_) for k_, v_ in res.items())[1]
        P.CONFIG["fwd"] = eval(best[3:])
        for pw in (4, 8, 2):
            P.CONFIG["prep_warps"] = pw
            t = med(lambda: P.prefill_fwd(*args, W, S, kind, stage="prep"))
            print(f"  sweep prep pass num_warps={pw}: {t:.3f} ms")
            res[f"pw{pw}"] = t
        P.CONFIG["prep_warps"] = min((4, 8, 2), key=lambda x: res[f"pw{x}"])
        for bv in (16, 32):
            P.CONFIG["state_bv"][D] = bv
            t = med(lambda: P.prefill_fwd(*args, W, S, kind, stage="state"))
            print(f"  sweep state passes (prep + state) BV={bv}: {t:.3f} ms")
            res[f"bv{bv}"] = t
        P.CONFIG["state_bv"][D] = min((16, 32), key=lambda x: res[f"bv{x}"])
        print(f"  chosen CONFIG: {P.CONFIG}")
    t_full = med(lambda: P.prefill_fwd(*args, W, S, kind))
    t_win = med(lambda: P.prefill_fwd(*args, W, S, kind, memory=False))
    t_state = med(lambda: P.prefill_fwd(*args, W, S, kind, stage="state"))
    t_prep = med(lambda: P.prefill_fwd(*args, W, S, kind, stage="prep"))
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))

    def mask_mod(b, h, qi, ki):
        return (ki <= qi) & ((qi - ki < W) | (ki < S))

    bm = torch.compile(create_block_mask)(mask_mod, None, None, T, T, device=DEV)  # no T^2 mask in memory
    flex = torch.compile(flex_attention)
    t_flex = med(lambda: flex(qt, kt, vt, block_mask=bm, enable_gqa=True))
    try:
        t_sdpa = med(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True))
    except Exception as e:  # noqa: BLE001
        print(f"  sdpa failed: {e}")
        t_sdpa = float("nan")
    fsd = 4 * D * H * T * (T + 1) / 2
    nbytes = 2 * (2 * T * H * D + 2 * T * HKV * D)
    rows = [("ours fused (window+memory+epilogue)", t_full, fw + fm),
            ("ours window-only", t_win, fw), ("ours memory state passes (prep+state)", t_state, None),
            ("ours prep pass alone (gates, WY inverse)", t_prep, None),
            ("FlexAttention window+sinks", t_flex, fw), ("SDPA causal full", t_sdpa, fsd)]
    print(f"\n== T={T} W={W} S={S} H={H} HKV={HKV} D={D} {kind} bf16; window {fw / 1e12:.3f} TFLOP, "
          f"memory {fm / 1e12:.3f} TFLOP, bytes floor {nbytes / 1e9:.3f} GB ==")
    for name, t, f in rows:
        tf = f"{f / t / 1e9:.0f} TFLOP/s" if f else ""
        print(f"  {name:40s} {t:9.3f} ms  {tf}")
    print(f"  memory branch overhead over our window-only: {100 * (t_full / t_win - 1):.1f}%")
    return dict(T=T, W=W, S=S, full=t_full, win=t_win, state=t_state, flex=t_flex, sdpa=t_sdpa, fw=fw, fm=fm)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--shapes", nargs="*", type=int, default=[8192, 32768, 131072])
    ap.add_argument("--kind", default="gdn", choices=("gdn", "dn", "mamba2"))
    a = ap.parse_args()
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    ok = check() if a.check else True
    W_of = {8192: (4096, 128), 32768: (4096, 128), 131072: (32640, 128)}
    out = []
    for i, T in enumerate(a.shapes):
        W, S = W_of.get(T, (4096, 128))
        out.append(bench(T, W, S, kind=a.kind, sweep=a.sweep and T == 32768))
    print("\n| T | W | ours fused ms | ours window-only ms | mem overhead | state passes ms | Flex ms | SDPA ms |"
          " ours TFLOP/s (win+mem) |")
    for r in out:
        print(f"| {r['T']} | {r['W']} | {r['full']:.3f} | {r['win']:.3f} | {100 * (r['full'] / r['win'] - 1):.1f}% |"
              f" {r['state']:.3f} | {r['flex']:.3f} | {r['sdpa']:.3f} | {(r['fw'] + r['fm']) / r['full'] / 1e9:.0f} |")
    print(f"CHECK {'PASSED' if ok else 'FAILED'}" if a.check else "")


if __name__ == "__main__":
    main()
