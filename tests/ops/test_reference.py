"""The fp32 reference against independent constructions of the spec."""

from __future__ import annotations

import random

import pytest
import torch

import ahn_ops
from ahn_ops.ops.ahn_attention import reference as ref

from ..utils import batch_slice, empty_layer_cache, make_inputs, sel

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# the memory agrees with fla's naive recurrent gated delta rule
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gdn", "dn"])
@pytest.mark.parametrize("T,W,S,G", [
    pytest.param(40, 7, 3, 2, id="T40-W7-S3-G2"),
    pytest.param(33, 1, 0, 1, id="T33-W1-S0-G1"),
    pytest.param(50, 16, 5, 4, id="T50-W16-S5-G4"),
])
def test_memory_matches_fla_naive(kind, T, W, S, G):
    naive = pytest.importorskip("fla.ops.gated_delta_rule.naive")
    B, HKV, D = 2, 2, 8
    H = HKV * G
    q, k, v, a, b, z, A_log, dt_bias, nw, ow = make_inputs(kind, B, T, H, HKV, D, F64, seed=T + W)
    g, w = ref.memory_gates_ref(a, b, A_log, dt_bias, kind, F64)
    m, state = ref.memory_readout_ref(q, k, v, g, w, W, S, kind, dtype=F64)
    # fla: the memory stream is positions S .. T-1-W; its output for token j is read by query j + W
    ks = ref.l2norm(k[:, S:T - W]).repeat_interleave(G, 2)
    vs = v[:, S:T - W].repeat_interleave(G, 2)
    qs = ref.l2norm(q[:, S + W:])
    o, fs = naive.naive_recurrent_gated_delta_rule(
        qs.float(), ks.float(), vs.float(), w[:, S:T - W].float(), g[:, S:T - W].float(),
        scale=D ** -0.5, output_final_state=True)
    torch.testing.assert_close(m[:, S + W:].float(), o, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.float(), fs, rtol=1e-4, atol=1e-5)
    assert torch.all(m[:, :S + W] == 0), "memory must read exactly 0 while t < W + S"


