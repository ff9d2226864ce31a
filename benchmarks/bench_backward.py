"""Backward of the fused AHN prefill (torch.ops.ahn.prefill_fwd + prefill_bwd) vs its peers.

    python benchmarks/bench_backward.py --check     # every gradient vs the fp32 reference, then timings
    python benchmarks/bench_backward.py             # timings only
    python benchmarks/bench_backward.py --config mem_warps=4 dq=64,4,3    # backward.CONFIG overrides
    python benchmarks/bench_backward.py --deterministic   # also deterministic=True, same run (its cost)
    python benchmarks/bench_backward.py --beside    # variants around cuDNN's band (band_beside, state_epi)

Correctness (flash-attention rule): for each gradient, err_kernel = |g - g_ref| / |g_ref| with
g_ref from autograd through the fp32 reference (reference.py, upcast inputs) and err_torch the
same for autograd through the same reference math run in bf16; the kernel passes when
err_kernel <= 2 * err_torch + 1e-3.

FLOPs of the window attention backward (visible pairs n = sum_t |K(t)|,
|K(t)| = min(t+1, W) + min(S, max(0, t-W+1))): 4 D H n (dq: S, dP) + 2 D H n (dq) + 8 D H n
(dk/dv: S, dP, dV, dK) = 14 D H n; forward 4 D H n. (Until Round 3 the backward re-ran the
attention forward for lse/delta, 4 D H n more; the forward now stores lse, NOTES_backward.md.)
Memory branch (per head and stream element with memory): about 30 D^2 + 20 BT D; not counted.
Peer: FlexAttention (window + sinks block mask, torch.compile) forward + backward, same run.
`collect(cfg)` (used by benchmarks/run_all.py) adds SDPA, fla and the unfused AHN pipeline
(benchmarks/peers.py) where installed, and returns result rows instead of printing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

ahn_ops = C.import_ahn_ops()

import triton  # noqa: E402

from ahn_ops.ops.ahn_attention import backward as bw  # noqa: E402
from ahn_ops.ops.ahn_attention import prefill  # noqa: E402  (registers the ops + autograd)
from ahn_ops.ops.ahn_attention import reference as ref  # noqa: E402

NAMES = ("q", "k", "v", "a", "b", "z", "A_log", "dt_bias", "norm_weight", "o_weight")


def make_inputs(kind, B, T, H, HKV, D, dtype, seed, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, sc=1.0: torch.randn(*s, generator=g) * sc  # noqa: E731
    q, k, v = r(B, T, H, D), r(B, T, HKV, D), r(B, T, HKV, D)
    a = None if kind == "dn" else r(B, T, H)
    b, z = r(B, T, H), r(B, T, H)
    A_log = None if kind == "dn" else torch.log(torch.rand(H, generator=g) * 15 + 1)
    dt_bias = None if kind == "dn" else r(H, sc=0.5)
    nw = 1 + 0.1 * r(H * D if kind == "mamba2" else D)  # Mamba2's norm spans the H heads of a token
    ow = r(H, D, D, sc=D ** -0.5)
    act = [q, k, v, a, b, z]
    par = [A_log, dt_bias, nw, ow]
    return ([None if x is None else x.to(dtype).to(device) for x in act]
            + [None if x is None else x.float().to(device) for x in par])


def rel(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)).item()


def grads_of(fn, inputs, dout):
    leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(leaves)
    out.backward(dout.to(out.dtype))
    return [None if x is None else x.grad for x in leaves]


def check(kind, B, T, H, HKV, D, W, S, cu, seed=0):
    inp = make_inputs(kind, B, T, H, HKV, D, torch.bfloat16, seed)
    cs = None if cu is None else torch.tensor(cu, device="cuda", dtype=torch.int32)
    dout = torch.randn(B, T, H, D, device="cuda")
    t0 = time.time()
    gk = grads_of(lambda x: torch.ops.ahn.prefill_fwd(*x, W, S, kind, cs, None, False)[0], inp, dout.bfloat16())
    torch.cuda.synchronize()
    tk = time.time() - t0
    up = [None if x is None else x.float() for x in inp]
    g32 = grads_of(lambda x: ref.ahn_attention_ref(*x, W, S, kind, cs, dtype=torch.float32), up, dout)
    gbf = grads_of(lambda x: ref.ahn_attention_ref(*x, W, S, kind, cs, dtype=torch.bfloat16), inp,
                   dout.bfloat16())
    rows = []
    for n, a_, b_, c_ in zip(NAMES, gk, g32, gbf):
        if a_ is None:
            continue
        finite = bool(torch.isfinite(a_).all())
        ek, et = rel(a_, b_), rel(c_, b_)
        rows.append((n, ek, et, finite and ek <= 2 * et + 1e-3))
    tag = f"{kind} B{B} T{T} H{H}/{HKV} D{D} W{W} S{S}" + (f" cu={cu}" if cu else "")
    print(f"[check] {tag} (kernel fwd+bwd incl. compile {tk:.1f}s)")
    for n, ek, et, ok in rows:
        print(f"   {n:12s} kernel {ek:.2e}  torch-bf16 {et:.2e}  {'ok' if ok else 'FAIL'}", flush=True)
    return tag, rows


def bench(kind, T, W, S, H=16, HKV=2, D=128, flex=True, det=False):
    from triton.testing import do_bench

    inp = make_inputs(kind, 1, T, H, HKV, D, torch.bfloat16, 1)
    leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in inp]
    dout = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            return torch.ops.ahn.prefill_fwd(*inp, W, S, kind, None, None, False)[0]

    def fwd_bwd():
        out = torch.ops.ahn.prefill_fwd(*leaves, W, S, kind, None, None, False, det)[0]
        out.backward(dout)

    with torch.no_grad():
        out0, _, lse0 = torch.ops.ahn.prefill_fwd(*inp, W, S, kind, None, None, False)

    def bwd_only():
        return bw.prefill_bwd(dout, None, *inp, out0, lse0, W, S, kind, None, None, det)

    res = {}
    fwd_bwd()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    res["peak_extra_GB"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    res["peak_GB"] = torch.cuda.max_memory_allocated() / 2 ** 30
    gl = [x for x in leaves if x is not None]
    res["fwd"] = do_bench(fwd, warmup=25, rep=100, return_mode="median")
    res["bwd"] = do_bench(bwd_only, warmup=25, rep=100, return_mode="median")
    res["fwd+bwd"] = do_bench(fwd_bwd, warmup=25, rep=100, grad_to_none=gl, return_mode="median")
    # per-kernel split of the backward
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                bwd_only()
            torch.cuda.synchronize()
        tot = {}
        for e in prof.key_averages():
            if e.device_type.name == "CUDA" or "kernel" in e.key:
                tot[e.key] = tot.get(e.key, 0) + e.device_time_total / 3 / 1e3
        res["split"] = sorted(tot.items(), key=lambda x: -x[1])[:10]
    except Exception as e:  # noqa: BLE001
        res["split"] = [(f"profiler failed: {e}", 0.0)]
    n = sum(min(t + 1, W) + min(S, max(0, t - W + 1)) for t in range(T))
    res["attn_bwd_TFLOPs_at_bwd_time"] = 14 * D * H * n / (res["bwd"] * 1e-3) / 1e12
    if flex:
        try:
            bm = C.sliding_window_block_mask(T, W, S, "cuda", compile=False)
            fa = C.compiled_flex()
            qf = inp[0].transpose(1, 2).detach().clone().requires_grad_(True)
            kf = inp[1].transpose(1, 2).detach().clone().requires_grad_(True)
            vf = inp[2].transpose(1, 2).detach().clone().requires_grad_(True)
            dof = dout.transpose(1, 2)

            def flex_fb():
                o = fa(qf, kf, vf, block_mask=bm, enable_gqa=True)
                o.backward(dof)

            flex_fb()
            res["flex fwd+bwd"] = do_bench(flex_fb, warmup=25, rep=100, grad_to_none=[qf, kf, vf],
                                           return_mode="median")
        except Exception as e:  # noqa: BLE001
            res["flex fwd+bwd"] = float("nan")
            print(f"[bench] flex failed: {type(e).__name__}: {str(e)[:200]}")
    return res


# ---------------------------------------------------------------------------------------------
# run_all interface: cases(cfg) -> [case], run_case(cfg, case) -> [row], collect(cfg) -> [row]
# ---------------------------------------------------------------------------------------------
def cases(cfg):
    """The forward + backward sweep (training shapes)."""
    if cfg.cpu:
        return [dict(kind="gdn", B=1, T=64, W=16, S=4, H=2, HKV=1, D=64)]
    H, HKV = C.HEADS["3b"]
    if cfg.quick:
        return [dict(kind="gdn", B=1, T=8192, W=4096, S=128, H=H, HKV=HKV, D=128)] + \
            [dict(kind=k, B=1, T=32768, W=4096, S=128, H=H, HKV=HKV, D=128) for k in C.KINDS]
    out = []
    for kind in C.KINDS:
        for hn in C.HEADS:
            H, HKV = C.HEADS[hn]
            for T in (8192, 32768):
                out.append(dict(kind=kind, B=1, T=T, W=4096, S=128, H=H, HKV=HKV, D=128))
    H, HKV = C.HEADS["3b"]
    out += [dict(kind="gdn", B=1, T=24576, W=2048, S=0, H=H, HKV=HKV, D=128),
            dict(kind="gdn", B=4, T=8192, W=4096, S=128, H=H, HKV=HKV, D=128)]
    return out


def shape_str(c):
    return f"B{c['B']} T{c['T']} W{c['W']} S{c['S']} H{c['H']}/{c['HKV']} D{c['D']}"


def run_case(cfg, c):
    """Forward + backward of ours (torch.ops.ahn.prefill_fwd with its registered autograd) and peers."""
    import torch.nn.functional as F

    import peers as PE

    kind, B, T, W, S, H, HKV, D = (c[x] for x in ("kind", "B", "T", "W", "S", "H", "HKV", "D"))
    dev = cfg.device
    st = C.peer_status(dev)
    inp = make_inputs(kind, B, T, H, HKV, D, torch.bfloat16, cfg.seed + 1, device=dev)
    dout = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)

    def leaves_of(xs):
        return [None if x is None else x.detach().clone().requires_grad_(True) for x in xs]

    leaves = leaves_of(inp)
    gl = [x for x in leaves if x is not None]
    note = "ours = Triton interpreter" if dev == "cpu" else ""

    def fwd_bwd():
        out = torch.ops.ahn.prefill_fwd(*leaves, W, S, kind, None, None, False)[0]
        out.backward(dout)

    errs = []
    ms = C.bench_ms(fwd_bwd, cfg, grad_to_none=gl, errors=errs)
    if errs:
        note = (note + "; " if note else "") + "ours failed: " + errs[-1]
    flops = B * C.backward_flops(T, W, S, H, D, kind)
    nbytes = C.backward_bytes(B, T, H, HKV, D, kind=kind)
    peer_ms, notes = {}, {}
    qt, kt, vt = (x.transpose(1, 2).detach().clone().requires_grad_(True) for x in inp[:3])
    dot = dout.transpose(1, 2)
    flex = None
    if st["flex"] or dev == "cpu":
        notes["flex"] = st["flex"] or "FlexAttention has no backward on the CPU"
    else:
        e = []
        try:
            flex = PE.flex_window(T, W, S, dev)
            peer_ms["flex"] = C.bench_ms(lambda: flex(qt, kt, vt).backward(dot), cfg, grad_to_none=[qt, kt, vt],
                                         errors=e)
        except Exception as ex:  # noqa: BLE001
            e.append(f"{type(ex).__name__}: {str(ex)[:120]}")
            peer_ms["flex"] = C.NAN
        notes["flex"] = "compiled, window+sinks" + (f"; failed: {e[-1]}" if e else "")
    e = []
    peer_ms["sdpa_full"] = C.bench_ms(
        lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True).backward(dot), cfg,
        grad_to_none=[qt, kt, vt], errors=e)
    notes["sdpa_full"] = "causal full attention" + (f"; failed: {e[-1]}" if e else "")
    if st["fla"] or flex is None:
        notes["unfused_ahn"] = st["fla"] or "needs compiled FlexAttention (CUDA)"
    else:
        un = PE.unfused_prefill(flex, True)
        ul = leaves_of(inp)
        e = []
        peer_ms["unfused_ahn"] = C.bench_ms(lambda: un(*ul, W, S, kind).backward(dout), cfg,
                                            grad_to_none=[x for x in ul if x is not None], errors=e)
        notes["unfused_ahn"] = "flex + fla + torch epilogue" + (f"; failed: {e[-1]}" if e else "")
    extra = dict(c)
    extra.pop("kind")
    rows = C.peer_rows(cfg, "prefill_fwd_bwd", kind, shape_str(c), ms, flops, nbytes, peer_ms, notes, **extra)
    for r in rows:
        r["ours_note"] = note
    return rows


def sweep(kind="gdn", T=32768, W=4096, S=128, H=16, HKV=2, D=128):
    """Launch-configuration sweep of _mem_bwd_h / _mem_bwd_wy and the attention backward kernels
    (fwd+bwd time, ms); keeps the best."""
    from triton.testing import do_bench

    inp = make_inputs(kind, 1, T, H, HKV, D, torch.bfloat16, 1)
    leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in inp]
    gl = [x for x in leaves if x is not None]
    dout = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)

    def fwd_bwd():
        torch.ops.ahn.prefill_fwd(*leaves, W, S, kind, None, None, False)[0].backward(dout)

    def setter(key):
        if key == "mem":  # (mem_bv, mem_stages) of _mem_bwd_h_kernel
            return lambda c: bw.CONFIG.update(mem_bv=c[0], mem_stages=c[1])
        if key == "wy":  # (wy_bv, wy_warps) of _mem_bwd_wy_kernel
            return lambda c: bw.CONFIG.update(wy_bv=c[0], wy_warps=c[1])
        return lambda c: bw.CONFIG.__setitem__(key, c)

    for key, cands in (("mem", [(64, 3), (32, 3), (64, 2), (32, 2)]),
                       ("wy", [(32, 4), (64, 4), (32, 8)]),
                       ("dkdv", [(64, 8, 2), (64, 4, 2), (32, 4, 2), (32, 4, 3), (32, 8, 2)]),
                       ("dq", [(64, 4, 3), (64, 8, 2), (64, 4, 2), (32, 4, 3)]),
                       ("side_stream", [True, False])):
        res = {}
        for cfg_ in cands:
            setter(key)(cfg_)
            try:
                res[cfg_] = do_bench(fwd_bwd, warmup=10, rep=60, grad_to_none=gl, return_mode="median")
            except Exception as e:  # noqa: BLE001
                print(f"[sweep] {key} {cfg_} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            print(f"[sweep] {kind} T{T} W{W} S{S} {key}={cfg_}: fwd+bwd {res[cfg_]:.3f} ms", flush=True)
        if res:
            setter(key)(min(res, key=res.get))
    print(f"[sweep] chosen backward CONFIG: {bw.CONFIG}", flush=True)


BESIDE_SETTINGS = (dict(band_beside=1, beside_bv=64), dict(epi_warps=8), dict(do_weight_slices=16),
                   dict(sink=(64, 8, 3)), dict(prep_maxnreg=None), dict(prep_warps=8, prep_maxnreg=128),
                   dict(state_epi=True, state_epi_bv=32), dict(state_epi=True, state_epi_bv=32, epi_warps=8),
                   dict(chain_join="event"), dict(chain_join="event", sink=(64, 8, 3), do_weight_slices=16))


BESIDE_SHAPES = {32768: ("gdn", 32768, 4096, 128), 24576: ("gdn", 24576, 2048, 0)}


def beside_table(settings=BESIDE_SETTINGS, shapes=tuple(BESIDE_SHAPES.values()), rounds=1):
    """fwd / bwd / fwd+bwd (ms) and peak memory for backward.CONFIG variants around cuDNN's band, in one process,
    at issue 33's shapes: the reverse chain beside the band (band_beside 1, at beside_bv value columns per
    program), the epilogue backward's warps (epi_warps), the o_weight product in 16 token slices of 2048 tokens
    (do_weight_slices), the sink keys' kernel at 64 queries per step (sink), the prep pass's register cap for more
    programs per SM (prefill.CONFIG prep_maxnreg, prep_warps: forward and re-run), and the state chain's re-run fused
    with the epilogue backward (state_epi, the chain at state_epi_bv columns); every other key as the defaults (or
    --config). rounds > 1 times every setting once per round, the settings in turn, so that a drift of the machine
    lands on all of them; the table gives medians over the rounds, the spread of fwd+bwd, and each setting's
    fwd+bwd over the first setting's in the same round (the median of those ratios)."""
    runs = {}
    for rnd in range(rounds):
        for kind, T, W, S in shapes:
            for st in settings:
                tag = " ".join(f"{k}={v}" for k, v in st.items())
                try:
                    # the prep pass's keys live in prefill.CONFIG (the forward's pass and the backward's re-run)
                    with C.configured(st, bw.CONFIG, prefill.CONFIG):
                        r = bench(kind, T, W, S, flex=False)
                except Exception as e:  # noqa: BLE001
                    print(f"[beside] {kind} T{T} {tag} raised {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                split = ", ".join(f"{k_[:24]} {t_:.3f}" for k_, t_ in r["split"][:6])
                print(f"[beside] round {rnd} {kind} T{T} W{W} S{S} {tag}: fwd+bwd {r['fwd+bwd']:.3f} ms, peak "
                      f"{r['peak_GB']:.2f} GB; {split}", flush=True)
                runs.setdefault((f"{kind} T{T} W{W} S{S}", tag), {})[rnd] = r
    print(f"\n== backward variants around cuDNN's band (ms, median over {rounds} round(s)), B=1 H=16 HKV=2 D=128 "
          "bf16 ==")
    print(f"  {'shape':24s} {'setting':36s} {'fwd':>7s} {'bwd':>7s} {'fwd+bwd':>8s} {'spread':>7s} {'x first':>8s} "
          f"{'peak GB':>8s}")
    for shape, tag, row in beside_summary(runs):
        print(f"  {shape:24s} {tag:36s} {row['fwd']:7.3f} {row['bwd']:7.3f} {row['fwd+bwd']:8.3f} "
              f"{row['spread']:7.3f} {row['x_first']:8.3f} {row['peak_GB']:8.2f}")


def beside_summary(runs):
    """``{(shape, setting): {round: bench result}}`` (settings in their order, the first of a shape its baseline)
    -> ``[(shape, setting, row)]``: medians of fwd, bwd, fwd+bwd and peak over the rounds, the fwd+bwd spread (max -
    min), and ``x_first``, the median over the rounds of fwd+bwd divided by the first setting's in the same round
    (paired: a round's drift cancels; a round where either raised is left out)."""
    first = {}
    for (shape, tag), rs in runs.items():
        first.setdefault(shape, rs)
    out = []
    for (shape, tag), rs in runs.items():
        fb = [r["fwd+bwd"] for r in rs.values()]
        base = first[shape]
        ratios = [r["fwd+bwd"] / base[i]["fwd+bwd"] for i, r in rs.items() if i in base]
        row = {k: statistics.median(r[k] for r in rs.values()) for k in ("fwd", "bwd", "fwd+bwd", "peak_GB")}
        row.update(spread=max(fb) - min(fb), x_first=statistics.median(ratios) if ratios else float("nan"))
        out.append((shape, tag, row))
    return out


def parse_config(items, config):
    """``["mem_warps=4", "dq=64,4,3", "mem_bv=None"]`` -> a dict of backward.CONFIG values; unknown keys fail."""
    out = {}
    for it in items:
        key, sep, val = it.partition("=")
        if not sep or key not in config:
            raise SystemExit(f"--config {it!r}: expected KEY=VALUE with KEY one of {sorted(config)}")
        out[key] = None if val == "None" else tuple(int(x) for x in val.split(",")) if "," in val else int(val)
    return out


def collect(cfg, case_list=None):
    """Rows of the whole forward + backward sweep (``cases(cfg)`` unless given)."""
    return [r for c in (case_list or cases(cfg)) for r in run_case(cfg, c)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--full", action="store_true", help="also the D=64 batch and T=16k gdn checks")
    ap.add_argument("--sweep", action="store_true", help="launch-config sweep of dkdv / dq before the timings")
    ap.add_argument("--deterministic", action="store_true", help="also time deterministic=True (same run)")
    ap.add_argument("--beside", action="store_true",
                    help="only the timings of the variants around cuDNN's band (BESIDE_SETTINGS)")
    ap.add_argument("--beside-T", type=int, nargs="+", default=list(BESIDE_SHAPES), choices=list(BESIDE_SHAPES),
                    help="--beside: issue 33's shapes to time, by T")
    ap.add_argument("--rounds", type=int, default=1,
                    help="--beside: time every setting once per round, in turn (medians, spread, ratio to the first)")
    ap.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                    help="backward.CONFIG overrides for the whole run (int, comma-separated tuple, or None)")
    args = ap.parse_args()
    bw.CONFIG.update(parse_config(args.config, bw.CONFIG))
    print(f"[env] torch {torch.__version__} triton {triton.__version__} {torch.cuda.get_device_name()} "
          f"backward.CONFIG {bw.CONFIG}")
    if args.beside:
        if args.rounds < 1:
            raise SystemExit(f"--rounds {args.rounds}: expected at least 1")
        beside_table(shapes=tuple(BESIDE_SHAPES[T] for T in args.beside_T), rounds=args.rounds)
        return
    checks = []
    if args.check:
        # gdn at T=8192 with sinks (sink split, unmasked interiors) and a varlen dn case; --full adds
        # the D=64 batch and the 16k gdn case. Each check is guarded: a failure is reported, the rest runs.
        cases = [("gdn", 1, 8192, 4, 1, 128, 2048, 128, None), ("dn", 1, 8192, 8, 2, 128, 1000, 5, [0, 3000, 3001, 8192]),
                 ("mamba2", 1, 8192, 4, 2, 128, 2048, 128, None),
                 # W >= 8192 at D = 128: the forward's 128-row programs feed the backward
                 ("gdn", 1, 12288, 4, 1, 128, 8192, 64, [0, 11000, 12288])]
        if args.full:
            cases += [("gdn", 2, 2500, 8, 2, 64, 333, 0, None), ("gdn", 1, 16384, 4, 1, 128, 4096, 128, None)]
        for c in cases:
            try:
                checks.append(check(*c))
            except Exception as e:  # noqa: BLE001
                print(f"[check] {c} raised {type(e).__name__}: {str(e)[:600]}", flush=True)
                checks.append((str(c), [("EXCEPTION", float("nan"), float("nan"), False)]))
        torch.cuda.empty_cache()
    results = []
    if args.sweep:
        sweep()
    if not args.no_bench:
        for kind, T, W, S in (("gdn", 32768, 4096, 128), ("gdn", 24576, 2048, 0)):
            try:
                r = bench(kind, T, W, S)
            except Exception as e:  # noqa: BLE001
                print(f"[bench] {kind} T{T} raised {type(e).__name__}: {str(e)[:600]}", flush=True)
                continue
            results.append(((kind, T, W, S), r))
            print(f"[bench] {kind} T{T} W{W} S{S}: {r}", flush=True)
            if args.deterministic:
                r = bench(kind, T, W, S, flex=False, det=True)
                results.append(((kind + " det", T, W, S), r))
                print(f"[bench] {kind} T{T} W{W} S{S} deterministic: {r}", flush=True)
    # short table last
    print("\n== gradient check: worst kernel rel err (torch-bf16 rel err) per gradient ==")
    worst = {}
    for tag, rows in checks:
        for n, ek, et, ok in rows:
            w = worst.get(n, (0.0, 0.0, True))
            worst[n] = (max(w[0], ek), max(w[1], et), w[2] and ok)
    for n, (ek, et, ok) in worst.items():
        print(f"  {n:12s} {ek:.2e} ({et:.2e}) {'ok' if ok else 'FAIL'}")
    print("\n== timings (ms, median), B=1 H=16 HKV=2 D=128 bf16 ==")
    print(f"  {'shape':28s} {'fwd':>7s} {'bwd':>7s} {'fwd+bwd':>8s} {'flex f+b':>8s} {'peak GB':>8s}")
    for (kind, T, W, S), r in results:
        print(f"  {kind} T{T} W{W} S{S}".ljust(30) + f"{r['fwd']:7.2f} {r['bwd']:7.2f} {r['fwd+bwd']:8.2f} "
              f"{r.get('flex fwd+bwd', float('nan')):8.2f} {r['peak_GB']:8.2f}")
        for k_, t_ in r["split"]:
            print(f"      {t_:7.3f} ms  {k_[:70]}")


if __name__ == "__main__":
    main()
