"""The fused decode glue (ahn_ops/ops/model_glue.py) against the Qwen2 modules it replaces, and the
static decode step with it (``DecodePlan(fuse_glue=True)``) against the step without it. CPU: Triton
interpreter."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from ahn_ops.fast_decode import DecodePlan
from ahn_ops.models.qwen2 import _rope
from ahn_ops.ops import model_glue as glue
from tests.models.helpers import VOCAB, decoder_matches_plain_step, patched

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ULP = {torch.float32: 2 ** -22, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


# The Triton interpreter casts fp32 -> bf16 by truncation (triton 3.8, runtime/interpreter.py
# _convert_float without a rounding mode), the GPU rounds to nearest even: on the CPU a bf16 result
# may sit a few ulps below torch's, and bit-equality is checked on the GPU only.
INTERP_BF16 = DEV == "cpu"


def _close_ulp(got, ref, dt, frac_exact=0.98, row_scale=False):
    """Within one unit in the last place everywhere (``row_scale``: of the row's largest value, for sums
    that cancel), and bit-equal almost everywhere (the kernels keep every rounding step of the torch
    code; only fp32 reduction order, exp/rsqrt approximations or fused multiply-adds differ)."""
    g, r = got.double(), ref.double()
    assert torch.isfinite(g).all()
    scale = r.abs() + (r.abs().amax(-1, keepdim=True) if row_scale else 0)
    if dt == torch.bfloat16 and INTERP_BF16:  # truncated intermediates: a few ulps, of the row scale
        tol = 4 * ULP[dt] * (r.abs() + r.abs().amax(-1, keepdim=True))
    elif dt == torch.float32 and DEV == "cuda":  # ex2.approx / rsqrt.approx: a few fp32 ulps
        tol = 8 * ULP[dt] * scale + 1e-30
    else:
        tol = ULP[dt] * scale + 1e-30
    assert ((g - r).abs() <= tol).all(), (g - r).abs().max().item()
    # fp32: rsqrt / exp / sum order differ in the last bits everywhere
    if dt != torch.float32 and not (dt == torch.bfloat16 and INTERP_BF16):
        assert (got == ref).double().mean().item() >= frac_exact


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("N,rows", [(64, 1), (200, 3), (256, 2)])
def test_add_rms_norm(dt, N, rows):
    g = torch.Generator().manual_seed(N + rows)
    x = (torch.randn(rows, 1, N, generator=g) * 3).to(dt).to(DEV)
    res = torch.randn(rows, 1, N, generator=g).to(dt).to(DEV)
    norm = Qwen2RMSNorm(N, eps=1e-6).to(DEV)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(N, generator=g))
    norm = norm.to(dt)
    y, h = glue.add_rms_norm(x, norm.weight, norm.variance_epsilon)
    assert h is x or torch.equal(h, x)
    _close_ulp(y, norm(x), dt)
    y, h = glue.add_rms_norm(x, norm.weight, norm.variance_epsilon, residual=res)
    if dt == torch.bfloat16 and INTERP_BF16:
        _close_ulp(h, res + x, dt)
    else:  # one rounding, as torch's add
        assert torch.equal(h, res + x)
    _close_ulp(y, norm(res + x), dt)
    with pytest.raises(ValueError, match="weight"):
        glue.add_rms_norm(x, norm.weight[:-1], 1e-6)
    with pytest.raises(ValueError, match="residual"):
        glue.add_rms_norm(x, norm.weight, 1e-6, residual=res[:, :, :-1])


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,HKV,D", [(1, 4, 2, 64), (3, 6, 1, 128), (2, 2, 2, 32)])
def test_rope_qk(dt, B, H, HKV, D):
    g = torch.Generator().manual_seed(B * H + D)
    q = torch.randn(B, H * D, generator=g).to(dt).to(DEV)
    # k as a column slice of a wider projection output (row stride != HKV * D)
    wide = torch.randn(B, HKV * D + 40, generator=g).to(dt).to(DEV)
    k = wide[:, :HKV * D]
    ang = torch.rand(B, 1, D // 2, generator=g) * 50
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().to(dt).to(DEV), emb.sin().to(dt).to(DEV)
    qo, ko = glue.rope_qk(q, k, cos, sin, D)
    qr, kr = _rope(q.view(B, 1, H, D), k.reshape(B, 1, HKV, D), cos, sin)
    assert qo.is_contiguous() and ko.is_contiguous()
    if DEV == "cpu" and dt != torch.bfloat16:  # interpreter: every rounding step as torch's, bit-equal
        assert torch.equal(qo, qr[:, 0]) and torch.equal(ko, kr[:, 0])
    else:
        # H100: up to one ulp of the row scale off torch's in every dtype, fp32 included
        # (the compiler fuses a product into the add), about a quarter of the values
        _close_ulp(qo, qr[:, 0], dt, frac_exact=0.5, row_scale=True)
        _close_ulp(ko, kr[:, 0], dt, frac_exact=0.5, row_scale=True)
    with pytest.raises(ValueError, match="q must be"):
        glue.rope_qk(q[:, :-1], k, cos, sin, D)


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,H,HKV,D,cos_b", [(2, 37, 6, 2, 64, 2), (1, 16, 8, 1, 128, 1), (3, 5, 2, 2, 32, 1)],
                         ids=["B2-T37-G3-D64", "B1-T16-G8-D128", "B3-T5-G1-D32-cos1"])
def test_rope_prefill(dt, B, T, H, HKV, D, cos_b):
    """The prefill RoPE (token blocks x all heads, one launch) == the adapter's torch code, odd T (masked
    last block), cos/sin per sequence or shared ([1, T, D], stride 0 over B)."""
    g = torch.Generator().manual_seed(T * H + D)
    q = torch.randn(B, T, H, D, generator=g).to(dt).to(DEV)
    k = torch.randn(B, T, HKV, D, generator=g).to(dt).to(DEV)
    ang = torch.rand(cos_b, T, D // 2, generator=g) * 50
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().to(dt).to(DEV), emb.sin().to(dt).to(DEV)
    qo, ko = glue.rope_prefill(q, k, cos, sin)
    qr, kr = _rope(q, k, cos, sin)
    assert qo.is_contiguous() and ko.is_contiguous() and qo.shape == q.shape and ko.shape == k.shape
    if DEV == "cpu" and dt != torch.bfloat16:  # interpreter: every rounding step as torch's, bit-equal
        assert torch.equal(qo, qr) and torch.equal(ko, kr)
    else:
        _close_ulp(qo.flatten(2), qr.flatten(2), dt, frac_exact=0.5, row_scale=True)
        _close_ulp(ko.flatten(2), kr.flatten(2), dt, frac_exact=0.5, row_scale=True)
    with pytest.raises(ValueError, match="k must be"):
        glue.rope_prefill(q, k[:, :-1], cos, sin)
    with pytest.raises(ValueError, match="cos must be"):
        glue.rope_prefill(q, k, cos[:, :-1], sin)


@pytest.mark.parametrize("dt", DTYPES, ids=str)
def test_silu_mul(dt):
    g = torch.Generator().manual_seed(7)
    a = (torch.randn(3, 1, 1500, generator=g) * 4).to(dt).to(DEV)
    u = torch.randn(3, 1, 1500, generator=g).to(dt).to(DEV)
    _close_ulp(glue.silu_mul(a, u), F.silu(a) * u, dt)
    with pytest.raises(ValueError, match="must match"):
        glue.silu_mul(a, u[..., :-1])


@pytest.mark.parametrize("kind", ["gdn", "dn", "mamba2"])
def test_decoder_glue_equals_plain_step(kind):
    # batch 2 with left padding: every branch of the glued step
    from ahn_ops import fast_decode as gen

    glued = DecodePlan(fuse_glue=True)
    model, x = decoder_matches_plain_step(kind, 2, 12, 11, glued)
    # the AHN layers take the stacked k/v/gates projection
    logits, cache = gen.prefill(model, x)
    dec = gen.StaticDecoder(model, cache, None, x.shape[1], 4, plan=glued)
    assert dec.plan == glued and sorted(dec.kvg) == sorted(model.model._ahn_info["ahn_layer_ids"])
    w, bias, (nk, oa, ob, oz) = dec.kvg[0]
    assert w.shape[0] % 8 == 0 and nk == 2 * 64 and oz is not None


def test_decoder_glue_bad_model():
    from ahn_ops import fast_decode as gen

    model = patched("gdn", window=5, sinks=0)
    model.config.hidden_act = "gelu"
    x = torch.randint(0, VOCAB, (1, 8))
    logits, cache = gen.prefill(model, x)
    with pytest.raises(ValueError, match="plan.fuse_glue=True: hidden_act"):
        gen.StaticDecoder(model, cache, None, 8, 2, plan=DecodePlan(fuse_glue=True))
    assert not gen.StaticDecoder(model, cache, None, 8, 2).plan.fuse_glue  # the default: off, no error
    assert not DecodePlan.default(model, 1, "cuda").fuse_glue  # off on a GPU too


# ------------------------------------------------------------------------------------------------------
# greedy choice (argmax + end-of-sequence bookkeeping + position step) and the decoder's RoPE table
# ------------------------------------------------------------------------------------------------------
def _logits_with_corner_rows(B, V, dt, seed):
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(B, V + 7, generator=g)
    x = big[:, :V]                                         # a row stride that is not V
    x[0] = torch.randint(-3, 4, (V,), generator=g).float()  # many ties: the first maximum must win
    x[1, 5], x[1, V - 2] = float("nan"), float("nan")       # a NaN is the maximum (the first one)
    x[2] = float("-inf")                                    # all -inf: index 0
    x[3, V - 1] = float("inf")                              # the last element, in the tail block
    x[4, 2048] = 1e4                                        # the first element of the second block
    return x.to(dt) if dt != torch.float32 else x


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("V", [4173, 2048, 37])
def test_greedy_next_is_torch_argmax(dt, V):
    B = 6
    x = _logits_with_corner_rows(B, max(V, 2049), dt, seed=V)[:, :V].to(DEV)
    tok = torch.full((B,), -7, dtype=torch.int64, device=DEV)  # poisoned
    pos = torch.arange(B, device=DEV) * 100
    ws = glue.greedy_next(x, tok, pos=pos)
    assert torch.equal(tok, torch.argmax(x.float(), -1))
    assert torch.equal(pos, torch.arange(B, device=DEV) * 100 + 1)
    # new logits through the same workspace; no pos: it stays
    x2 = torch.randn(B, V, generator=torch.Generator().manual_seed(1)).to(dt).to(DEV)
    assert glue.greedy_next(x2, tok, workspace=ws) is ws
    assert torch.equal(tok, torch.argmax(x2.float(), -1))
    assert torch.equal(pos, torch.arange(B, device=DEV) * 100 + 1)


def test_greedy_next_end_of_sequence():
    B, V = 5, 3000
    x = torch.randn(B, V, generator=torch.Generator().manual_seed(3)).to(DEV)
    best = x.argmax(-1)
    eos = torch.tensor([int(best[1]), 2999, int(best[3])], device=DEV)
    unfinished = torch.tensor([True, True, True, False, False], device=DEV)
    pad = 17
    # the decoder's own torch rule
    nxt = torch.where(unfinished, best, pad)
    ref_unf = unfinished & ~(nxt[:, None] == eos).any(-1)
    tok = torch.full((B,), -1, dtype=torch.int64, device=DEV)
    glue.greedy_next(x, tok, unfinished, eos, pad)
    assert torch.equal(tok, nxt) and torch.equal(unfinished, ref_unf)
    assert unfinished.tolist() == [True, False, True, False, False]


def test_greedy_next_bad_input():
    x = torch.randn(2, 50, device=DEV)
    tok = torch.zeros(2, dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError, match="tok must be"):
        glue.greedy_next(x, tok.int())
    with pytest.raises(ValueError, match="pos must be"):
        glue.greedy_next(x, tok, pos=torch.zeros(3, dtype=torch.int64, device=DEV))
    with pytest.raises(ValueError, match="logits must be"):
        glue.greedy_next(x.t(), tok)
    with pytest.raises(ValueError, match="eos and unfinished"):
        glue.greedy_next(x, tok, eos=torch.tensor([1], device=DEV))


def test_decoder_rope_table_and_step_limit():
    # the fused step's RoPE table holds what the model's rotary module computes at each position, and the
    # decoder refuses to step past max_new_tokens (its table and static buffers end there)
    from ahn_ops import fast_decode as gen

    model = patched("gdn", window=5, sinks=2).to(DEV)
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEV)
    logits, cache = gen.prefill(model, x)
    # on the GPU the default plan with the glue (the fused projections too on Hopper), as it runs there
    plan = dataclasses.replace(DecodePlan.default(model, 2), fuse_glue=True)
    dec = gen.StaticDecoder(model, cache, None, x.shape[1], 3, plan=plan)
    assert dec.rope_table is not None and dec.greedy_fused
    pos = torch.tensor([0, 4, 11], device=DEV)
    h = model.model.embed_tokens.weight[:1, None]
    c, s = model.model.rotary_emb(h, pos[None])
    assert torch.equal(dec.rope_table[pos, 0], c[0]) and torch.equal(dec.rope_table[pos, 1], s[0])
    dec.start(logits)
    for _ in range(3):
        dec.eager_step()
    assert dec.pos.tolist() == [12, 12]
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.eager_step()
