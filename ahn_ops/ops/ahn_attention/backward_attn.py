"""Backward of the sliding-window attention with sinks (flash-attention-2 style), Triton.

Three launches over query/key blocks of BT = 64 rows of one sequence. They take the softmax
normaliser ``lse`` (log2 domain, fp32 ``[tokens, H]``) from the forward (``prefill_kernels._fwd_kernel``
stores it; the autograd saves it) and ``delta = rowsum(dO * o_win)`` from
``backward_mem._epi_bwd_kernel`` (``o_win = out - y_mem``). Until Round 3 (NOTES_backward.md) a
fourth launch re-ran the attention forward for these two: 2.5-3.5 ms of a ~32 ms backward at
T=32k on H100.

1. ``_attn_dq_kernel``   grid (H, blocks): ``dq = D^-0.5 * sum_j dS k + dq_mem`` over the same
   key blocks (sink blocks ``j < S`` left of the band, then the band ``[t_lo - W + 1, t_hi]``);
   ``dq_mem`` is the memory branch's gradient w.r.t. the normalised query, taken back through
   the l2norm (or F.normalize for mamba2) here, where q is loaded anyway.
2. ``_attn_dkdv_sink_kernel`` grid (items, HKV): the part of a sink key block's work that lies
   past its window band (queries ``t >= j_hi + W``: they see the block's keys only as sinks),
   cut into query ranges of ``QS`` tokens (a host-built table of (sequence, key block, t0, t1)).
   Partial dk/dv go into the fp32 accumulators with atomics. Before this split one program per
   sink key block walked all ``T x G`` query rows alone: 11.4 ms of a 37.6 ms backward at
   T=32k, S=128 (2.5 ms with S=0), H100.
3. ``_attn_dkdv_kernel`` grid (HKV, blocks): for a key block, loop over the G query heads of
   the kv group and over the query blocks of its band ``[j0, j_hi + W - 1]``; K/V are never
   repeated to H heads. Adds the fp32 partials (sink ranges; the memory branch's gradient w.r.t.
   the normalised key, summed over the G heads, taken back through the key's norm here) and
   writes once.

Masks are applied on edge blocks only (the diagonal, the window's far edge, the sequence end);
interior blocks of the band skip the [BT, BN] index arithmetic and the masked loads.

``W``, ``S`` and ``WB`` (the cuDNN band's window) are run-time arguments (``do_not_specialize``): training
samples a new window and sink count per step, and a recompile per value would cost seconds each.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..common.jit_helpers import band_blocks as _band_blocks
from ..common.jit_helpers import chunk_at as _chunk_at
from ..common.jit_helpers import inv_norm as _inv_norm


@triton.jit
def _allowed(t_pos, o_s, m_i, T, W, S):
    # [BT, BN] key j visible to query t: j <= t and (t - j < W or j < S), both inside the sequence
    return ((o_s[None, :] <= t_pos[:, None]) & ((t_pos[:, None] - o_s[None, :] < W) | (o_s[None, :] < S))
            & m_i[:, None] & (o_s[None, :] < T))


@triton.jit
def _dq_block(b_q, b_do, b_k, b_v, m_s, b_lse, b_dl, b_dq, qk_scale, MASKED: tl.constexpr):
    b_s = tl.dot(b_q, tl.trans(b_k)) * qk_scale  # [BT, BN]
    b_p = tl.math.exp2(b_s - b_lse[:, None])
    if MASKED:
        b_p = tl.where(m_s, b_p, 0.)
    b_dp = tl.dot(b_do, tl.trans(b_v))  # [BT, BN]
    b_ds = b_p * (b_dp - b_dl[:, None])
    b_dq += tl.dot(b_ds.to(b_k.dtype), b_k)  # [BT, D]
    return b_dq


@triton.jit(do_not_specialize=["W", "S", "WB"])
def _attn_dq_kernel(
    # pointers
    q, k, v, do, seq, chunks, lse, delta, dq_acc, dq, dqb,
    # sizes
    W, S, qk_scale, sm_scale, mem_scale, WB,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    # meta
    BT: tl.constexpr, BN: tl.constexpr, MAMBA2: tl.constexpr, BAND: tl.constexpr = True,
):
    # BAND False: the band t - WB < j <= t's dq came from outside (``dqb``, rows as q: band_cudnn.band_bwd,
    # WB <= W), so only the sinks that left the window of some row of the block and the window's far part
    # t - W < j <= t - WB are walked here
    i_h, i_c = tl.program_id(0), tl.program_id(1)
    G: tl.constexpr = H // HKV
    i_kv = i_h // G
    i_n, i_b, bos, T = _chunk_at(chunks, seq, i_c)

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
    b_do = tl.load(do + p_row, mask=m_i[:, None], other=0.)  # [BT, D]
    b_lse = tl.load(lse + o_q * H + i_h, mask=m_i, other=0.)  # [BT]
    b_dl = tl.load(delta + o_q * H + i_h, mask=m_i, other=0.)  # [BT]
    # the memory's dq_acc is d/d(qn), qn = l2norm(q) mem_scale: x r -> r (dy - y (y . dy)). Taken
    # back here, before the loop (its temporaries die before the accumulator loop starts), and
    # carried in the accumulator divided by sm_scale (the loop's sum is scaled once at the end)
    b_dm = tl.load(dq_acc + p_row, mask=m_i[:, None], other=0.)  # [BT, D]
    b_qf = b_q.to(tl.float32)
    b_rq = _inv_norm(b_qf, MAMBA2)  # [BT]
    b_qy = b_qf * b_rq[:, None]
    b_dq = (b_rq * (mem_scale / sm_scale))[:, None] * (b_dm - b_qy * tl.sum(b_qy * b_dm, 1)[:, None])
    lo = (tl.maximum(t_lo - W + 1, 0) // BN) * BN
    if BAND:
        n_sink = tl.minimum(S, lo)
    else:
        n_sink = 0
        n_out = tl.minimum(S, t_hi - W + 1)  # sinks j <= t - W for some row t of the block
        for j0 in range(0, n_out, BN):
            o_s = j0 + o_j
            m_k = o_s < n_out
            o_x = ((bos + tl.where(m_k, o_s, 0)) * HKV + i_kv)[:, None] * D + o_d[None, :]
            b_k = tl.load(k + o_x, mask=m_k[:, None], other=0.)  # [BN, D]
            b_v = tl.load(v + o_x, mask=m_k[:, None], other=0.)  # [BN, D]
            m_s = (o_s[None, :] <= t_pos[:, None] - W) & m_k[None, :] & m_i[:, None]
            b_dq = _dq_block(b_q, b_do, b_k, b_v, m_s, b_lse, b_dl, b_dq, qk_scale, True)
        for j0 in range(tl.maximum(t_lo - W + 1, 0), tl.where(WB < W, t_hi - WB + 1, 0), BN):
            o_s = j0 + o_j
            m_k = o_s <= t_hi - WB
            o_x = ((bos + tl.where(m_k, o_s, 0)) * HKV + i_kv)[:, None] * D + o_d[None, :]
            b_k = tl.load(k + o_x, mask=m_k[:, None], other=0.)  # [BN, D]
            b_v = tl.load(v + o_x, mask=m_k[:, None], other=0.)  # [BN, D]
            m_s = ((o_s[None, :] <= t_pos[:, None] - WB) & (o_s[None, :] > t_pos[:, None] - W) & m_k[None, :]
                   & m_i[:, None])
            b_dq = _dq_block(b_q, b_do, b_k, b_v, m_s, b_lse, b_dl, b_dq, qk_scale, True)
    for j0 in range(0, n_sink, BN):
        o_s = j0 + o_j
        m_k = o_s < n_sink
        o_x = ((bos + tl.where(m_k, o_s, 0)) * HKV + i_kv)[:, None] * D + o_d[None, :]
        b_k = tl.load(k + o_x, mask=m_k[:, None], other=0.)  # [BN, D]
        b_v = tl.load(v + o_x, mask=m_k[:, None], other=0.)  # [BN, D]
        m_s = _allowed(t_pos, o_s, m_i, T, W, S) & m_k[None, :]
        b_dq = _dq_block(b_q, b_do, b_k, b_v, m_s, b_lse, b_dl, b_dq, qk_scale, True)
    jA, jB = _band_blocks(t_lo, t_hi, lo, W, BN)
    jB = tl.where(t_lo + BT <= T, jB, jA)  # a partial query block: every key block masked
    if not BAND:  # no band loops below
        lo = t_hi + 1
        jA = lo
        jB = lo
    for j0 in range(lo, jA, BN):
        o_s = j0 + o_j
        m_k = o_s <= t_hi
        o_x = ((bos + tl.where(m_k, o_s, 0)) * HKV + i_kv)[:, None] * D + o_d[None, :]
        b_k = tl.load(k + o_x, mask=m_k[:, None], other=0.)  # [BN, D]
        b_v = tl.load(v + o_x, mask=m_k[:, None], other=0.)  # [BN, D]
        b_dq = _dq_block(b_q, b_do, b_k, b_v, _allowed(t_pos, o_s, m_i, T, W, S), b_lse, b_dl, b_dq,
                         qk_scale, True)
    for j0 in range(jA, jB, BN):
        o_x = ((bos + j0 + o_j) * HKV + i_kv)[:, None] * D + o_d[None, :]
        b_k = tl.load(k + o_x)  # [BN, D]
        b_v = tl.load(v + o_x)  # [BN, D]
        b_dq = _dq_block(b_q, b_do, b_k, b_v, None, b_lse, b_dl, b_dq, qk_scale, False)
    for j0 in range(jB, t_hi + 1, BN):
        o_s = j0 + o_j
        m_k = o_s <= t_hi
        o_x = ((bos + tl.where(m_k, o_s, 0)) * HKV + i_kv)[:, None] * D + o_d[None, :]
        b_k = tl.load(k + o_x, mask=m_k[:, None], other=0.)  # [BN, D]
        b_v = tl.load(v + o_x, mask=m_k[:, None], other=0.)  # [BN, D]
        b_dq = _dq_block(b_q, b_do, b_k, b_v, _allowed(t_pos, o_s, m_i, T, W, S), b_lse, b_dl, b_dq,
                         qk_scale, True)
    b_dq = b_dq * sm_scale
    if not BAND:
        b_dq += tl.load(dqb + p_row, mask=m_i[:, None], other=0.).to(tl.float32)
    tl.store(dq + p_row, b_dq.to(dq.dtype.element_ty), mask=m_i[:, None])


@triton.jit
def _dkdv_block(b_k, b_v, b_dk, b_dv, q, do, lse, delta, bos, t0, t_end, o_s, o_m, o_d, i_h, T, W, S, qk_scale,
                H: tl.constexpr, D: tl.constexpr, MASK: tl.constexpr, WB=0):
    # one [BT keys] x [BM queries] step of the transposed flash-attention-2 dk/dv accumulation.
    # MASK 0: every pair visible (band interior, no mask, no masked loads); 1: causal/window/sink
    # mask; 2: sink-only range (t - j >= W for the whole block: a key is seen iff it is a sink);
    # 3: sink keys past the window, pair by pair (the band done elsewhere); 4: the window's far part
    # WB <= t - j < W, pair by pair (the band t - j < WB done elsewhere)
    t_pos = t0 + o_m
    if MASK == 0:
        o_q = bos + t_pos
        p_row = (o_q * H + i_h)[:, None] * D + o_d[None, :]
        b_q = tl.load(q + p_row)  # [BM, D]
        b_do = tl.load(do + p_row)  # [BM, D]
        b_lse = tl.load(lse + o_q * H + i_h)  # [BM]
        b_dl = tl.load(delta + o_q * H + i_h)  # [BM]
    else:
        m_i = t_pos < t_end
        o_q = bos + tl.where(m_i, t_pos, 0)
        p_row = (o_q * H + i_h)[:, None] * D + o_d[None, :]
        b_q = tl.load(q + p_row, mask=m_i[:, None], other=0.)  # [BM, D]
        b_do = tl.load(do + p_row, mask=m_i[:, None], other=0.)  # [BM, D]
        b_lse = tl.load(lse + o_q * H + i_h, mask=m_i, other=0.)  # [BM]
        b_dl = tl.load(delta + o_q * H + i_h, mask=m_i, other=0.)  # [BM]
    # scale in fp32 after the product, as the forward does (a pre-scaled bf16 k would round the
    # logits differently from the forward's lse they are normalised by)
    b_pt = tl.math.exp2(tl.dot(b_k, tl.trans(b_q)) * qk_scale - b_lse[None, :])  # [BT, BM]
    if MASK == 1:
        b_pt = tl.where(tl.trans(_allowed(t_pos, o_s, m_i, T, W, S)), b_pt, 0.)
    if MASK == 2:
        b_pt = tl.where((o_s < S)[:, None] & m_i[None, :], b_pt, 0.)
    if MASK == 3:  # sink keys and the queries they are out of the window of (t - j >= W)
        b_pt = tl.where((o_s < S)[:, None] & (t_pos[None, :] - o_s[:, None] >= W) & m_i[None, :], b_pt, 0.)
    if MASK == 4:
        b_pt = tl.where((t_pos[None, :] - o_s[:, None] >= WB) & (t_pos[None, :] - o_s[:, None] < W) &
                        (o_s < T)[:, None] & m_i[None, :], b_pt, 0.)
    b_dv += tl.dot(b_pt.to(b_do.dtype), b_do)  # [BT, D]
    b_dpt = tl.dot(b_v, tl.trans(b_do))  # [BT, BM]
    b_dst = b_pt * (b_dpt - b_dl[None, :])
    b_dk += tl.dot(b_dst.to(b_q.dtype), b_q)  # [BT, D]
    return b_dk, b_dv


@triton.jit(do_not_specialize=["W", "S"])
def _attn_dkdv_sink_kernel(
    # pointers
    q, k, v, do, seq, items, lse, delta, dk_acc, dv_acc,
    # sizes
    W, S, qk_scale, sm_scale,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    # meta
    BT: tl.constexpr, BM: tl.constexpr, BAND: tl.constexpr = True, DET: tl.constexpr = False,
):
    # items [n_items, 4] int32: (sequence, key block, first query, end query), t0 >= j_hi + W; without
    # BAND (the band's gradients come from outside) t0 >= j0 + W and the pairs are masked one by one.
    # DET (deterministic): each item stores its partials in its own slot of dk_acc / dv_acc
    # ([n_items, HKV, BT, D]); the host sums the slots of a key block in a fixed order (backward.py)
    i_it, i_kv = tl.program_id(0), tl.program_id(1)
    G: tl.constexpr = H // HKV
    i_n = tl.load(items + i_it * 4)
    i_b = tl.load(items + i_it * 4 + 1)
    q_lo = tl.load(items + i_it * 4 + 2)
    q_hi = tl.load(items + i_it * 4 + 3)
    bos = tl.load(seq + i_n * 8).to(tl.int64)
    T = tl.load(seq + i_n * 8 + 1)

    o_s = i_b * BT + tl.arange(0, BT)  # key positions
    m_k = (o_s < T) & (o_s < S)
    o_m = tl.arange(0, BM)
    o_d = tl.arange(0, D)
    p_kv = ((bos + tl.where(m_k, o_s, 0)) * HKV + i_kv)[:, None] * D + o_d[None, :]
    b_k = tl.load(k + p_kv, mask=m_k[:, None], other=0.)  # [BT, D]
    b_v = tl.load(v + p_kv, mask=m_k[:, None], other=0.)  # [BT, D]
    b_dk = tl.zeros([BT, D], dtype=tl.float32)
    b_dv = tl.zeros([BT, D], dtype=tl.float32)
    for g in range(G):
        i_h = i_kv * G + g
        for t0 in range(q_lo, q_hi, BM):
            b_dk, b_dv = _dkdv_block(b_k, b_v, b_dk, b_dv, q, do, lse, delta, bos, t0, q_hi, o_s, o_m, o_d, i_h,
                                     T, W, S, qk_scale, H, D, 2 if BAND else 3)
    if DET:
        p_slot = ((i_it.to(tl.int64) * HKV + i_kv) * BT + tl.arange(0, BT))[:, None] * D + o_d[None, :]
        tl.store(dk_acc + p_slot, b_dk * sm_scale)
        tl.store(dv_acc + p_slot, b_dv)
    else:
        tl.atomic_add(dk_acc + p_kv, b_dk * sm_scale, mask=m_k[:, None], sem="relaxed")
        tl.atomic_add(dv_acc + p_kv, b_dv, mask=m_k[:, None], sem="relaxed")


@triton.jit(do_not_specialize=["W", "S", "WB"])
def _attn_dkdv_kernel(
    # pointers
    q, k, v, do, seq, chunks, lse, delta, dk_acc, dkm_acc, dkw_acc, dv_acc, dk, dv, dkb, dvb,
    # sizes
    W, S, qk_scale, sm_scale, WB,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    # meta
    BT: tl.constexpr, BM: tl.constexpr, MAMBA2: tl.constexpr, BAND: tl.constexpr = True,
):
    # BAND False: the band t - j < WB's dk, dv came from outside (``dkb``, ``dvb``, rows as k), the sink
    # keys' pairs past the window from _attn_dkdv_sink_kernel (in dk_acc, dv_acc): the window's far part
    # WB <= t - j < W (queries j0 + WB .. j_hi + W - 1), the memory part and the sums
    i_kv, i_c = tl.program_id(0), tl.program_id(1)
    G: tl.constexpr = H // HKV
    i_n, i_b, bos, T = _chunk_at(chunks, seq, i_c)

    o_s = i_b * BT + tl.arange(0, BT)  # key positions
    m_k = o_s < T
    o_m = tl.arange(0, BM)
    o_d = tl.arange(0, D)
    p_kv = ((bos + o_s) * HKV + i_kv)[:, None] * D + o_d[None, :]
    b_k = tl.load(k + p_kv, mask=m_k[:, None], other=0.)  # [BT, D]
    b_v = tl.load(v + p_kv, mask=m_k[:, None], other=0.)  # [BT, D]
    # the memory's d/d(kn), kn = l2norm(k), summed over the G heads (dkm_acc + dkw_acc, two launches'
    # parts): x r -> r (dy - y (y . dy)), taken back before the loop and carried in the accumulator
    # divided by sm_scale (as in _attn_dq)
    b_dkm = tl.load(dkm_acc + p_kv, mask=m_k[:, None], other=0.) + \
        tl.load(dkw_acc + p_kv, mask=m_k[:, None], other=0.)  # [BT, D]
    b_kf = b_k.to(tl.float32)
    b_rk = _inv_norm(b_kf, MAMBA2)  # [BT]
    b_kn = b_kf * b_rk[:, None]
    b_dk = (b_rk / sm_scale)[:, None] * (b_dkm - b_kn * tl.sum(b_kn * b_dkm, 1)[:, None])
    b_dv = tl.zeros([BT, D], dtype=tl.float32)
    j0 = i_b * BT
    j_hi = tl.minimum(j0 + BT, T) - 1
    # the band: queries within W of some key of the block (a sink block's later queries are
    # done by _attn_dkdv_sink_kernel). Query blocks t0 = j0 + i BM: masked [0, i_a),
    # unmasked [i_a, i_b) (t0 >= j_hi, t0 + BM - 1 - j0 < W, inside the sequence), masked [i_b, n_q)
    t_end = tl.minimum(T, j_hi + W)
    n_q = tl.cdiv(t_end - j0, BM)
    i_a = tl.minimum(tl.cdiv(BT - 1, BM), n_q)
    i_int = tl.minimum(W // BM, (T - j0) // BM)
    i_int = tl.where(j0 + BT <= T, i_int, 0)
    i_b2 = tl.maximum(i_a, tl.minimum(i_int, n_q))
    if not BAND:
        i_a = 0
        i_b2 = 0
        n_q = 0
    for g in range(G):
        i_h = i_kv * G + g
        for i in range(0, i_a):
            b_dk, b_dv = _dkdv_block(b_k, b_v, b_dk, b_dv, q, do, lse, delta, bos, j0 + i * BM, t_end, o_s, o_m,
                                     o_d, i_h, T, W, S, qk_scale, H, D, 1)
        for i in range(i_a, i_b2):
            b_dk, b_dv = _dkdv_block(b_k, b_v, b_dk, b_dv, q, do, lse, delta, bos, j0 + i * BM, t_end, o_s, o_m,
                                     o_d, i_h, T, W, S, qk_scale, H, D, 0)
        for i in range(i_b2, n_q):
            b_dk, b_dv = _dkdv_block(b_k, b_v, b_dk, b_dv, q, do, lse, delta, bos, j0 + i * BM, t_end, o_s, o_m,
                                     o_d, i_h, T, W, S, qk_scale, H, D, 1)
        if not BAND:
            for t0 in range(j0 + WB, tl.where(WB < W, t_end, 0), BM):
                b_dk, b_dv = _dkdv_block(b_k, b_v, b_dk, b_dv, q, do, lse, delta, bos, t0, t_end, o_s, o_m,
                                         o_d, i_h, T, W, S, qk_scale, H, D, 4, WB)
    b_dk = b_dk * sm_scale + tl.load(dk_acc + p_kv, mask=m_k[:, None], other=0.)
    b_dv = b_dv + tl.load(dv_acc + p_kv, mask=m_k[:, None], other=0.)
    if not BAND:
        b_dk += tl.load(dkb + p_kv, mask=m_k[:, None], other=0.).to(tl.float32)
        b_dv += tl.load(dvb + p_kv, mask=m_k[:, None], other=0.).to(tl.float32)
    tl.store(dk + p_kv, b_dk.to(dk.dtype.element_ty), mask=m_k[:, None])
    tl.store(dv + p_kv, b_dv.to(dv.dtype.element_ty), mask=m_k[:, None])


def sink_items(lens, W: int, S: int, BT: int, QS: int, band: bool = True):
    """Work table of ``_attn_dkdv_sink_kernel``: rows (sequence, key block, t0, t1), int32 list.

    For each key block of a sequence holding a sink (``j0 < S``), the queries past its band,
    ``[j_hi + W, T)``, in ranges of ``QS`` tokens (QS a multiple of the query block); without
    ``band`` (the band done elsewhere) from the first query out of the window of the block's first
    key, ``[j0 + W, T)``.
    """
    rows = []
    for n, T in enumerate(lens):
        for i_b in range(triton.cdiv(min(S, T), BT)):
            j_hi = min(i_b * BT + BT, T) - 1
            for t0 in range((j_hi if band else i_b * BT) + W, T, QS):
                rows.append([n, i_b, t0, min(t0 + QS, T)])
    return rows
