"""Triton jit helpers shared by the fused AHN prefill's forward and backward kernels.

The forward's kernels (``ahn_attention/prefill_kernels.py``) and the backward's
(``ahn_attention/backward_attn.py``, ``ahn_attention/backward_mem.py``) read the same launch tables
and normalise q / k and load the gates the same way: these helpers are that shared code.

- :func:`chunk_at`: a work item of a ``[n, 2]`` (sequence, block) table and its sequence's row of the
  ``[N, 8]`` metadata (``ahn_attention/tables.py``).
- :func:`inv_norm` / :func:`norm_rows`: the memory's q / k row normalisation (GDN / DN l2norm, Mamba2
  F.normalize), fp32.
- :func:`load_gates`: ``(g, beta)`` of a chunk's tokens from their raw projections.
- :func:`band_blocks`: the partition of a query block's window band into masked and unmasked key blocks.

The kernels import them under their former private names (``chunk_at as _chunk_at``, ...), so that
their code is the same text as before these helpers moved here.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["chunk_at", "inv_norm", "norm_rows", "load_gates"]


@triton.jit
def chunk_at(chunks, seq, i_c):
    """Work item ``i_c`` of a ``[n, 2]`` (sequence, block) table -> its sequence ``i_n``, block ``i_b``
    within it, the sequence's first row ``bos`` (int64) and length ``T`` (from the ``[N, 8]`` ``seq``)."""
    i_n = tl.load(chunks + i_c * 2)
    i_b = tl.load(chunks + i_c * 2 + 1)
    bos = tl.load(seq + i_n * 8).to(tl.int64)
    T = tl.load(seq + i_n * 8 + 1)
    return i_n, i_b, bos, T


@triton.jit
def band_blocks(t_lo, t_hi, lo, W, BN: tl.constexpr):
    """Key blocks ``j0 = lo + i BN`` of the window band of query rows ``[t_lo, t_hi]``, split as
    ``[lo, j1)`` masked lower edge, ``[j1, j2)`` interior that needs no mask (``j0 >= t_hi - W + 1``: in
    every row's window; ``j0 + BN - 1 <= t_lo``: causal for every row), ``[j2, t_hi + 1)`` masked diagonal.
    The interior assumes every row of the block is a real row: a caller whose partial blocks must not
    see unmasked keys (the backward's dq) moves ``j2`` back to ``j1`` for them."""
    j1 = tl.minimum(lo + tl.cdiv(tl.maximum(t_hi - W + 1 - lo, 0), BN) * BN, t_hi + 1)
    j2 = j1 + tl.maximum(tl.cdiv(t_lo - BN + 2 - j1, BN), 0) * BN
    return j1, j2


@triton.jit
def inv_norm(b_x, MAMBA2: tl.constexpr):
    # [BT] row scale of the memory's q/k normalisation (fp32): GDN/DN l2norm 1 / sqrt(sum x^2 + 1e-6),
    # Mamba2 F.normalize 1 / max(||x||, 1e-12)
    if MAMBA2:
        b_r = 1. / tl.maximum(tl.sqrt(tl.sum(b_x * b_x, 1)), 1e-12)
    else:
        b_r = tl.rsqrt(tl.sum(b_x * b_x, 1) + 1e-6)
    return b_r


# norm_rows calls inv_norm by its former private name (its code is the same text as before the move)
_inv_norm = inv_norm


@triton.jit
def norm_rows(b_x, MAMBA2: tl.constexpr):
    return b_x * _inv_norm(b_x, MAMBA2)[:, None]


@triton.jit
def load_gates(a, b, A_log, dt_bias, o_row, m_act, i_h, RS: tl.constexpr, GATES: tl.constexpr):
    """(g, beta) [BT] fp32 of the tokens at rows ``o_row`` of the raw projections ``a``, ``b`` (``RS``
    elements per row: ``H`` for ``[tokens, H]`` inputs, ``2 H`` for the cache path's ``[rows, 2, H]``
    gate inputs with ``b`` one row half further); 0 where ``m_act`` is off.

    GATES: 0 = GDN a, b; 1 = DN b; 3 = Mamba2 a = dt_proj(x): beta = dt = softplus(a + dt_bias),
    g = -exp(A_log) dt.
    """
    if GATES == 3:
        b_x = tl.load(a + o_row * RS + i_h, mask=m_act, other=0.).to(tl.float32) + tl.load(dt_bias + i_h)
        b_sp = tl.where(b_x > 20., b_x, tl.log(1. + tl.exp(tl.minimum(b_x, 20.))))
        b_beta = tl.where(m_act, b_sp, 0.)
        b_g = -tl.exp(tl.load(A_log + i_h).to(tl.float32)) * b_beta
    else:
        b_b = tl.load(b + o_row * RS + i_h, mask=m_act, other=0.).to(tl.float32)
        b_beta = tl.where(m_act, tl.sigmoid(b_b), 0.)
        if GATES == 0:
            b_a = tl.load(a + o_row * RS + i_h, mask=m_act, other=0.).to(tl.float32)
            b_x = b_a + tl.load(dt_bias + i_h).to(tl.float32)
            # softplus with torch's threshold 20
            b_sp = tl.where(b_x > 20., b_x, tl.log(1. + tl.exp(tl.minimum(b_x, 20.))))
            b_g = tl.where(m_act, -tl.exp(tl.load(A_log + i_h).to(tl.float32)) * b_sp, 0.)
        else:
            b_g = tl.zeros_like(b_beta)
    return b_g, b_beta
