"""Forward-engine spike (issue "A Hopper forward engine"): cuDNN's band attention beside ours and the peers.

One device run: checks the cuDNN band (forward and backward) against an fp32 reference on odd sizes,
then times, at the standard shapes, the cuDNN band alone (forward, backward), FlexAttention's
window + sinks, our Triton fused forward and its window-only path, our memory passes alone, and the
memory passes on a side stream beside the cuDNN band. Prints one table last.

    python benchmarks/spike_hopper_fwd.py [--shapes 32768 131072] [--no-flex]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import compiled_flex, import_ahn_ops, sliding_window_block_mask  # noqa: E402

import_ahn_ops()
from triton.testing import do_bench  # noqa: E402

from ahn_ops.ops.ahn_attention import band_cudnn as BC  # noqa: E402
from ahn_ops.ops.ahn_attention.reference import window_attention_ref  # noqa: E402
from ahn_ops.ops.ahn_attention import prefill as P  # noqa: E402

SHAPES = {32768: (4096, 128), 131072: (32640, 128), 24576: (2048, 0)}


def rel(x, r):
    return float((x.float() - r.float()).norm() / r.float().norm().clamp_min(1e-30))


def check():
    rows = []
    for (B, T, H, HKV, D, W) in [(1, 1000, 8, 2, 128, 100), (2, 777, 4, 4, 128, 1), (1, 515, 16, 2, 128, 4096),
                                 (1, 1031, 8, 1, 64, 257)]:
        for dt in (torch.bfloat16, torch.float16):
            g = torch.Generator(device="cuda").manual_seed(T + W)
            q = torch.randn(B, T, H, D, device="cuda", dtype=dt, generator=g)
            k = torch.randn(B, T, HKV, D, device="cuda", dtype=dt, generator=g)
            v = torch.randn(B, T, HKV, D, device="cuda", dtype=dt, generator=g)
            out = torch.full_like(q, float("nan"))
            try:
                o, lse = BC.band_fwd(q, k, v, W, out=out)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001
                rows.append(f"fwd B{B} T{T} H{H}/{HKV} D{D} W{W} {dt}: FAILED {type(e).__name__}: {str(e)[:300]}")
                continue
            qr, kr, vr = (x.float().requires_grad_() for x in (q, k, v))
            orf, lr = window_attention_ref(qr, kr, vr, W, 0, return_lse=True)  # the band alone (no sinks)
            # torch's own low-precision error: the reference on rounded output
            ob, _ = window_attention_ref(q, k, v, W, 0, return_lse=True)
            e_o, e_l = rel(o, orf), float((lse - lr).abs().max())
            e_t = rel(orf.to(dt), orf)
            do = torch.randn_like(q)
            orf.backward(do.float())
            try:
                dq, dk, dv = BC.band_bwd(q, k, v, o, do, lse, W)
                torch.cuda.synchronize()
                e_g = [rel(a, b.grad) for a, b in zip((dq, dk, dv), (qr, kr, vr))]
            except Exception as e:  # noqa: BLE001
                e_g = [float("nan")] * 3
                rows.append(f"bwd FAILED {type(e).__name__}: {str(e)[:300]}")
            rows.append(f"B{B} T{T} H{H}/{HKV} D{D} W{W} {str(dt)[6:]}: o {e_o:.2e} (bf16 rounding {e_t:.2e}) "
                        f"lse max {e_l:.1e} nan {int(torch.isnan(o).sum())} | dq {e_g[0]:.2e} dk {e_g[1]:.2e} "
                        f"dv {e_g[2]:.2e}")
    return rows


def make(T, H=16, HKV=2, D=128, dt=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", dtype=dt, generator=g)  # noqa: E731
    x = dict(q=r(1, T, H, D), k=r(1, T, HKV, D), v=r(1, T, HKV, D), a=r(1, T, H), b=r(1, T, H), z=r(1, T, H))
    x["A_log"] = torch.rand(H, device="cuda") * 0.5
    x["dt_bias"] = torch.rand(H, device="cuda") * 0.1
    x["norm_weight"] = torch.rand(D, device="cuda") + 0.5
    x["o_weight"] = (torch.randn(H, D, D, device="cuda") * D ** -0.5).to(dt)
    return x


def band_flops(T, W, H, D):
    n = sum(min(t + 1, W) for t in range(T)) if T < 4096 else (W * (W + 1) // 2 + max(T - W, 0) * W
                                                                if T >= W else T * (T + 1) // 2)
    return 4 * D * H * n


def ms(fn):
    return do_bench(fn, warmup=25, rep=150, return_mode="median")


def bench(T, flex=True):
    W, S = SHAPES[T]
    H, HKV, D = 16, 2, 128
    x = make(T)
    q, k, v = x["q"], x["k"], x["v"]
    res = {}
    fl = band_flops(T, W, H, D)

    def fused(memory=True, stage="all"):
        return P.prefill_fwd(q, k, v, x["a"], x["b"], x["z"], x["A_log"], x["dt_bias"], x["norm_weight"],
                             x["o_weight"], W, S, "gdn", memory=memory, stage=stage)

    kinds = ("gdn", "dn", "mamba2") if T <= 32768 else ("gdn",)
    for kind in kinds:
        xa, xb = (None if kind == "dn" else x["a"]), (None if kind == "mamba2" else x["b"])
        nw = x["norm_weight"].repeat(H) if kind == "mamba2" else x["norm_weight"]
        for eng in ("cudnn", "triton"):
            P.CONFIG["band"] = eng
            res[f"fused fwd {kind} [{eng} band]"] = ms(
                lambda: P.prefill_fwd(q, k, v, xa, xb, x["z"], x["A_log"], x["dt_bias"], nw, x["o_weight"],
                                      W, S, kind))
    if T == 32768:
        P.CONFIG["band"] = "cudnn"
        for cfg in [(64, 4, 1), (64, 4, 3), (64, 8, 2), (128, 8, 2), (32, 4, 2), (64, 2, 2)]:
            P.CONFIG["fwd_band_in"] = cfg
            res[f"fused fwd gdn [cudnn] combine {cfg}"] = ms(
                lambda: P.prefill_fwd(q, k, v, x["a"], x["b"], x["z"], x["A_log"], x["dt_bias"], x["norm_weight"],
                                      x["o_weight"], W, S, "gdn"))
        P.CONFIG["fwd_band_in"] = (64, 4, 2)
    P.CONFIG["band"] = "triton"
    res["cudnn band fwd"] = ms(lambda: BC.band_fwd(q, k, v, W))
    o, lse = BC.band_fwd(q, k, v, W)
    do = torch.randn_like(q)
    res["cudnn band bwd"] = ms(lambda: BC.band_bwd(q, k, v, o, do, lse, W))
    res["ours window-only"] = ms(lambda: fused(memory=False))
    res["ours memory passes"] = ms(lambda: fused(stage="state"))
    side = torch.cuda.Stream()

    def overlapped():
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            fused(stage="state")
        BC.band_fwd(q, k, v, W)
        main.wait_stream(side)

    res["band || memory (2 streams)"] = ms(overlapped)
    if flex:
        bm = sliding_window_block_mask(T, W, S, "cuda")
        fa = compiled_flex()
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        res["flex window+sinks fwd"] = ms(lambda: fa(qt, kt, vt, block_mask=bm, enable_gqa=True))
    if T == 32768:
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        t_sd = ms(lambda: sdpa(qt, kt, vt, is_causal=True, enable_gqa=True))
        res["sdpa causal (full T)"] = t_sd
        res["_sdpa_tflops"] = 4 * D * H * T * (T + 1) / 2 / t_sd / 1e9
    return res, fl


def build_latency():
    """Host time of the first call at a new shape (cuDNN graph build + plan) and of a repeat."""
    import time

    q = torch.randn(1, 5000, 16, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 5000, 2, 128, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    BC.band_fwd(q, k, k, 1000)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    BC.band_fwd(q, k, k, 1000)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", type=int, nargs="*", default=[32768, 131072])
    ap.add_argument("--no-flex", action="store_true")
    args = ap.parse_args()
    import triton

    cd = BC._cudnn()
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
          f"cudnn(torch) {torch.backends.cudnn.version()} cudnn(frontend backend) {cd.backend_version()}")
    for r in check():
        print("check:", r)
    b1, b2 = build_latency()
    print(f"cuDNN band: first call at a new shape {b1:.1f} ms (graph build), repeat {b2:.2f} ms")
    table = []
    for T in args.shapes:
        res, fl = bench(T, flex=not args.no_flex and T <= 32768)
        W, S = SHAPES[T]
        for name, t in res.items():
            if name.startswith("_"):
                continue
            tf = f"{fl / t / 1e9:.0f}" if "band" in name and "||" not in name and "bwd" not in name else ""
            if "bwd" in name:
                tf = f"{2.5 * fl / t / 1e9:.0f}"
            table.append(f"T={T} W={W} S={S} | {name:28s} | {t:8.3f} ms | {tf}")
        if "_sdpa_tflops" in res:
            table.append(f"T={T} | sdpa causal TFLOP/s {res['_sdpa_tflops']:.0f}")
        print("\n".join(table[-len(res):]), flush=True)
    print("\n=== table (median ms; TFLOP/s of the band: fwd 4*D*H*n, bwd 2.5x) ===")
    print("\n".join(table))


if __name__ == "__main__":
    main()
