"""The sm_90a forward kernel (csrc/cuda/sm90/ahn_fwd_sm90.cuh, ``torch.ops.ahn.prefill_fwd_sm90``) checked and timed.

    python benchmarks/bench_sm90.py               # check, then time T=32k and 131k
    python benchmarks/bench_sm90.py check         # the attention checks only (also: check-fused, bench)
    python benchmarks/bench_sm90.py bench-bwd     # the band backward (band_bwd_sm90) against cuDNN's, alone and fused
    python benchmarks/bench_sm90.py engines       # prefill_fwd on "auto" (the sm_90a kernel) against "no_sm90"
    python benchmarks/bench_sm90.py overlap       # the memory passes beside the kernel, wider state-chain programs
    python benchmarks/bench_sm90.py cache         # the cache path with the passes before / beside the kernel
    python benchmarks/bench_sm90.py variants      # the kernel's variants 1 and 2 in turn: attention alone, the forward
    python benchmarks/bench_sm90.py ncu-target    # three gdn forwards at 32k, passes before the kernel (for ncu)

Needs the extension built with its sm_90a kernels (the nvidia-cutlass headers installed at build time). Each
part is a process of its own in `device_check.sh sm90` (a kernel that hangs costs one part's timeout). A
failed check is reported and the remaining checks still run; the exit status is 1 if any failed.

Checks, every kernel variant (0: overlap inside each warpgroup; 1: and the warpgroups' ping-pong; 2: 1 with the
softmax's row max and sum in four partials): o and lse
against an fp32 reference (query t attends j <= t with t - W < j or j < S) on odd shapes, GQA, W = 1, W >= T,
sinks inside and past the window, bf16 and fp16, into memory poisoned with NaN; the error beside PyTorch's
own in the same dtype (the masked SDPA of the same inputs). Timing: ``do_bench`` medians, B=1 H=16 HKV=2
D=128, in the same run: cuDNN's band (``band_cudnn.band_fwd``, S=0: the default Hopper path's band) and
FlexAttention's window + sinks (S=128); TFLOP/s count 4 D H per attended (query, key) pair.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


class Kernel:
    """``torch.ops.ahn.prefill_fwd_sm90`` (the extension built with its sm_90a kernels) in this script's terms."""

    def __init__(self):
        sys.path.insert(0, HERE)
        import common as C

        C.import_ahn_ops()
        from ahn_ops import _ext

        if not _ext.has_sm90_kernels():
            raise SystemExit("ahn_ops was built without its sm_90a kernels: pip install --no-deps nvidia-cutlass, "
                             "then rebuild (python setup.py build_ext --inplace)")
        self.op = torch.ops.ahn.prefill_fwd_sm90

    def band_fwd(self, q, k, v, W, S=0, variant=0, cu_seqlens=None):
        """Window + sinks attention: o [B, T, H, D], natural-log lse [B, H, T]; with ``cu_seqlens`` (int32) the
        sequences packed along T (B = 1)."""
        max_len = 0 if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return self.op(q, k, v, None, None, None, None, None, None, int(W), int(S), 1.0, variant, cu_seqlens, max_len)

    def fused_fwd(self, q, k, v, vnew, hs, ow, gc, z, nw, W, S, mem_scale, variant=0):
        """The GDN / DN forward behind the memory passes (their gc, hs, v_new): out, lse."""
        return self.op(q, k, v, vnew, hs, ow, gc, z, nw, int(W), int(S), float(mem_scale), variant)


def allowed_mask(T, W, S, device):
    t = torch.arange(T, device=device)
    return (t[None, :] <= t[:, None]) & ((t[None, :] > t[:, None] - W) | (t[None, :] < S))


def reference(q, k, v, W, S):
    """fp32 window + sinks attention: o [B, T, H, D], lse [B, H, T] (``reference.window_attention_ref``)."""
    from ahn_ops.ops.ahn_attention.reference import window_attention_ref

    return window_attention_ref(q, k, v, W, S, return_lse=True)


