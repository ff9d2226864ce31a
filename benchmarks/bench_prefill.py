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
`collect(cfg)` (used by benchmarks/run_all.py) adds fla, flash-attn and the unfused AHN pipeline
(benchmarks/peers.py) where installed, and returns result rows instead of printing.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

ahn_ops = C.import_ahn_ops()

import triton  # noqa: E402

from ahn_ops.ops.ahn_attention import prefill as P  # noqa: E402
from ahn_ops.ops.ahn_attention import reference as ref  # noqa: E402

DEV = "cuda"


def make(kind, B, T, H, HKV, D, dtype=torch.bfloat16, seed=0, device=None):
    DEV = device or globals()["DEV"]  # noqa: N806
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


window_flops = C.window_flops
memory_flops = C.memory_flops


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
        out = torch.ops.ahn.prefill_fwd(*args, W, S, kind, cs, None, False)[0]
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
                          torch.zeros(B, W, 2, H, **zz), torch.zeros(B, H, D, D, device=DEV),
                          torch.zeros(B, dtype=torch.int64, device=DEV), W, S, kind)
    outs, t0 = [], 0
    for n in (1000, 1, 999, 1000):
        xs = [None if x is None else x[:, t0:t0 + n] for x in args[:6]] + list(args[6:])
        outs.append(ahn_ops.ahn_attention(*xs, window=W, sinks=S, kind=kind, cache=cache))  # T=1: decode path
        t0 += n
    out = torch.cat(outs, 1)
    one = torch.ops.ahn.prefill_fwd(*args, W, S, kind, None, None, False)[0]
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
        # query rows per _fwd_kernel program (128: two memory chunks per program); printed only,
        # the defaults come back (fwd_rows None: prefill._fwd_launch picks the rows by the window)
        base = (P.CONFIG["fwd"], P.CONFIG["fwd_rows"])
        for rows, cfg in [(64, base[0]), (128, (64, 4, 3)), (128, (64, 8, 3)), (128, (64, 8, 2))]:
            P.CONFIG["fwd"], P.CONFIG["fwd_rows"] = cfg, rows
            try:
                t = med(lambda: P.prefill_fwd(*args, W, S, kind))
                print(f"  sweep full fwd fwd_rows={rows} cfg(BN,warps,stages)={cfg}: {t:.3f} ms")
            except Exception as e:  # noqa: BLE001
                print(f"  sweep fwd_rows={rows} cfg {cfg} failed: {type(e).__name__}: {str(e)[:100]}")
        P.CONFIG["fwd"], P.CONFIG["fwd_rows"] = base
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

    bm = C.sliding_window_block_mask(T, W, S, DEV)  # compiled: no T^2 mask in memory
    flex = C.compiled_flex()
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


# ---------------------------------------------------------------------------------------------
# run_all interface: cases(cfg) -> [case], run_case(cfg, case) -> [row], collect(cfg) -> [row]
# ---------------------------------------------------------------------------------------------
def cases(cfg):
    """The prefill sweep: T (with its W), kinds, Qwen2.5 head shapes, W, S and B."""
    if cfg.cpu:
        base = dict(B=1, H=2, HKV=1, D=64, W=32, S=4)
        out = [dict(base, kind="gdn", T=64)] + [dict(base, kind=k, T=128) for k in C.KINDS]
        return out
    out = []
    W_of = {8192: (4096, 128), 32768: (4096, 128), 131072: (32640, 128)}
    Ts = (8192, 32768) if cfg.quick else (8192, 32768, 131072)
    kinds = ("gdn",) if cfg.quick else C.KINDS
    heads = ("3b",) if cfg.quick else tuple(C.HEADS)
    for kind in kinds:
        for hn in heads:
            H, HKV = C.HEADS[hn]
            for T in Ts:
                W, S = W_of[T]
                out.append(dict(kind=kind, B=1, T=T, W=W, S=S, H=H, HKV=HKV, D=128))
    H, HKV = C.HEADS["3b"]
    if cfg.quick:  # one point of every other axis
        # every kind at the standard shape (issue 7 compares them with gdn at T=32768)
        out += [dict(kind="dn", B=1, T=32768, W=4096, S=128, H=H, HKV=HKV, D=128),
                dict(kind="mamba2", B=1, T=32768, W=4096, S=128, H=H, HKV=HKV, D=128),
                dict(kind="gdn", B=1, T=8192, W=4096, S=128, H=28, HKV=4, D=128),
                dict(kind="gdn", B=1, T=8192, W=4096, S=128, H=40, HKV=8, D=128),
                dict(kind="gdn", B=4, T=8192, W=4096, S=128, H=H, HKV=HKV, D=128)]
        return out
    out += [dict(kind="gdn", B=1, T=32768, W=W, S=128, H=H, HKV=HKV, D=128) for W in (1024, 16384)]
    out += [dict(kind="gdn", B=1, T=32768, W=4096, S=0, H=H, HKV=HKV, D=128)]
    out += [dict(kind="gdn", B=B, T=8192, W=4096, S=128, H=H, HKV=HKV, D=128) for B in (4, 16)]
    return out


