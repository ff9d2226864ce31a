"""The skinny fused projections of the decode step (ahn_ops/ops/decode_linear.py) against the torch ops
they replace (Qwen2RMSNorm, F.linear, RoPE, SiLU * up, residual add), and the static decode step with
them (``DecodePlan(fuse_linear=True, ...)``) against the step without. CPU: Triton interpreter."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

import ahn_ops
from ahn_ops.fast_decode import DecodePlan
from ahn_ops.models.qwen2 import _rope
from ahn_ops.ops import decode_linear as dl
from tests.models.helpers import VOCAB, assert_greedy_of_full_forward, decoder_matches_plain_step, patched

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ULP = {torch.float32: 2 ** -23, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}


def _close(got, ref, dt, ulps=4):
    """Within a few units in the last place of the row's scale: the kernels keep every rounding step of
    the torch code, so only the fp32 summation order of the dot products (and, on the CPU, the
    interpreter's truncating fp32 -> bf16 cast) separate them; one flipped rounding of a projection
    output moves a RoPE'd or SiLU'd value by about one ulp of the row."""
    g, r = got.double(), ref.double()
    assert got.dtype == dt and got.shape == ref.shape
    assert torch.isfinite(g).all()
    scale = r.abs() + r.abs().amax(-1, keepdim=True)
    tol = (ulps if dt != torch.float32 else 64) * ULP[dt] * scale
    bad = (g - r).abs() > tol
    assert not bad.any(), f"{bad.sum().item()} of {bad.numel()} off, worst {(g - r).abs().max().item():.3g}"


def _norm(K, dt, g):
    n = Qwen2RMSNorm(K, eps=1e-6).to(DEV)
    with torch.no_grad():
        n.weight.copy_(1 + 0.2 * torch.randn(K, generator=g))
    return n.to(dt)


def _w(n, K, dt, g, scale=None):
    return (torch.randn(n, K, generator=g) * (scale or K ** -0.5)).to(dt).to(DEV)


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("B,K,H,HKV,D,ngates,bias", [(1, 256, 4, 2, 64, 3, True), (3, 200, 2, 1, 32, 2, False),
                                                     (4, 96, 4, 4, 16, 0, True), (2, 64, 2, 1, 64, 5, True)])
def test_norm_qkvg(dt, B, K, H, HKV, D, ngates, bias):
    g = torch.Generator().manual_seed(B * K + D)
    h = (torch.randn(B, K, generator=g) * 3).to(dt).to(DEV)
    norm = _norm(K, dt, g)
    wq = _w(H * D, K, dt, g)
    nk = HKV * D
    N = 2 * nk + ngates * H + 3                   # k | v | gates | odd padding
    wkvg = _w(N, K, dt, g)
    bq = (torch.randn(H * D, generator=g) * 0.1).to(dt).to(DEV) if bias else None
    bkvg = (torch.randn(N, generator=g) * 0.1).to(dt).to(DEV) if bias else None
    ang = torch.rand(B, 1, D // 2, generator=g) * 50
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().to(dt).to(DEV), emb.sin().to(dt).to(DEV)
    q, y = dl.norm_qkvg(h, norm.weight, norm.variance_epsilon, wq, bq, wkvg, bkvg, nk, cos, sin, D)
    # reference: the plain step's ops
    x = norm(h)
    qr = F.linear(x, wq, bq)
    yr = F.linear(x, wkvg, bkvg)
    qr, kr = _rope(qr.view(B, 1, H, D), yr[:, :nk].reshape(B, 1, HKV, D), cos, sin)
    _close(q, qr.reshape(B, -1), dt)
    _close(y[:, :nk], kr.reshape(B, -1), dt)
    _close(y[:, nk:], yr[:, nk:], dt)
    with pytest.raises(ValueError, match="wq must be"):
        dl.norm_qkvg(h, norm.weight, 1e-6, wq[:, :-1], bq, wkvg, bkvg, nk, cos, sin, D)
    with pytest.raises(ValueError, match="nk"):
        dl.norm_qkvg(h, norm.weight, 1e-6, wq, bq, wkvg, bkvg, nk + 1, cos, sin, D)
    with pytest.raises(ValueError, match="cos and sin"):
        dl.norm_qkvg(h, norm.weight, 1e-6, wq, bq, wkvg, bkvg, nk, cos.float() if dt != torch.float32
                     else cos.half(), sin, D)


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("B,K,N,bias", [(1, 256, 96, False), (3, 300, 70, True), (4, 64, 17, False)])
def test_linear_residual(dt, B, K, N, bias):
    g = torch.Generator().manual_seed(B + K + N)
    x = torch.randn(B, K, generator=g).to(dt).to(DEV)
    w = _w(N, K, dt, g)
    b = (torch.randn(N, generator=g) * 0.1).to(dt).to(DEV) if bias else None
    res = torch.randn(B, N, generator=g).to(dt).to(DEV)
    out = dl.linear_residual(x, w, b, res)
    _close(out, res + F.linear(x, w, b), dt)
    # a strided input row (o from a wider buffer) works
    wide = torch.randn(B, K + 8, generator=g).to(dt).to(DEV)
    _close(dl.linear_residual(wide[:, :K], w, b, res), res + F.linear(wide[:, :K], w, b), dt)
    with pytest.raises(ValueError, match="residual must be"):
        dl.linear_residual(x, w, b, res[:, :-1])
    with pytest.raises(ValueError, match="batch must be 1..16"):
        dl.linear_residual(x[:1].expand(17, K).contiguous(), w, b, res[:1].expand(17, N).contiguous())
    if dt == torch.float32:  # no tensor-core path in float32: 4 rows at most
        with pytest.raises(ValueError, match="float32 and head_dim < 16: 1..4"):
            dl.linear_residual(x[:1].expand(5, K).contiguous(), w, b, res[:1].expand(5, N).contiguous())
    with pytest.raises(TypeError, match="x must be"):
        dl.linear_residual(x.to(torch.float64), w, b, res)


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("B,K,N,bias", [(1, 128, 200, False), (2, 96, 33, True), (4, 256, 64, False)])
def test_norm_gate_up(dt, B, K, N, bias):
    g = torch.Generator().manual_seed(B * 7 + K + N)
    h = (torch.randn(B, K, generator=g) * 2).to(dt).to(DEV)
    norm = _norm(K, dt, g)
    wg, wu = _w(N, K, dt, g, scale=3 * K ** -0.5), _w(N, K, dt, g)
    bg = (torch.randn(N, generator=g) * 0.1).to(dt).to(DEV) if bias else None
    bu = (torch.randn(N, generator=g) * 0.1).to(dt).to(DEV) if bias else None
    out = dl.norm_gate_up(h, norm.weight, norm.variance_epsilon, wg, wu, bg, bu)
    x = norm(h)
    _close(out, F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu), dt)
    with pytest.raises(ValueError, match="w_up must be"):
        dl.norm_gate_up(h, norm.weight, 1e-6, wg, wu[:-1])
    with pytest.raises(ValueError, match="norm_weight must be"):
        dl.norm_gate_up(h, norm.weight[:-1], 1e-6, wg, wu)


@pytest.mark.parametrize("config", [(2, 32, 1), (4, 64, 2, 1), (16, 512, 4, 2),
                                    # persistent: one K tile, 1 tile ahead, 3 programs (per SM; the CPU counts 1)
                                    (2, 256, 4, 2, 3),
                                    # persistent with K tiles (4 of 64: a tail), 2 tiles ahead, 2 / 5 programs
                                    (1, 64, 4, 3, 2), (4, 128, 2, 3, 5)])
def test_configs(config):
    # any tile shape (rows per program, K tile, warps, stages; or the persistent kernel: register buffers,
    # programs per SM) gives the torch result: masks of partial row blocks and K tails, RoPE pairs split
    # across programs, programs with unequal numbers of row blocks
    g = torch.Generator().manual_seed(3)
    dt = torch.float32
    h = torch.randn(3, 200, generator=g).to(DEV)
    norm = _norm(200, dt, g)
    x = norm(h)
    wg, wu = _w(77, 200, dt, g), _w(77, 200, dt, g)
    _close(dl.norm_gate_up(h, norm.weight, 1e-6, wg, wu, config=config), F.silu(x @ wg.T) * (x @ wu.T), dt)
    res = torch.randn(3, 77, generator=g).to(DEV)
    _close(dl.linear_residual(h, wg, None, res, config=config), res + h @ wg.T, dt)
    with pytest.raises(ValueError, match="role"):
        dl.linear_residual(h, wg, None, res, role="up_proj")
    with pytest.raises(ValueError, match=r"config must be \(BN2, BK, num_warps"):
        dl.linear_residual(h, wg, None, res, config=config + (1, 1, 1))
    D, nk = 32, 64
    wq, wkvg = _w(2 * D, 200, dt, g), _w(nk + 9, 200, dt, g)
    emb = torch.rand(3, 1, D // 2, generator=g).repeat(1, 1, 2) * 9
    cos, sin = emb.cos().to(DEV), emb.sin().to(DEV)
    q, y = dl.norm_qkvg(h, norm.weight, 1e-6, wq, None, wkvg, None, nk, cos, sin, D, config=config)
    qr, kr = _rope((x @ wq.T).view(3, 1, 2, D), (x @ wkvg.T)[:, :nk].reshape(3, 1, 2, D), cos, sin)
    _close(q, qr.reshape(3, -1), dt)
    _close(y, torch.cat([kr.reshape(3, -1), (x @ wkvg.T)[:, nk:]], 1), dt)


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float32], ids=str)
def test_persistent_programs_take_many_blocks(dt):
    # the persistent kernel with many row blocks per program (the B=1 default on a GPU; on the CPU 2 programs):
    # every block's output lands in its rows, with a different number of blocks per program, at B = 1 and 2
    g = torch.Generator().manual_seed(11)
    K, N = (2048, 11008) if DEV == "cuda" else (96, 301)
    for B in (1, 2):
        h = torch.randn(B, K, generator=g).to(dt).to(DEV)
        norm = _norm(K, dt, g)
        x = norm(h)
        wg, wu = _w(N, K, dt, g), _w(N, K, dt, g)
        for cfg in ((2, 16384, 4, 2, 3), (1, 16384, 4, 3, 2)):
            _close(dl.norm_gate_up(h, norm.weight, 1e-6, wg, wu, config=cfg),
                   F.silu(F.linear(x, wg)) * F.linear(x, wu), dt)
        res = torch.randn(B, K, generator=g).to(dt).to(DEV)
        wd = _w(K, N, dt, g)
        act = torch.randn(B, N, generator=g).to(dt).to(DEV)
        _close(dl.linear_residual(act, wd, None, res, role="down_proj", config=(2, 1024, 8, 2, 2)),
               res + F.linear(act, wd), dt)


@pytest.mark.skipif(not (torch.cuda.is_available() and dl.can_trigger(torch.device("cuda"))),
                    reason="programmatic dependent launch needs an sm_90+ GPU")
def test_chained_launches_change_nothing():
    # o_proj -> gate/up -> down_proj -> q/k/v as programmatic dependent launches (each requests its first
    # weight tiles before waiting for the one before): bit-identical to plain launches, eager and in a CUDA
    # graph, with new inputs every round (a kernel that read its input before the wait would see stale data)
    g = torch.Generator().manual_seed(5)
    dt, dev, K, N, D = torch.bfloat16, torch.device("cuda"), 2048, 11008, 128
    norm, norm2 = _norm(K, dt, g), _norm(K, dt, g)
    wo, wg, wu, wd = _w(K, K, dt, g), _w(N, K, dt, g), _w(N, K, dt, g), _w(K, N, dt, g)
    wq, wkvg = _w(16 * D, K, dt, g), _w(2 * 2 * D + 48, K, dt, g)
    for B in (1, 2):
        o, h = torch.empty(B, K, dtype=dt, device=dev), torch.empty(B, K, dtype=dt, device=dev)
        cs = torch.empty(B, D, dtype=dt, device=dev)

        def layer(chain):
            x = dl.linear_residual(o, wo, None, h, chain=chain)
            act = dl.norm_gate_up(x, norm.weight, 1e-6, wg, wu, chain=chain)
            x = dl.linear_residual(act, wd, None, x, role="down_proj", chain=chain)
            return (x,) + dl.norm_qkvg(x, norm2.weight, 1e-6, wq, None, wkvg, None, 2 * D, cs, cs, D, chain=chain)

        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layer(True)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            captured = layer(True)
        for r in range(3):
            for t_ in (o, h, cs):
                t_.copy_(torch.randn(t_.shape, generator=g).to(dt))
            ref = layer(False)
            for got in (layer(True), (graph.replay(), captured)[1]):
                for a, b in zip(got, ref):
                    assert torch.equal(a, b), (B, r)


LOW = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dt", LOW, ids=str)
@pytest.mark.parametrize("B,config", [(3, None), (5, (8, 64, 4, 2)), (9, (16, 32, 4, 1)), (16, (32, 128, 8, 3))])
def test_tensor_core_path(dt, B, config):
    # B > 2 in bf16/fp16: the products on tensor cores (batch padded to 16 rows, 2 BN2 weight rows per
    # tile); the same roundings as the torch ops, tile tails in K (200, 72) and in N (odd row counts)
    g = torch.Generator().manual_seed(B * 31)
    K, D, H, HKV = 200, 32, 3, 1
    h = (torch.randn(B, K, generator=g) * 2).to(dt).to(DEV)
    norm = _norm(K, dt, g)
    x = norm(h)
    wq, wkvg = _w(H * D, K, dt, g), _w(2 * HKV * D + 7, K, dt, g)
    bq = (torch.randn(H * D, generator=g) * 0.1).to(dt).to(DEV)
    ang = torch.rand(B, 1, D // 2, generator=g) * 50
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().to(dt).to(DEV), emb.sin().to(dt).to(DEV)
    q, y = dl.norm_qkvg(h, norm.weight, norm.variance_epsilon, wq, bq, wkvg, None, HKV * D, cos, sin, D,
                        config=config)
    yr = F.linear(x, wkvg)
    qr, kr = _rope(F.linear(x, wq, bq).view(B, 1, H, D), yr[:, :HKV * D].reshape(B, 1, HKV, D), cos, sin)
    _close(q, qr.reshape(B, -1), dt)
    _close(y, torch.cat([kr.reshape(B, -1), yr[:, HKV * D:]], 1), dt)
    wg, wu = _w(77, K, dt, g, scale=3 * K ** -0.5), _w(77, K, dt, g)
    bu = (torch.randn(77, generator=g) * 0.1).to(dt).to(DEV)
    # SiLU * up chains three roundings: with the interpreter's truncating bf16 casts one of 1232 values
    # lands 7 ulps of its row from torch's (it equals a truncating emulation of the same steps exactly)
    _close(dl.norm_gate_up(h, norm.weight, norm.variance_epsilon, wg, wu, None, bu, config=config),
           F.silu(F.linear(x, wg)) * F.linear(x, wu, bu), dt, ulps=8 if DEV == "cpu" and dt == torch.bfloat16 else 4)
    xo = torch.randn(B, 72, generator=g).to(dt).to(DEV)
    wo = _w(45, 72, dt, g)
    res = torch.randn(B, 45, generator=g).to(dt).to(DEV)
    for role in ("o_proj", "down_proj"):
        _close(dl.linear_residual(xo, wo, None, res, role=role, config=config), res + F.linear(xo, wo), dt)
    assert dl.supports(B, dt, D) and dl.supports(B, torch.float32) == dl.supports(B, dt, 8) == (B <= 4)


@pytest.mark.skipif(DEV != "cuda", reason="bf16 whole-model decode: GPU")
@pytest.mark.parametrize("gate_up", [None, True])
def test_decoder_linear_tensor_cores_bf16(gate_up):
    # the fused step at B = 5 (tensor-core projections; the MLP's gate/up on cuBLAS unless asked) in bf16:
    # every token a best one of a full forward
    from ahn_ops import fast_decode as gen

    model = patched("gdn", window=9, sinks=4, hidden=256, heads=4, kv_heads=2).to(DEV, torch.bfloat16)
    x = torch.randint(0, VOCAB, (5, 21), generator=torch.Generator().manual_seed(4)).to(DEV)
    plan = DecodePlan(fuse_glue=True, fuse_linear=True, fuse_gate_up=bool(gate_up),
                      overlap=dl.can_trigger(torch.device(DEV)))
    fused = ahn_ops.generate(model, x, 6, use_cuda_graph=False, plan=plan)
    assert_greedy_of_full_forward(model, x, fused)
    if gate_up is None and torch.cuda.get_device_capability()[0] == 9:  # the default on Hopper from B = 3 on
        logits, cache = gen.prefill(model, x)
        dec = gen.StaticDecoder(model, cache, None, x.shape[1], 4)
        assert dec.plan == plan == DecodePlan.default(model, 5)


@pytest.mark.parametrize("kind,gate_up", [("gdn", None), ("gdn", True), ("dn", None), ("mamba2", True)])
def test_decoder_linear_equals_plain_step(kind, gate_up):
    # a full-attention layer (RMSNorm kernel + its own projections) and left padding, batch 3 (padded
    # to 4 rows in the kernels): every branch of the fused-projection step, the MLP's gate/up through
    # cuBLAS (the default from batch 3 on) or fused
    from ahn_ops import fast_decode as gen

    plan = DecodePlan(fuse_glue=True, fuse_linear=True, fuse_gate_up=bool(gate_up),
                      overlap=dl.can_trigger(torch.device(DEV)))
    model, x = decoder_matches_plain_step(kind, 3, 6, 5, plan, with_unmasked=kind == "gdn")
    logits, cache = gen.prefill(model, x)
    dec = gen.StaticDecoder(model, cache, None, x.shape[1], 4, plan=plan)
    assert dec.plan is plan
    with pytest.raises(ValueError, match="plan.fuse_linear=True needs fuse_glue"):
        gen.StaticDecoder(model, cache, None, x.shape[1], 4, plan=DecodePlan(fuse_linear=True))
    with pytest.raises(ValueError, match="plan.fuse_gate_up=True needs fuse_linear"):
        gen.StaticDecoder(model, cache, None, x.shape[1], 4, plan=DecodePlan(fuse_glue=True, fuse_gate_up=True))


def test_decoder_linear_auto_off_for_large_batches():
    from ahn_ops import fast_decode as gen

    model = patched("gdn", window=5, sinks=0).to(DEV)
    x = torch.randint(0, VOCAB, (dl.MAX_BROADCAST_BATCH + 1, 8)).to(DEV)  # float32 model: 4 rows at most
    logits, cache = gen.prefill(model, x)
    with pytest.raises(ValueError, match="batch <= 16 in bf16/fp16 or <= 4 in float32"):
        gen.StaticDecoder(model, cache, None, 8, 2, plan=DecodePlan(fuse_glue=True, fuse_linear=True))
    assert not gen.StaticDecoder(model, cache, None, 8, 2).plan.fuse_linear


def test_decoder_overlap_needs_hopper_and_changes_nothing():
    # overlap: each AHN layer's decode op launched early after its q/k/v projection (sm_90+); the tokens
    # (and so every logit's argmax over a few steps, CUDA graph included) are those of the plain launch
    from ahn_ops import fast_decode as gen

    model = patched("gdn", window=9, sinks=4, hidden=256, heads=4, kv_heads=2).to(DEV)
    if DEV == "cuda":
        model = model.to(torch.bfloat16)
    for layer in model.model.layers:  # the C++ decode op (the helper patches with the reference backend)
        layer.self_attn._ahn_cfg["backend"] = "auto"
    x = torch.randint(0, VOCAB, (3, 21), generator=torch.Generator().manual_seed(5)).to(DEV)
    logits, cache = gen.prefill(model, x)
    if not dl.can_trigger(torch.device(DEV)):
        with pytest.raises(ValueError, match="plan.overlap=True needs fuse_linear on an sm_90"):
            gen.StaticDecoder(model, cache, None, x.shape[1], 2, plan=DecodePlan(overlap=True))
        assert not gen.StaticDecoder(model, cache, None, x.shape[1], 2).plan.overlap
        return
    assert gen.StaticDecoder(model, cache, None, x.shape[1], 2).plan.overlap  # the default on Hopper from B = 3
    for B in (1, 2):  # not where the projections are persistent
        _, cache1 = gen.prefill(model, x[:B])
        assert not gen.StaticDecoder(model, cache1, None, x.shape[1], 2).plan.overlap
    for B in (1, 2, 3):
        default = DecodePlan.default(model, B)
        on = ahn_ops.generate(model, x[:B], 12, use_cuda_graph=True, plan=dataclasses.replace(default, overlap=True))
        off = ahn_ops.generate(model, x[:B], 12, use_cuda_graph=True, plan=dataclasses.replace(default, overlap=False))
        assert torch.equal(on, off)