# ---------------------------------------------------------------------------------------------
# window and memory are complementary: every earlier token seen exactly once
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,W,S", [(24, 5, 3), (24, 1, 0), (24, 30, 2), (17, 4, 20)])
def test_window_and_memory_cover_each_token_once(T, W, S):
    # all keys equal -> uniform attention over K(t); values one-hot -> o_win * |K(t)| = 1[j in K(t)].
    # Mamba2 with no decay (A_log = -inf), dt = 1, q = k = e: readout = sum_{j in M(t)} v_j = 1[j in M(t)].
    B, H, D = 1, 2, T
    e = torch.zeros(D, dtype=F64)
    e[0] = 1.0
    q = e.expand(B, T, H, D).clone()
    k = e.expand(B, T, 1, D).clone()
    v = torch.eye(T, dtype=F64)[None, :, None, :].expand(B, T, 1, D).clone()
    o_win = ref.window_attention_ref(q, k, v, W, S, dtype=F64)
    t = torch.arange(T)
    j = torch.arange(T)
    in_window = (j[None] <= t[:, None]) & ((t[:, None] - j[None] < W) | (j[None] < S))
    win = o_win[0, :, 0] * in_window.sum(1, keepdim=True)
    dt = torch.full((B, T, H), 1.0, dtype=F64)
    g = torch.zeros(B, T, H, dtype=F64)
    m, _ = ref.memory_readout_ref(q, k, v, g, dt, W, S, "mamba2", dtype=F64)
    mem = m[0, :, 0]
    torch.testing.assert_close(win, in_window.to(F64), atol=1e-12, rtol=0)
    total = win + mem
    torch.testing.assert_close(total, (j[None] <= t[:, None]).to(F64), atol=1e-12, rtol=0)
    in_memory = (j[None] >= S) & (j[None] <= t[:, None] - W)
    torch.testing.assert_close(mem, in_memory.to(F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["gdn", "dn", "mamba2"])
def test_zero_o_weight_is_sliding_window_attention(kind):
    B, T, H, HKV, D, W, S = 2, 45, 4, 2, 16, 9, 3
    q, k, v, a, b, z, A_log, dt_bias, nw, ow = make_inputs(kind, B, T, H, HKV, D, seed=7)
    out = ahn_ops.ahn_attention(q, k, v, a, b, z, A_log, dt_bias, nw, torch.zeros_like(ow),
                                window=W, sinks=S, kind=kind, backend="reference")
    # independent sliding window with sinks: explicit repeated K/V and a dense mask
    G = H // HKV
    kr, vr = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    s = torch.einsum("bthd,bjhd->bhtj", q, kr) * D ** -0.5
    t = torch.arange(T)
    allowed = (t[None] <= t[:, None]) & ((t[:, None] - t[None] < W) | (t[None] < S))
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    want = torch.einsum("bhtj,bjhd->bthd", p, vr)
    assert torch.equal(out, ref.window_attention_ref(q, k, v, W, S))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_memory_contributes_nothing_before_w_plus_s():
    kind, B, T, H, HKV, D, W, S = "gdn", 1, 30, 2, 1, 8, 10, 4
    inp = make_inputs(kind, B, T, H, HKV, D, seed=3)
    out, o_win, y, _ = ref.ahn_attention_ref(*inp, W, S, kind, return_parts=True)
    assert torch.all(y[:, :W + S] == 0)
    assert y[:, W + S:].abs().min() > 0


# ---------------------------------------------------------------------------------------------
# chunked prefill and decode on the cache == one prefill
# ---------------------------------------------------------------------------------------------
CASES = [
    pytest.param("gdn", 61, 7, 3, 2, id="gdn-T61-W7-S3-G2"),
    pytest.param("dn", 50, 5, 0, 1, id="dn-T50-W5-S0-G1"),
    pytest.param("mamba2", 47, 6, 2, 4, id="mamba2-T47-W6-S2-G4"),
    pytest.param("gdn", 20, 32, 4, 2, id="gdn-T20-W32-S4-G2"),
    pytest.param("gdn", 30, 1, 1, 2, id="gdn-T30-W1-S1-G2"),
]


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("kind,T,W,S,G", CASES)
def test_chunked_prefill_and_decode_match_one_prefill(kind, T, W, S, G, backend):
    B, HKV, D = 2, 2, 8
    H = HKV * G
    inp = make_inputs(kind, B, T, H, HKV, D, F64, seed=T * 7 + W)
    q, k, v, a, b, z, A_log, dt_bias, nw, ow = inp
    full = ahn_ops.ahn_attention(*inp, window=W, sinks=S, kind=kind, backend=backend)
    cache = empty_layer_cache(kind, B, H, HKV, D, W, S, F64)
    rng = random.Random(T + W)
    outs, t0 = [], 0
    while t0 < T:  # random chunk sizes: decode steps (1) and chunks crossing W, W + S, ring wraps
        n = min(rng.choice([1, 1, 1, 2, 3, W, W + 1, 2 * W + 3]), T - t0)
        sl = slice(t0, t0 + n)
        outs.append(ahn_ops.ahn_attention(*(sel(x, sl) for x in (q, k, v, a, b, z)), A_log, dt_bias, nw, ow,
                                          window=W, sinks=S, kind=kind, cache=cache, backend=backend))
        t0 += n
    assert cache.pos.tolist() == [T] * B
    # the fp32 state in the cache: agreement to fp32 rounding
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    # the final cached state is the state of one prefill
    _, _, _, state = ref.ahn_attention_ref(*inp, W, S, kind, dtype=F64, return_parts=True)
    torch.testing.assert_close(cache.state.double(), state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gdn", "mamba2"])
def test_batch_at_different_positions(kind):
    # sequence 0 prefills 5 tokens, sequence 1 prefills 13 (crossing W + S), then both decode together
    B, H, HKV, D, W, S, T = 2, 4, 2, 8, 6, 2, 40
    inp = make_inputs(kind, B, T, H, HKV, D, F64, seed=11)
    q, k, v, a, b, z, A_log, dt_bias, nw, ow = inp
    full = ahn_ops.ahn_attention(*inp, window=W, sinks=S, kind=kind)
    cache = empty_layer_cache(kind, B, H, HKV, D, W, S, F64)
    starts = [5, 13]
    for bi, n in enumerate(starts):
        part = [None if x is None else x[bi:bi + 1, :n] for x in (q, k, v, a, b, z)]
        o = ahn_ops.ahn_attention(*part, A_log, dt_bias, nw, ow, window=W, sinks=S, kind=kind,
                                  cache=batch_slice(cache, slice(bi, bi + 1)))
        torch.testing.assert_close(o, full[bi:bi + 1, :n], rtol=1e-5, atol=1e-5)
    assert cache.pos.tolist() == starts
    steps = T - max(starts)
    for s in range(steps):
        idx = torch.tensor([starts[0] + s, starts[1] + s])
        cur = [None if x is None else x[torch.arange(B), idx] for x in (q, k, v, a, b, z)]
        o = ahn_ops.ahn_decode(*cur, A_log, dt_bias, nw, ow, cache, backend="reference")
        torch.testing.assert_close(o, full[torch.arange(B), idx], rtol=1e-5, atol=1e-5)


def test_varlen_equals_separate_calls():
    kind, H, HKV, D, W, S = "gdn", 4, 2, 8, 5, 2
    lens = [7, 1, 19, 12]
    parts = [make_inputs(kind, 1, n, H, HKV, D, seed=i) for i, n in enumerate(lens)]
    _, _, _, _, _, _, A_log, dt_bias, nw, ow = parts[0]
    packed = [torch.cat([p[i] for p in parts], 1) for i in range(6)]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    out = ahn_ops.ahn_attention(*packed, A_log, dt_bias, nw, ow, window=W, sinks=S, kind=kind, cu_seqlens=cu)
    want = torch.cat([ahn_ops.ahn_attention(*p[:6], A_log, dt_bias, nw, ow, window=W, sinks=S, kind=kind)
                      for p in parts], 1)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["gdn", "dn", "mamba2"])
def test_gradcheck_reference(kind):
    B, T, H, HKV, D, W, S = 1, 9, 2, 1, 4, 3, 1
    inp = [None if x is None else x.detach().requires_grad_() for x in make_inputs(kind, B, T, H, HKV, D, F64, seed=5)]

    def f(*xs):
        return ref.ahn_attention_ref(*xs, W, S, kind, dtype=F64)

    assert torch.autograd.gradcheck(f, tuple(inp), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "chunked", "reference"])
