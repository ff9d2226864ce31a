"""kind="mamba2" in the fused Triton prefill: forward, cache path and backward against the fp32 reference.

Same harness and tolerances as test_prefill.py (forward: the flash-attention rule, kernel error
<= 2x the error of the same reference math in the low precision + a floor) and test_backward.py
(fp32 inputs: every gradient tight against autograd through the fp32 reference; fp16: the rule).
CPU CI runs the kernels in Triton's interpreter (TRITON_INTERPRET=1, set by conftest).
"""

from __future__ import annotations

import os

import pytest
import torch

import ahn_ops
from ahn_ops.ops.ahn_attention import reference as ref

from ..utils import check_bf16_grad_rule, check_within_2x, kernel_grads, make_inputs, ref_grads

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or TRITON_INTERPRET=1")
_check = check_within_2x


def _prefill():
    from ahn_ops.ops.ahn_attention import prefill
    return prefill


KIND = "mamba2"

FWD_CASES = [
    # T, W, S, G, D, dtype
    pytest.param(1, 5, 0, 1, 64, torch.bfloat16, id="T1-W5-S0-G1"),
    pytest.param(63, 200, 3, 4, 64, torch.bfloat16, id="T63-W200-S3-G4-WgeT"),
    pytest.param(100, 33, 4, 4, 64, torch.bfloat16, id="T100-W33-S4-G4"),
    pytest.param(100, 17, 0, 1, 64, torch.float16, id="T100-W17-S0-G1-fp16"),
    pytest.param(70, 20, 2, 2, 128, torch.float16, id="T70-W20-S2-G2-D128-fp16"),
]


@pytest.mark.parametrize("T,W,S,G,D,dtype", FWD_CASES)
def test_mamba2_prefill_matches_reference(T, W, S, G, D, dtype):
    HKV = 2 if G < 4 else 1
    H = HKV * G
    args = make_inputs(KIND, 1, T, H, HKV, D, dtype, device=DEV, seed=T * 7 + W)
    out = ahn_ops.ahn_attention(*args, window=W, sinks=S, kind=KIND, backend="kernel")
    r = ref.ahn_attention_ref(*args, W, S, KIND)
    lp = ref.ahn_attention_ref(*args, W, S, KIND, dtype=dtype)
    _check(f"mamba2-T{T}-W{W}-S{S}-G{G}-D{D}", out, r, lp)


@pytest.mark.usefixtures("fwd_rows")
def test_mamba2_prefill_varlen():
    lens, W, S, H, HKV, D = [37, 1, 100, 129], 29, 3, 4, 1, 64
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    args = make_inputs(KIND, 1, sum(lens), H, HKV, D, torch.bfloat16, device=DEV, seed=5)
    out = ahn_ops.ahn_attention(*args, window=W, sinks=S, kind=KIND, cu_seqlens=cu, backend="kernel")
    r = ref.ahn_attention_ref(*args, W, S, KIND, cu_seqlens=cu)
    lp = ref.ahn_attention_ref(*args, W, S, KIND, cu_seqlens=cu, dtype=torch.bfloat16)
    _check("mamba2-varlen", out, r, lp)


@pytest.mark.usefixtures("fwd_rows")
def test_mamba2_initial_and_final_state():
    # initial state = the state before token S; final state holds tokens S .. T-1-W (B = 2)
    B, T, W, S, H, HKV, D = 2, 90, 21, 5, 4, 2, 64
    q, k, v, a, b, z, A_log, dt_bias, nw, ow = make_inputs(KIND, B, T, H, HKV, D, torch.bfloat16, device=DEV,
                                                           seed=3)
    h0 = torch.randn(B, H, D, D, device=DEV) * 0.1
    _prefill()
    out, ht, _ = torch.ops.ahn.prefill_fwd(q, k, v, a, b, z, A_log, dt_bias, nw, ow, W, S, KIND, None, h0, True)

    def full(dtype):
        o_win = ref.window_attention_ref(q, k, v, W, S, dtype=dtype)
        g, w = ref.memory_gates_ref(a, b, A_log, dt_bias, KIND, dtype)
        m, st = ref.memory_readout_ref(q, k, v, g, w, W, S, KIND, initial_state=h0, dtype=dtype)
        return o_win + ref.epilogue_ref(m, z, nw, ow, KIND), st

    r, st = full(torch.float32)
    lp, st_lp = full(torch.bfloat16)
    _check("mamba2-h0-out", out, r, lp)
    _check("mamba2-h0-final-state", ht, st, st_lp)


def test_mamba2_opcheck():
    T, W, S, H, HKV, D = 40, 9, 2, 2, 1, 64
    _prefill()
    args = make_inputs(KIND, 1, T, H, HKV, D, torch.float16, device=DEV, seed=7)
    leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in args]
    torch.library.opcheck(torch.ops.ahn.prefill_fwd.default, (*leaves, W, S, KIND, None, None, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------
# fp32 gradients of every input: test_backward.py::test_grads_fp32_exact (mamba2 cases)


def test_mamba2_grads_fp16_rule():
    # strong decays (A_log up to log 16) and H = 4 heads sharing the norm
    T, W, S, G, HKV, D = 130, 20, 3, 2, 2, 64
    dt = torch.bfloat16 if DEV == "cuda" else torch.float16
    inp = make_inputs(KIND, 1, T, HKV * G, HKV, D, dt, device=DEV, seed=3)
    dout = torch.randn(1, T, HKV * G, D, device=DEV)
    gk = kernel_grads(inp, dout, W, S, KIND, None)
    gr = ref_grads([None if x is None else x.float() for x in inp], dout, W, S, KIND, None, torch.float32)
    low = [None if x is None else x.to(torch.bfloat16) if x.dtype == dt else x for x in inp]
    gt = ref_grads(low, dout, W, S, KIND, None, torch.bfloat16)
    check_bf16_grad_rule(gk, gr, gt)


# the initial-state gradient of mamba2 is checked in test_backward.py::test_initial_state_grad
