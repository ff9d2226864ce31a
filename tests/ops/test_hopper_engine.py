"""The Hopper forward engine: cuDNN's band attention + the Triton kernel's sinks, ring tail, memory readout
and epilogue, against the fp32 reference and against the all-Triton engine (GPU with cuDNN >= 9.5 and
nvidia-cudnn-frontend only; the rest of the prefill tests run on whichever engine ``auto`` picks).

Tolerance as in test_prefill.py: max-abs error <= 2x PyTorch's own low-precision error + a floor.
"""

from __future__ import annotations

import pytest
import torch

import ahn_ops
from ahn_ops.ops.ahn_attention import reference as ref

from ..utils import check_within_2x, empty_layer_cache, make_inputs



def _why_not() -> str:
    if not torch.cuda.is_available():
        return "needs CUDA"
    from ahn_ops.ops.ahn_attention import band_cudnn

    return band_cudnn.unavailable_reason("cuda") or ""


needs_cudnn = pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "ok")


def _prefill():
    from ahn_ops.ops.ahn_attention import prefill

    return prefill


@pytest.fixture
def engine(monkeypatch):
    """Set ``prefill.CONFIG["band"]`` for the rest of a test."""
    def set_(name):
        monkeypatch.setitem(_prefill().CONFIG, "band", name)
    return set_


_check = check_within_2x


CASES = [
    # kind, B, T, W, S, G, D, dtype
    pytest.param("gdn", 1, 1000, 300, 5, 8, 128, torch.bfloat16, id="gdn-T1000-W300-S5-G8"),
    pytest.param("dn", 2, 517, 1, 3, 4, 128, torch.float16, id="dn-B2-T517-W1-S3-fp16"),
    pytest.param("mamba2", 1, 333, 4096, 7, 1, 128, torch.bfloat16, id="mamba2-T333-W4096-S7-G1"),
    pytest.param("gdn", 3, 700, 129, 0, 2, 64, torch.bfloat16, id="gdn-B3-T700-W129-S0-D64"),
    pytest.param("mamba2", 1, 4099, 1024, 128, 8, 128, torch.float16, id="mamba2-T4099-W1024-S128-fp16"),
    pytest.param("gdn", 1, 2053, 200, 300, 4, 128, torch.bfloat16, id="gdn-T2053-W200-S300"),
]


@needs_cudnn
@pytest.mark.parametrize("kind,B,T,W,S,G,D,dtype", CASES)
def test_engine_matches_reference_and_triton(kind, B, T, W, S, G, D, dtype, engine):
    P = _prefill()
    HKV = 2 if G < 8 else 1
    H = HKV * G
    args = make_inputs(kind, B, T, H, HKV, D, dtype, device="cuda", seed=T + W + S)
    engine("cudnn")
    out, _, lse = P.prefill_fwd(*args, W, S, kind)
    engine("triton")
    out_t, _, lse_t = P.prefill_fwd(*args, W, S, kind)
    r = ref.ahn_attention_ref(*args, W, S, kind)
    lp = ref.ahn_attention_ref(*args, W, S, kind, dtype=dtype)
    _check(f"{kind} cudnn band", out, r, lp)
    _check(f"{kind} triton band", out_t, r, lp)
    # the saved normaliser feeds the backward: the two engines must agree on it
    torch.testing.assert_close(lse, lse_t, rtol=0, atol=2e-3)


@needs_cudnn
@pytest.mark.parametrize("lens", [[300, 300, 300], [700, 650, 690, 701], [5, 700, 64]],
                         ids=["equal", "close", "unequal"])
def test_engine_varlen(lens, engine):
    """cu_seqlens: sequences of one length and of close lengths (padded to one) take the cuDNN band, others
    the Triton band ("no_sm90": the choice the sm_90a kernel would otherwise take first); the gradients too."""
    P = _prefill()
    from ahn_ops.ops.ahn_attention import band_cudnn

    padded = len(lens) * band_cudnn.pad_len(max(lens))
    assert (len(set(lens)) == 1 or padded <= (1 + P.BAND_PAD_WASTE) * sum(lens)) == (lens != [5, 700, 64])
    kind, W, S, H, HKV, D = "gdn", 100, 4, 8, 2, 128
    T = sum(lens)
    args = make_inputs(kind, 1, T, H, HKV, D, torch.bfloat16, device="cuda", seed=len(lens) + T)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
    engine("no_sm90")
    out, ht, _ = P.prefill_fwd(*args, W, S, kind, cu_seqlens=cu, output_final_state=True)
    s = 0
    for i, n in enumerate(lens):
        one = [None if x is None else x[:, s:s + n] for x in args[:6]] + list(args[6:])
        r, _, _, st = ref.ahn_attention_ref(*one, W, S, kind, return_parts=True)
        lp = ref.ahn_attention_ref(*one, W, S, kind, dtype=torch.bfloat16)
        _check(f"seq {i} (T={n})", out[:, s:s + n], r, lp)
        torch.testing.assert_close(ht[i], st[0], rtol=2e-2, atol=2e-2)
        s += n
    # the backward through the same engine: every gradient within the bf16 rule of the fp32 reference
    from ..utils import check_bf16_grad_rule, kernel_grads, ref_grads

    dout = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)
    gk = kernel_grads(args, dout, W, S, kind, cu)
    gr = ref_grads([None if x is None else x.float() for x in args], dout, W, S, kind, cu, torch.float32)
    gt = ref_grads(args, dout, W, S, kind, cu, torch.bfloat16)
    check_bf16_grad_rule(gk, gr, gt)


