"""Fused Triton prefill (``torch.ops.ahn.prefill_fwd`` / ``prefill_cache``) against the fp32 reference.

CPU CI runs the kernels in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest) on
small odd shapes; the GPU-only tests at the end skip without CUDA.

Tolerance (flash-attention rule): the kernel's max-abs error against the fp32 reference is
at most 2x the error of the same PyTorch math run in the low precision
(``ahn_attention_ref(..., dtype=bf16/fp16)``) plus a small floor. Both numbers are printed.
"""

from __future__ import annotations

import os

import pytest
import torch

import ahn_ops
from ahn_ops.ops.ahn_attention import reference as ref

from ..utils import batch_slice, check_within_2x, empty_layer_cache, make_inputs, poison_unwritten, sel

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.skipif(not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or TRITON_INTERPRET=1")
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


def _prefill():
    from ahn_ops.ops.ahn_attention import prefill
    return prefill


_check = check_within_2x


CASES = [
    # kind, T, W, S, G, D, dtype
    pytest.param("gdn", 1, 5, 0, 1, 64, torch.bfloat16, id="gdn-T1-W5-S0-G1"),
    pytest.param("gdn", 63, 200, 3, 4, 64, torch.bfloat16, id="gdn-T63-W200-S3-G4"),
    pytest.param("gdn", 100, 33, 4, 4, 64, torch.bfloat16, id="gdn-T100-W33-S4-G4"),
    pytest.param("gdn", 200, 50, 0, 1, 64, torch.float16, id="gdn-T200-W50-S0-G1-fp16"),
    pytest.param("gdn", 200, 1, 7, 8, 64, torch.bfloat16, id="gdn-T200-W1-S7-G8"),
    pytest.param("dn", 100, 33, 4, 1, 64, torch.float16, id="dn-T100-W33-S4-G1-fp16"),
    pytest.param("dn", 200, 64, 64, 4, 64, torch.bfloat16, id="dn-T200-W64-S64-G4"),
    pytest.param("gdn", 130, 40, 2, 2, 128, torch.bfloat16, id="gdn-T130-W40-S2-G2-D128"),
]


@pytest.mark.parametrize("kind,T,W,S,G,D,dtype", CASES)
def test_prefill_matches_reference(kind, T, W, S, G, D, dtype):
    HKV = 2 if G < 8 else 1
    H = HKV * G
    args = make_inputs(kind, 1, T, H, HKV, D, dtype, device=DEV, seed=T * 7 + W)
    out = ahn_ops.ahn_attention(*args, window=W, sinks=S, kind=kind, backend="kernel")
    r = ref.ahn_attention_ref(*args, W, S, kind)
    lp = ref.ahn_attention_ref(*args, W, S, kind, dtype=dtype)
    _check(f"{kind}-T{T}-W{W}-S{S}-G{G}-D{D}", out, r, lp)


@pytest.mark.usefixtures("fwd_rows")
@pytest.mark.parametrize("kind,W,S", [
    pytest.param("gdn", 29, 3, id="gdn-W29-S3"), pytest.param("dn", 29, 3, id="dn-W29-S3"),
    # S + W = 75: the state pass starts at chunk 1, so a 128-row block's first chunk has no state
    pytest.param("gdn", 70, 5, id="gdn-W70-S5"),
])
def test_prefill_varlen(kind, W, S):
    lens, H, HKV, D = [37, 1, 130, 64, 129], 4, 1, 64
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    args = make_inputs(kind, 1, sum(lens), H, HKV, D, torch.bfloat16, device=DEV, seed=5)
    out = ahn_ops.ahn_attention(*args, window=W, sinks=S, kind=kind, cu_seqlens=cu, backend="kernel")
    r = ref.ahn_attention_ref(*args, W, S, kind, cu_seqlens=cu)
    lp = ref.ahn_attention_ref(*args, W, S, kind, cu_seqlens=cu, dtype=torch.bfloat16)
    _check(f"{kind}-varlen", out, r, lp)


@pytest.mark.usefixtures("fwd_rows")
def test_prefill_batch_and_final_state():
    kind, B, T, W, S, H, HKV, D = "gdn", 2, 90, 21, 5, 4, 2, 64
    args = make_inputs(kind, B, T, H, HKV, D, torch.bfloat16, device=DEV, seed=11)
    out, ht, _ = torch.ops.ahn.prefill_fwd(*args, W, S, kind, None, None, True) if _prefill() else None
    r, _, _, st = ref.ahn_attention_ref(*args, W, S, kind, return_parts=True)
    _, _, _, st_lp = ref.ahn_attention_ref(*args, W, S, kind, dtype=torch.bfloat16, return_parts=True)
    _check("gdn-B2-out", out, r, ref.ahn_attention_ref(*args, W, S, kind, dtype=torch.bfloat16))
    _check("gdn-B2-final-state", ht, st, st_lp)


@pytest.mark.usefixtures("fwd_rows")
@pytest.mark.parametrize("kind,T,W,S", [
    pytest.param("gdn", 100, 30, 2, id="gdn-T100-W30-S2"),
    # S + W >= 2 chunks: the first chunks read h0 only (the state pass's zero chunks with an initial state)
    pytest.param("gdn", 300, 130, 2, id="gdn-T300-W130-S2"),
    pytest.param("dn", 200, 64, 70, id="dn-T200-W64-S70"),
])
def test_prefill_initial_state(kind, T, W, S):
    # initial state = the state before token S (memory_readout_ref's convention)
    H, HKV, D = 2, 1, 64
    q, k, v, a, b, z, A_log, dt_bias, nw, ow = make_inputs(kind, 1, T, H, HKV, D, torch.bfloat16, device=DEV, seed=3)
    h0 = torch.randn(1, H, D, D, device=DEV) * 0.1
    out, ht, _ = torch.ops.ahn.prefill_fwd(q, k, v, a, b, z, A_log, dt_bias, nw, ow, W, S, kind, None, h0, True) \
        if _prefill() else None

    def full(dtype):
        o_win = ref.window_attention_ref(q, k, v, W, S, dtype=dtype)
        g, w = ref.memory_gates_ref(a, b, A_log, dt_bias, kind, dtype)
        m, st = ref.memory_readout_ref(q, k, v, g, w, W, S, kind, initial_state=h0, dtype=dtype)
        return (o_win + ref.epilogue_ref(m, z, nw, ow, kind)), st

    r, st = full(torch.float32)
    lp, st_lp = full(torch.bfloat16)
    _check(f"{kind}-h0-out", out, r, lp)
    _check(f"{kind}-h0-final-state", ht, st, st_lp)


@pytest.mark.usefixtures("fwd_rows")
@pytest.mark.parametrize("kind,W,S,splits", [
    pytest.param("gdn", 24, 3, [50, 1, 37, 70], id="gdn-W24-S3-50+1+37+70"),
    pytest.param("dn", 40, 0, [10, 100, 48], id="dn-W40-S0-10+100+48"),
    pytest.param("gdn", 16, 20, [5, 30, 60], id="gdn-W16-S20-5+30+60"),
    pytest.param("mamba2", 24, 3, [40, 1, 30, 29], id="mamba2-W24-S3-40+1+30+29"),
])
def test_chunked_prefill_on_cache(kind, W, S, splits):
    """Prefill in pieces on a cache (kernels, sequences at different positions) == one pass."""
    B, H, HKV, D = 2, 4, 2, 64
    T = sum(splits)
    args = make_inputs(kind, B, T, H, HKV, D, torch.bfloat16, device=DEV, seed=17)
    cache = empty_layer_cache(kind, B, H, HKV, D, W, S, dtype=torch.bfloat16, device=DEV)
    def tok(f):  # slice the per-token inputs q, k, v, a, b, z; parameters stay
        return [None if x is None else f(x) for x in args[:6]] + list(args[6:])

    # sequence 1 starts one piece late, so the two sit at different positions
    outs, t0 = [], 0
    first = splits[0]
    one = batch_slice(cache, slice(0, 1))
    o0 = ahn_ops.ahn_attention(*tok(lambda x: x[:1, :first]),
                               window=W, sinks=S, kind=kind, cache=one, backend="kernel")
    outs.append(torch.cat([o0, torch.full_like(o0, float("nan"))], 0))
    t0 = first
    lens = splits[1:] + [first]
    pos1 = 0
    for n in lens:
        n0 = min(n, T - t0) if t0 < T else 0
        sl0 = slice(t0, t0 + n0)
        sl1 = slice(pos1, pos1 + n)
        # both sequences in one call when they take the same number of tokens
        if n0 == n:
            xs = tok(lambda x: torch.cat([x[:1, sl0], x[1:, sl1]], 0))
            o = ahn_ops.ahn_attention(*xs, window=W, sinks=S, kind=kind, cache=cache, backend="kernel")
            outs.append(o)
        else:
            if n0:
                o = ahn_ops.ahn_attention(*tok(lambda x: x[:1, sl0]),
                                          window=W, sinks=S, kind=kind, cache=one, backend="kernel")
                outs.append(torch.cat([o, torch.full_like(o, float("nan"))], 0))
            o = ahn_ops.ahn_attention(*tok(lambda x: x[1:, sl1]),
                                      window=W, sinks=S, kind=kind, cache=batch_slice(cache, slice(1, 2)),
                                      backend="kernel")
            outs.append(torch.cat([torch.full_like(o, float("nan")), o], 0))
        t0 += n0
        pos1 += n
    # reassemble per sequence in token order (NaN rows mark the other sequence's pieces)
    o_seq = [torch.cat([o[i] for o in outs if not o[i].isnan().all()], 0) for i in range(B)]
    out = torch.stack(o_seq)
    assert out.shape[1] == T
    r = ref.ahn_attention_ref(*args, W, S, kind)
    lp = ref.ahn_attention_ref(*args, W, S, kind, dtype=torch.bfloat16)
    _check(f"{kind}-cache-chunks", out, r, lp)
    assert cache.pos.tolist() == [T, T]


@pytest.mark.parametrize("kind,W,S,T,before,strided", [
    pytest.param("gdn", 16, 5, 37, [0, 9, 60], False, id="gdn-W16-S5-T37-P0+9+60"),
    pytest.param("dn", 24, 6, 3, [0, 4, 50], True, id="dn-W24-S6-T3-P0+4+50-strided"),
    pytest.param("mamba2", 20, 0, 45, [0, 7, 33], True, id="mamba2-W20-S0-T45-P0+7+33-strided"),
    # S + W - P >= 64: whole chunks before the first memory token (the prep/state passes' zero chunks)
    pytest.param("gdn", 100, 4, 150, [0, 30, 131], False, id="gdn-W100-S4-T150-P0+30+131"),
    pytest.param("mamba2", 130, 2, 140, [0, 3, 200], False, id="mamba2-W130-S2-T140-P0+3+200"),
])
def test_prefill_cache_updates_like_reference(kind, W, S, T, before, strided):
    """One cache-path call on sequences at different positions (empty, inside the first window, ring
    wrapped): output and every cache field as the reference's, unused cache rows NaN-poisoned (the
    kernel gathers the whole ring tail from positions read on the device and must mask them), and a
    strided cache (served through a contiguous copy) updated in place."""
    B, H, HKV, D = len(before), 4, 2, 64
    n_max = max(before)
    hist = make_inputs(kind, B, n_max, H, HKV, D, torch.bfloat16, device=DEV, seed=21)
    new = make_inputs(kind, B, T, H, HKV, D, torch.bfloat16, device=DEV, seed=22)

    def make_cache():
        if not strided:
            return empty_layer_cache(kind, B, H, HKV, D, W, S, dtype=torch.bfloat16, device=DEV)
        # every field a view with a gap between sequences (not contiguous)
        def gap(*shape, dtype=torch.bfloat16):
            return torch.zeros(shape[0], shape[1] + 1, *shape[2:], dtype=dtype, device=DEV)[:, 1:]
        return ahn_ops.AHNLayerCache(gap(B, S, HKV, D), gap(B, S, HKV, D), gap(B, W, HKV, D), gap(B, W, HKV, D),
                                     gap(B, W, 2, H),
                                     gap(B, H, D, D, dtype=torch.float32),
                                     torch.zeros(B, 2, dtype=torch.int64, device=DEV)[:, 0], W, S, kind)

    cache = make_cache()
    # history on the reference path, each sequence to its own position
    for bi, n in enumerate(before):
        if n:
            one = batch_slice(cache, slice(bi, bi + 1))
            ahn_ops.ahn_attention(*[None if x is None else x[bi:bi + 1, :n] for x in hist[:6]], *hist[6:],
                                  window=W, sinks=S, kind=kind, cache=one, backend="reference")
    assert cache.pos.tolist() == before
    poison_unwritten(*cache.tensors()[:5], before, W, S)
    twin = make_cache()
    for dst, src in zip(twin.tensors(), cache.tensors()):
        dst.copy_(src)
    out = ahn_ops.ahn_attention(*new, window=W, sinks=S, kind=kind, cache=cache, backend="kernel")
    r = ahn_ops.ahn_attention(*new, window=W, sinks=S, kind=kind, cache=twin, backend="reference")
    lp_cache = make_cache()
    for dst, src in zip(lp_cache.tensors(), twin.tensors()):
        dst.copy_(src)
    lp = ref.ahn_prefill_cache_ref(*new, *lp_cache.tensors(), W, S, kind, dtype=torch.bfloat16)
    _check(f"{kind}-cache-call", out, r, lp)
    names = ("sink_k", "sink_v", "ring_k", "ring_v", "gates", "state", "pos")
    for name, x, y in zip(names, cache.tensors(), twin.tensors()):
        if name == "state":
            _check(f"{kind}-cache-state", x, y, lp_cache.state)
        else:  # copies of the new k / v rows and gate inputs, positions: exact, the untouched NaN rows included
            assert torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0)), f"cache.{name} differs"