def test_empty_inputs(backend):
    # T = 0, B = 0 and empty packed sequences (cu_seqlens may repeat an offset) give empty outputs
    kind, H, HKV, D, W, S = "gdn", 4, 2, 8, 5, 2
    call = dict(window=W, sinks=S, kind=kind, backend=backend)
    for B, T in ((2, 0), (0, 9)):
        out = ahn_ops.ahn_attention(*make_inputs(kind, B, T, H, HKV, D, seed=3), **call)
        assert out.shape == (B, T, H, D)
    lens = [7, 0, 12, 0]
    parts = [make_inputs(kind, 1, n, H, HKV, D, seed=i) for i, n in enumerate(lens)]
    _, _, _, _, _, _, A_log, dt_bias, nw, ow = parts[0]
    packed = [torch.cat([p[i] for p in parts], 1) for i in range(6)]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    out = ahn_ops.ahn_attention(*packed, A_log, dt_bias, nw, ow, cu_seqlens=cu, **call)
    want = torch.cat([ahn_ops.ahn_attention(*p[:6], A_log, dt_bias, nw, ow, **call) for p in parts if p[0].shape[1]], 1)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    # T = 0 on a cache: nothing changes
    q, k, v, a, b, z, A_log, dt_bias, nw, ow = make_inputs(kind, 2, 9, H, HKV, D, seed=4)
    cache = empty_layer_cache(kind, 2, H, HKV, D, W, S)
    ahn_ops.ahn_attention(q, k, v, a, b, z, A_log, dt_bias, nw, ow, cache=cache, **call)
    before = [t.clone() for t in cache.tensors()]
    out = ahn_ops.ahn_attention(*(x[:, :0] for x in (q, k, v, a, b, z)), A_log, dt_bias, nw, ow, cache=cache, **call)
    assert out.shape == (2, 0, H, D)
    for t0, t1 in zip(before, cache.tensors()):
        assert torch.equal(t0, t1)


