"""The memory's state chain: one level (sequential over all chunks) against the two-level scan
(``prefill.state_chain``), alone and inside the fused forward and forward + backward.

Per shape (B=1 H=16 HKV=2 D=128 bf16, gdn unless --kinds): the prep pass runs once, then the chain
variants are timed on its outputs and checked against the one-level chain (max relative difference of
the per-chunk states and of v_new); then the whole forward and forward + backward with the chain's
CONFIG set to each variant. ``do_bench`` medians; the device is printed first.

    python benchmarks/bench_state_chain.py [--shapes 32768 131072] [--variants one 32,4,2 64,8,2]

A variant is ``one`` (the one-level chain) or ``BV,warps,stages`` of the per-segment kernels.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import import_ahn_ops  # noqa: E402

import_ahn_ops()
from triton.testing import do_bench  # noqa: E402

from ahn_ops.ops.ahn_attention import prefill as P  # noqa: E402
from ahn_ops.ops.ahn_attention.prefill_kernels import _prep_kernel  # noqa: E402
from ahn_ops.ops.ahn_attention.tables import BT, seq_tables  # noqa: E402

SHAPES = {32768: (4096, 128), 131072: (32640, 128), 24576: (2048, 0), 8192: (1024, 128)}


def inputs(kind, T, H=16, HKV=2, D=128, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*s, scale=1.0):
        return torch.randn(*s, generator=g, device="cuda") * scale

    dt = torch.bfloat16
    q, k, v = r(1, T, H, D).to(dt), r(1, T, HKV, D).to(dt), r(1, T, HKV, D).to(dt)
    a = None if kind == "dn" else r(1, T, H).to(dt)
    b = None if kind == "mamba2" else r(1, T, H).to(dt)
    z = r(1, T, H).to(dt)
    A_log = None if kind == "dn" else torch.log(torch.rand(H, device="cuda", generator=g) * 15 + 1)
    dt_bias = None if kind == "dn" else r(H, scale=0.5)
    nw = 1 + 0.1 * r(H * D if kind == "mamba2" else D)
    ow = r(H, D, D, scale=D ** -0.5)
    return [q, k, v, a, b, z, A_log, dt_bias, nw, ow]


def set_variant(name):
    if name == "one":
        P.CONFIG["state_seg"] = (None,) + tuple(P.CONFIG["state_seg"][1:])
    else:
        bv, warps, stages = (int(x) for x in name.split(","))
        P.CONFIG["state_seg"] = (1, bv, warps, stages)


def chain_only(kind, T, W, S, variants):
    """Times state_chain alone on one prep pass's outputs; returns {variant: (ms, max rel diff)}."""
    q, k, v, a, b, z, A_log, dt_bias, nw, ow = inputs(kind, T)
    H, HKV, D = q.shape[2], k.shape[2], q.shape[3]
    mamba2 = kind == "mamba2"
    gates = {"gdn": 0, "dn": 1, "mamba2": 3}[kind]
    seq, chunks, NT = seq_tables([T], [0], [0], [0], [0], "cuda")
    dev, dt = q.device, q.dtype
    dummy = q.new_zeros(16)
    gc = torch.empty(T, H, dtype=torch.float32, device=dev)
    w = dummy if mamba2 else torch.empty(T, H, D, dtype=dt, device=dev)
    u = torch.empty(T, H, D, dtype=dt, device=dev)
    kd = torch.empty(T, H, D, dtype=dt, device=dev)
    _prep_kernel[(NT, H)](
        kx=k.view(T, HKV, D), vx=v.view(T, HKV, D), a=a.view(T, H) if a is not None else dummy,
        b=b.view(T, H) if b is not None else dummy, gx=dummy, A_log=A_log.float() if A_log is not None else dummy,
        dt_bias=dt_bias.float() if dt_bias is not None else dummy, seq=seq, chunks=chunks, gc=gc, w=w, u=u, kd=kd,
        xs=dummy, H=H, HKV=HKV, D=D, W=W, S=S, BT=BT, GATES=gates, MAMBA2=mamba2,
        num_warps=P.CONFIG["prep_warps"])
    res, ref = {}, None
    for name in variants:
        set_variant(name)
        hs = torch.full((NT, H, D, D), float("nan"), dtype=dt, device=dev)
        vnew = u if mamba2 else torch.full((T, H, D), float("nan"), dtype=dt, device=dev)
        ht = torch.empty(1, H, D, D, dtype=torch.float32, device=dev)

        def run():
            P.state_chain(kd, w, u, gc, seq, [T], 1, H, D, W, S, mamba2, None, hs, vnew, ht, dummy)

        run()
        c0 = min((S + W) // BT, NT)
        got = (hs[c0:].float(), vnew[c0 * BT:].float(), ht.clone())
        if ref is None:
            ref, diff = got, 0.0
        else:
            diff = max(((x - y).norm() / y.norm().clamp_min(1e-30)).item() for x, y in zip(got, ref))
        res[name] = (do_bench(run, warmup=20, rep=200, return_mode="median"), diff)
    return res


def whole(kind, T, W, S, variants, backward):
    args = inputs(kind, T, seed=1)
    res = {}
    for name in variants:
        set_variant(name)
        if backward:
            leaves = [None if x is None else x.detach().requires_grad_(x.is_floating_point()) for x in args]
            dout = torch.randn_like(args[0])

            def run():
                o = torch.ops.ahn.prefill_fwd(*leaves, W, S, kind, None, None, False)[0]
                o.backward(dout)
        else:
            def run():
                torch.ops.ahn.prefill_fwd(*args, W, S, kind, None, None, False)
        run()
        res[name] = do_bench(run, warmup=5, rep=100 if T <= 32768 else 20, return_mode="median")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", type=int, nargs="*", default=[32768, 131072])
    ap.add_argument("--kinds", nargs="*", default=["gdn"])
    ap.add_argument("--variants", nargs="*", default=["one", "16,4,2", "32,4,2", "64,4,2", "64,8,2"])
    ap.add_argument("--whole", nargs="*", default=None, help="variants for the forward (+ backward) timings "
                    "(default: one and the first two-level variant)")
    ap.add_argument("--no-backward", action="store_true")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    keep = P.CONFIG["state_seg"]
    whole_vs = args.whole or ["one", next(v for v in args.variants if v != "one")]
    rows = []
    for kind in args.kinds:
        for T in args.shapes:
            W, S = SHAPES[T]
            NT = math.ceil(T / BT)
            for name, (ms, diff) in chain_only(kind, T, W, S, args.variants).items():
                rows.append((kind, T, f"chain {name}", ms, f"{diff:.1e}"))
                print(rows[-1], flush=True)
            for name, ms in whole(kind, T, W, S, whole_vs, False).items():
                rows.append((kind, T, f"forward, chain {name}", ms, ""))
                print(rows[-1], flush=True)
            if not args.no_backward and T <= 32768:
                for name, ms in whole(kind, T, W, S, whole_vs, True).items():
                    rows.append((kind, T, f"fwd+bwd, chain {name}", ms, ""))
                    print(rows[-1], flush=True)
            print(f"({kind} T={T}: {NT} chunks, two-level segments of {P._seg_chunks(NT)} chunks)")
    P.CONFIG["state_seg"] = keep
    print("\n| kind | T | what | ms | rel diff vs one-level |\n|---|---|---|---|---|")
    for kind, T, what, ms, diff in rows:
        print(f"| {kind} | {T} | {what} | {ms:.3f} | {diff} |")


if __name__ == "__main__":
    main()