def test_opcheck_prefill_fwd():
    kind, T, W, S, H, HKV, D = "gdn", 70, 20, 3, 2, 1, 64
    args = make_inputs(kind, 1, T, H, HKV, D, torch.bfloat16, device=DEV, seed=2)
    _prefill()
    cu = torch.tensor([0, 30, 70], dtype=torch.int32, device=DEV)
    torch.library.opcheck(torch.ops.ahn.prefill_fwd.default, (*args, W, S, kind, cu, None, True))
    dn = make_inputs("dn", 1, T, H, HKV, D, torch.float16, device=DEV, seed=4)
    torch.library.opcheck(torch.ops.ahn.prefill_fwd.default, (*dn, W, 0, "dn", None, None, False))


def test_opcheck_prefill_cache():
    kind, B, T, W, S, H, HKV, D = "gdn", 2, 20, 8, 2, 2, 1, 64
    args = make_inputs(kind, B, T, H, HKV, D, torch.bfloat16, device=DEV, seed=8)
    _prefill()
    cache = empty_layer_cache(kind, B, H, HKV, D, W, S, dtype=torch.bfloat16, device=DEV)
    cache.pos.fill_(0)
    torch.library.opcheck(torch.ops.ahn.prefill_cache.default, (*args, *cache.tensors(), W, S, kind),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------
@gpu
def test_compile_fullgraph():
    kind, T, W, S, H, HKV, D = "gdn", 300, 70, 4, 4, 2, 128
    args = make_inputs(kind, 1, T, H, HKV, D, torch.bfloat16, device="cuda", seed=9)
    f = torch.compile(lambda *xs: ahn_ops.ahn_attention(*xs, window=W, sinks=S, kind=kind), fullgraph=True)
    out = f(*args)
    torch.testing.assert_close(out, ahn_ops.ahn_attention(*args, window=W, sinks=S, kind=kind))


@gpu
@pytest.mark.parametrize("kind,T,W,S,G", [
    pytest.param("gdn", 8192, 1024, 128, 8, id="gdn-T8192-W1024-S128-G8"),
    pytest.param("dn", 4097, 4096, 5, 4, id="dn-T4097-W4096-S5-G4"),
    pytest.param("gdn", 32768, 4096, 128, 8, id="gdn-T32768-W4096-S128-G8"),
    # W >= 8192 at D = 128: the forward's 128-row programs (prefill._fwd_launch)
    pytest.param("mamba2", 16384, 8192, 128, 8, id="mamba2-T16384-W8192-S128-G8-rows128"),
])
def test_prefill_gpu_realistic(kind, T, W, S, G):
    H, D = 2 * G, 128
    args = make_inputs(kind, 1, T, H, 2, D, torch.bfloat16, device="cuda", seed=T)
    out = ahn_ops.ahn_attention(*args, window=W, sinks=S, kind=kind, backend="kernel")
    r = ref.ahn_attention_ref(*args, W, S, kind)
    rel = ((out.float() - r).norm() / r.norm()).item()
    print(f"{kind}-T{T}: rel err {rel:.2e}")
    assert not out.isnan().any() and rel < 1.5e-2


def test_launch_tables_match_a_plain_construction_and_are_cached():
    # the per-sequence metadata and the chunk / row-block tables, built vectorised and cached by
    # contents (a prefill of the same lengths must not rebuild them or copy them again)
    import random

    import triton

    from ahn_ops.ops.ahn_attention import tables as TB
    rnd = random.Random(5)
    for _ in range(60):
        n = rnd.randint(1, 6)
        lens = [rnd.choice([0, 1, 5, 63, 64, 65, 200, 1000]) for _ in range(n)]
        cols = [[rnd.randint(0, 999) for _ in range(n)] for _ in range(4)]
        rows, chunks, bos, coff = [], [], 0, 0
        for i, T in enumerate(lens):
            rows.append([bos, T, cols[0][i], cols[1][i], cols[2][i], cols[3][i], coff, 0])
            chunks += [[i, c] for c in range(triton.cdiv(T, TB.BT))]
            bos, coff = bos + T, coff + triton.cdiv(T, TB.BT)
        seq, ch, NT = TB.seq_tables(lens, *cols, "cpu")
        assert NT == coff and seq.dtype == ch.dtype == torch.int32
        assert torch.equal(seq, torch.tensor(rows, dtype=torch.int32))
        assert torch.equal(ch, torch.tensor(chunks or [[0, 0]], dtype=torch.int32))
        for BM in (64, 128):
            blocks = [[i, c] for i, T in enumerate(lens) for c in range(triton.cdiv(T, BM))]
            rb, NB = TB.row_blocks(lens, BM, "cpu")
            assert NB == len(blocks) and torch.equal(rb, torch.tensor(blocks or [[0, 0]], dtype=torch.int32))
    a = TB.seq_tables([300, 5], [0, 0], [0, 300], [0, 0], [0, 300], "cpu")
    assert TB.seq_tables([300, 5], [0, 0], [0, 300], [0, 0], [0, 300], "cpu")[0] is a[0]  # a hit
    assert TB.seq_tables([300, 6], [0, 0], [0, 300], [0, 0], [0, 300], "cpu")[0] is not a[0]
    assert len(TB._TABLES) <= TB._TABLES_MAX


def test_fwd_rows_rule(monkeypatch):
    """64 query rows per program at short windows, 128 (with its own launch config) from fwd_long's window
    on at D = 128 (H200: the window band ~6% faster, the memory part a little slower); an int forces."""
    P = _prefill()
    monkeypatch.setitem(P.CONFIG, "fwd_rows", None)
    w_long, rows_long, cfg_long = P.CONFIG["fwd_long"]
    assert rows_long == 2 * P.BT
    assert P._fwd_launch(128, 4096) == (P.BT, P.CONFIG["fwd"])
    assert P._fwd_launch(128, w_long) == (rows_long, cfg_long)
    assert P._fwd_launch(128, 32640) == (rows_long, cfg_long)
    assert P._fwd_launch(64, 32640) == (P.BT, P.CONFIG["fwd"])  # D = 64: not measured with 128 rows
    monkeypatch.setitem(P.CONFIG, "fwd_rows", 64)
    assert P._fwd_launch(128, 32640) == (64, P.CONFIG["fwd"])