def shape_str(c):
    return f"B{c['B']} T{c['T']} W{c['W']} S{c['S']} H{c['H']}/{c['HKV']} D{c['D']}"


def run_case(cfg, c):
    """Ours (torch.ops.ahn.prefill_fwd's launcher) and every installed peer on one shape."""
    import torch.nn.functional as F

    import peers as PE

    kind, B, T, W, S, H, HKV, D = (c[x] for x in ("kind", "B", "T", "W", "S", "H", "HKV", "D"))
    dev = cfg.device
    st = C.peer_status(dev)
    args = make(kind, B, T, H, HKV, D, seed=cfg.seed + T, device=dev)
    q, k, v = args[:3]
    fw, fm = window_flops(T, W, S, H, D) * B, memory_flops(T, W, S, H, D, kind=kind) * B
    nbytes = C.prefill_bytes(B, T, H, HKV, D, kind=kind)
    errs = []
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if dev == "cpu" and not interp:  # no Triton on the CPU without the interpreter: the reference path
        note = "ours = reference path (TRITON_INTERPRET unset)"
        ours_fn = lambda: ahn_ops.ahn_attention(*args, window=W, sinks=S, kind=kind, backend="reference")  # noqa: E731
    else:
        note = "ours = Triton interpreter" if dev == "cpu" else ""
        ours_fn = lambda: P.prefill_fwd(*args, W, S, kind)[0]  # noqa: E731
    ms = C.bench_ms(ours_fn, cfg, errors=errs)
    if errs:
        note = (note + "; " if note else "") + "ours failed: " + errs[-1]
    out_ours = ours_fn() if not errs else None
    peer_ms, notes = {}, {}
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    flex, un_err = None, None
    if st["flex"]:
        notes["flex"] = st["flex"]
    else:
        e = []
        try:
            flex = PE.flex_window(T, W, S, dev)
            peer_ms["flex"] = C.bench_ms(lambda: flex(qt, kt, vt), cfg, errors=e)
        except Exception as ex:  # noqa: BLE001
            e.append(f"{type(ex).__name__}: {str(ex)[:120]}")
            peer_ms["flex"] = C.NAN
        notes["flex"] = ("eager (CPU)" if dev == "cpu" else "compiled, window+sinks") + \
            (f"; failed: {e[-1]}" if e else "")
    e = []
    peer_ms["sdpa_full"] = C.bench_ms(
        lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True), cfg, errors=e)
    notes["sdpa_full"] = "causal full attention" + (f"; failed: {e[-1]}" if e else "")
    if st["flash_attn"]:
        notes["flash_attn"] = st["flash_attn"]
    else:
        fa, e = PE.flash_window(W, S), []
        peer_ms["flash_attn"] = C.bench_ms(lambda: fa(q, k, v), cfg, errors=e)
        notes["flash_attn"] = "window without sinks" + (f"; failed: {e[-1]}" if e else "")
    use_fla = not st["fla"]
    g, w = ref.memory_gates_ref(args[3], args[4], args[6], args[7], kind, torch.float32)
    if use_fla:
        e = []
        peer_ms["fla_memory"] = C.bench_ms(lambda: PE.fla_memory(q, k, v, g, w, W, S, kind), cfg, errors=e)
        notes["fla_memory"] = ("chunk_simple_gla" if kind == "mamba2" else "chunk_gated_delta_rule") + \
            " (memory branch alone)" + (f"; failed: {e[-1]}" if e else "")
    else:
        notes["fla_memory"] = st["fla"]
    if flex is not None and (use_fla or dev == "cpu"):
        e = []
        un = PE.unfused_prefill(flex, use_fla)
        peer_ms["unfused_ahn"] = C.bench_ms(lambda: un(*args, W, S, kind), cfg, errors=e)
        msg = "flex + " + ("fla" if use_fla else "reference scan") + " + torch epilogue"
        if not e and out_ours is not None:
            un_err = rel(un(*args, W, S, kind), out_ours)
        notes["unfused_ahn"] = msg + (f"; failed: {e[-1]}" if e else "")
    else:
        notes["unfused_ahn"] = "needs FlexAttention and fla"
    extra = dict(c, window_flops=fw, memory_flops=fm, full_attn_flops=B * C.full_attn_flops(T, H, D))
    extra.pop("kind")
    rows = C.peer_rows(cfg, "prefill_fwd", kind, shape_str(c), ms, fw + fm, nbytes, peer_ms, notes, **extra)
    for r in rows:
        r["ours_note"] = note
        if r["peer"] == "unfused_ahn" and un_err is not None:
            r["peer_rel_err"] = un_err  # |unfused - ours| / |ours|: the peer computes the same function
    return rows


def collect(cfg, case_list=None):
    """Rows of the whole prefill sweep (``cases(cfg)`` unless given)."""
    return [r for c in (case_list or cases(cfg)) for r in run_case(cfg, c)]


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