# ---------------------------------------------------------------------------------------------
# bad input: clear errors, cache untouched
# ---------------------------------------------------------------------------------------------
def _good():
    return make_inputs("gdn", 2, 12, 4, 2, 8, seed=1)


@pytest.mark.parametrize("mutate,exc,needle", [
    (lambda a: a.__setitem__(0, a[0][0]), ValueError, "q must have shape"),
    (lambda a: a.__setitem__(1, a[1][..., :4]), ValueError, "k must have shape"),
    (lambda a: a.__setitem__(2, a[2].half()), TypeError, "v must have dtype"),
    (lambda a: a.__setitem__(3, a[3][..., :3]), ValueError, "a must have shape"),
    (lambda a: a.__setitem__(4, None), TypeError, "b must be a torch.Tensor"),
    (lambda a: a.__setitem__(5, a[5].int()), TypeError, "z must have dtype"),
    (lambda a: a.__setitem__(6, a[6][:2]), ValueError, "A_log must have shape"),
    (lambda a: a.__setitem__(8, torch.ones(32)), ValueError, "norm_weight must have shape"),
    (lambda a: a.__setitem__(9, a[9][:, :4]), ValueError, "o_weight must have shape"),
    (lambda a: a.__setitem__(9, a[9].to("meta")), ValueError, "o_weight must be on device"),
    (lambda a: (a.__setitem__(1, a[1][:, :, :1].expand(-1, -1, 3, -1)),
                a.__setitem__(2, a[2][:, :, :1].expand(-1, -1, 3, -1))), ValueError, "multiple of key/value heads"),
])
def test_bad_inputs_name_the_argument(mutate, exc, needle):
    args = list(_good())
    mutate(args)
    with pytest.raises(exc, match=needle):
        ahn_ops.ahn_attention(*args, window=4, sinks=1, kind="gdn")


@pytest.mark.parametrize("kw,exc,needle", [
    (dict(window=0), ValueError, "window must be >= 1"),
    (dict(sinks=-1), ValueError, "sinks must be >= 0"),
    (dict(window=2.5), TypeError, "window must be an int"),
    (dict(kind="lstm"), ValueError, "kind must be one of"),
    (dict(kind="dn"), ValueError, "a must be None for kind='dn'"),
    (dict(cu_seqlens=torch.tensor([0, 5, 12])), ValueError, "cu_seqlens"),
])
def test_bad_arguments(kw, exc, needle):
    call = dict(window=4, sinks=1, kind="gdn")
    call.update(kw)
    with pytest.raises(exc, match=needle):
        ahn_ops.ahn_attention(*_good(), **call)