@needs_cudnn
@pytest.mark.parametrize("kind", ["gdn", "mamba2"])
def test_engine_cache_continuation(kind, engine):
    """Chunked prefill on a cache (the ring-tail keys at positions < P come from the Triton loop,
    the new tokens' band from cuDNN) equals the Triton engine and the reference."""
    B, T, W, S, H, HKV, D = 2, 900, 256, 4, 8, 2, 128
    args = make_inputs(kind, B, T, H, HKV, D, torch.bfloat16, device="cuda", seed=5)
    outs = {}
    for name in ("cudnn", "triton"):
        engine(name)
        cache = empty_layer_cache(kind, B, H, HKV, D, W, S, dtype=torch.bfloat16, device="cuda")
        parts = []
        for s, e in [(0, 300), (300, 301), (301, 900)]:
            piece = [None if x is None else x[:, s:e] for x in args[:6]] + list(args[6:])
            parts.append(ahn_ops.ahn_attention(*piece, window=W, sinks=S, kind=kind, cache=cache, backend="kernel"))
        outs[name] = (torch.cat(parts, 1), cache.state.clone())
    r = ref.ahn_attention_ref(*args, W, S, kind)
    lp = ref.ahn_attention_ref(*args, W, S, kind, dtype=torch.bfloat16)
    _check(f"{kind} cache cudnn", outs["cudnn"][0], r, lp)
    _check(f"{kind} cache triton", outs["triton"][0], r, lp)
    torch.testing.assert_close(outs["cudnn"][1], outs["triton"][1], rtol=1e-5, atol=1e-5)


@needs_cudnn
def test_engine_gradients_match_triton(engine):
    """The backward (Triton) reads the forward's saved lse: its gradients must not depend on the engine."""
    kind, T, W, S, H, HKV, D = "gdn", 777, 200, 6, 8, 2, 128
    args = make_inputs(kind, 1, T, H, HKV, D, torch.bfloat16, device="cuda", seed=3)
    dout = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)
    grads = {}
    for name in ("cudnn", "triton"):
        engine(name)
        xs = [None if x is None else x.detach().clone().requires_grad_(x.is_floating_point()) for x in args]
        out = ahn_ops.ahn_attention(*xs, window=W, sinks=S, kind=kind)
        out.backward(dout)
        grads[name] = [x.grad for x in xs if x is not None and x.grad is not None]
    for a, b in zip(grads["cudnn"], grads["triton"]):
        rel = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
        assert rel < 2e-2, rel


@needs_cudnn
def test_engine_required_errors_clearly(engine):
    engine("cudnn")
    args = make_inputs("gdn", 1, 64, 4, 2, 128, torch.bfloat16, device="cuda", seed=1)
    cu = torch.tensor([0, 20, 64], dtype=torch.int32, device="cuda")
    # lengths 20 and 44: padding both to the longest adds more rows than the padded band allows (BAND_PAD_WASTE)
    with pytest.raises(RuntimeError, match="too unequal for one padded cuDNN band"):
        _prefill().prefill_fwd(*args, 16, 2, "gdn", cu_seqlens=cu)


