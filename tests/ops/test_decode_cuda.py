"""GPU tests of the CUDA decode kernel ``torch.ops.ahn.decode_step`` (csrc/cuda/ahn_decode.cu).

Every step of a decode loop is compared with ``ahn_decode_ref`` run on an fp32 copy of the
cache, and the whole cache (sinks, ring, gates, state, pos) is compared at the end.
Tolerance by the flash-attention rule: the kernel's error against the fp32 reference is at
most 2x the error of the same reference math run in the low precision (on a cache of its
own), plus a small floor. Caches start random, with sequences of one batch at different
positions, so one short loop covers positions < W, = W, the first absorption at W + S, and
rings that have wrapped many times. Skips without CUDA.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import ahn_ops  # noqa: F401  (registers torch.ops.ahn)
from ahn_ops._ext import decode_switches
from ahn_ops.ops.ahn_attention.reference import ahn_decode_ref

from ..utils import poison_unwritten

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOOR = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}
CAP = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _require_kernel():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("ahn::decode_step", "CUDA"), (
        "CUDA is available but ahn_ops was built without its CUDA kernels")


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_cache(B, H, HKV, D, W, S, kind, dtype, pos, gen, dev="cuda"):
    """A random (not history-consistent) cache; rows without a token yet are NaN (never to be read)."""
    def r(*s, scale=1.0):
        return torch.randn(*s, generator=gen) * scale
    sink_k, sink_v = r(B, S, HKV, D).to(dtype), r(B, S, HKV, D).to(dtype)
    ring_k, ring_v = r(B, W, HKV, D).to(dtype), r(B, W, HKV, D).to(dtype)
    gates = r(B, W, 2, H).to(dtype)  # the ring tokens' raw gate inputs a, b
    state = r(B, H, D, D, scale=0.1)
    poison_unwritten(sink_k, sink_v, ring_k, ring_v, gates, pos, W, S)
    pos_t = torch.tensor(pos, dtype=torch.int64)
    return [t.to(dev) for t in (sink_k, sink_v, ring_k, ring_v, gates, state, pos_t)]


def make_params(H, D, kind, gen, ow_zero=False, pdtype=torch.float32, dev="cuda"):
    A_log = None if kind == "dn" else torch.log(torch.rand(H, generator=gen) * 15 + 1)
    dt_bias = None if kind == "dn" else torch.randn(H, generator=gen) * 0.5
    nw = 1 + 0.1 * torch.randn(H * D if kind == "mamba2" else D, generator=gen)
    ow = torch.zeros(H, D, D) if ow_zero else torch.randn(H, D, D, generator=gen) * D ** -0.5
    return [None if x is None else x.to(dev, pdtype) for x in (A_log, dt_bias, nw, ow)]


def make_step(B, H, HKV, D, kind, dtype, gen, dev="cuda"):
    q = (torch.randn(B, H, D, generator=gen) * 1.5).to(dev, dtype)
    k = torch.randn(B, HKV, D, generator=gen).to(dev, dtype)
    v = torch.randn(B, HKV, D, generator=gen).to(dev, dtype)
    a = None if kind == "dn" else torch.randn(B, H, generator=gen).to(dev, dtype)
    b = None if kind == "mamba2" else torch.randn(B, H, generator=gen).to(dev, dtype)
    z = torch.randn(B, H, generator=gen).to(dev, dtype)
    return q, k, v, a, b, z


def fp32_copy(cache):
    return [t.float().clone() if t.is_floating_point() else t.clone() for t in cache]


# (kind, dtype, D, H, HKV, B, W, S, steps, start positions (cycled over B), extra)
CASES = [
    pytest.param("gdn", "bf16", 128, 16, 2, 3, 16, 4, 40, [0, 13, 1000], {}, id="gdn-bf16-D128-G8-B3-W16-S4"),
    pytest.param("gdn", "fp16", 64, 4, 4, 3, 32, 0, 40, [0, 31, 517], {}, id="gdn-fp16-D64-G1-B3-W32-S0"),
    pytest.param("dn", "bf16", 128, 2, 2, 1, 16, 4, 30, [0], {}, id="dn-bf16-D128-G1-B1-W16-S4"),
    pytest.param("dn", "fp16", 64, 16, 2, 3, 20, 3, 30, [0, 19, 333], {}, id="dn-fp16-D64-G8-B3-W20-S3"),
    pytest.param("mamba2", "bf16", 128, 16, 2, 3, 16, 4, 40, [0, 17, 900], {}, id="mamba2-bf16-D128-G8-B3"),
    pytest.param("mamba2", "fp16", 64, 8, 1, 3, 24, 2, 30, [0, 25, 700], {}, id="mamba2-fp16-D64-G8-B3"),
    pytest.param("mamba2", "bf16", 128, 16, 1, 2, 40, 4, 12, [40, 3000], {}, id="mamba2-bf16-D128-G16-B2"),
    pytest.param("gdn", "fp32", 128, 16, 2, 3, 16, 4, 30, [0, 13, 1000], {}, id="gdn-fp32-D128-G8-B3"),
    pytest.param("mamba2", "fp32", 64, 4, 4, 3, 16, 4, 30, [0, 19, 400], {}, id="mamba2-fp32-D64-G1-B3"),
    pytest.param("dn", "fp32", 64, 8, 1, 2, 16, 0, 20, [0, 77], {}, id="dn-fp32-D64-G8-B2-S0"),
    # several splits per sequence (S + W > 64 keys), crossing W + S = 135 at step 15
    pytest.param("gdn", "bf16", 128, 16, 2, 3, 130, 5, 24, [120, 40, 9000], {}, id="gdn-bf16-D128-G8-W130-S5"),
    pytest.param("gdn", "bf16", 128, 16, 2, 2, 1000, 8, 4, [2500, 30], {}, id="gdn-bf16-D128-W1000-splits"),
    pytest.param("mamba2", "fp16", 64, 8, 2, 2, 700, 16, 4, [710, 5000], {}, id="mamba2-fp16-D64-W700-splits"),
    # the new token at the end of a whole tile of sinks (t = 15, 31 < S = 32), at the sink/ring boundary,
    # windows filling up and full (S + W = 96); long splits (8 tiles per warp, D = 64: 3 prologue tiles
    # per warp) with the window filling up at the first step
    pytest.param("gdn", "bf16", 128, 16, 2, 3, 64, 32, 40, [0, 10, 80], {}, id="gdn-bf16-D128-S32-sink-tiles"),
    pytest.param("dn", "fp16", 64, 8, 2, 2, 2000, 16, 6, [2015, 2100], {"env": {"AHN_DECODE_SPLIT_KEYS": "512"}},
                 id="dn-fp16-D64-W2000-prologue"),
    # Qwen2.5-7B's G = 7, and G = 20 > 16 (two head tiles per kv head)
    pytest.param("gdn", "bf16", 128, 14, 2, 2, 24, 4, 12, [20, 300], {}, id="gdn-bf16-D128-G7"),
    pytest.param("dn", "fp16", 64, 20, 1, 2, 24, 4, 12, [20, 300], {}, id="dn-fp16-D64-G20"),
    # large batch, sequences spread over every regime
    pytest.param("gdn", "bf16", 128, 16, 2, 64, 48, 4, 5, list(range(0, 640, 10)), {}, id="gdn-bf16-D128-B64"),
    pytest.param("mamba2", "fp16", 64, 8, 2, 64, 40, 2, 4, list(range(0, 320, 5)), {}, id="mamba2-fp16-D64-B64"),
    # the window branch alone (o_weight = 0), CUDA-core path, no PDL, bf16 parameters
    pytest.param("gdn", "bf16", 128, 16, 2, 3, 100, 4, 12, [95, 7, 600], {"ow_zero": True}, id="gdn-bf16-ow0"),
    pytest.param("gdn", "bf16", 128, 16, 2, 3, 130, 5, 12, [128, 7, 600], {"env": {"AHN_DECODE_SIMT": "1"}},
                 id="gdn-bf16-simt"),
    pytest.param("mamba2", "bf16", 64, 8, 2, 3, 100, 4, 8, [101, 7, 600], {"env": {"AHN_DECODE_PDL": "0"}},
                 id="mamba2-bf16-nopdl"),
    pytest.param("dn", "fp16", 128, 8, 2, 3, 40, 4, 8, [41, 7, 600], {"pdtype": torch.bfloat16},
                 id="dn-fp16-bf16params"),
    # the tensor-core loop's lazy reference max: the exact max (0), the largest headroom (2^12 weights
    # in fp16) with peaky scores (q x 6: the max moves often and far), and the default with peaky scores
    pytest.param("gdn", "bf16", 128, 16, 2, 2, 1000, 8, 4, [2500, 30], {"env": {"AHN_DECODE_LAZY": "0"}},
                 id="gdn-bf16-exact-max"),
    pytest.param("gdn", "fp16", 128, 16, 2, 2, 1000, 8, 4, [2500, 30],
                 {"env": {"AHN_DECODE_LAZY": "12"}, "q_scale": 6.0}, id="gdn-fp16-lazy12-peaky"),
    pytest.param("dn", "bf16", 64, 8, 2, 2, 700, 4, 4, [710, 40], {"q_scale": 6.0}, id="dn-bf16-D64-peaky"),
    # launch-knob instantiations: the 168-register budget at a small B (255 is the default there; B = 64
    # takes 168), 3 cp.async stages
    pytest.param("gdn", "fp16", 128, 16, 2, 3, 1000, 8, 4, [2500, 30, 7], {"env": {"AHN_DECODE_MINB": "3"}},
                 id="gdn-fp16-minb3"),
    pytest.param("mamba2", "bf16", 128, 8, 2, 2, 1000, 8, 4, [2500, 30], {"env": {"AHN_DECODE_STAGES": "3"}},
                 id="mamba2-bf16-st3"),
]


@pytest.mark.parametrize("kind,dt,D,H,HKV,B,W,S,steps,starts,extra", CASES)
def test_decode_matches_reference(kind, dt, D, H, HKV, B, W, S, steps, starts, extra):
    _require_kernel()
    with decode_switches(**extra.get("env", {})):  # the op's debug switches, read again while set
        _decode_matches_reference(kind, dt, D, H, HKV, B, W, S, steps, starts, extra)


def _decode_matches_reference(kind, dt, D, H, HKV, B, W, S, steps, starts, extra):
    dtype = DT[dt]
    gen = torch.Generator().manual_seed(zlib.crc32(repr((kind, dt, D, H, HKV, B, W, S)).encode()))
    pos = [starts[i % len(starts)] for i in range(B)]
    cache = make_cache(B, H, HKV, D, W, S, kind, dtype, pos, gen)
    cache_ref = fp32_copy(cache)                     # fp32 reference
    cache_lp = [t.clone() for t in cache]            # the same math in the low precision
    A_log, dt_bias, nw, ow = make_params(H, D, kind, gen, extra.get("ow_zero", False),
                                         extra.get("pdtype", torch.float32))
    worst = (0.0, 0.0)
    for step in range(steps):
        q, k, v, a, b, z = make_step(B, H, HKV, D, kind, dtype, gen)
        q = (q.float() * extra.get("q_scale", 1.0)).to(dtype)
        out = torch.ops.ahn.decode_step(q, k, v, a, b, z, A_log, dt_bias, nw, ow, *cache, W, S, kind)
        ref = ahn_decode_ref(q, k, v, a, b, z, A_log, dt_bias, nw, ow, *cache_ref, W, S, kind,
                             dtype=torch.float32)
        lp = ahn_decode_ref(q, k, v, a, b, z, A_log, dt_bias, nw, ow, *cache_lp, W, S, kind, dtype=dtype)
        assert out.shape == (B, H, D) and out.dtype == dtype
        assert torch.isfinite(out).all(), f"step {step}: non-finite output (unwritten element?)"
        err, err_lp = rel_err(out, ref), rel_err(lp, ref)
        worst = max(worst, (err, err_lp))
        assert err <= min(2 * err_lp + FLOOR[dtype], CAP[dtype]), (
            f"step {step} (pos {cache_ref[6].tolist()[:4]}...): kernel err {err:.3e}, low-precision ref "
            f"err {err_lp:.3e}")
    print(f"worst step: kernel err {worst[0]:.2e}, low-precision torch err {worst[1]:.2e}")
    sink_k, sink_v, ring_k, ring_v, gates, state, pos_k = cache
    r_sink_k, r_sink_v, r_ring_k, r_ring_v, r_gates, r_state, r_pos = cache_ref
    assert torch.equal(pos_k, r_pos)
    for name, x, y in (("sink_k", sink_k, r_sink_k), ("sink_v", sink_v, r_sink_v),
                       ("ring_k", ring_k, r_ring_k), ("ring_v", ring_v, r_ring_v), ("gates", gates, r_gates)):
        # bit-equal, NaN rows (no token yet) included
        torch.testing.assert_close(x.float(), y, rtol=0, atol=0, equal_nan=True, msg=f"cache.{name} differs")
    assert rel_err(state, r_state) < 1e-4, f"state rel err {rel_err(state, r_state):.2e}"


def _valid_args(B=2, H=4, HKV=2, D=64, W=8, S=2, kind="gdn", dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    cache = make_cache(B, H, HKV, D, W, S, kind, dtype, [3, 20], gen)
    A_log, dt_bias, nw, ow = make_params(H, D, kind, gen)
    q, k, v, a, b, z = make_step(B, H, HKV, D, kind, dtype, gen)
    return dict(q=q, k=k, v=v, a=a, b=b, z=z, A_log=A_log, dt_bias=dt_bias, norm_weight=nw, o_weight=ow,
                sink_k=cache[0], sink_v=cache[1], ring_k=cache[2], ring_v=cache[3], gates=cache[4],
                state=cache[5], pos=cache[6], window=W, sinks=S, kind=kind)


def _call(args):
    names = ["q", "k", "v", "a", "b", "z", "A_log", "dt_bias", "norm_weight", "o_weight", "sink_k", "sink_v",
             "ring_k", "ring_v", "gates", "state", "pos", "window", "sinks", "kind"]
    return torch.ops.ahn.decode_step(*[args[n] for n in names])


def _bad(name):
    def f(x):
        B, H, HKV, D, W, S = 2, 4, 2, 64, 8, 2
        if name == "kind":
            x["kind"] = "lstm"
        elif name == "k_shape":
            x["k"] = torch.randn(B, HKV + 1, D, device="cuda", dtype=torch.bfloat16)
        elif name == "a_missing":
            x["a"] = None
        elif name == "gates_dtype":
            x["gates"] = x["gates"].double()
        elif name == "state_dtype":
            x["state"] = x["state"].bfloat16()
        elif name == "q_dtype":
            x["q"] = x["q"].double()
        elif name == "ring_noncontig":
            x["ring_k"] = torch.zeros(B, HKV, W, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        elif name == "ring_misaligned":  # contiguous, but 2 bytes past a 16-byte boundary
            x["ring_v"] = torch.zeros(B * W * HKV * D + 1, device="cuda", dtype=torch.bfloat16)[1:].view(B, W, HKV, D)
        elif name == "pos_cpu":
            x["pos"] = x["pos"].cpu()
        elif name == "o_weight_shape":
            x["o_weight"] = x["o_weight"][:, :, :32]
        elif name == "window":
            x["window"] = 0
        elif name == "head_dim_96":
            for key in ("q", "k", "v"):
                t = x[key]
                x[key] = torch.randn(*t.shape[:-1], 96, device="cuda", dtype=t.dtype)
            x["sink_k"] = torch.zeros(B, S, HKV, 96, device="cuda", dtype=torch.bfloat16)
            x["sink_v"] = x["sink_k"].clone()
            x["ring_k"] = torch.zeros(B, W, HKV, 96, device="cuda", dtype=torch.bfloat16)
            x["ring_v"] = x["ring_k"].clone()
            x["state"] = torch.zeros(B, H, 96, 96, device="cuda")
            x["norm_weight"] = torch.ones(96, device="cuda")
            x["o_weight"] = torch.zeros(H, 96, 96, device="cuda")
        return x
    return f


@pytest.mark.parametrize("name,exc", [
    ("kind", ValueError), ("k_shape", ValueError), ("a_missing", ValueError), ("gates_dtype", TypeError),
    ("state_dtype", TypeError), ("q_dtype", TypeError), ("ring_noncontig", ValueError), ("ring_misaligned", ValueError),
    ("pos_cpu", ValueError),
    ("o_weight_shape", ValueError), ("window", ValueError), ("head_dim_96", ValueError),
])
def test_bad_inputs_rejected_before_any_write(name, exc):
    _require_kernel()
    args = _bad(name)(_valid_args())
    keys = ("sink_k", "sink_v", "ring_k", "ring_v", "gates", "state", "pos")
    before = {k: args[k].clone() for k in keys}
    with pytest.raises(exc):
        _call(args)
    torch.cuda.synchronize()
    for k in keys:
        torch.testing.assert_close(args[k], before[k], rtol=0, atol=0, equal_nan=True,
                                   msg=f"cache.{k} was written by a rejected call")


def test_valid_args_run():
    _require_kernel()
    out = _call(_valid_args())
    torch.cuda.synchronize()
    assert out.shape == (2, 4, 64) and torch.isfinite(out).all()


def test_noncontiguous_inputs():
    """q/k/v views with padded rows and a/b/z strided views give the contiguous result."""
    _require_kernel()
    args = _valid_args(D=128)
    ref_args = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    for key in ("q", "k", "v"):
        t = args[key]
        big = torch.zeros(t.shape[0], t.shape[1], t.shape[2] + 8, device="cuda", dtype=t.dtype)
        big[..., 3:3 + t.shape[2]] = t  # misaligned rows: copied inside the op
        args[key] = big[..., 3:3 + t.shape[2]]
    for key in ("a", "b", "z"):
        t = args[key]
        args[key] = torch.stack([t, t * 0], -1)[..., 0]
    out = _call(args)
    ref = _call(ref_args)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_interface_falls_back_for_other_head_dims():
    """ahn_ops.ahn_decode on CUDA with D = 32 runs the reference instead of the kernel."""
    cache = ahn_ops.AHNCache(2, 1, 4, 2, 32, window=8, sinks=2, kind="dn", dtype=torch.float32, device="cuda")
    gen = torch.Generator().manual_seed(1)
    q, k, v, a, b, z = make_step(2, 4, 2, 32, "dn", torch.float32, gen)
    _, _, nw, ow = make_params(4, 32, "dn", gen)
    out = ahn_ops.ahn_decode(q, k, v, None, b, z, None, None, nw, ow, cache[0])
    assert out.shape == (2, 4, 32) and cache[0].pos.tolist() == [1, 1]


@pytest.mark.parametrize("kind,dt,D,H,HKV,B,W,S,starts,graph", [
    ("gdn", "bf16", 128, 16, 2, 1, 1000, 8, [2500], False),          # long splits: every prologue before the wait
    ("gdn", "bf16", 128, 16, 2, 3, 130, 5, [120, 3, 9000], True),    # short sequences: the new token in a prologue
    ("mamba2", "fp16", 64, 8, 2, 2, 700, 16, [710, 20], False),
    ("dn", "fp32", 64, 8, 1, 2, 40, 4, [41, 7], False),              # CUDA-core attention path
])
def test_overlap_prev_after_a_triggering_projection(kind, dt, D, H, HKV, B, W, S, starts, graph):
    """decode_step(overlap_prev=True) right after a projection kernel that lets it launch early (the
    fused q/k/v projection of the decode step, ``trigger_next``), and before a chained o_proj (a
    programmatic dependent launch that streams its weights before waiting), gives the bits of the plain
    calls: output, o_proj's output and every cache tensor, step after step (and replayed in a CUDA
    graph)."""
    _require_kernel()
    from ahn_ops.ops import decode_linear as dl

    dtype = DT[dt]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{kind}{dt}{D}{B}{W}".encode()))
    pos = [starts[i % len(starts)] for i in range(B)]
    cache_a = make_cache(B, H, HKV, D, W, S, kind, dtype, pos, gen)
    cache_b = [t.clone() for t in cache_a]
    params = make_params(H, D, kind, gen)
    K = 2048  # a projection that takes a while: a read of its outputs before it ends would see old values
    h = torch.randn(B, K, generator=gen).to("cuda", dtype)
    nw = torch.ones(K, device="cuda", dtype=dtype)
    wq = (torch.randn(H * D, K, generator=gen) * K ** -0.5).to("cuda", dtype)
    wkv = (torch.randn(2 * HKV * D, K, generator=gen) * K ** -0.5).to("cuda", dtype)
    cos, sin = torch.ones(B, D, device="cuda", dtype=dtype), torch.zeros(B, D, device="cuda", dtype=dtype)
    wo = (torch.randn(K, H * D, generator=gen) * (H * D) ** -0.5).to("cuda", dtype)
    _, _, _, a, b, z = make_step(B, H, HKV, D, kind, dtype, gen)

    def step(cache, overlap):
        q, y = dl.norm_qkvg(h, nw, 1e-6, wq, None, wkv, None, HKV * D, cos, sin, D, trigger_next=overlap)
        k, v = y[:, :HKV * D].view(B, HKV, D), y[:, HKV * D:].view(B, HKV, D)
        out = torch.ops.ahn.decode_step(q.view(B, H, D), k, v, a, b, z, *params, *cache, W, S, kind, overlap)
        o = dl.linear_residual(out.reshape(B, -1), wo, None, h, chain=overlap)
        return torch.cat([out.reshape(B, -1), o], 1)

    for _ in range(3):
        h.copy_(torch.randn(B, K, generator=gen))  # new q, k, v every step
        out_a, out_b = step(cache_a, True), step(cache_b, False)
        assert torch.equal(out_a, out_b)
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            g = {}
            for name, cache, ov in (("a", cache_a, True), ("b", cache_b, False)):
                g[name] = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g[name], stream=s):
                    g[name + "_out"] = step(cache, ov)
        torch.cuda.current_stream().wait_stream(s)
        for _ in range(4):
            h.copy_(torch.randn(B, K, generator=gen))
            g["a"].replay()
            g["b"].replay()
            assert torch.equal(g["a_out"], g["b_out"])
    torch.cuda.synchronize()
    for x, y in zip(cache_a, cache_b):
        assert torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0))
