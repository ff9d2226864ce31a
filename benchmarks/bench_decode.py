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
  read        the floor at this size: the fastest of a few configurations of a plain streaming read
              (Triton, persistent programs, 16-byte loads, an xor per program) of the same number of bytes
              from NL rotated buffers, in a CUDA graph like ahn-graph; a copy's bandwidth is the floor for
              large transfers only: a 36 MB read pays the launch, the ramp and the drain too.
L2 (50 MB on H100): every timed call uses the next of NL layer caches, NL * bytes >= 150 MB,
and triton's do_bench also flushes L2 between calls.

Run:  python benchmarks/bench_decode.py [--batch 1 16 64] [--out results.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

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
    """GB/s of a 2 GiB device-to-device copy, counting bytes read + written (common.measure_ceilings)."""
    return C.measure_ceilings(C.Cfg(device="cuda"))["copy_GBps"]


def _shape(sh):
    return sh or dict(H=H, HKV=HKV, D=D, S=S, W=W, kind=KIND)


def make_layer(B, gen, start, sh=None, device="cuda"):
    """One layer's cache (random, full window) and parameters; ``sh`` = dict(H, HKV, D, S, W, kind)."""
    sh = _shape(sh)
    H_, HKV_, D_, S_, W_, kind = (sh[x] for x in ("H", "HKV", "D", "S", "W", "kind"))
    dev, dt = device, DTYPE
    c = dict(
        sink_k=torch.randn(B, S_, HKV_, D_, device=dev, dtype=dt, generator=gen),
        sink_v=torch.randn(B, S_, HKV_, D_, device=dev, dtype=dt, generator=gen),
        ring_k=torch.randn(B, W_, HKV_, D_, device=dev, dtype=dt, generator=gen),
        ring_v=torch.randn(B, W_, HKV_, D_, device=dev, dtype=dt, generator=gen),
        gates=torch.randn(B, W_, 2, H_, device=dev, dtype=dt, generator=gen),  # raw gate inputs a, b
        state=0.1 * torch.randn(B, H_, D_, D_, device=dev, generator=gen),
        pos=torch.full((B,), start, dtype=torch.int64, device=dev),
    )
    prm = dict(
        A_log=None if kind == "dn" else torch.log(torch.rand(H_, device=dev, generator=gen) * 15 + 1),
        dt_bias=None if kind == "dn" else 0.5 * torch.randn(H_, device=dev, generator=gen),
        norm_weight=1 + 0.1 * torch.randn(H_ * D_ if kind == "mamba2" else D_, device=dev, generator=gen),
        o_weight=(torch.randn(H_, D_, D_, device=dev, generator=gen) * D_ ** -0.5).to(dt),
    )
    return c, prm


def make_inputs(B, gen, sh=None, device="cuda"):
    sh = _shape(sh)
    H_, HKV_, D_, kind = sh["H"], sh["HKV"], sh["D"], sh["kind"]
    r = lambda *s_: torch.randn(*s_, device=device, dtype=DTYPE, generator=gen)  # noqa: E731
    x = dict(q=r(B, H_, D_), k=r(B, HKV_, D_), v=r(B, HKV_, D_), a=r(B, H_), b=r(B, H_), z=r(B, H_))
    if kind == "dn":
        x["a"] = None
    if kind == "mamba2":
        x["b"] = None
    return x


def ahn_call(x, c, p, sh=None):
    sh = _shape(sh)
    return torch.ops.ahn.decode_step(x["q"], x["k"], x["v"], x["a"], x["b"], x["z"], p["A_log"], p["dt_bias"],
                                     p["norm_weight"], p["o_weight"], c["sink_k"], c["sink_v"], c["ring_k"],
                                     c["ring_v"], c["gates"], c["state"], c["pos"], sh["W"], sh["S"], sh["kind"])


def unfused_call(x, c, p, t: int):
    """The unfused AHN decode step in PyTorch ops (positions known on the host, as in HF)."""
    B = x["q"].shape[0]
    slot = (t - S) % W
    # 1. recurrent step: the token leaving the window, GatedDeltaNet in plain torch
    kk = c["ring_k"][:, slot].float()                                    # [B, HKV, D]
    vv = c["ring_v"][:, slot].float()
    kn = (kk * torch.rsqrt((kk * kk).sum(-1, keepdim=True) + 1e-6)).repeat_interleave(G, 1)
    vv = vv.repeat_interleave(G, 1)
    gi = c["gates"][:, slot].float()                                     # [B, 2, H] raw a, b
    g = -torch.exp(p["A_log"]) * F.softplus(gi[:, 0] + p["dt_bias"])    # [B, H]
    w = torch.sigmoid(gi[:, 1])
    st = c["state"] * torch.exp(g)[..., None, None]
    upd = vv - torch.einsum("bhkv,bhk->bhv", st, kn)
    st = st + (w[..., None] * kn)[..., None] * upd[..., None, :]
    c["state"].copy_(st)
    # 2. the new token into the ring (and its gate inputs)
    c["ring_k"][:, slot] = x["k"]
    c["ring_v"][:, slot] = x["v"]
    c["gates"][:, slot, 0] = x["a"]
    c["gates"][:, slot, 1] = x["b"]
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


@functools.lru_cache(maxsize=None)
def _read_kernel():
    """One JIT function for every size (its compiles are cached per configuration)."""
    import triton
    import triton.language as tl

    @triton.jit
    def read_kernel(x, out, n, BLOCK: tl.constexpr):
        # a streaming read: every program walks its share of x in BLOCK-element steps, xor-folds what it
        # loaded (no floating point: the loads are the only work) and stores one word
        pid, nprog = tl.program_id(0), tl.num_programs(0)
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(pid * BLOCK, n, nprog * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            acc ^= tl.load(x + offs, mask=offs < n, other=0, cache_modifier=".cg")
        tl.store(out + pid, tl.xor_sum(acc, 0))

    return read_kernel


def read_floor(nbytes: int, NL: int, reps=10):
    """us of the fastest plain read of nbytes (rotating over NL buffers, in a CUDA graph as ahn-graph) over a
    few (programs per SM, block, warps) configurations, and that configuration."""
    kern = _read_kernel()
    n = nbytes // 4
    bufs = [torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, device="cuda") for _ in range(NL)]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    best = (float("inf"), None)
    for per_sm in (1, 2, 4, 8):
        for block, warps in ((4096, 4), (8192, 8), (16384, 8)):
            grid = (min(sms * per_sm, math.ceil(n / block)),)
            out = torch.empty(grid[0], dtype=torch.int32, device="cuda")
            us = graph_time([lambda b=b: kern[grid](b, out, n, BLOCK=block, num_warps=warps) for b in bufs], reps)
            if us < best[0]:  # (a failed configuration's NaN never wins)
                best = (us, f"{per_sm}/SM, {block} words, {warps} warps")
    del bufs
    return best


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
    """One step at the benchmark shape (B=1, W=32640, 64 splits of 512 keys) against the fp32 reference."""
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


# ---------------------------------------------------------------------------------------------
# run_all interface: cases(cfg) -> [case], run_case(cfg, case) -> [row], collect(cfg) -> [row]
# ---------------------------------------------------------------------------------------------
def cases(cfg):
    """Decode sweep: context length T (AHN constant, full attention grows), B, kinds, head shapes."""
    if cfg.cpu:
        base = dict(B=1, W=32, S=4, H=2, HKV=1, D=64)
        return [dict(base, kind="gdn", T=T) for T in (64, 256)] + [dict(base, kind=k, T=64) for k in ("dn", "mamba2")]
    H3, HKV3 = C.HEADS["3b"]
    base = dict(W=W, S=S, D=128)
    if cfg.quick:
        out = [dict(base, kind="gdn", B=1, T=T, H=H3, HKV=HKV3) for T in (32768, 131072)]
        out += [dict(base, kind="gdn", B=16, T=32768, H=H3, HKV=HKV3),
                dict(base, kind="dn", B=1, T=32768, H=H3, HKV=HKV3),
                dict(base, kind="mamba2", B=1, T=32768, H=H3, HKV=HKV3)]
        return out
    out = []
    for kind in C.KINDS:
        for hn in C.HEADS:
            H_, HKV_ = C.HEADS[hn]
            for B in (1, 16, 64):
                out.append(dict(base, kind=kind, B=B, T=65536, H=H_, HKV=HKV_))
    out += [dict(base, kind="gdn", B=1, T=T, H=H3, HKV=HKV3) for T in (8192, 32768, 131072, 262144, 524288)]
    return out


def shape_str(c):
    return f"B{c['B']} T{c['T']} W{c['W']} S{c['S']} H{c['H']}/{c['HKV']} D{c['D']}"


def run_case(cfg, c):
    """Our decode_step (eager, and replayed in a CUDA graph) against full-attention SDPA over a
    T-token cache, flash-attn's kvcache decode and the unfused AHN step (torch, and with fla)."""
    import peers as PE

    kind, B, T, W_, S_, H_, HKV_, D_ = (c[x] for x in ("kind", "B", "T", "W", "S", "H", "HKV", "D"))
    dev = cfg.device
    st = C.peer_status(dev)
    sh = dict(H=H_, HKV=HKV_, D=D_, S=S_, W=W_, kind=kind)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed + T + B)
    nbytes = C.decode_bytes(B, W_, S_, H_, HKV_, D_, T)
    fl = C.decode_flops(B, W_, S_, H_, D_, T)
    start = max(T, S_ + W_)
    # rotate over >= 150 MB of layer caches so that L2 (50 MB on H100) does not serve repeats
    NL = 1 if cfg.cpu else max(2, math.ceil(150e6 / nbytes))
    layers = [make_layer(B, gen, start, sh, dev) for _ in range(NL)]
    x = make_inputs(B, gen, sh, dev)
    it = [0]

    def rot(f):
        def g():
            cc, pp = layers[it[0] % NL]
            it[0] += 1
            return f(cc, pp)
        return g

    errs = []
    ms = C.bench_ms(rot(lambda cc, pp: ahn_call(x, cc, pp, sh)), cfg, errors=errs)
    note = ("ours failed: " + errs[-1]) if errs else ""
    peer_ms, notes = {}, {}
    if not cfg.cpu:
        us = graph_time([lambda cc=cc, pp=pp: ahn_call(x, cc, pp, sh) for cc, pp in layers])
        peer_ms["ahn_graph"] = us * 1e-3
        notes["ahn_graph"] = "ours replayed in a CUDA graph (speedup = graph / eager)"
    # full attention at context T (what AHN replaces): a T-token KV cache read per step
    nkv = 1 if cfg.cpu else max(1, min(NL, math.ceil(150e6 / C.full_decode_bytes(B, T, HKV_, D_))))
    e = []
    try:
        kvs = [(torch.randn(B, HKV_, T, D_, device=dev, dtype=DTYPE, generator=gen),
                torch.randn(B, HKV_, T, D_, device=dev, dtype=DTYPE, generator=gen)) for _ in range(nkv)]
        q4 = x["q"][:, :, None]

        def sdpa_rot():
            kk, vv = kvs[it[0] % nkv]
            it[0] += 1
            return F.scaled_dot_product_attention(q4, kk, vv, enable_gqa=True)

        peer_ms["sdpa_full"] = C.bench_ms(sdpa_rot, cfg, errors=e)
        notes["sdpa_full"] = "full attention over the T-token KV cache" + (f"; failed: {e[-1]}" if e else "")
        if st["flash_attn"]:
            notes["flash_attn"] = st["flash_attn"]
        else:
            from flash_attn import flash_attn_with_kvcache

            kc = [(kk.transpose(1, 2).contiguous(), vv.transpose(1, 2).contiguous()) for kk, vv in kvs]
            del kvs
            qf = x["q"][:, None]
            e = []
            peer_ms["flash_attn"] = C.bench_ms(lambda: flash_attn_with_kvcache(qf, *kc[it[0] % nkv]), cfg, errors=e)
            notes["flash_attn"] = "flash_attn_with_kvcache, T-token cache" + (f"; failed: {e[-1]}" if e else "")
            del kc
    except torch.OutOfMemoryError:
        peer_ms["sdpa_full"] = C.NAN
        notes["sdpa_full"] = "OOM at this KV cache size"
    kvs = kc = None  # noqa: F841
    t0 = start
    e = []
    peer_ms["unfused_torch"] = C.bench_ms(rot(lambda cc, pp: PE.unfused_decode(x, cc, pp, t0, W_, S_, kind)),
                                          cfg, errors=e)
    notes["unfused_torch"] = "torch ops: ring gather, memory step, ring write, cat + SDPA, epilogue" + \
        (f"; failed: {e[-1]}" if e else "")
    if kind != "mamba2":
        if st["fla"]:
            notes["unfused_fla"] = st["fla"]
        else:
            e = []
            peer_ms["unfused_fla"] = C.bench_ms(
                rot(lambda cc, pp: PE.unfused_decode(x, cc, pp, t0, W_, S_, kind, use_fla=True)), cfg, errors=e)
            notes["unfused_fla"] = "as unfused_torch, memory step fused_recurrent_gated_delta_rule" + \
                (f"; failed: {e[-1]}" if e else "")
    extra = dict(c, ahn_cache_bytes=C.ahn_cache_bytes(B, W_, S_, H_, HKV_, D_),
                 full_cache_bytes=C.full_cache_bytes(B, T, HKV_, D_))
    extra.pop("kind")
    rows = C.peer_rows(cfg, "decode", kind, shape_str(c), ms, fl, nbytes, peer_ms, notes, **extra)
    for r in rows:
        r["ours_note"] = note
    del layers
    if not cfg.cpu:
        torch.cuda.empty_cache()
    return rows