# ---------------------------------------------------------------------------------------------
# The composition's own kernel paths (_fwd_kernel BAND_IN: sinks past the window, memory and epilogue after
# an outside band; the backward kernels without BAND: sinks past the window and memory, plus the outside
# band's gradients) with the band computed by a float32 torch stand-in for cuDNN, in fp32 so that the check
# is tight: runs everywhere, the CPU interpreter included.
# ---------------------------------------------------------------------------------------------
def _torch_band_fwd(q, k, v, W, out=None):
    """(o [B, T, H, D], lse [B, H, T] natural log) of the band t - W < j <= t, as band_cudnn.band_fwd."""
    B, T, H, D = q.shape
    G = H // k.shape[2]
    s = torch.einsum("bthd,bjhd->bhtj", q.float(), k.float().repeat_interleave(G, 2)) * D ** -0.5
    t = torch.arange(T, device=q.device)
    m = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < W)
    s = s.masked_fill(~m, float("-inf"))
    o = torch.einsum("bhtj,bjhd->bthd", torch.softmax(s, -1), v.float().repeat_interleave(G, 2))
    return o.to(q.dtype), torch.logsumexp(s, -1)  # a permuted view: the launcher must not assume rows


def _torch_band_bwd(q, k, v, o, do, lse, W):
    """(dq, dk, dv) of the band given the whole softmax's o and lse [B, H, T], as band_cudnn.band_bwd."""
    B, T, H, D = q.shape
    HKV = k.shape[2]
    G = H // HKV
    kf, vf = k.float().repeat_interleave(G, 2), v.float().repeat_interleave(G, 2)
    s = torch.einsum("bthd,bjhd->bhtj", q.float(), kf) * D ** -0.5
    t = torch.arange(T, device=q.device)
    m = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < W)
    p = torch.where(m, torch.exp(s - lse[..., None]), torch.zeros_like(s))
    dp = torch.einsum("bthd,bjhd->bhtj", do.float(), vf)
    delta = (do.float() * o.float()).sum(-1).transpose(1, 2)  # [B, H, T]
    ds = p * (dp - delta[..., None]) * D ** -0.5
    dq = torch.einsum("bhtj,bjhd->bthd", ds, kf)
    dk = torch.einsum("bhtj,bthd->bjhd", ds, q.float()).reshape(B, T, HKV, G, D).sum(3)
    dv = torch.einsum("bhtj,bthd->bjhd", p, do.float()).reshape(B, T, HKV, G, D).sum(3)
    return tuple(x.to(y.dtype).contiguous() for x, y in ((dq, q), (dk, k), (dv, v)))  # contiguous, as band_bwd


def _into(grads, out):
    """As band_cudnn.band_bwd with ``out``: the gradients written into the caller's buffers (which the Triton
    kernels then read and rewrite in place), else new tensors."""
    if out is None:
        return grads
    for o, g in zip(out, grads):
        o.copy_(g)
    return out


@pytest.mark.skipif(not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("kind,B,T,W,S,G,step", [
    pytest.param("gdn", 1, 150, 40, 5, 2, None, id="gdn-T150-W40-S5"),
    pytest.param("mamba2", 2, 97, 20, 70, 1, None, id="mamba2-B2-T97-W20-S70"),
    pytest.param("dn", 1, 130, 1, 3, 4, None, id="dn-T130-W1-S3"),
    # a length on cuDNN's grid (a multiple of band_cudnn.PAD): the band's gradients written into dq, dk, dv
    pytest.param("gdn", 2, 128, 50, 4, 2, None, id="gdn-B2-T128-W50-S4-in-place"),
    # a window of a shape that has seen many (EXACT_WINDOWS 0 below): the band at the window rounded down
    # to the step, the kernels walking the keys between (band_cudnn.band_window)
    pytest.param("gdn", 1, 150, 60, 5, 2, 32, id="gdn-T150-W60-S5-band32"),
    pytest.param("mamba2", 2, 97, 40, 3, 1, 16, id="mamba2-B2-T97-W40-S3-band32"),
    pytest.param("dn", 1, 260, 130, 70, 4, 64, id="dn-T260-W130-S70-band128"),
])
def test_band_composition_kernel(kind, B, T, W, S, G, step, monkeypatch):
    from collections import OrderedDict

    from ahn_ops.ops.ahn_attention import band_cudnn

    P = _prefill()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # every call takes the outside band (fp32 included: the stand-in computes in fp32)
    monkeypatch.setattr(P, "_band_engine", lambda q, lens: True)
    asked = []

    def fwd(q, k, v, w, out=None):
        asked.append(w)
        return _torch_band_fwd(q, k, v, w, out)

    def bwd(q, k, v, o, do, lse, w, out=None):
        asked.append(w)
        return _into(_torch_band_bwd(q, k, v, o, do, lse, w), out)

    monkeypatch.setattr(band_cudnn, "band_fwd", fwd)
    monkeypatch.setattr(band_cudnn, "band_bwd", bwd)
    monkeypatch.setattr(band_cudnn, "_SEEN", OrderedDict())
    monkeypatch.setattr(band_cudnn, "WINDOW_STEP", step or 10 ** 9)
    monkeypatch.setattr(band_cudnn, "EXACT_WINDOWS", 0)
    HKV = 2 if G < 4 else 1
    H, D = HKV * G, 64
    args = make_inputs(kind, B, T, H, HKV, D, torch.float32, device=dev, seed=T + S)
    xs = [None if x is None else x.detach().clone().requires_grad_(x.is_floating_point()) for x in args]
    out = torch.ops.ahn.prefill_fwd(*xs, W, S, kind, None, None, False)[0]
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dev)
    out.backward(dout)
    refs = [None if x is None else x.detach().clone().requires_grad_(x.is_floating_point()) for x in args]
    r = ref.ahn_attention_ref(*refs, W, S, kind)
    r.backward(dout)
    assert not out.isnan().any()
    rel = ((out - r).norm() / r.norm()).item()
    print(f"{kind} out: rel err {rel:.2e}")
    assert rel < 1e-4, rel
    for i, (x, y) in enumerate(zip(xs, refs)):
        if x is None or x.grad is None:
            continue
        rel = ((x.grad - y.grad).norm() / y.grad.norm().clamp_min(1e-30)).item()
        print(f"grad {i}: rel err {rel:.2e}")
        assert rel < 1e-3, (i, rel)
    Wb = min(W, T) if step is None else min(W, T) - min(W, T) % step
    assert asked == [Wb, Wb], asked  # the forward's band, then the backward's


