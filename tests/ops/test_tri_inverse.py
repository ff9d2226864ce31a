"""``tl_utils.tri_inverse``: (I + L)^-1 of the WY/UT form against torch in float64."""

import os

import pytest
import torch
import triton
import triton.language as tl

from ahn_ops.ops.common.tl_utils import tri_inverse

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1",
                                reason="needs CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _inverse_kernel(L, X, BT: tl.constexpr, BF16: tl.constexpr):
    # BF16: the merge products of a bf16 kernel (one tf32 pass on the GPU); else those of an fp32 one
    i = tl.program_id(0)
    o = tl.arange(0, BT)
    p = i * BT * BT + o[:, None] * BT + o[None, :]
    if BF16:
        b_X = tri_inverse(tl.load(L + p), BT, tl.bfloat16)
    else:
        b_X = tri_inverse(tl.load(L + p), BT, tl.float32)
    tl.store(X + p, b_X)


def _wy_L(n, BT, D, decay, seed):
    # L = tril(diag(beta) kn kn^T exp(gc_i - gc_j), -1): unit keys, beta in (0, 1), cumulative log-decay
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, BT, D, generator=g, dtype=torch.float64)
    k[:, 1:] += 2 * k[:, :1]  # correlated keys: larger off-diagonal entries
    kn = k / k.norm(dim=-1, keepdim=True)
    beta = torch.rand(n, BT, generator=g, dtype=torch.float64)
    gc = (-decay * torch.rand(n, BT, generator=g, dtype=torch.float64)).cumsum(-1)
    E = torch.exp(gc[:, :, None] - gc[:, None, :])
    return torch.tril(beta[:, :, None] * (kn @ kn.transpose(1, 2)) * E, -1)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("decay", [0.0, 0.3, 4.0])
def test_tri_inverse_matches_torch(decay, bf16):
    n, BT = (64 if DEV == "cuda" else 3), 64
    L = _wy_L(n, BT, 128, decay, seed=int(decay * 10))
    ref = torch.linalg.inv(torch.eye(BT, dtype=torch.float64) + L)
    X = torch.full((n, BT, BT), float("nan"), device=DEV)
    _inverse_kernel[(n,)](L.float().to(DEV).contiguous(), X, BT=BT, BF16=bf16)
    X = X.double().cpu()
    err = ((X - ref).norm() / ref.norm()).item()
    # the interpreter multiplies in fp32. On the GPU an fp32 kernel merges in tf32x3 (near-fp32) and a bf16
    # one in one tf32 pass (tl_utils.dot_inv), whose error must stay below the rounding of X to bf16 that
    # such a kernel applies before using it (these 64 blocks on the H200: 6.6e-4 vs 8.6e-4 at
    # decay 0, 2.1e-4 vs 7.3e-4 at 0.3, 6.9e-5 vs 2.9e-4 at 4)
    bf16_rounding = ((ref.to(torch.bfloat16).double() - ref).norm() / ref.norm()).item()
    tol = bf16_rounding if (bf16 and DEV == "cuda") else 1e-5
    assert torch.isfinite(X).all() and err < tol, err
    # exactly lower triangular with a unit diagonal
    assert torch.equal(torch.triu(X, 1), torch.zeros_like(X))
    assert torch.allclose(torch.diagonal(X, dim1=1, dim2=2), torch.ones(n, BT, dtype=torch.float64), atol=1e-6)