def collect(cfg, case_list=None):
    """Rows of the whole decode sweep (``cases(cfg)`` unless given)."""
    return [r for c in (case_list or cases(cfg)) for r in run_case(cfg, c)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--no-peers", action="store_true")
    args = ap.parse_args()
    C.import_ahn_ops()  # the repository root on sys.path when run as a script
    from ahn_ops._ext import decode_switches  # the op's debug switches, read again while set

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
        with decode_switches(AHN_DECODE_PDL="0"):
            row["ahn_nopdl_us"] = do_bench(ahn_rot)
        with decode_switches(AHN_DECODE_SIMT="1"):
            row["ahn_simt_us"] = do_bench(ahn_rot)
        row["ahn_graph_us"] = graph_time([lambda c=c, p=p: ahn_call(x, c, p) for c, p in layers])
        if B == 1:  # split-size sweep (default: 64 splits of 512 keys on 132 SMs)
            for keys in (256, 1024):
                with decode_switches(AHN_DECODE_SPLIT_KEYS=str(keys)):
                    row[f"ahn_graph_split{keys}_us"] = graph_time([lambda c=c, p=p: ahn_call(x, c, p)
                                                                   for c, p in layers])
            print("  B=1 graph us by keys/split: default %.1f, 256: %.1f, 1024: %.1f" % tuple(
                row[k] for k in ("ahn_graph_us", "ahn_graph_split256_us", "ahn_graph_split1024_us")), flush=True)
        row["read_us"], row["read_config"] = read_floor(nbytes, NL)
        print(f"  B={B}: read floor {row['read_us']:.1f} us ({row['read_config']})", flush=True)
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
    hdr = ["B", "MB", "ahn us", "%bw", "graph us", "%bw", "read us", "graph/rd", "noPDL", "simt", "sdpa us",
           "unfused", "unf-graph", "x unf", "x unf(g)"]
    print(" | ".join(f"{h:>9}" for h in hdr))
    for r in results["rows"]:
        pct = lambda k: 100 * r[k.replace("_us", "_GBps")] / copy_bw  # noqa: E731
        vals = [r["B"], r["bytes"] / 1e6, r["ahn_us"], pct("ahn_us"), r["ahn_graph_us"], pct("ahn_graph_us"),
                r["read_us"], r["ahn_graph_us"] / r["read_us"],
                r["ahn_nopdl_us"], r["ahn_simt_us"], r.get("sdpa_us", float("nan")),
                r.get("unfused_us", float("nan")), r.get("unfused_graph_us", float("nan")),
                r.get("unfused_us", float("nan")) / r["ahn_us"],
                r.get("unfused_graph_us", float("nan")) / r["ahn_graph_us"]]
        print(" | ".join(f"{v:>9.1f}" if isinstance(v, float) else f"{v:>9}" for v in vals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