@pytest.mark.skipif(not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("kind,lens,W,S,step", [
    pytest.param("gdn", [37, 150, 1, 90], 40, 5, None, id="gdn-unequal-W40-S5"),
    pytest.param("mamba2", [64, 3, 129], 20, 70, 16, id="mamba2-unequal-W20-S70-band16"),
])
def test_band_composition_varlen(kind, lens, W, S, step, monkeypatch):
    # sequences of unequal lengths: the band over a batch padded to the longest (band_cudnn.to_batch), read
    # back by the forward at the padded stride TM and gathered back in the backward
    from collections import OrderedDict

    from ahn_ops.ops.ahn_attention import band_cudnn

    P = _prefill()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(P, "_band_engine", lambda q, lens: True)
    shapes = []

    def fwd(q, k, v, w, out=None):
        shapes.append(tuple(q.shape[:2]))
        return _torch_band_fwd(q, k, v, w, out)

    def bwd(q, k, v, o, do, lse, w, out=None):
        shapes.append(tuple(q.shape[:2]))
        return _into(_torch_band_bwd(q, k, v, o, do, lse, w), out)

    monkeypatch.setattr(band_cudnn, "band_fwd", fwd)
    monkeypatch.setattr(band_cudnn, "band_bwd", bwd)
    monkeypatch.setattr(band_cudnn, "_SEEN", OrderedDict())
    monkeypatch.setattr(band_cudnn, "WINDOW_STEP", step or 10 ** 9)
    monkeypatch.setattr(band_cudnn, "EXACT_WINDOWS", 0)
    H, HKV, D = 4, 2, 64
    T = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
    args = make_inputs(kind, 1, T, H, HKV, D, torch.float32, device=dev, seed=T + S)
    xs = [None if x is None else x.detach().clone().requires_grad_(x.is_floating_point()) for x in args]
    out = torch.ops.ahn.prefill_fwd(*xs, W, S, kind, cu, None, False)[0]
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dev)
    out.backward(dout)
    refs = [None if x is None else x.detach().clone().requires_grad_(x.is_floating_point()) for x in args]
    r = ref.ahn_attention_ref(*refs, W, S, kind, cu)
    r.backward(dout)
    assert shapes == [(len(lens), band_cudnn.pad_len(max(lens)))] * 2, shapes  # one padded batch each way
    rel = ((out - r).norm() / r.norm()).item()
    assert rel < 1e-4, rel
    for i, (x, y) in enumerate(zip(xs, refs)):
        if x is None or x.grad is None:
            continue
        rel = ((x.grad - y.grad).norm() / y.grad.norm().clamp_min(1e-30)).item()
        assert rel < 1e-3, (i, rel)


