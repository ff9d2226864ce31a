"""Benchmark of one AHN decode step per layer: torch.ops.ahn.decode_step against its peers.

Shape (Qwen2.5-3B attention, the published AHN inference window): H=16, HKV=2, D=128, S=128,
W=32640, bf16, kind gdn, every sequence past S + W (full window, a token absorbed each step).

Bytes that must move per layer-step and sequence (each read once, each write once):
    window K/V   (S + W) * HKV * D * 2 tensors * 2 B = 33.55 MB   (the cached window, the
                 leaving token's row included: the state reads it)
    state        H * D * D * 4 B * 2 (read + write) = 2.10 MB
    total        35.65 MB per sequence; the new token, gates and the output are < 0.1 MB.
FLOPs (not the bound): 4 * (S + W) * H * D (QK and PV) + ~6 * H * D * D (state) = 0.27 GFLOP.
GB/s is reported against a device-to-device copy measured in the same run (read + write).

Peers, same run, same shapes:
  sdpa        F.scaled_dot_product_attention over a contiguous 32768-token GQA cache
              (q [B,16,1,128], k/v [B,2,32768,128], enable_gqa=True): attention alone.
  unfused     the AHN decode written with PyTorch ops: read the leaving token from the ring,
              l2norm, GatedDeltaNet step in plain torch (einsum; fla is not installed on the
              device), write the new token into the ring, torch.cat(sinks, ring) + SDPA,
              state readout, RMSNorm * norm_weight * silu(z), per-head o_proj, add.
  ahn         torch.ops.ahn.decode_step (2 launches; PDL on sm_90), eager, do_bench median.
  ahn-graph   the same op, NL layers x R steps captured in one CUDA graph; time per layer-step.
  (+ variants: ahn without PDL, ahn on CUDA cores instead of tensor cores, unfused in a graph)
L2 (50 MB on H100): every timed call uses the next of NL layer caches, NL * bytes >= 150 MB,
and triton's do_bench also flushes L2 between calls.

Run:  python benchmarks/bench_decode.py [--batch 1 16 64] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

H, HKV, D, S, W = 16, 2, 128, 128, 32640
G = H // HKV
DTYPE = torch.bfloat16
KIND = "gdn"


def bytes_min(B: int) -> int:
    return B * ((S + W) * HKV * D * 2 * 2 + H * D * D * 4 * 2)


def flops(B: int) -> float:
    return B * (4.0 * (S + W) * H * D + 6.0 * H * D * D)


def do_bench(fn, warmup=50, rep=300):
    """Median in us (triton's do_bench: CUDA events, L2 flushed before each call); NaN on error."""
    import triton.testing

    try:
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3
    except Exception as e:  # a peer that fails must not cost the whole run
        print(f"  failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        torch.cuda.synchronize()
        return float("nan")


def copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy, counting bytes read + written."""
    n = 1 << 30
    x = torch.empty(n, dtype=torch.int16, device="cuda").random_()
    y = torch.empty_like(x)
    t = do_bench(lambda: y.copy_(x), warmup=20, rep=200)
    del x, y
    return 2 * 2 * n / (t * 1e-6) / 1e9


def make_layer(B, gen, start):
    """One layer's cache (random, full window) and parameters."""
    dev = "cuda"
    c = dict(
        sink_k=torch.randn(B, S, HKV, D, device=dev, dtype=DTYPE, generator=gen),
        sink_v=torch.randn(B, S, HKV, D, device=dev, dtype=DTYPE, generator=gen),
        ring_k=torch.randn(B, W, HKV, D, device=dev, dtype=DTYPE, generator=gen),
        ring_v=torch.randn(B, W, HKV, D, device=dev, dtype=DTYPE, generator=gen),
        gates=torch.stack([-0.1 * torch.rand(B, W, H, device=dev, generator=gen),
                           torch.rand(B, W, H, device=dev, generator=gen)], -1),
        state=0.1 * torch.randn(B, H, D, D, device=dev, generator=gen),
        pos=torch.full((B,), start, dtype=torch.int64, device=dev),
    )
    prm = dict(
        A_log=torch.log(torch.rand(H, device=dev, generator=gen) * 15 + 1),
        dt_bias=0.5 * torch.randn(H, device=dev, generator=gen),
        norm_weight=1 + 0.1 * torch.randn(D, device=dev, generator=gen),
        o_weight=(torch.randn(H, D, D, device=dev, generator=gen) * D ** -0.5).to(DTYPE),
    )
    return c, prm


def make_inputs(B, gen):
    dev = "cuda"
    return dict(
        q=torch.randn(B, H, D, device=dev, dtype=DTYPE, generator=gen),
        k=torch.randn(B, HKV, D, device=dev, dtype=DTYPE, generator=gen),
        v=torch.randn(B, HKV, D, device=dev, dtype=DTYPE, generator=gen),
        a=torch.randn(B, H, device=dev, dtype=DTYPE, generator=gen),
        b=torch.randn(B, H, device=dev, dtype=DTYPE, generator=gen),
        z=torch.randn(B, H, device=dev, dtype=DTYPE, generator=gen),
    )


def ahn_call(x, c, p):
    return torch.ops.ahn.decode_step(x["q"], x["k"], x["v"], x["a"], x["b"], x["z"], p["A_log"], p["dt_bias"],
                                     p["norm_weight"], p["o_weight"], c["sink_k"], c["sink_v"], c["ring_k"],
                                     c["ring_v"], c["gates"], c["state"], c["pos"], W, S, KIND)


def unfused_call(x, c, p, t: int):
    """The unfused AHN decode step in PyTorch ops (positions known on the host, as in HF)."""
    B = x["q"].shape[0]
    slot = (t - S) % W
    # 1. recurrent step: the token leaving the window, GatedDeltaNet in plain torch
    kk = c["ring_k"][:, slot].float()                                    # [B, HKV, D]
    vv = c["ring_v"][:, slot].float()
    kn = (kk * torch.rsqrt((kk * kk).sum(-1, keepdim=True) + 1e-6)).repeat_interleave(G, 1)
    vv = vv.repeat_interleave(G, 1)
    g, w = c["gates"][:, slot, :, 0], c["gates"][:, slot, :, 1]          # [B, H]
    st = c["state"] * torch.exp(g)[..., None, None]
    upd = vv - torch.einsum("bhkv,bhk->bhv", st, kn)
    st = st + (w[..., None] * kn)[..., None] * upd[..., None, :]
    c["state"].copy_(st)
    # 2. the new token into the ring (and its gates)
    c["ring_k"][:, slot] = x["k"]
    c["ring_v"][:, slot] = x["v"]
    gt = -torch.exp(p["A_log"]) * F.softplus(x["a"].float() + p["dt_bias"])
    c["gates"][:, slot, :, 0] = gt
    c["gates"][:, slot, :, 1] = torch.sigmoid(x["b"].float())
    # 3. window attention: torch.cat of sinks + ring, SDPA
    kv_k = torch.cat([c["sink_k"], c["ring_k"]], 1).transpose(1, 2)     # [B, HKV, S+W, D]
    kv_v = torch.cat([c["sink_v"], c["ring_v"]], 1).transpose(1, 2)
    o_win = F.scaled_dot_product_attention(x["q"][:, :, None], kv_k, kv_v, enable_gqa=True)[:, :, 0]
    # 4. readout, norm, gate, projection
    q = x["q"].float()
    qn = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) * D ** -0.5
    m = torch.einsum("bhkv,bhk->bhv", st, qn)
    z = x["z"].float()
    u = m * torch.rsqrt(m.pow(2).mean(-1, keepdim=True) + 1e-5) * p["norm_weight"] * (z * torch.sigmoid(z))[..., None]
    y = torch.einsum("bhd,hde->bhe", u, p["o_weight"].float())
    return (o_win.float() + y).to(DTYPE)


def graph_time(fns, reps=10):
    """us per call of a graph capturing reps x [fns...] (each fn one layer-step); NaN on error."""
    try:
        return _graph_time(fns, reps)
    except Exception as e:
        print(f"  graph failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return float("nan")


def _graph_time(fns, reps):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for f in fns:
                f()
    g.replay()
    torch.cuda.synchronize()
    t = do_bench(g.replay, warmup=20, rep=200)
    return t / (reps * len(fns))


def check_large_window(gen):
    """One step at the benchmark shape (B=1, W=32640, 128 splits) against the fp32 reference."""
    from ahn_ops.ops.ahn_attention.reference import ahn_decode_ref

    c, p = make_layer(1, gen, S + W + 12345)
    x = make_inputs(1, gen)
    c32 = {k: (v.float().clone() if v.is_floating_point() else v.clone()) for k, v in c.items()}
    out = ahn_call(x, c, p)
    names = ["sink_k", "sink_v", "ring_k", "ring_v", "gates", "state", "pos"]
    ref = ahn_decode_ref(x["q"], x["k"], x["v"], x["a"], x["b"], x["z"], p["A_log"], p["dt_bias"],
                         p["norm_weight"], p["o_weight"], *[c32[n] for n in names], W, S, KIND)
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    serr = ((c["state"].double() - c32["state"].double()).norm() / c32["state"].double().norm()).item()
    return err, serr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--no-peers", action="store_true")
    args = ap.parse_args()
    import ahn_ops  # noqa: F401

    torch.backends.cuda.matmul.allow_tf32 = False
    prop = torch.cuda.get_device_properties(0)
    dev_name = f"{prop.name}, {prop.multi_processor_count} SMs"
    gen = torch.Generator(device="cuda").manual_seed(0)
    copy_bw = copy_bandwidth()
    err, serr = check_large_window(gen)
    print(f"device: {dev_name}; torch {torch.__version__}; copy bandwidth {copy_bw:.0f} GB/s")
    print(f"check at B=1, W={W}: out rel err vs fp32 reference {err:.2e}, state rel err {serr:.2e}")
    results = dict(device=dev_name, torch=torch.__version__, copy_GBps=copy_bw, check_err=err, check_state_err=serr,
                   shape=dict(H=H, HKV=HKV, D=D, S=S, W=W, dtype="bf16", kind=KIND), rows=[])
    start = S + W + 1000
    for B in args.batch:
        nbytes = bytes_min(B)
        NL = max(2, math.ceil(150e6 / nbytes))
        layers = [make_layer(B, gen, start) for _ in range(NL)]
        x = make_inputs(B, gen)
        row = dict(B=B, bytes=nbytes, layers_rotated=NL)

        it = [0]

        def ahn_rot():
            c, p = layers[it[0] % NL]
            it[0] += 1
            return ahn_call(x, c, p)

        row["ahn_us"] = do_bench(ahn_rot)
        os.environ["AHN_DECODE_PDL"] = "0"
        row["ahn_nopdl_us"] = do_bench(ahn_rot)
        os.environ.pop("AHN_DECODE_PDL")
        os.environ["AHN_DECODE_SIMT"] = "1"
        row["ahn_simt_us"] = do_bench(ahn_rot)
        os.environ.pop("AHN_DECODE_SIMT")
        row["ahn_graph_us"] = graph_time([lambda c=c, p=p: ahn_call(x, c, p) for c, p in layers])
        if B == 1:  # split-size sweep (default: 128 splits of 256 keys on 132 SMs)
            for keys in (128, 512, 1024):
                os.environ["AHN_DECODE_SPLIT_KEYS"] = str(keys)
                row[f"ahn_graph_split{keys}_us"] = graph_time([lambda c=c, p=p: ahn_call(x, c, p) for c, p in layers])
            os.environ.pop("AHN_DECODE_SPLIT_KEYS")
            print("  B=1 graph us by keys/split: default %.1f, 128: %.1f, 512: %.1f, 1024: %.1f" % tuple(
                row[k] for k in ("ahn_graph_us", "ahn_graph_split128_us", "ahn_graph_split512_us",
                                 "ahn_graph_split1024_us")), flush=True)
        if not args.no_peers:
            kvs = [(torch.randn(B, HKV, S + W, D, device="cuda", dtype=DTYPE, generator=gen),
                    torch.randn(B, HKV, S + W, D, device="cuda", dtype=DTYPE, generator=gen)) for _ in range(NL)]
            q4 = x["q"][:, :, None]

            def sdpa_rot():
                kk, vv = kvs[it[0] % NL]
                it[0] += 1
                return F.scaled_dot_product_attention(q4, kk, vv, enable_gqa=True)

            row["sdpa_us"] = do_bench(sdpa_rot)
            del kvs

            def unfused_rot():
                c, p = layers[it[0] % NL]
                it[0] += 1
                return unfused_call(x, c, p, start + 7)

            row["unfused_us"] = do_bench(unfused_rot, warmup=20, rep=200)
            row["unfused_graph_us"] = graph_time([lambda c=c, p=p: unfused_call(x, c, p, start + 7)
                                                  for c, p in layers], reps=2)
        for key in [k for k in row if k.endswith("_us")]:
            row[key.replace("_us", "_GBps")] = nbytes / (row[key] * 1e-6) / 1e9
        results["rows"].append(row)
        del layers
        torch.cuda.empty_cache()

    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    # the table last (the device tool returns the tail of the output)
    print(f"\nper layer-step, H={H} HKV={HKV} D={D} S={S} W={W} bf16 {KIND}; copy {copy_bw:.0f} GB/s")
    hdr = ["B", "MB", "ahn us", "%bw", "graph us", "%bw", "noPDL", "simt", "sdpa us", "unfused", "unf-graph",
           "x unf", "x unf(g)"]
    print(" | ".join(f"{h:>9}" for h in hdr))
    for r in results["rows"]:
        pct = lambda k: 100 * r[k.replace("_us", "_GBps")] / copy_bw  # noqa: E731
        vals = [r["B"], r["bytes"] / 1e6, r["ahn_us"], pct("ahn_us"), r["ahn_graph_us"], pct("ahn_graph_us"),
                r["ahn_nopdl_us"], r["ahn_simt_us"], r.get("sdpa_us", float("nan")),
                r.get("unfused_us", float("nan")), r.get("unfused_graph_us", float("nan")),
                r.get("unfused_us", float("nan")) / r["ahn_us"],
                r.get("unfused_graph_us", float("nan")) / r["ahn_graph_us"]]
        print(" | ".join(f"{v:>9.1f}" if isinstance(v, float) else f"{v:>9}" for v in vals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
