"""Backward of the fused prefill (torch.ops.ahn.prefill_fwd + register_autograd -> prefill_bwd).

CPU CI runs the Triton kernels in the interpreter (TRITON_INTERPRET=1, set by conftest):
  * fp32 inputs: every gradient against autograd through the fp32 reference, tight (the
    interpreter's fp32 dots are exact, so this checks the math and the indexing);
  * fp16 inputs: the flash-attention rule, kernel error <= 2x the error of the same reference
    math run in bf16 + a floor (the interpreter's bf16 tl.dot multiplies raw bit patterns in
    triton 3.8, so bf16 is checked on the GPU: benchmarks/bench_backward.py --check).
GPU tests (bf16, long sequences) skip without CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

from ahn_ops.ops.ahn_attention import reference as ref

from ..utils import (GRAD_NAMES, check_bf16_grad_rule, grad_err, grads_of, kernel_grads, make_inputs, ref_grads,
                     rel_err)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1",
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1")

NAMES = GRAD_NAMES
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _prefill():
    from ahn_ops.ops.ahn_attention import prefill  # noqa: F401  (registers ops + autograd)


CASES = [
    pytest.param("gdn", 1, 1, 4, 0, 1, None, id="gdn-T1-W4-S0-G1"),
    pytest.param("gdn", 1, 63, 5, 0, 4, None, id="gdn-T63-W5-S0-G4"),
    pytest.param("gdn", 2, 100, 17, 3, 2, None, id="gdn-B2-T100-W17-S3-G2"),
    pytest.param("dn", 1, 100, 30, 7, 4, None, id="dn-T100-W30-S7-G4"),
    pytest.param("gdn", 1, 130, 64, 64, 1, None, id="gdn-T130-W64-S64-G1"),
    pytest.param("dn", 1, 63, 100, 2, 2, None, id="dn-T63-W100-S2-WgeT"),
    pytest.param("gdn", 1, 150, 20, 5, 2, [0, 40, 41, 150], id="gdn-varlen-0,40,41,150-W20-S5"),
    pytest.param("mamba2", 1, 1, 4, 0, 1, None, id="mamba2-T1-W4-S0-G1"),
    pytest.param("mamba2", 1, 63, 5, 0, 4, None, id="mamba2-T63-W5-S0-G4"),
    pytest.param("mamba2", 2, 100, 17, 3, 2, None, id="mamba2-B2-T100-W17-S3-G2"),
    pytest.param("mamba2", 1, 130, 64, 64, 1, None, id="mamba2-T130-W64-S64-G1"),
    pytest.param("mamba2", 1, 63, 100, 2, 2, None, id="mamba2-T63-W100-S2-WgeT"),
    pytest.param("mamba2", 1, 150, 20, 5, 2, [0, 40, 41, 150], id="mamba2-varlen-0,40,41,150-W20-S5"),
]


@pytest.mark.parametrize("kind,B,T,W,S,G,cu", CASES)
def test_grads_fp32_exact(kind, B, T, W, S, G, cu):
    HKV, D = 1, 64
    inp = make_inputs(kind, B, T, HKV * G, HKV, D, torch.float32, device=DEV, seed=T + W + S)
    cs = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
    # dout from its own seed: the global generator's state depends on which tests ran before in the
    # process (pytest-xdist deals them out differently per run), and a GPU failure must reproduce
    dout = torch.randn(B, T, HKV * G, D, generator=torch.Generator().manual_seed(T * W + S)).to(DEV)
    gk = kernel_grads(inp, dout, W, S, kind, cs)
    gr = ref_grads([None if x is None else x.float() for x in inp], dout, W, S, kind, cs, torch.float32)
    for n, a, r in zip(NAMES, gk, gr):
        if r is None:  # an input the kind does not take (DN's a, Mamba2's b) gets no gradient
            assert a is None, n
            continue
        e = grad_err(a, r)
        print(f"{n}: kernel fp32 rel err {e:.2e}")
        # sums over all tokens (A_log, dt_bias) add up more rounding than per-token grads
        assert torch.isfinite(a).all() and e < (2e-4 if n in ("A_log", "dt_bias", "a") else 2e-5), n


@pytest.mark.parametrize("kind,T,W,S,G", [
    pytest.param("gdn", 130, 20, 3, 2, id="gdn-T130-W20-S3-G2"),
    pytest.param("dn", 100, 30, 0, 4, id="dn-T100-W30-S0-G4"),
])
def test_grads_fp16_rule(kind, T, W, S, G):
    # strong decays: A_log up to log 16 (the case that exposed the dg cancellation, NOTES_backward.md)
    HKV, D = 1, 64
    dt = torch.bfloat16 if DEV == "cuda" else torch.float16
    inp = make_inputs(kind, 1, T, HKV * G, HKV, D, dt, device=DEV, seed=3)
    dout = torch.randn(1, T, HKV * G, D, device=DEV)
    gk = kernel_grads(inp, dout, W, S, kind, None)
    up = [None if x is None else x.float() for x in inp]
    gr = ref_grads(up, dout, W, S, kind, None, torch.float32)
    low = [None if x is None else x.to(torch.bfloat16) if x.dtype == dt else x for x in inp]
    gt = ref_grads(low, dout, W, S, kind, None, torch.bfloat16)
    check_bf16_grad_rule(gk, gr, gt)


@pytest.mark.skipif(DEV != "cuda", reason="long bf16 sequences need a GPU")
@pytest.mark.parametrize("kind,W,cu,D", [
    pytest.param("gdn", 8192, [0, 11000, 12288], 128, id="gdn-W8192-varlen-rows128"),
    pytest.param("dn", 2048, None, 128, id="dn-W2048-rows64"),
    pytest.param("dn", 2048, None, 64, id="dn-W2048-D64"),
    pytest.param("gdn", 1000, [0, 7000, 12288], 64, id="gdn-W1000-varlen-D64"),
])
def test_grads_gpu_long(kind, W, cu, D):
    # bf16 at T = 12288 with the 2x rule; W = 8192 takes the forward's 128-row programs, whose lse / out
    # feed the backward (prefill._fwd_launch); the first sequence is longer than W so that the memory
    # (and every AHN parameter's gradient) is in play. D = 64 takes other tile shapes, hence other
    # software pipelines (benchmarks/kernel_regs.py checks those offline for one race pattern)
    B, T, S, HKV, G = 1, 12288, 64, 1, 4
    inp = make_inputs(kind, B, T, HKV * G, HKV, D, torch.bfloat16, device=DEV, seed=W)
    cs = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
    dout = torch.randn(B, T, HKV * G, D, device=DEV)
    gk = kernel_grads(inp, dout, W, S, kind, cs)
    gr = ref_grads([None if x is None else x.float() for x in inp], dout, W, S, kind, cs, torch.float32)
    gt = ref_grads(inp, dout, W, S, kind, cs, torch.bfloat16)
    assert gr[NAMES.index("o_weight")].norm() > 0  # the memory branch is in play
    check_bf16_grad_rule(gk, gr, gt)


@pytest.mark.skipif(DEV != "cuda", reason="races between programs or pipeline stages show on a GPU only")
@pytest.mark.parametrize("kind,D", [("dn", 128), ("gdn", 128), ("dn", 64), ("mamba2", 128)])
def test_grads_run_to_run(kind, D):
    # Two backward runs on the same inputs agree up to the order of the fp32 atomics (dk, dv summed over
    # the G query heads of a kv head). The interpreter runs programs one after another, so a race shows
    # only here: on an H200 with triton 3.6 the first version of the two-launch _mem_bwd (h / wy kernels)
    # gave run-to-run differences of 8.3e-2 in k and 9.1e-2 in b for dn at this shape (a software-pipelining
    # race, NOTES_backward.md); the one-launch kernel before it 1.5e-5
    B, T, S, HKV, G, W = 1, 12288, 64, 1, 4, 2048
    inp = make_inputs(kind, B, T, HKV * G, HKV, D, torch.bfloat16, device=DEV, seed=W)
    dout = torch.randn(B, T, HKV * G, D, device=DEV)
    g1 = kernel_grads(inp, dout, W, S, kind, None)
    g2 = kernel_grads(inp, dout, W, S, kind, None)
    for n, a, b in zip(NAMES, g1, g2):
        if a is not None:
            assert rel_err(a, b) <= 1e-4, (n, rel_err(a, b))


@pytest.mark.parametrize("Tt,H,D,dtype", [
    pytest.param(1, 2, 64, torch.float32, id="T1"),
    pytest.param(700, 3, 64, torch.float16, id="T700-fp16"),
    pytest.param(1300, 2, 128, torch.float32, id="T1300-D128"),
    pytest.param(5000, 4, 128, torch.bfloat16 if DEV == "cuda" else torch.float16, id="T5000-D128-low"),
])
def test_do_weight_token_slices(Tt, H, D, dtype, monkeypatch):
    # the o_weight gradient's product u^T dy per head, split over token slices (fp32 partials summed in order)
    # or one cuBLAS product: each against float64, within fp32 accumulation over Tt products of the input dtype
    from ahn_ops.ops.ahn_attention import backward as bw

    g = torch.Generator(device="cpu").manual_seed(Tt + H)
    u, dy = (torch.randn(Tt, H, D, generator=g).to(DEV, dtype) for _ in range(2))
    want = torch.einsum("thi,thj->hij", u.double(), dy.double())
    for slices in (0, 1, 3, 16, 264):
        monkeypatch.setitem(bw.CONFIG, "do_weight_slices", slices)
        got = bw._do_weight(u, dy)
        assert got.shape == (H, D, D) and got.dtype == torch.float32
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert err < 1e-5, (slices, err)


@pytest.mark.skipif(DEV != "cuda", reason="the side stream exists on CUDA devices only")
@pytest.mark.parametrize("kind", ["gdn", "mamba2"])
def test_side_stream_matches_serial(kind, monkeypatch):
    # backward.CONFIG["side_stream"]: the sink kernel and the do_weight product run on a side stream
    # beside the memory passes. Same gradients (up to the order of the fp32 atomics) as all on one stream,
    # on a varlen batch whose sequences each have sink key blocks past their band
    from ahn_ops.ops.ahn_attention import backward as bw

    B, T, S, HKV, G, W, D = 1, 9000, 100, 2, 4, 1500, 128
    inp = make_inputs(kind, B, T, HKV * G, HKV, D, torch.bfloat16, device=DEV, seed=5)
    cs = torch.tensor([0, 4000, 4001, 9000], dtype=torch.int32, device=DEV)
    dout = torch.randn(B, T, HKV * G, D, device=DEV)
    monkeypatch.setitem(bw.CONFIG, "side_stream", True)
    g1 = kernel_grads(inp, dout, W, S, kind, cs)
    monkeypatch.setitem(bw.CONFIG, "side_stream", False)
    g2 = kernel_grads(inp, dout, W, S, kind, cs)
    for n, a, b in zip(NAMES, g1, g2):
        if a is not None:
            assert rel_err(a, b) <= 1e-4, (n, rel_err(a, b))


@pytest.mark.parametrize("kind,T,W,S,cu,h0", [
    pytest.param("gdn", 300, 40, 5, None, False, id="gdn"),
    pytest.param("dn", 260, 30, 3, [0, 100, 101, 260], False, id="dn-varlen-100,1,159"),
    pytest.param("mamba2", 200, 20, 0, [0, 130, 200], False, id="mamba2-varlen"),
    pytest.param("gdn", 150, 70, 2, None, True, id="gdn-h0"),
])
def test_state_epi_launch_matches_two(kind, T, W, S, cu, h0, monkeypatch):
    # backward.CONFIG["state_epi"]: the state chain's re-run and the epilogue backward as one launch whose later
    # programs wait for the chunks the first ones count ready. The same gradients as the two launches (bitwise in
    # the interpreter, whose programs run one by one; within the order of the fp32 atomics on a GPU), with
    # sinks, varlen (a one-token sequence), Mamba2's two epilogue phases and an initial state
    from ahn_ops.ops.ahn_attention import backward as bw

    _prefill()
    H, HKV, D = 4, 2, 64
    dt = torch.float32 if DEV == "cpu" else torch.bfloat16
    inp = make_inputs(kind, 1, T, H, HKV, D, dt, device=DEV, seed=T + W)
    cs = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
    g = torch.Generator().manual_seed(T)
    N = 1 if cu is None else len(cu) - 1
    st0 = (torch.randn(N, H, D, D, generator=g) * 0.1).to(DEV) if h0 else None
    out, _, lse = torch.ops.ahn.prefill_fwd(*inp, W, S, kind, cs, st0, False)
    dout = torch.randn(1, T, H, D, generator=g).to(DEV, dt)
    dht = torch.randn(N, H, D, D, generator=g).to(DEV) if h0 else None
    got = {}
    for fused in (False, True):
        monkeypatch.setitem(bw.CONFIG, "state_epi", fused)
        got[fused] = bw.prefill_bwd(dout, dht, *inp, out, lse, W, S, kind, cs, st0)
    names = NAMES + ("initial_state",)
    for n, a, b in zip(names, got[True], got[False]):
        assert (a is None) == (b is None), n
        if a is not None:
            if DEV == "cpu":
                assert torch.equal(a, b), n
            else:
                assert rel_err(a, b) <= 1e-4, (n, rel_err(a, b))


@pytest.mark.skipif(DEV != "cuda", reason="the side stream exists on CUDA devices only")
@pytest.mark.parametrize("kind,cu,config", [
    pytest.param("gdn", None, {}, id="gdn"),
    pytest.param("dn", [0, 4480, 9000], {"chain_join": "event"}, id="dn-varlen-chain_event"),
    pytest.param("mamba2", None, {}, id="mamba2"),
    pytest.param("gdn", [0, 3000, 3001, 9000],
                 {"state_epi": True, "epi_warps": 8, "sink": (64, 8, 3), "do_weight_slices": 16, "prep_maxnreg": None},
                 id="gdn-varlen-state_epi-8warps-sink64-slices16-prep_nocap"),
    pytest.param("mamba2", None, {"state_epi": True, "state_epi_bv": 32}, id="mamba2-state_epi-32"),
])
def test_memory_grads_beside_band(kind, cu, config, monkeypatch):
    # backward.CONFIG["band_beside"] = 1: the reverse chain runs on a side stream while cuDNN's band runs on the
    # main stream. Same gradients (up to the order of the fp32 atomics) as after the band, and within the 2x rule
    # of the fp32 reference; a buffer handed from one stream to the other too early would show as a difference
    # here (the chain and band kernels are long at this size). config: other backward settings for both runs (the
    # fused state chain + epilogue launch, whose epilogue programs wait on the chain's counters, at this size; the
    # epilogue at 8 warps, the sink keys' kernel at 64 queries per step, the o_weight product in token slices, the
    # prep pass without its register cap: prefill.CONFIG, forward and re-run; the memory kernels after the band waiting
    # for the chain alone, not for the sink kernel and the o_weight product queued behind it: chain_join)
    from ahn_ops.ops.ahn_attention import backward as bw
    from ahn_ops.ops.ahn_attention import prefill as pf

    for key, val in config.items():
        monkeypatch.setitem(bw.CONFIG if key in bw.CONFIG else pf.CONFIG, key, val)

    B, T, S, HKV, G, W, D = 1, 9000, 64, 2, 4, 1500, 128
    inp = make_inputs(kind, B, T, HKV * G, HKV, D, torch.bfloat16, device=DEV, seed=11)
    lens = [T] if cu is None else [b - a for a, b in zip(cu, cu[1:])]
    if not pf._band_engine(inp[0], lens):
        pytest.skip("cuDNN's band does not run here (band_cudnn.unavailable_reason)")
    cs = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
    dout = torch.randn(B, T, HKV * G, D, device=DEV)
    monkeypatch.setitem(bw.CONFIG, "band_beside", 0)
    g0 = kernel_grads(inp, dout, W, S, kind, cs)
    monkeypatch.setitem(bw.CONFIG, "band_beside", 1)
    g1 = kernel_grads(inp, dout, W, S, kind, cs)
    for n, a, b in zip(NAMES, g1, g0):
        if a is not None:
            assert rel_err(a, b) <= 1e-4, (n, rel_err(a, b))
    gr = ref_grads([None if x is None else x.float() for x in inp], dout, W, S, kind, cs, torch.float32)
    gt = ref_grads(inp, dout, W, S, kind, cs, torch.bfloat16)
    check_bf16_grad_rule(g1, gr, gt)


@pytest.mark.parametrize("key,val", [("band_beside", 2), ("chain_join", "events")])
def test_band_beside_setting_is_checked(key, val, monkeypatch):
    from ahn_ops.ops.ahn_attention import backward as bw

    monkeypatch.setitem(bw.CONFIG, key, val)
    inp = make_inputs("gdn", 1, 70, 2, 1, 64, torch.float32, device=DEV, seed=1)
    with pytest.raises(ValueError, match=key):
        kernel_grads(inp, torch.randn(1, 70, 2, 64, device=DEV), 8, 2, "gdn", None)


def test_random_window_no_recompile():
    # W, S are run-time arguments (do_not_specialize): new values reuse the compiled kernels
    from ahn_ops.ops.ahn_attention import backward_attn as ka
    from ahn_ops.ops.ahn_attention import backward_mem as km

    kind, T, H, D = "gdn", 130, 2, 64  # T = 130: (17, 3) launches the sink kernel too
    inp = make_inputs(kind, 1, T, H, 1, D, torch.float32, device=DEV, seed=1)
    dout = torch.randn(1, T, H, D, device=DEV)
    kernels = ((ka, "_attn_dq_kernel"), (ka, "_attn_dkdv_kernel"), (km, "_mem_bwd_h_kernel"),
               (km, "_mem_bwd_wy_kernel"), (ka, "_attn_dkdv_sink_kernel"))

    def cached():  # compiled variants so far (other tests of this process may have added some)
        return {k: len(getattr(m, k).device_caches[0][0]) for m, k in kernels} if DEV == "cuda" else {}

    kernel_grads(inp, dout, 17, 3, kind, None)
    before = cached()
    kernel_grads(inp, dout, 33, 0, kind, None)
    assert cached() == before, (before, cached())


@pytest.mark.parametrize("kind", ["gdn", "mamba2"])
def test_initial_state_grad(kind):
    # gradient of the initial state (and of the final state) through the op, against autograd
    # of the reference's memory with an initial state
    _prefill()
    T, H, D, W, S = 90, 2, 64, 20, 3
    inp = make_inputs(kind, 1, T, H, 1, D, torch.float32, device=DEV, seed=5)
    h0 = (torch.randn(1, H, D, D, device=DEV) * 0.1)
    leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in inp]
    h0k = h0.clone().requires_grad_(True)
    out, ht, _ = torch.ops.ahn.prefill_fwd(*leaves, W, S, kind, None, h0k, True)
    dout, dht = torch.randn_like(out), torch.randn_like(ht)
    (out * dout).sum().add_((ht * dht).sum()).backward()
    q, k, v, a, b, z, A_log, dt_bias, nw, ow = [None if x is None else x.detach().clone().requires_grad_(True)
                                                for x in inp]
    h0r = h0.clone().requires_grad_(True)
    o_win = ref.window_attention_ref(q, k, v, W, S)
    g, w = ref.memory_gates_ref(a, b, A_log, dt_bias, kind)
    m, st = ref.memory_readout_ref(q, k, v, g, w, W, S, kind, initial_state=h0r)
    outr = o_win + ref.epilogue_ref(m, z, nw, ow, kind)
    (outr * dout).sum().add_((st * dht).sum()).backward()
    assert rel_err(h0k.grad, h0r.grad) < 1e-4
    if kind == "gdn":
        assert rel_err(leaves[0].grad, q.grad) < 1e-4
    for i, name, x in ((0, "q", q), (1, "k", k), (3, "a", a), (6, "A_log", A_log), (8, "norm_weight", nw)):
        assert rel_err(leaves[i].grad, x.grad) < 1e-3, name


@pytest.mark.parametrize("kind,cu,rows", [
    pytest.param("gdn", None, 64, id="gdn"),
    pytest.param("dn", [0, 90, 91, 200], 128, id="dn-varlen-90,1,109-fwdrows128"),
    pytest.param("mamba2", None, 64, id="mamba2"),
    pytest.param("mamba2", [0, 90, 91, 200], 128, id="mamba2-varlen-90,1,109-fwdrows128"),
])
def test_delta_from_out_minus_memory(kind, cu, rows, monkeypatch):
    # the attention backward's delta = rowsum(dout * o_win) is taken as rowsum(dout * (out - y_mem))
    # in _epi_bwd_kernel: o_weight x30 makes y_mem ~30x the window output, so a delta that kept
    # (or lost, or mis-scaled by Mamba2's cross-head r) any part of y_mem moves dq/dk/dv far past
    # the bound; W = 70, S = 5: the first chunk of a sequence reads no memory (y_mem = 0, delta from
    # out alone), the second has rows with and without memory; varlen: a 1-token sequence.
    # rows: the forward's query rows per program (its lse and out feed the backward)
    from ahn_ops.ops.ahn_attention import prefill

    monkeypatch.setitem(prefill.CONFIG, "fwd_rows", rows)
    B, T, W, S, G, HKV, D = 1, 200, 70, 5, 2, 1, 64
    inp = list(make_inputs(kind, B, T, HKV * G, HKV, D, torch.float32, device=DEV, seed=13))
    inp[9] = inp[9] * 30.  # o_weight
    cs = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
    dout = torch.randn(B, T, HKV * G, D, device=DEV)
    gk = kernel_grads(inp, dout, W, S, kind, cs)
    gr = ref_grads([None if x is None else x.float() for x in inp], dout, W, S, kind, cs, torch.float32)
    for n, a, r in zip(NAMES, gk, gr):
        if r is None:
            assert a is None, n
            continue
        e = grad_err(a, r)
        print(f"{n}: kernel fp32 rel err {e:.2e}")
        assert torch.isfinite(a).all() and e < (2e-4 if n in ("A_log", "dt_bias", "a") else 2e-5), n


@pytest.mark.parametrize("sink_cfg", [(32, 4, 3), (64, 8, 3)], ids=["BM32", "BM64"])
def test_sink_split_and_unmasked_interior(sink_cfg, monkeypatch):
    # W = 130 >= 2 blocks: the dq/lse/dkdv bands have unmasked interior blocks; S = 70: two sink
    # key blocks (the second one partly sinks) whose queries past the band are split into ranges
    # of 64 tokens (backward.CONFIG["sink_qs"]), each its own program adding with atomics, at 32 or 64
    # queries per step (backward.CONFIG["sink"])
    from ahn_ops.ops.ahn_attention import backward as bw

    monkeypatch.setitem(bw.CONFIG, "sink_qs", 64)
    monkeypatch.setitem(bw.CONFIG, "sink", sink_cfg)
    kind, T, W, S, G, HKV, D = "gdn", 320, 130, 70, 2, 1, 64
    inp = make_inputs(kind, 1, T, HKV * G, HKV, D, torch.float32, device=DEV, seed=11)
    dout = torch.randn(1, T, HKV * G, D, device=DEV)
    gk = kernel_grads(inp, dout, W, S, kind, None)
    gr = ref_grads([None if x is None else x.float() for x in inp], dout, W, S, kind, None, torch.float32)
    for n, a, r in zip(NAMES, gk, gr):
        if r is None:  # an input the kind does not take (DN's a, Mamba2's b) gets no gradient
            assert a is None, n
            continue
        e = grad_err(a, r)
        print(f"{n}: kernel fp32 rel err {e:.2e}")
        assert torch.isfinite(a).all() and e < (2e-4 if n in ("A_log", "dt_bias", "a") else 2e-5), n


def test_opcheck_and_compile():
    _prefill()
    kind, T, H, D, W, S = "gdn", 40, 2, 64, 9, 2
    inp = make_inputs(kind, 1, T, H, 1, D, torch.float16, device=DEV, seed=7)
    leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in inp]
    torch.library.opcheck(torch.ops.ahn.prefill_fwd.default, (*leaves, W, S, kind, None, None, False),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    dout = torch.randn(1, T, H, D, device=DEV, dtype=torch.float16)
    out, _, lse = torch.ops.ahn.prefill_fwd(*inp, W, S, kind, None, None, False)
    assert lse.shape == (1, T, H) and lse.dtype == torch.float32
    torch.library.opcheck(torch.ops.ahn.prefill_bwd.default,
                          (dout, None, *inp, out, lse, W, S, kind, None, None),
                          test_utils=("test_schema", "test_faketensor"))

    def f(*xs):
        return torch.ops.ahn.prefill_fwd(*xs, W, S, kind, None, None, False)[0]

    g_eager = grads_of(lambda x: f(*x), inp, dout)
    g_comp = grads_of(lambda x: torch.compile(f, fullgraph=True, backend="aot_eager")(*x), inp, dout)
    for n, a, c in zip(NAMES, g_eager, g_comp):
        assert torch.equal(a, c), n


def test_checkpoint():
    from torch.utils.checkpoint import checkpoint

    _prefill()
    kind, T, H, D, W, S = "dn", 40, 2, 64, 9, 2
    inp = make_inputs(kind, 1, T, H, 1, D, torch.float32, device=DEV, seed=8)
    dout = torch.randn(1, T, H, D, device=DEV)

    def f(*xs):
        return torch.ops.ahn.prefill_fwd(*xs, W, S, kind, None, None, False)[0]

    g1 = grads_of(lambda x: f(*x), inp, dout)
    g2 = grads_of(lambda x: checkpoint(f, *x, use_reentrant=False), inp, dout)
    for n, a, c in zip(NAMES, g1, g2):
        if a is not None:
            assert torch.equal(a, c), n