def torch_same_dtype(q, k, v, W, S):
    B, T, H, D = q.shape
    G = H // k.shape[2]
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(G, 2).transpose(1, 2), v.repeat_interleave(G, 2).transpose(1, 2),
        attn_mask=allowed_mask(T, W, S, q.device))
    return o.transpose(1, 2)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check(mod, first=None) -> bool:
    # (B, T, H, HKV, W, S): sinks past the window in one block, in several, inside the band, S >= T
    cases = [(1, 1, 2, 1, 1, 0), (2, 100, 4, 2, 64, 0), (1, 257, 8, 1, 1, 0), (1, 1000, 16, 2, 200, 0),
             (2, 777, 4, 4, 5000, 3), (1, 2048, 16, 2, 1024, 128), (1, 4100, 8, 1, 129, 300), (1, 3000, 4, 2, 2999, 0),
             (1, 1500, 4, 2, 300, 5), (1, 1300, 2, 1, 1, 200), (2, 650, 4, 2, 256, 700)][:first]
    worst, fails = 0.0, 0
    for dt, variant in ((torch.bfloat16, 0), (torch.float16, 0), (torch.bfloat16, 1), (torch.float16, 1),
                        (torch.bfloat16, 2), (torch.float16, 2)):
        for B, T, H, HKV, W, S in cases:
            g = torch.Generator(device="cuda").manual_seed(T * 31 + W + S)
            q, k, v = (torch.randn(B, T, h, 128, device="cuda", dtype=dt, generator=g) for h in (H, HKV, HKV))
            poison = torch.full((B * T * H * 128 * 4,), float("nan"), device="cuda")
            del poison  # the caching allocator hands this NaN-filled block to the kernel's outputs
            o, lse = mod.band_fwd(q, k, v, W, S, variant)
            ro, rlse = reference(q, k, v, W, S)
            ours, theirs = rel(o, ro), rel(torch_same_dtype(q, k, v, W, S), ro)
            lerr = (lse - rlse).abs().max().item()
            ok = not o.isnan().any().item() and ours <= 2 * theirs + 1e-6 and lerr < 1e-3
            worst = max(worst, ours / max(theirs, 1e-30))
            print(f"v{variant} {str(dt)[6:]:8s} B{B} T{T} H{H}/{HKV} W{W} S{S}: o rel err {ours:.2e} (torch {theirs:.2e}), "
                  f"lse max err {lerr:.1e} {'ok' if ok else 'FAIL'}", flush=True)
            fails += not ok
        # varlen: sequences packed along T (one empty, one of a single token), each against its own reference
        lens = [300, 1, 700, 0, 129, 1025]
        cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32, device="cuda")
        q, k, v = (torch.randn(1, sum(lens), h, 128, device="cuda", dtype=dt) for h in (8, 2, 2))
        o, lse = mod.band_fwd(q, k, v, 200, 5, variant, cu)
        errs, ok = [], not o.isnan().any().item()
        for s0, s1 in zip(cu[:-1].tolist(), cu[1:].tolist()):
            if s1 > s0:
                ro, rlse = reference(q[:, s0:s1], k[:, s0:s1], v[:, s0:s1], 200, 5)
                theirs = rel(torch_same_dtype(q[:, s0:s1], k[:, s0:s1], v[:, s0:s1], 200, 5), ro)
                errs.append(rel(o[:, s0:s1], ro))
                ok &= errs[-1] <= 2 * theirs + 1e-6 and (lse[..., s0:s1] - rlse).abs().max().item() < 1e-3
        print(f"v{variant} {str(dt)[6:]:8s} varlen {lens} W200 S5: worst o rel err {max(errs):.2e} "
              f"{'ok' if ok else 'FAIL'}", flush=True)
        fails += not ok
    print(f"# attention checks: {fails} failed (worst ratio to torch's own error {worst:.2f})")
    return fails == 0


def capture_combine(args, W, S, kind="gdn"):
    """Runs ahn_ops' fused forward (``prefill_fwd``) on the engine before the sm_90a kernel ("no_sm90", whose
    Triton combine kernel the sm_90a kernel replaces) and returns its output with the keyword arguments that
    combine kernel (``_fwd_kernel``) was launched with: the memory passes' gc, hs, vnew among them."""
    import common as C  # (on the path since Kernel() imported ahn_ops through it)
    from ahn_ops.ops.ahn_attention import prefill as P

    real, seen = P._fwd_kernel, {}

    class Spy:
        def __getitem__(self, grid):
            def launch(**kw):
                seen.update(kw)
                return real[grid](**kw)
            return launch

    P._fwd_kernel = Spy()
    try:
        with C.configured({"band": "no_sm90"}, P.CONFIG):
            out = P.prefill_fwd(*args, W, S, kind)[0]
    finally:
        P._fwd_kernel = real
    assert "vnew" in seen, "prefill_fwd did not launch the Triton combine kernel"
    return out, seen