def test_band_engine_takes_close_lengths(monkeypatch):
    # unequal lengths take the cuDNN band while padding them to the longest adds at most BAND_PAD_WASTE rows
    from ahn_ops.ops.ahn_attention import band_cudnn

    P = _prefill()
    monkeypatch.setattr(band_cudnn, "unavailable_reason", lambda device: None)
    assert P.BAND_PAD_WASTE == 0.25
    fake = type("Q", (), {"device": torch.device("cuda", 0), "dtype": torch.bfloat16})()
    assert P._band_engine(fake, [4096, 4096])
    assert P._band_engine(fake, [4096, 4000, 3900])  # 3 x 4096 rows for 11996: 2.4% padding
    assert not P._band_engine(fake, [4096, 100])  # 8192 rows for 4196
    monkeypatch.setitem(P.CONFIG, "band", "cudnn")
    with pytest.raises(RuntimeError, match="too unequal"):
        P._band_engine(fake, [4096, 100])


def test_band_window_policy(monkeypatch):
    # the first EXACT_WINDOWS distinct windows of a (direction, shape) get their exact graph, later ones the
    # window rounded down to WINDOW_STEP (a training job's per-step draws: each layer's call with the step's
    # window must not build a graph of its own); a window covering the call is asked for as the padded length
    from collections import OrderedDict

    from ahn_ops.ops.ahn_attention import band_cudnn as BC

    monkeypatch.setattr(BC, "_SEEN", OrderedDict())
    monkeypatch.setattr(BC, "EXACT_WINDOWS", 2)
    q, k = torch.empty(1, 1000, 8, 64), torch.empty(1, 1000, 2, 64)
    assert [BC.band_window("fwd", q, k, 700) for _ in range(3)] == [700, 700, 700]  # a fixed window: exact
    assert BC.band_window("fwd", q, k, 600) == 600  # the second distinct window: exact too
    assert [BC.band_window("fwd", q, k, w) for w in (900, 900, 513)] == [768, 768, 512]  # then rounded
    assert BC.band_window("fwd", q, k, 700) == 700 and BC.band_window("fwd", q, k, 600) == 600  # still exact
    assert BC.band_window("bwd", q, k, 900) == 900  # each direction has its own windows
    assert BC.band_window("fwd", q[:, :900], k[:, :900], 800) == 768  # same padded length (1024): same shape
    assert BC.band_window("fwd", q[:, :600], k[:, :600], 550) == 550  # another padded length: its own windows
    assert BC.band_window("fwd", q, k, 200) == 200  # at most one step: always exact
    assert BC.band_window("fwd", q, k, 1000) == 1024 and BC.band_window("bwd", q, k, 5000) == 1024
    assert BC.band_window("fwd", q[:, :128], k[:, :128], 128) == 128
    assert len(BC._SEEN[("fwd", "cpu", q.dtype, 1, 1024, 8, 2, 64)]) == 2  # the draws were not recorded




@pytest.mark.skipif(not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("kind", ["gdn", "dn", "mamba2"])
def test_band_composition_cache(kind, monkeypatch):
    # chunked prefill on a cache with the outside band (new tokens' band from the stand-in, ring tail and
    # memory from _fwd_kernel BAND_IN, the memory passes on the gathered stream) against the reference, and
    # the same state as the all-Triton engine leaves
    from collections import OrderedDict

    from ahn_ops.ops.ahn_attention import band_cudnn

    P = _prefill()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    B, T, W, S, H, HKV, D = 2, 230, 60, 3, 4, 2, 64
    args = make_inputs(kind, B, T, H, HKV, D, torch.bfloat16, device=dev, seed=11)
    monkeypatch.setattr(band_cudnn, "band_fwd", _torch_band_fwd)
    monkeypatch.setattr(band_cudnn, "_SEEN", OrderedDict())
    monkeypatch.setattr(band_cudnn, "WINDOW_STEP", 10 ** 9)
    states = {}
    for outside in (True, False):
        monkeypatch.setattr(P, "_band_engine", lambda q, lens, o=outside: o)
        cache = empty_layer_cache(kind, B, H, HKV, D, W, S, dtype=torch.bfloat16, device=dev)
        parts = []
        for s, e in [(0, 70), (70, 71), (71, 230)]:
            piece = [None if x is None else x[:, s:e] for x in args[:6]] + list(args[6:])
            parts.append(ahn_ops.ahn_attention(*piece, window=W, sinks=S, kind=kind, cache=cache, backend="kernel"))
        r = ref.ahn_attention_ref(*args, W, S, kind)
        lp = ref.ahn_attention_ref(*args, W, S, kind, dtype=torch.bfloat16)
        _check(f"{kind} cache, outside band {outside}", torch.cat(parts, 1), r, lp)
        states[outside] = cache.state.clone()
    # the memory passes do not depend on the band's engine: the states agree to the last bit
    assert torch.equal(states[True], states[False])

