"""Small Triton building blocks shared by the kernels."""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton's CPU interpreter (3.8) multiplies bf16 operands of tl.dot as their int16 bit
# patterns; under TRITON_INTERPRET=1 we upcast dot operands to fp32 (products of bf16/fp16
# values are exact in fp32, so this is the same math the GPU does with fp32 accumulation).
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def dot(a, b):
    """``tl.dot(a, b)`` with fp32 accumulation; interpreter-safe for bf16 operands."""
    if INTERPRET:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def dot_inv(a, b, DT: tl.constexpr):
    """fp32 x fp32 product of the triangular-inverse merges, for kernels whose inputs are ``DT``.

    The inverse is rounded to ``DT`` before use, so for bf16 (8-bit mantissa) one tf32 pass (10 bits) is
    below that rounding and for fp16 (10 bits) of its order. With bf16 inputs three passes ("tf32x3",
    near-fp32) gave the same outputs and gradients within the 2x rule and cost the prep pass 0.17 ms more
    at T=32k, H=16 on an H200 (benchmarks/NOTES_prefill.md; fp16 not timed there).
    fp32 inputs keep the three passes. The interpreter multiplies in fp32.
    """
    if INTERPRET:
        c = tl.dot(a, b)
    elif DT == tl.float32:
        c = tl.dot(a, b, input_precision="tf32x3")
    else:
        c = tl.dot(a, b, input_precision="tf32")
    return c


@triton.jit
def tri_inverse(b_L, BT: tl.constexpr, DT: tl.constexpr):
    """``(I + L)^-1`` [BT, BT] fp32 of a strictly lower triangular fp32 ``L`` (BT a multiple of 16), for a
    kernel whose inputs are ``DT`` (the merge products' precision, ``dot_inv``).

    1. The BT/16 diagonal 16x16 blocks of ``L``, held as one [BT/16, 16, 16] tensor, are inverted
       by forward substitution, all blocks at once: step ``i`` updates row ``i`` of every block
       from the finished rows above it (``x_i = a_i + a_i X`` with ``a_i = -L_i``), a masked row
       sum and a broadcast product over 16x16 values per block (no matrix product, no layout
       round trip: ~1k element operations per step instead of a masked BT^3 product).
    2. ``I + L = (I + Ld)(I + M)`` with ``Xd = (I + Ld)^-1`` block diagonal and
       ``M = Xd Lo`` strictly block-lower (``Lo``: the part of ``L`` outside the diagonal
       blocks), so for BT = 64 ``M^4 = 0`` and ``(I + L)^-1 = (I - M)(I + M^2) Xd``: four
       tensor-core products (``dot_inv``: one tf32 pass for bf16 / fp16 inputs, three for fp32).
    The prep pass (prefill) calls this; the backward's re-run of the prep pass stores the result
    (input dtype) for backward_mem._mem_bwd_wy_kernel, so both use the same X bit for bit.
    """
    NB: tl.constexpr = BT // 16
    o_t = tl.arange(0, BT)
    o_b = tl.arange(0, NB)
    o_r = tl.arange(0, 16)
    m_diag = (o_b[:, None, None, None] == o_b[None, None, :, None])  # [NB, 1, NB, 1]
    b_X0 = -tl.sum(tl.where(m_diag, tl.reshape(b_L, (NB, 16, NB, 16)), 0.), 2)  # [NB, 16, 16] = -Ld
    b_X = b_X0
    # step i's row a_i is a row of -Ld, not of the rows the steps make: each step takes the next row out of
    # b_X0 and broadcasts it over the columns (a row sum and a layout change) beside its own product, so the
    # chain from one step to the next is the product and its sum alone
    b_a = tl.sum(tl.where((o_r == 1)[None, :, None], b_X0, 0.), 1)  # [NB, 16]: row 1 (zero from column 1 on)
    b_ab = tl.broadcast_to(b_a[:, :, None], (NB, 16, 16))
    for i in range(1, 16):
        m_r = (o_r == i)[None, :, None]  # [1, 16, 1]
        b_an = tl.sum(tl.where((o_r == i + 1)[None, :, None], b_X0, 0.), 1)  # row i + 1 (zeros past 15)
        b_x = b_a + tl.sum(b_ab * b_X, 1)  # rows j < i are final; a_j = 0 for j >= i
        b_X = tl.where(m_r, b_x[:, None, :], b_X)
        b_a = b_an
        b_ab = tl.broadcast_to(b_an[:, :, None], (NB, 16, 16))
    b_eye = (o_t[:, None] == o_t[None, :]).to(tl.float32)
    b_Xd = tl.reshape(tl.where(m_diag, b_X[:, :, None, :], 0.), (BT, BT)) + b_eye  # block diagonal
    m_blk = (o_t[:, None] // 16) == (o_t[None, :] // 16)
    b_M = dot_inv(b_Xd, tl.where(m_blk, 0., b_L), DT)
    return dot_inv(dot_inv(b_eye - b_M, b_eye + dot_inv(b_M, b_M, DT), DT), b_Xd, DT)