def prefill_inputs(T, H, HKV, D, seed=0, dt=torch.bfloat16, dev="cuda"):
    """gdn inputs of ``prefill_fwd``: q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight (B = 1)."""
    g = torch.Generator(device=dev).manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, device=dev, dtype=dt, generator=g)

    return (r(1, T, H, D), r(1, T, HKV, D), r(1, T, HKV, D), r(1, T, H), r(1, T, H), r(1, T, H),
            torch.rand(H, device=dev, generator=g) * 0.5, torch.rand(H, device=dev, generator=g) * 0.1,
            torch.rand(D, device=dev, generator=g) + 0.5, (torch.randn(H, D, D, device=dev, generator=g) * D ** -0.5).to(dt))


def fused_call(mod, args, kw, W, S, variant):
    """This kernel on the inputs ``args`` and the memory passes' buffers of ahn_ops' combine launch ``kw``."""
    q, k, v, z, nw, ow = args[0], args[1], args[2], args[5], args[8], args[9]
    B, T, H, D = q.shape
    # the combine's buffers are per token ([B * T, H, ...]); the op takes [B, T, H, ...]
    return mod.fused_fwd(q, k, v, kw["vnew"].view(B, T, H, D), kw["hs"], ow.to(q.dtype).contiguous(),
                         kw["gc"].view(B, T, H), z.contiguous(), nw.float().contiguous(), W, S, D ** -0.5, variant)


def check_fused(mod, first=None) -> bool:
    from ahn_ops.ops.ahn_attention import reference as R  # (Kernel() imported ahn_ops from this tree)

    # (T, H, HKV, W, S): memory from the first blocks on, a window longer than some blocks' rows, an odd tail
    cases = [(1000, 4, 2, 200, 5), (777, 8, 1, 64, 0), (2100, 4, 4, 1024, 130), (300, 2, 1, 1, 3),
             (4096, 16, 2, 512, 128)][:first]
    fails = 0
    for variant in (0, 1, 2):
        for T, H, HKV, W, S in cases:
            args = prefill_inputs(T, H, HKV, 128, seed=T + W)
            theirs, kw = capture_combine(args, W, S)
            poison = torch.full((T * H * 128 * 4,), float("nan"), device="cuda")
            del poison
            o, _ = fused_call(mod, args, kw, W, S, variant)
            ref = R.ahn_attention_ref(*[x.float() if x.is_floating_point() else x for x in args], W, S, "gdn")
            e_ours, e_theirs = rel(o, ref), rel(theirs, ref)
            ok = not o.isnan().any().item() and e_ours <= 2 * e_theirs + 1e-6
            print(f"fused v{variant} T{T} H{H}/{HKV} W{W} S{S}: rel err {e_ours:.2e} (ahn_ops' Triton combine "
                  f"{e_theirs:.2e}; ours vs it {rel(o, theirs):.1e}) {'ok' if ok else 'FAIL'}", flush=True)
            fails += not ok
    print(f"# fused checks: {fails} failed")
    return fails == 0


def _timer():
    from triton.testing import do_bench

    def t(fn):
        # at least ~15 timed calls: a 50 ms call (T=131072) got 4 in 200 ms, too few for a stable median
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        return do_bench(fn, warmup=max(25, 3 * ms), rep=max(200, 15 * ms), return_mode="median")

    return t


def bench(mod):
    import common as C  # (on the path since Kernel() imported ahn_ops through it)
    import peers
    from ahn_ops.ops.ahn_attention import band_cudnn

    H, HKV, D = 16, 2, 128
    rows = []
    t = _timer()

    for T, W, S in [(32768, 4096, 128), (131072, 32640, 128), (16384, 2048, 0)]:
        q, k, v = (torch.randn(1, T, h, D, device="cuda", dtype=torch.bfloat16) for h in (H, HKV, HKV))
        res = {}
        for variant in (0, 1, 2):
            res[f"ours v{variant} S=0"] = t(lambda: mod.band_fwd(q, k, v, W, 0, variant)), 0
            if S:
                res[f"ours v{variant} S={S}"] = t(lambda: mod.band_fwd(q, k, v, W, S, variant)), S
        res["cuDNN band S=0"] = t(lambda: band_cudnn.band_fwd(q, k, v, W)), 0
        o, _ = mod.band_fwd(q, k, v, W, 0, 1)
        co, _ = band_cudnn.band_fwd(q, k, v, W)
        if S:
            fx = peers.flex_window(T, W, S, "cuda")
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            res[f"FlexAttention S={S}"] = t(lambda: fx(qt, kt, vt)), S
        for name, (ms, sinks) in res.items():
            rows.append((T, W, name, ms, C.window_flops(T, W, sinks, H, D) / ms / 1e9))
            print(rows[-1], flush=True)
        print(f"# T={T} W={W}: rel diff of o, ours v1 vs cuDNN band: {rel(o, co):.1e}", flush=True)
    print("\n| T | W | what | ms | TFLOP/s |\n|---|---|---|---|---|")
    for T, W, name, ms, tf in rows:
        print(f"| {T} | {W} | {name} | {ms:.3f} | {tf:.0f} |")
    fused_forward(mod, t)


