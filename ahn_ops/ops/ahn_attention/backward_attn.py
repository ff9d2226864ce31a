"""Backward of the sliding-window attention with sinks (flash-attention-2 style), Triton.

Three launches over query/key blocks of BT = 64 rows of one sequence:

1. ``_attn_lse_kernel``  grid (H, blocks): recompute the window attention of a query block
   (online softmax) and keep only ``lse`` (log2 domain) and ``delta = rowsum(dO * o_win)``.
   The forward op returns ``o_win + y`` and no lse, so this pass costs one attention forward
   (QK^T and PV); it keeps backward.py independent of what the forward saves.
2. ``_attn_dq_kernel``   grid (H, blocks): ``dq = dq_mem + D^-0.5 * sum_j dS k`` over the same
   key blocks (sink blocks ``j < S`` left of the band, then the band ``[t_lo - W + 1, t_hi]``).
3. ``_attn_dkdv_kernel`` grid (HKV, blocks): for a key block, loop over the G query heads of
   the kv group and over the query blocks that see it (``[j0, j0 + BT - 1 + W - 1]``, or to
   the end of the sequence for a block holding sinks); K/V are never repeated to H heads.
   Adds the memory branch's fp32 partial dk/dv (``dk_acc``, ``dv_acc``) and writes once.

``W`` and ``S`` are run-time arguments (``do_not_specialize``): training samples a new window
and sink count per step, and a recompile per value would cost seconds each.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _allowed(t_pos, o_s, m_i, T, W, S):
    # [BT, BN] key j visible to query t: j <= t and (t - j < W or j < S), both inside the sequence
    return ((o_s[None, :] <= t_pos[:, None]) & ((t_pos[:, None] - o_s[None, :] < W) | (o_s[None, :] < S))
            & m_i[:, None] & (o_s[None, :] < T))


@triton.jit(do_not_specialize=["W", "S"])
def _attn_lse_kernel(
    # pointers
    q, k, v, do, seq, chunks, lse, delta,
    # sizes
    W, S, qk_scale,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    # meta
    BT: tl.constexpr, BN: tl.constexpr,
):
    i_h, i_c = tl.program_id(0), tl.program_id(1)
    G: tl.constexpr = H // HKV
    i_kv = i_h // G
    i_n = tl.load(chunks + i_c * 2)
    i_b = tl.load(chunks + i_c * 2 + 1)
    bos = tl.load(seq + i_n * 8).to(tl.int64)
    T = tl.load(seq + i_n * 8 + 1)

    o_t = tl.arange(0, BT)
    o_j = tl.arange(0, BN)
    o_d = tl.arange(0, D)
    t_pos = i_b * BT + o_t
    m_i = t_pos < T
    t_lo = i_b * BT
    t_hi = tl.minimum(t_lo + BT, T) - 1
    o_q = bos + t_pos
    b_q = tl.load(q + (o_q * H + i_h)[:, None] * D + o_d[None, :], mask=m_i[:, None], other=0.)  # [BT, D]
    b_qs = (b_q.to(tl.float32) * qk_scale).to(b_q.dtype)
    b_m = tl.full([BT], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BT], dtype=tl.float32)
    b_acc = tl.zeros([BT, D], dtype=tl.float32)
    # band start aligned down to BN; sink blocks strictly left of it, so no key is visited twice
    lo = (tl.maximum(t_lo - W + 1, 0) // BN) * BN
    for j0 in range(0, tl.minimum(S, lo), BN):
        o_s = j0 + o_j
        m_k = o_s < tl.minimum(S, lo)
        o_x = ((bos + tl.where(m_k, o_s, 0)) * HKV + i_kv)[:, None] * D + o_d[None, :]
        b_k = tl.load(k + o_x, mask=m_k[:, None], other=0.)  # [BN, D]
        b_v = tl.load(v + o_x, mask=m_k[:, None], other=0.)  # [BN, D]
        b_s = tl.dot(b_qs, tl.trans(b_k))  # [BT, BN]
        b_s = tl.where(_allowed(t_pos, o_s, m_i, T, W, S) & m_k[None, :], b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_mn_s = tl.where(b_mn == float("-inf"), 0., b_mn)
        b_p = tl.math.exp2(b_s - b_mn_s[:, None])
        b_al = tl.math.exp2(b_m - b_mn_s)
        b_l = b_l * b_al + tl.sum(b_p, 1)
        b_acc = b_acc * b_al[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
        b_m = b_mn
    for j0 in range(lo, t_hi + 1, BN):
        o_s = j0 + o_j
        m_k = o_s <= t_hi
        o_x = ((bos + tl.where(m_k, o_s, 0)) * HKV + i_kv)[:, None] * D + o_d[None, :]
        b_k = tl.load(k + o_x, mask=m_k[:, None], other=0.)  # [BN, D]
        b_v = tl.load(v + o_x, mask=m_k[:, None], other=0.)  # [BN, D]
        b_s = tl.dot(b_qs, tl.trans(b_k))  # [BT, BN]
        b_s = tl.where(_allowed(t_pos, o_s, m_i, T, W, S), b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_mn_s = tl.where(b_mn == float("-inf"), 0., b_mn)
        b_p = tl.math.exp2(b_s - b_mn_s[:, None])
        b_al = tl.math.exp2(b_m - b_mn_s)
        b_l = b_l * b_al + tl.sum(b_p, 1)
        b_acc = b_acc * b_al[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
        b_m = b_mn
    # every query sees itself (W >= 1), so l > 0 on valid rows
    b_l = tl.where(m_i, b_l, 1.)
    b_o = b_acc / b_l[:, None]
    b_do = tl.load(do + (o_q * H + i_h)[:, None] * D + o_d[None, :], mask=m_i[:, None], other=0.).to(tl.float32)
    # delta from o rounded to the input dtype, as flash-attention uses the stored O
    b_delta = tl.sum(b_o.to(b_q.dtype).to(tl.float32) * b_do, 1)
    tl.store(lse + o_q * H + i_h, tl.where(m_i, b_m, 0.) + tl.log2(b_l), mask=m_i)
    tl.store(delta + o_q * H + i_h, b_delta, mask=m_i)


@triton.jit(do_not_specialize=["W", "S"])
def _attn_dq_kernel(
    # pointers
    q, k, v, do, seq, chunks, lse, delta, dq_acc, dq,
    # sizes
    W, S, qk_scale, sm_scale,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    # meta
    BT: tl.constexpr, BN: tl.constexpr,
):
    i_h, i_c = tl.program_id(0), tl.program_id(1)
    G: tl.constexpr = H // HKV
    i_kv = i_h // G
    i_n = tl.load(chunks + i_c * 2)
    i_b = tl.load(chunks + i_c * 2 + 1)
    bos = tl.load(seq + i_n * 8).to(tl.int64)
    T = tl.load(seq + i_n * 8 + 1)

    o_t = tl.arange(0, BT)
    o_j = tl.arange(0, BN)
    o_d = tl.arange(0, D)
    t_pos = i_b * BT + o_t
    m_i = t_pos < T
    t_lo = i_b * BT
    t_hi = tl.minimum(t_lo + BT, T) - 1
    o_q = bos + t_pos
    p_row = (o_q * H + i_h)[:, None] * D + o_d[None, :]
    b_q = tl.load(q + p_row, mask=m_i[:, None], other=0.)  # [BT, D]
    b_qs = (b_q.to(tl.float32) * qk_scale).to(b_q.dtype)
    b_do = tl.load(do + p_row, mask=m_i[:, None], other=0.)  # [BT, D]
    b_lse = tl.load(lse + o_q * H + i_h, mask=m_i, other=0.)  # [BT]
    b_dl = tl.load(delta + o_q * H + i_h, mask=m_i, other=0.)  # [BT]
    b_dq = tl.zeros([BT, D], dtype=tl.float32)
    lo = (tl.maximum(t_lo - W + 1, 0) // BN) * BN
    n_sink = tl.minimum(S, lo)
    for j0 in range(0, n_sink, BN):
        o_s = j0 + o_j
        m_k = o_s < n_sink
        o_x = ((bos + tl.where(m_k, o_s, 0)) * HKV + i_kv)[:, None] * D + o_d[None, :]
        b_k = tl.load(k + o_x, mask=m_k[:, None], other=0.)  # [BN, D]
        b_v = tl.load(v + o_x, mask=m_k[:, None], other=0.)  # [BN, D]
        b_s = tl.dot(b_qs, tl.trans(b_k))  # [BT, BN]
        b_p = tl.where(_allowed(t_pos, o_s, m_i, T, W, S) & m_k[None, :], tl.math.exp2(b_s - b_lse[:, None]), 0.)
        b_dp = tl.dot(b_do, tl.trans(b_v))  # [BT, BN]
        b_ds = b_p * (b_dp - b_dl[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k)  # [BT, D]
    for j0 in range(lo, t_hi + 1, BN):
        o_s = j0 + o_j
        m_k = o_s <= t_hi
        o_x = ((bos + tl.where(m_k, o_s, 0)) * HKV + i_kv)[:, None] * D + o_d[None, :]
        b_k = tl.load(k + o_x, mask=m_k[:, None], other=0.)  # [BN, D]
        b_v = tl.load(v + o_x, mask=m_k[:, None], other=0.)  # [BN, D]
        b_s = tl.dot(b_qs, tl.trans(b_k))  # [BT, BN]
        b_p = tl.where(_allowed(t_pos, o_s, m_i, T, W, S), tl.math.exp2(b_s - b_lse[:, None]), 0.)
        b_dp = tl.dot(b_do, tl.trans(b_v))  # [BT, BN]
        b_ds = b_p * (b_dp - b_dl[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k)  # [BT, D]
    b_dq = b_dq * sm_scale + tl.load(dq_acc + p_row, mask=m_i[:, None], other=0.)
    tl.store(dq + p_row, b_dq.to(dq.dtype.element_ty), mask=m_i[:, None])


@triton.jit(do_not_specialize=["W", "S"])
def _attn_dkdv_kernel(
    # pointers
    q, k, v, do, seq, chunks, lse, delta, dk_acc, dv_acc, dk, dv,
    # sizes
    W, S, qk_scale, sm_scale,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    # meta
    BT: tl.constexpr, BM: tl.constexpr,
):
    i_kv, i_c = tl.program_id(0), tl.program_id(1)
    G: tl.constexpr = H // HKV
    i_n = tl.load(chunks + i_c * 2)
    i_b = tl.load(chunks + i_c * 2 + 1)
    bos = tl.load(seq + i_n * 8).to(tl.int64)
    T = tl.load(seq + i_n * 8 + 1)

    o_s = i_b * BT + tl.arange(0, BT)  # key positions
    m_k = o_s < T
    o_m = tl.arange(0, BM)
    o_d = tl.arange(0, D)
    p_kv = ((bos + o_s) * HKV + i_kv)[:, None] * D + o_d[None, :]
    b_k = tl.load(k + p_kv, mask=m_k[:, None], other=0.)  # [BT, D]
    b_v = tl.load(v + p_kv, mask=m_k[:, None], other=0.)  # [BT, D]
    b_ks = (b_k.to(tl.float32) * qk_scale).to(b_k.dtype)
    b_dk = tl.zeros([BT, D], dtype=tl.float32)
    b_dv = tl.zeros([BT, D], dtype=tl.float32)
    j0 = i_b * BT
    j_hi = tl.minimum(j0 + BT, T) - 1
    # queries that see some key of the block: all later ones if it holds a sink, else the band
    t_end = tl.where(j0 < S, T, tl.minimum(T, j_hi + W))
    for g in range(G):
        i_h = i_kv * G + g
        for t0 in range(j0, t_end, BM):
            t_pos = t0 + o_m
            m_i = t_pos < t_end
            o_q = bos + tl.where(m_i, t_pos, 0)
            p_row = (o_q * H + i_h)[:, None] * D + o_d[None, :]
            b_q = tl.load(q + p_row, mask=m_i[:, None], other=0.)  # [BM, D]
            b_do = tl.load(do + p_row, mask=m_i[:, None], other=0.)  # [BM, D]
            b_lse = tl.load(lse + o_q * H + i_h, mask=m_i, other=0.)  # [BM]
            b_dl = tl.load(delta + o_q * H + i_h, mask=m_i, other=0.)  # [BM]
            b_st = tl.dot(b_ks, tl.trans(b_q))  # [BT, BM]
            m_st = tl.trans(_allowed(t_pos, o_s, m_i, T, W, S))  # [BT, BM]
            b_pt = tl.where(m_st, tl.math.exp2(b_st - b_lse[None, :]), 0.)
            b_dv += tl.dot(b_pt.to(b_do.dtype), b_do)  # [BT, D]
            b_dpt = tl.dot(b_v, tl.trans(b_do))  # [BT, BM]
            b_dst = b_pt * (b_dpt - b_dl[None, :])
            b_dk += tl.dot(b_dst.to(b_q.dtype), b_q)  # [BT, D]
    b_dk = b_dk * sm_scale + tl.load(dk_acc + p_kv, mask=m_k[:, None], other=0.)
    b_dv = b_dv + tl.load(dv_acc + p_kv, mask=m_k[:, None], other=0.)
    tl.store(dk + p_kv, b_dk.to(dk.dtype.element_ty), mask=m_k[:, None])
    tl.store(dv + p_kv, b_dv.to(dv.dtype.element_ty), mask=m_k[:, None])