@pytest.mark.parametrize("bad", ["shape", "dtype", "kind", "window"])
def test_rejected_call_leaves_cache_unchanged(bad):
    kind, B, H, HKV, D, W, S = "gdn", 2, 4, 2, 8, 4, 1
    q, k, v, a, b, z, A_log, dt_bias, nw, ow = make_inputs(kind, B, 9, H, HKV, D, seed=2)
    cache = empty_layer_cache(kind, B, H, HKV, D, W, S)
    ahn_ops.ahn_attention(q, k, v, a, b, z, A_log, dt_bias, nw, ow, window=W, sinks=S, kind=kind, cache=cache)
    before = [t.clone() for t in cache.tensors()]
    q1, k1, v1, a1, b1, z1 = (x[:, -1:] for x in (q, k, v, a, b, z))
    call = dict(window=W, sinks=S, kind=kind, cache=cache)
    if bad == "shape":
        k1 = k1[..., :4]
    elif bad == "dtype":
        q1, k1, v1 = q1.double(), k1.double(), v1.double()
    elif bad == "kind":
        call["kind"] = "dn"
        a1 = None
    else:
        call["window"] = W + 1
    with pytest.raises((ValueError, TypeError)):
        ahn_ops.ahn_attention(q1, k1, v1, a1, b1, z1, A_log, dt_bias, nw, ow, **call)
    for t0, t1 in zip(before, cache.tensors()):
        assert torch.equal(t0, t1)


# ---------------------------------------------------------------------------------------------
# AHNCache
# ---------------------------------------------------------------------------------------------
def test_cache_allocation_reset_reorder():
    c = ahn_ops.AHNCache(batch_size=3, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                         window=5, sinks=2, kind="gdn", dtype=torch.float32)
    per_layer_seq = (2 * 2 * 2 * 8 + 2 * 5 * 2 * 8) * 4 + 5 * 4 * 2 * 4 + 4 * 8 * 8 * 4 + 8
    assert c.nbytes == 2 * 3 * per_layer_seq
    for i, layer in enumerate(c):
        layer.state.fill_(float(i + 1))
        layer.pos.copy_(torch.tensor([1, 2, 3]))
    c.reorder(torch.tensor([2, 0, 0]))
    assert c.seq_lens().tolist() == [3, 1, 1]
    c.reset([1])
    assert c.seq_lens().tolist() == [3, 0, 1]
    assert torch.all(c[1].state[1] == 0) and torch.all(c[1].state[0] == 2)
    c.reset()
    assert c.nbytes == 2 * 3 * per_layer_seq and int(c.pos.abs().sum()) == 0
    with pytest.raises(ValueError, match="window must be >= 1"):
        ahn_ops.AHNCache(1, 1, 4, 2, 8, window=0)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ahn_ops.AHNCache(1, 1, 3, 2, 8, window=4)


def test_docstring_examples_run():
    import doctest

    import ahn_ops.cache
    from ahn_ops.ops.ahn_attention import interface

    for mod in (ahn_ops.cache, interface, ahn_ops._ext):
        res = doctest.testmod(mod, verbose=False)
        assert res.attempted > 0 and res.failed == 0, mod.__name__


@pytest.mark.parametrize("T,W,S,G,block", [(37, 5, 3, 2, 8), (40, 64, 0, 1, 512), (50, 1, 60, 4, 16)])
def test_window_attention_ref_lse(T, W, S, G, block):
    # return_lse: the natural-log log-sum-exp of the scaled scores each query attends, across query blocks,
    # GQA, W = 1, W >= T, S >= T; the output is the same as without it
    g = torch.Generator().manual_seed(T + W)
    q = torch.randn(2, T, 2 * G, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, T, 2, 16, generator=g, dtype=torch.float64) for _ in range(2))
    out, lse = ref.window_attention_ref(q, k, v, W, S, block=block, dtype=torch.float64, return_lse=True)
    assert torch.equal(out, ref.window_attention_ref(q, k, v, W, S, block=block, dtype=torch.float64))
    t = torch.arange(T)
    allowed = (t[None] <= t[:, None]) & ((t[:, None] - t[None] < W) | (t[None] < S))
    s = torch.einsum("bthd,bjhd->bhtj", q, k.repeat_interleave(G, 2)) * 16 ** -0.5
    want = torch.logsumexp(s.masked_fill(~allowed, float("-inf")), -1)
    torch.testing.assert_close(lse, want, rtol=1e-12, atol=1e-12)