def fused_forward(mod, t, T=32768, W=4096, S=128, H=16, HKV=2, D=128):
    """The fused AHN forward (gdn) with its band from cuDNN (the default) or from this kernel, in place of
    ``band_cudnn.band_fwd``; the memory passes on the side stream at default or high priority. cuDNN's band
    kernel holds every SM for its whole run, so the memory passes run beside it only at its edges; this
    kernel's CTAs retire every ~20 us, so a high-priority side stream can take SMs as they free up."""
    from ahn_ops.ops.ahn_attention import band_cudnn
    from ahn_ops.ops.ahn_attention import prefill as P

    args = prefill_inputs(T, H, HKV, D)
    cudnn_band = band_cudnn.band_fwd

    def ours(q, k, v, w, out=None):
        return mod.band_fwd(q.contiguous(), k.contiguous(), v.contiguous(), w, 0, 1)

    res, outs = {}, {}
    P.CONFIG["band"] = "no_sm90"  # ("auto" takes the sm_90a engine itself on this GPU)
    for band_name, band in (("cuDNN band", cudnn_band), ("our band", ours)):
        for prio in (0, -1):
            P.CONFIG["side_priority"] = prio
            band_cudnn.band_fwd = band
            try:
                fn = lambda: P.prefill_fwd(*args, W, S, "gdn")  # noqa: E731
                outs[band_name] = fn()[0]
                res[f"{band_name}, side stream priority {prio}"] = t(fn)
            finally:
                band_cudnn.band_fwd = cudnn_band
                P.CONFIG["side_priority"] = 0
    # this kernel with the memory readout and epilogue in its consumer, behind ahn_ops' memory passes (timed
    # alone: the passes run before it here)
    _, kw = capture_combine(args, W, S)
    for variant in (0, 1, 2):
        res[f"fused kernel v{variant} alone (memory passes not included)"] = t(
            lambda: fused_call(mod, args, kw, W, S, variant))
    res["memory passes alone (prep + state chain)"] = t(lambda: P.prefill_fwd(*args, W, S, "gdn", stage="state"))
    P.CONFIG["band"] = "sm90"  # the library's "sm90" engine: the memory passes, then the fused kernel
    try:
        P.CONFIG["sm90_overlap"] = "off"
        res["sm90 engine (memory passes, then the fused kernel)"] = t(lambda: P.prefill_fwd(*args, W, S, "gdn"))
        # the passes beside it (the default): ready counters, deferred tiles finished after them
        P.CONFIG["sm90_overlap"] = "prefill"
        for prio in (0, -1):
            P.CONFIG["sm90_side_priority"] = prio
            res[f"sm90 engine, memory passes beside it (priority {prio})"] = t(
                lambda: P.prefill_fwd(*args, W, S, "gdn"))
        outs["overlap"] = P.prefill_fwd(*args, W, S, "gdn")[0]
    finally:
        P.CONFIG.update(band="auto", sm90_overlap="prefill", sm90_side_priority=-1)
    outs["fused"] = fused_call(mod, args, kw, W, S, 1)[0]
    print(f"\n# fused gdn forward, T={T} W={W} S={S} H={H}/{HKV} D={D}; rel diff of out, our band vs cuDNN's: "
          f"{rel(outs['our band'], outs['cuDNN band']):.1e}, the fused kernel vs cuDNN's composition: "
          f"{rel(outs['fused'], outs['cuDNN band']):.1e}, the overlapped sm90 engine vs it: "
          f"{rel(outs['overlap'], outs['cuDNN band']):.1e}")
    print("| band | ms |\n|---|---|")
    for name, ms in res.items():
        print(f"| {name} | {ms:.3f} |")


def bench_engines(t):
    """The library's forward (``prefill_fwd``) on its default engine ("auto": the sm_90a kernel on this GPU, the
    memory passes beside it; with ``deterministic=True`` before it) against the one before it ("no_sm90": cuDNN's
    band beside the memory passes, then the Triton kernel for sinks, memory and epilogue), every kind at T = 32k,
    gdn at T = 131k; the outputs compared."""
    sys.path.insert(0, HERE)
    from bench_prefill import make

    from ahn_ops.ops.ahn_attention import prefill as P

    H, HKV, D = 16, 2, 128
    rows, before = [], P.CONFIG["band"]
    try:
        for kind, T, W, S in [("gdn", 32768, 4096, 128), ("dn", 32768, 4096, 128), ("mamba2", 32768, 4096, 128),
                              ("gdn", 131072, 32640, 128), ("gdn", 16384, 2048, 0)]:
            args = make(kind, 1, T, H, HKV, D)
            ms, outs = {}, {}
            for engine, det in (("no_sm90", False), ("auto", False), ("auto", True)):
                P.CONFIG["band"] = engine
                fn = lambda: P.prefill_fwd(*args, W, S, kind, deterministic=det)  # noqa: E731
                outs[engine, det] = fn()[0]
                ms[engine, det] = t(fn)
            rows.append((kind, T, W, S, ms["no_sm90", False], ms["auto", False], ms["auto", True],
                         rel(outs["auto", False], outs["no_sm90", False])))
            print(rows[-1], flush=True)
            del args, outs
    finally:
        P.CONFIG["band"] = before
    print("\n| kind | T | W | S | no_sm90 ms | auto (sm90, passes beside) ms | speed-up | auto, deterministic ms "
          "| rel diff of out |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, T, W, S, a, b, c, d in rows:
        print(f"| {kind} | {T} | {W} | {S} | {a:.3f} | {b:.3f} | {a / b:.3f}x | {c:.3f} | {d:.1e} |")


CHAINS = ((16, 4, 3), (32, 4, 3), (64, 4, 3), (64, 8, 3), (128, 8, 3))


def bench_overlap(t, T=32768, W=4096, S=128, H=16, HKV=2, D=128, chains=CHAINS):
    """The memory passes beside the sm_90a kernel (``CONFIG["sm90_overlap"]``) with fewer, wider state-chain
    programs. The chain's default 16 value columns per program make 8 programs per head, 128 at H = 16, each
    holding an SM slot the kernel's CTAs (one per SM) cannot share, so beside the kernel it ran no faster than
    before it (3.09 against 3.02 ms at priority -1). With 64 or 128 columns per program the chain holds 32 or 16
    SMs, at a longer step; whether the kernel on the rest finishes sooner is this measurement."""
    from ahn_ops.ops.ahn_attention import prefill as P

    args = prefill_inputs(T, H, HKV, D)
    saved = dict(P.CONFIG, state_bv=dict(P.CONFIG["state_bv"]))
    rows = []
    # (side priority, sm90_rows_outer) (priority 0 lost at every width: 4.3-5.0 ms at 32k, the chain's CTAs behind
    # the kernel's)
    beside = [(-1, None), (-1, False)]
    try:
        P.CONFIG["band"] = "sm90"
        P.CONFIG["sm90_overlap"] = "off"
        serial = P.prefill_fwd(*args, W, S, "gdn")[0]
        P.CONFIG["sm90_rows_outer"] = True
        ser_rows = t(lambda: P.prefill_fwd(*args, W, S, "gdn"))
        P.CONFIG["sm90_rows_outer"] = None
        for bv, warps, stages in chains:
            P.CONFIG["state_bv"][D], P.CONFIG["sm90_state_bv"], P.CONFIG["state_warps"] = bv, bv, warps
            P.CONFIG["state_stages"] = P.CONFIG["sm90_state_stages"] = stages
            P.CONFIG["sm90_overlap"] = "off"
            passes = t(lambda: P.prefill_fwd(*args, W, S, "gdn", stage="state"))
            ser = t(lambda: P.prefill_fwd(*args, W, S, "gdn"))
            row = [f"{bv} / {warps} / {stages}", passes, ser]
            P.CONFIG["sm90_overlap"] = "prefill"
            for prio, rows_outer in beside:
                P.CONFIG["sm90_side_priority"], P.CONFIG["sm90_rows_outer"] = prio, rows_outer
                row.append(t(lambda: P.prefill_fwd(*args, W, S, "gdn")))
            P.CONFIG["sm90_side_priority"], P.CONFIG["sm90_rows_outer"] = beside[0]
            row.append(rel(P.prefill_fwd(*args, W, S, "gdn")[0], serial))
            rows.append(row)
            print(tuple(rows[-1]), flush=True)
    finally:
        P.CONFIG.clear()
        P.CONFIG.update(saved)
    print(f"\n# sm_90a engine, gdn T={T} W={W} S={S} H={H}/{HKV} D={D}: the state chain's value columns per "
          "program (programs per head: D / columns); the kernel's CTAs row block by row block over all heads "
          "(rows outer) or head by head (heads outer)")
    print(f"passes, then the kernel with its CTAs rows outer (16 columns): {ser_rows:.3f} ms")
    names = ["beside, priority -1, rows outer", "beside, -1, heads outer"]
    print("| columns / warps / stages | memory passes alone | passes, then the kernel | " + " | ".join(names)
          + " | rel diff of out |\n|---|---|---|" + "---|" * (len(beside) + 1))
    for row in rows:
        print(f"| {row[0]} | " + " | ".join(f"{x:.3f}" for x in row[1:-1]) + f" | {row[-1]:.1e} |")


def bench_cache(t, H=16, HKV=2, D=128, S=128):
    """The cache path (``prefill_cache_fwd``, what a model's prefill on an ``AHNCache`` runs) with the memory
    passes before the sm_90a kernel (``CONFIG["sm90_overlap"] = "prefill"``, the default) and beside it ("all"):
    a 64-token question on a 128k cache (one chunk: its tiles are likely deferred to the memory-only launch), a
    4096-token chunk at 32k, a 32768-token chunk at 96k (beside it whatever ``CONFIG["sm90_overlap_min"]`` says,
    so that every size is measured both ways). The cache's contents are random (its positions past the window and
    the sinks); each timed call restores them first (the copy is timed alone and subtracted)."""
    from ahn_ops.ops.ahn_attention import prefill as P

    rows, before = [], (P.CONFIG["band"], P.CONFIG["sm90_overlap"], P.CONFIG["sm90_overlap_min"])
    try:
        P.CONFIG["band"], P.CONFIG["sm90_overlap_min"] = "sm90", (0, 0)
        for W, pos, T in [(32640, 131072, 64), (4096, 32768, 4096), (32640, 98304, 32768)]:
            g = torch.Generator(device="cuda").manual_seed(T)
            r = lambda *shape: torch.randn(*shape, device="cuda", generator=g)  # noqa: E731
            x = prefill_inputs(T, H, HKV, D, seed=T)
            cache0 = (r(1, S, HKV, D).bfloat16(), r(1, S, HKV, D).bfloat16(), r(1, W, HKV, D).bfloat16(),
                      r(1, W, HKV, D).bfloat16(), r(1, W, 2, H).bfloat16(), r(1, H, D, D) * 0.01,
                      torch.full((1,), pos, dtype=torch.int64, device="cuda"))
            cache = [c.clone() for c in cache0]

            def restore():
                for c, c0 in zip(cache, cache0):
                    c.copy_(c0)

            def call():
                restore()
                return P.prefill_cache_fwd(*x, *cache, W, S, "gdn")

            copy_ms = t(restore)
            ms, outs = {}, {}
            for mode in ("prefill", "all"):
                P.CONFIG["sm90_overlap"] = mode
                outs[mode] = call()
                ms[mode] = t(call) - copy_ms
            rows.append((W, pos, T, ms["prefill"], ms["all"], rel(outs["all"], outs["prefill"])))
            print(rows[-1], flush=True)
    finally:
        P.CONFIG["band"], P.CONFIG["sm90_overlap"], P.CONFIG["sm90_overlap_min"] = before
    print(f"\n# the cache path, gdn, H={H}/{HKV} D={D} S={S}, sm_90a kernel: the memory passes before it / beside it")
    print("| W | position | new tokens | passes before (ms) | beside (ms) | rel diff of out |\n|---|---|---|---|---|---|")
    for W, pos, T, a, b, d in rows:
        print(f"| {W} | {pos} | {T} | {a:.3f} | {b:.3f} | {d:.1e} |")


def bench_bwd(mod, first=None):
    """The band backward (``torch.ops.ahn.band_bwd_sm90``) beside cuDNN's (``band_cudnn.band_bwd``) on the same
    inputs (their gradients compared), then the fused gdn forward + backward with the backward's band from each
    (``backward.CONFIG["band"]``), the forward on "no_sm90" and on "sm90". TFLOP/s count the band backward's
    five products, 10 D H per band (query, key) pair."""
    import common as C
    from ahn_ops.ops.ahn_attention import backward as Bw
    from ahn_ops.ops.ahn_attention import band_cudnn
    from ahn_ops.ops.ahn_attention import prefill as P

    t = _timer()

    H, HKV, D = 16, 2, 128
    rows = []
    for T, W in [(32768, 4096), (16384, 2048), (131072, 32640)][:first]:
        q, do = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(1, T, HKV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        o, lse = band_cudnn.band_fwd(q, k, v, W)  # the band's own softmax: o, natural-log lse [1, H, T]
        delta = (do.float() * o.float()).sum(-1)[0]  # [T, H]
        ld = torch.zeros(2, H, (T + 3) // 4 * 4, device="cuda")
        ld[0, :, :T] = lse[0] * 1.4426950408889634
        ld[1, :, :T] = delta.t()
        cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
        bufs = [torch.zeros(T, h, D, device="cuda") for h in (H, HKV, HKV)]
        flat = [x[0] for x in (q, k, v, do)]

        def ours():
            for b in bufs:
                b.zero_()
            torch.ops.ahn.band_bwd_sm90(*flat, ld, W, cu, T, *bufs)

        wb = band_cudnn.band_window("bwd", q, k, W)
        ms_o = t(ours)
        ms_c = t(lambda: band_cudnn.band_bwd(q, k, v, o, do, lse, wb))
        ours()
        theirs = band_cudnn.band_bwd(q, k, v, o, do, lse, wb)
        diffs = ", ".join(f"{n} {rel(a, b[0]):.1e}" for n, a, b in zip(("dq", "dk", "dv"), bufs, theirs))
        fl = 2.5 * C.window_flops(T, W, 0, H, D)
        for name, ms in (("ours (zeroing its fp32 buffers included)", ms_o), (f"cuDNN band (window {wb})", ms_c)):
            rows.append((T, W, name, ms, fl / ms / 1e9))
            print(rows[-1], flush=True)
        print(f"# T={T} W={W}: rel diff of the band gradients, ours vs cuDNN's: {diffs}", flush=True)
        del q, do, k, v, o, bufs, flat
    print("\n| T | W | band backward | ms | TFLOP/s |\n|---|---|---|---|---|")
    for T, W, name, ms, tf in rows:
        print(f"| {T} | {W} | {name} | {ms:.3f} | {tf:.0f} |")

    T, W, S = 32768, 4096, 128
    args = [x.requires_grad_(x.is_floating_point()) for x in prefill_inputs(T, H, HKV, D, seed=5)]
    dout = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)

    def fwd():  # the op with its registered autograd
        return torch.ops.ahn.prefill_fwd(*args, W, S, "gdn", None, None, False, False)[0]

    def step():
        torch.autograd.grad(fwd(), args, dout)

    def peak_gb():  # one step's peak allocation (issue 33: <= 3.4 GB at this shape)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 1e9

    res, grads, peaks = {}, {}, {}
    try:
        for engine in ("no_sm90", "sm90"):
            for band in ("auto", "sm90"):
                P.CONFIG["band"], Bw.CONFIG["band"] = engine, band
                name = f"forward {engine}, backward band {'cuDNN' if band == 'auto' else 'sm90'}"
                res[name] = t(step)
                peaks[name] = peak_gb()
                # kept on the host: gradients held on the GPU would count in the next pairs' peaks
                grads[name] = [g.float().cpu() for g in torch.autograd.grad(fwd(), args, dout)]
        Bw.CONFIG["chain_priority"] = 0
        res["forward sm90, backward band sm90, the chain beside it at priority 0"] = t(step)
        Bw.CONFIG["side_stream"] = False
        res["forward sm90, backward band sm90, one stream"] = t(step)
    finally:
        P.CONFIG["band"], Bw.CONFIG["band"], Bw.CONFIG["side_stream"] = "auto", "auto", True
        Bw.CONFIG["chain_priority"] = -1
    base = grads["forward no_sm90, backward band cuDNN"]
    print(f"\n# gdn forward + backward, T={T} W={W} S={S} H={H}/{HKV} D={D}; worst rel diff of a gradient "
          "against the default's: " + ", ".join(f"{n}: {max(rel(a, b) for a, b in zip(g, base)):.1e}"
                                                for n, g in grads.items()))
    print("| forward + backward | ms | peak GB |\n|---|---|---|")
    for name, ms in res.items():
        print(f"| {name} | {ms:.3f} | {peaks[name]:.2f} |" if name in peaks else f"| {name} | {ms:.3f} | |")


def bench_variants(mod, t, rounds=3, variants=(1, 2)):
    """The kernel's variants against each other, in turn for ``rounds`` rounds (the machine's drift lands on every
    variant): the attention alone (S=128) and the library's gdn forward on the default engine under
    ``CONFIG["sm90_variant"]`` (the passes beside the kernel, and before it with ``deterministic=True``), at T=32k
    W=4096 and 131k W=32640. Medians over the rounds, and each variant over the first."""
    import common as C  # (on the path since Kernel() imported ahn_ops through it)
    from ahn_ops.ops.ahn_attention import prefill as P

    H, HKV, D, S = 16, 2, 128, 128
    res = {}
    for T, W in ((32768, 4096), (131072, 32640)):
        args = prefill_inputs(T, H, HKV, D)
        q, k, v = args[0], args[1], args[2]
        for _ in range(rounds):
            for var in variants:
                res.setdefault((T, "attention alone", var), []).append(t(lambda: mod.band_fwd(q, k, v, W, S, var)))
                with C.configured({"sm90_variant": var}, P.CONFIG):
                    res.setdefault((T, "forward, passes beside", var), []).append(
                        t(lambda: P.prefill_fwd(*args, W, S, "gdn")))
                    res.setdefault((T, "forward, passes before", var), []).append(
                        t(lambda: P.prefill_fwd(*args, W, S, "gdn", deterministic=True)))
        del args, q, k, v
    print(f"\n# the sm_90a kernel's variants, gdn, H={H}/{HKV} D={D} S={S}; ms, median of {rounds} rounds (x first)")
    print("| T | what | " + " | ".join(f"v{var}" for var in variants) + " |\n|---|---|" + "---|" * len(variants))
    for T, what in dict.fromkeys((T, what) for T, what, _ in res):
        med = [statistics.median(res[T, what, var]) for var in variants]
        print(f"| {T} | {what} | " + " | ".join(f"{m:.3f} ({m / med[0]:.3f})" for m in med) + " |")


def ncu_target(T=32768, W=4096, S=128, kind="gdn"):
    """Three forwards on the default engine with the memory passes before the kernel (``deterministic=True``:
    under Nsight Compute, which runs kernels one at a time, a kernel beside the passes would find no chunk ready
    and defer every tile). Profile the second: ``ncu --launch-skip 1 --launch-count 1 -k regex:band_fwd``."""
    sys.path.insert(0, HERE)
    from bench_prefill import make

    from ahn_ops.ops.ahn_attention import prefill as P

    args = make(kind, 1, T, 16, 2, 128)
    for _ in range(3):
        P.prefill_fwd(*args, W, S, kind, deterministic=True)
    torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("parts", nargs="*",
                    choices=["check", "check-fused", "bench", "bench-bwd", "engines", "overlap", "cache",
                             "variants", "ncu-target"],
                    help="default: check, check-fused, bench")
    ap.add_argument("--first", type=int, help="only the first N shapes of each check (e.g. under compute-sanitizer)")
    ap.add_argument("--shape", nargs=3, type=int, metavar=("T", "W", "S"), default=(32768, 4096, 128),
                    help="overlap: the shape (default 32768 4096 128)")
    ap.add_argument("--chains", nargs="+", metavar="BV:WARPS:STAGES",
                    help="overlap: the state chain's launches to time (default: " +
                    " ".join(":".join(map(str, c)) for c in CHAINS) + ")")
    a = ap.parse_args()
    parts = a.parts or ["check", "check-fused", "bench"]
    print("#", torch.cuda.get_device_name(), "torch", torch.__version__)
    mod = Kernel()
    ok = True
    if "check" in parts:
        ok &= check(mod, a.first)
    if "check-fused" in parts:
        ok &= check_fused(mod, a.first)
    if "bench" in parts:
        bench(mod)
    if "bench-bwd" in parts:
        bench_bwd(mod, a.first)
    if "engines" in parts:
        bench_engines(_timer())
    if "overlap" in parts:
        chains = [tuple(int(x) for x in c.split(":")) for c in a.chains] if a.chains else CHAINS
        T, W, S = a.shape
        bench_overlap(_timer(), T, W, S, chains=chains)
    if "cache" in parts:
        bench_cache(_timer())
    if "variants" in parts:
        bench_variants(mod, _timer())
    if "ncu-target" in parts:
        ncu_target()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
