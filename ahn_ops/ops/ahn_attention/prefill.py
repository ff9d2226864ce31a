"""Fused AHN prefill forward in Triton (kinds "gdn", "dn" and "mamba2").

Three launches, four for Mamba2 (README.md beside this file has the derivation):

1. ``_prep_kernel``   grid (chunks, H), fully parallel. Per memory chunk of BT=64 stream
   elements: write gates from the raw ``a, b`` projections, l2norm of k, in-chunk cumsum of
   the log-decay, the WY/UT inverse ``A = (I + tril(diag(beta) K K^T * decay, -1))^-1`` and
   ``w = A (beta exp(gc) k)``, ``u = A (beta v)``.
2. ``_state_kernel``  grid (D / BV, H, sequences), sequential over chunks: the fp32 state
   ``h`` [D, BV] in registers; stores the state before every chunk (input dtype) and
   ``v_new = u - w h``; optional initial / final state.
3. ``_fwd_kernel``    grid (H, row blocks): for a query block of BM rows (``_fwd_launch``: 64, or 128 for
   long windows; one or two memory chunks, each read from the state before it), the sliding-window
   flash attention with sinks (online softmax in fp32, K/V read at head ``h // G``, only the
   sink blocks and the window band are visited, masks only on edge blocks) PLUS the memory
   readout of the same rows from the chunk state, RMSNorm, swish gate, per-head [D, D]
   projection and the sum, written once in the input dtype. Also stores the window softmax's
   log-sum-exp (fp32 ``[tokens, H]``, log2 domain) for the backward, which so needs no attention
   re-run (the cache path, inference only, skips that store).
   On sm_90+ with cuDNN (``CONFIG["band"]``, ``_band_engine``), the window band over the call's own
   tokens runs in cuDNN's fused attention (``band_cudnn``) while launches 1-2 run on a side stream;
   ``_fwd_kernel`` (``BAND_IN``) then starts from the band's output and log-sum-exp and walks only
   the sinks that left the window and, on a cache, the ring tail (positions before the call's).
4. Mamba2 only: its RMSNorm spans the H heads of a token, so ``_fwd_kernel`` stops before the
   norm (window output, un-normalised projection ``yp``, per-head sum of squares) and
   ``_mamba2_norm_kernel`` (grid: token blocks) applies the cross-head scale: ``out += r * yp``.
   Mamba2 has no delta correction: the prep pass skips the WY inverse (``w = 0``, ``u = dt v``),
   the state pass skips ``w h`` and ``u`` serves as ``v_new``.

The AHN alignment: the memory is a plain gated delta rule over a *stream* with one element
per query row ``i`` (position ``t = P + i``). Element ``i`` absorbs token ``t - W`` (beta = 0,
g = 0 when ``t - W < S``, so the state stays 0), and the delta rule's output for element
``i`` is exactly what query ``t`` reads. Memory chunks are stream chunks, so a query block
of BT rows is one memory chunk and the readout needs nothing but the state before it.

Positions: every sequence ``n`` carries ``P_n`` (tokens before the first query row; 0 for a
prefill from scratch). Keys come from ``kx`` rows holding positions ``kpos0_n ..``: for a
prefill ``kx`` is ``k`` itself; on a cache it is the ring tail followed by the new tokens.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..common.alloc import empty
from ..common.tl_utils import dot, tri_inverse

__all__ = ["prefill_fwd", "prefill_cache_fwd", "SUPPORTED_D"]

SUPPORTED_D = (64, 128)
BT = 64  # memory chunk == query block: a query block reads exactly one chunk state
# Launch configuration; `python benchmarks/bench_prefill.py --sweep` and `benchmarks/spike_hopper_fwd.py`
# re-derive it (the measurements behind each choice: benchmarks/NOTES_prefill.md, "Launch configuration").
# band: the window band's engine: "auto" (cuDNN where _band_engine allows, else Triton), "cudnn" or "triton".
# fwd: (BN, num_warps, num_stages) of the all-Triton _fwd_kernel at 64 query rows (more warps or BN=128 spill).
# fwd_band_in: the same for _fwd_kernel behind the cuDNN band (sinks, ring tail, memory, epilogue only).
# fwd_rows: None picks 64 rows, or fwd_long = (min window, rows, cfg) at D = 128 and long windows, where
#   128-row programs read each K/V block of the band half as often; an int forces the rows (with "fwd").
# state_*: the sequential state pass, 16 value columns per program at D = 128 (more programs on a
#   latency-bound chain); prep_warps, norm_bm: the prep pass and the Mamba2 norm kernel.
CONFIG = {"band": "auto", "fwd": (64, 4, 3), "fwd_band_in": (64, 4, 1), "fwd_rows": None,
          "fwd_long": (8192, 128, (64, 8, 3)),
          "state_bv": {64: 64, 128: 16}, "state_warps": 4, "state_stages": 3, "prep_warps": 4, "norm_bm": 32}


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _chunk_at(chunks, seq, i_c):
    """Work item ``i_c`` of a ``[n, 2]`` (sequence, block) table -> its sequence ``i_n``, block ``i_b``
    within it, the sequence's first row ``bos`` (int64) and length ``T`` (from the ``[N, 8]`` ``seq``)."""
    i_n = tl.load(chunks + i_c * 2)
    i_b = tl.load(chunks + i_c * 2 + 1)
    bos = tl.load(seq + i_n * 8).to(tl.int64)
    T = tl.load(seq + i_n * 8 + 1)
    return i_n, i_b, bos, T


@triton.jit
def _l2norm_rows(b_x):
    # l2norm(a) = a / sqrt(sum a^2 + 1e-6), the docs/AHN_SPEC.md normalisation of q and k (fp32)
    return b_x * tl.rsqrt(tl.sum(b_x * b_x, 1) + 1e-6)[:, None]


@triton.jit
def _inv_norm(b_x, MAMBA2: tl.constexpr):
    # [BT] row scale of the memory's q/k normalisation (fp32): GDN/DN l2norm 1 / sqrt(sum x^2 + 1e-6),
    # Mamba2 F.normalize 1 / max(||x||, 1e-12)
    if MAMBA2:
        b_r = 1. / tl.maximum(tl.sqrt(tl.sum(b_x * b_x, 1)), 1e-12)
    else:
        b_r = tl.rsqrt(tl.sum(b_x * b_x, 1) + 1e-6)
    return b_r


@triton.jit
def _norm_rows(b_x, MAMBA2: tl.constexpr):
    return b_x * _inv_norm(b_x, MAMBA2)[:, None]


@triton.jit
def _load_gates(a, b, gx, A_log, dt_bias, o_row, m_act, i_h, H: tl.constexpr, GATES: tl.constexpr):
    """(g, beta) [BT] fp32 of the tokens at kx rows ``o_row``; 0 where ``m_act`` is off.

    GATES: 0 = raw GDN projections a, b; 1 = raw DN projection b; 2 = stored fp32 (g, beta);
    3 = raw Mamba2 projection a = dt_proj(x): beta = dt = softplus(a + dt_bias), g = -exp(A_log) dt.
    """
    if GATES == 2:
        b_g = tl.load(gx + o_row * H * 2 + i_h * 2, mask=m_act, other=0.).to(tl.float32)
        b_beta = tl.load(gx + o_row * H * 2 + i_h * 2 + 1, mask=m_act, other=0.).to(tl.float32)
    elif GATES == 3:
        b_x = tl.load(a + o_row * H + i_h, mask=m_act, other=0.).to(tl.float32) + tl.load(dt_bias + i_h)
        b_sp = tl.where(b_x > 20., b_x, tl.log(1. + tl.exp(tl.minimum(b_x, 20.))))
        b_beta = tl.where(m_act, b_sp, 0.)
        b_g = -tl.exp(tl.load(A_log + i_h).to(tl.float32)) * b_beta
    else:
        b_b = tl.load(b + o_row * H + i_h, mask=m_act, other=0.).to(tl.float32)
        b_beta = tl.where(m_act, tl.sigmoid(b_b), 0.)
        if GATES == 0:
            b_a = tl.load(a + o_row * H + i_h, mask=m_act, other=0.).to(tl.float32)
            b_x = b_a + tl.load(dt_bias + i_h).to(tl.float32)
            # softplus with torch's threshold 20
            b_sp = tl.where(b_x > 20., b_x, tl.log(1. + tl.exp(tl.minimum(b_x, 20.))))
            b_g = tl.where(m_act, -tl.exp(tl.load(A_log + i_h).to(tl.float32)) * b_sp, 0.)
        else:
            b_g = tl.zeros_like(b_beta)
    return b_g, b_beta


@triton.jit
def _wy_prep(b_kn, b_v, b_k, b_beta, b_gc, w, xs, o_q, o_t, o_d, i_h, m_i, H: tl.constexpr, D: tl.constexpr,
             BT: tl.constexpr, STORE_X: tl.constexpr):
    # delta rule (GDN/DN): stores w = A (beta exp(gc) k), returns u = A (beta v) [BT, D] fp32;
    # STORE_X (the backward's recompute): also stores A in the input dtype, [tokens, H, BT] rows, which
    # is the X that backward_mem._mem_bwd_wy_kernel would otherwise invert again (the same bits)
    m_low = o_t[:, None] > o_t[None, :]
    b_kk = dot(b_kn.to(b_k.dtype), tl.trans(b_kn.to(b_k.dtype)))  # [BT, BT]
    b_dec = tl.exp(tl.where(m_low, b_gc[:, None] - b_gc[None, :], 0.))
    b_L = tl.where(m_low, b_beta[:, None] * b_kk * b_dec, 0.)  # strictly lower part of I + L
    b_A = tri_inverse(b_L, BT, b_k.dtype)  # (I + L)^-1, fp32
    b_Ac = b_A.to(b_k.dtype)
    if STORE_X:
        tl.store(xs + (o_q * H + i_h)[:, None] * BT + o_t[None, :], b_Ac, mask=m_i[:, None])
    b_w = dot(b_Ac, (b_kn * (b_beta * tl.exp(b_gc))[:, None]).to(b_k.dtype))  # [BT, D]
    b_u = dot(b_Ac, (b_v.to(tl.float32) * b_beta[:, None]).to(b_k.dtype))  # [BT, D]
    tl.store(w + (o_q * H + i_h)[:, None] * D + o_d[None, :], b_w.to(w.dtype.element_ty), mask=m_i[:, None])
    return b_u


@triton.jit
def _prep_kernel(
    # pointers
    kx, vx, a, b, gx, A_log, dt_bias, seq, chunks, gc, w, u, kd, xs,
    # sizes
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, W, S,
    # meta
    BT: tl.constexpr, GATES: tl.constexpr, MAMBA2: tl.constexpr, STORE_X: tl.constexpr = False,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    G: tl.constexpr = H // HKV
    i_n, i_b, bos, T = _chunk_at(chunks, seq, i_c)
    P = tl.load(seq + i_n * 8 + 2)
    kxb = tl.load(seq + i_n * 8 + 3).to(tl.int64)
    kp0 = tl.load(seq + i_n * 8 + 4)

    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, D)
    o_i = i_b * BT + o_t
    m_i = o_i < T
    pos = P + o_i - W  # the token stream element i absorbs
    m_act = m_i & (pos >= S)
    o_row = kxb + tl.where(m_act, pos - kp0, 0)

    o_q = bos + o_i
    # chunks before the first element that absorbs a token (positions < S + W - P) are all zeros: store
    # them without loads or the WY inverse (a quarter of the chunks of a 131k prefill at W = 32640). The
    # backward's recompute (STORE_X) also stores the inverse, so it keeps the full path
    if STORE_X:
        n_zero = 0
    else:
        n_zero = tl.maximum(S + W - P, 0) // BT
    if i_b < n_zero:
        b_z = tl.zeros([BT, D], dtype=tl.float32)
        p_x = (o_q * H + i_h)[:, None] * D + o_d[None, :]
        tl.store(kd + p_x, b_z.to(kd.dtype.element_ty), mask=m_i[:, None])
        tl.store(u + p_x, b_z.to(u.dtype.element_ty), mask=m_i[:, None])
        if not MAMBA2:
            tl.store(w + p_x, b_z.to(w.dtype.element_ty), mask=m_i[:, None])
        tl.store(gc + o_q * H + i_h, tl.zeros([BT], dtype=tl.float32), mask=m_i)
    else:
        b_k = tl.load(kx + (o_row * HKV + i_h // G)[:, None] * D + o_d[None, :], mask=m_act[:, None], other=0.)
        b_v = tl.load(vx + (o_row * HKV + i_h // G)[:, None] * D + o_d[None, :], mask=m_act[:, None], other=0.)
        b_kn = _norm_rows(b_k.to(tl.float32), MAMBA2)  # [BT, D]
        b_g, b_beta = _load_gates(a, b, gx, A_log, dt_bias, o_row, m_act, i_h, H, GATES)
        b_gc = tl.cumsum(b_g, 0)  # [BT] in-chunk cumulative log-decay (0 for DN)
        if MAMBA2:
            # no delta correction: no inverse, w = 0 (not stored), and the new values are u = dt v
            b_u = b_v.to(tl.float32) * b_beta[:, None]  # [BT, D]
        else:
            b_u = _wy_prep(b_kn, b_v, b_k, b_beta, b_gc, w, xs, o_q, o_t, o_d, i_h, m_i, H, D, BT, STORE_X)
        # the state pass adds kn^T (v_new * exp(g_last - gc)): store its decayed keys once here
        b_glast = tl.sum(tl.where(o_i == tl.minimum(i_b * BT + BT, T) - 1, b_gc, 0.), 0)
        b_kd = b_kn * tl.exp(tl.where(m_act, b_glast - b_gc, 0.))[:, None]
        tl.store(kd + (o_q * H + i_h)[:, None] * D + o_d[None, :], b_kd.to(kd.dtype.element_ty), mask=m_i[:, None])
        tl.store(gc + o_q * H + i_h, b_gc, mask=m_i)
        tl.store(u + (o_q * H + i_h)[:, None] * D + o_d[None, :], b_u.to(u.dtype.element_ty), mask=m_i[:, None])


@triton.jit
def _state_kernel(
    # pointers
    kd, w, u, gc, seq, h0, hs, vnew, ht,
    # sizes
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, W, S,
    # meta
    BT: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr, MAMBA2: tl.constexpr,
):
    i_v, i_h, i_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(seq + i_n * 8).to(tl.int64)
    T = tl.load(seq + i_n * 8 + 1)
    P = tl.load(seq + i_n * 8 + 2)
    coff = tl.load(seq + i_n * 8 + 6).to(tl.int64)
    NT = tl.cdiv(T, BT)

    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, D)
    o_v = i_v * BV + tl.arange(0, BV)
    # chunks before the first element with a memory token leave the state unchanged: without an initial
    # state nothing reads their (zero) states; with one, their states are h0 and their v_new rows 0
    # (u = w = 0 there: the prep pass's zero chunks), stored without loads or products
    c0 = tl.minimum(tl.maximum(S + W - P, 0) // BT, NT)
    if USE_H0:
        b_h = tl.load(h0 + ((i_n * H + i_h) * D + o_d[:, None]) * D + o_v[None, :]).to(tl.float32)
        for i_c in range(0, c0):
            p_hs = hs + (((coff + i_c) * H + i_h) * D + o_d[:, None]) * D + o_v[None, :]
            tl.store(p_hs, b_h.to(hs.dtype.element_ty))
            if not MAMBA2:
                o_q = bos + i_c * BT + o_t
                tl.store(vnew + (o_q * H + i_h)[:, None] * D + o_v[None, :],
                         tl.zeros([BT, BV], dtype=vnew.dtype.element_ty), mask=(i_c * BT + o_t < T)[:, None])
    else:
        b_h = tl.zeros([D, BV], dtype=tl.float32)
    for i_c in range(c0, NT):
        tl.store(hs + (((coff + i_c) * H + i_h) * D + o_d[:, None]) * D + o_v[None, :], b_h.to(hs.dtype.element_ty))
        o_i = i_c * BT + o_t
        m_i = o_i < T
        o_q = bos + o_i
        b_u = tl.load(u + (o_q * H + i_h)[:, None] * D + o_v[None, :], mask=m_i[:, None], other=0.)  # [BT, BV]
        if MAMBA2:
            # no delta correction: the new values are u = dt v themselves (the readout reads u)
            b_vn = b_u.to(tl.float32)
        else:
            b_w = tl.load(w + (o_q * H + i_h)[:, None] * D + o_d[None, :], mask=m_i[:, None], other=0.)  # [BT, D]
            b_vn = b_u.to(tl.float32) - dot(b_w, b_h.to(b_w.dtype))  # [BT, BV]
            tl.store(vnew + (o_q * H + i_h)[:, None] * D + o_v[None, :], b_vn.to(vnew.dtype.element_ty),
                     mask=m_i[:, None])
        b_kd = tl.load(kd + (o_q * H + i_h)[:, None] * D + o_d[None, :], mask=m_i[:, None], other=0.)  # [BT, D]
        i_last = tl.minimum(i_c * BT + BT, T) - 1
        b_glast = tl.load(gc + (bos + i_last) * H + i_h)
        b_h = b_h * tl.exp(b_glast) + dot(tl.trans(b_kd), b_vn.to(b_kd.dtype))  # [D, BV]
    if STORE_HT:
        tl.store(ht + ((i_n * H + i_h) * D + o_d[:, None]) * D + o_v[None, :], b_h)


@triton.jit
def _attn_block(b_q, b_k, b_v, m_s, b_acc, b_m, b_l, qk_scale, MASKED: tl.constexpr):
    # one online-softmax step in the log2 domain; qk_scale = D^-0.5 * log2(e) applied in fp32
    # (scaling q before the dot would round it to bf16 once more: 1.4x the error)
    b_s = dot(b_q, tl.trans(b_k)) * qk_scale  # [BT, BN]
    if MASKED:
        b_s = tl.where(m_s, b_s, float("-inf"))
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))
    if MASKED:
        # a row that has seen no key yet keeps m = -inf; shift by 0 so that exp2 gives 0, not NaN
        b_mn_s = tl.where(b_mn == float("-inf"), 0., b_mn)
    else:
        b_mn_s = b_mn
    b_p = tl.math.exp2(b_s - b_mn_s[:, None])
    b_alpha = tl.math.exp2(b_m - b_mn_s)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + dot(b_p.to(b_v.dtype), b_v)  # [BT, D]
    return b_acc, b_mn, b_l


@triton.jit
def _mem_rows(b_o, b_q, i_c, i_h, i_kv, bos, T, P, kxb, kp0, coff, W, S, mem_scale,
              q, kx, z, nw, ow, gc, hs, vnew, out, yp, ss,
              H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, USE_H0: tl.constexpr,
              MAMBA2: tl.constexpr, LOAD_Q: tl.constexpr):
    # memory readout + epilogue of the BT query rows of chunk i_c (window output b_o [BT, D] fp32),
    # then the store of out. The rows read the state before chunk i_c (one chunk state per BT rows)
    # and the in-chunk pairs. b_q: the rows' q (LOAD_Q: loaded here; b_q is then a placeholder).
    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, D)
    o_i = i_c * BT + o_t
    m_i = o_i < T
    o_q = bos + o_i
    t_pos = P + o_i
    t_hi = P + tl.minimum(i_c * BT + BT, T) - 1
    # a block none of whose rows reads a memory token reads 0 (unless an initial state is given)
    if USE_H0:
        do_mem = t_hi >= 0
    else:
        do_mem = t_hi - W >= S
    if do_mem:
        if LOAD_Q:
            b_qx = tl.load(q + (o_q * H + i_h)[:, None] * D + o_d[None, :], mask=m_i[:, None], other=0.)
        else:
            b_qx = b_q
        b_qf = b_qx.to(tl.float32)
        b_qn = _norm_rows(b_qf, MAMBA2) * mem_scale  # [BT, D]
        b_gc = tl.load(gc + o_q * H + i_h, mask=m_i, other=0.)  # [BT], cumsum within the chunk
        b_qe = b_qn * tl.exp(b_gc)[:, None]  # [BT, D]
        b_hc = tl.load(hs + (((coff + i_c) * H + i_h) * D + o_d[:, None]) * D + o_d[None, :])  # [D, D]
        b_mo = dot(b_qe.to(b_qx.dtype), b_hc)  # [BT, D]
        pos = t_pos - W
        m_act = m_i & (pos >= S)
        o_row = kxb + tl.where(m_act, pos - kp0, 0)
        b_k = tl.load(kx + (o_row * HKV + i_kv)[:, None] * D + o_d[None, :], mask=m_act[:, None], other=0.)
        b_kn = _norm_rows(b_k.to(tl.float32), MAMBA2)  # [BT, D]
        # in-chunk causal pairs (gc is a per-chunk cumsum: exp(gc_i - gc_j) within the chunk)
        m_low = o_t[:, None] >= o_t[None, :]
        b_s = dot(b_qn.to(b_qx.dtype), tl.trans(b_kn.to(b_qx.dtype)))  # [BT, BT]
        b_s = tl.where(m_low, b_s * tl.exp(tl.where(m_low, b_gc[:, None] - b_gc[None, :], 0.)), 0.)
        b_vn = tl.load(vnew + (o_q * H + i_h)[:, None] * D + o_d[None, :], mask=m_act[:, None], other=0.)
        b_mo += dot(b_s.to(b_qx.dtype), b_vn)  # [BT, D]
        b_z = tl.load(z + o_q * H + i_h, mask=m_i, other=0.).to(tl.float32)
        b_ow = tl.load(ow + (i_h * D + o_d[:, None]) * D + o_d[None, :])  # [D, D]
        if MAMBA2:
            # gate, then the head's share of the token's RMSNorm (finished by _mamba2_norm_kernel)
            b_x = b_mo * (b_z * tl.sigmoid(b_z))[:, None]  # [BT, D]
            b_nw = tl.load(nw + i_h * D + o_d).to(tl.float32)
            b_yp = dot((b_x * b_nw[None, :]).to(b_ow.dtype), b_ow)  # [BT, D]
            tl.store(yp + (o_q * H + i_h)[:, None] * D + o_d[None, :], b_yp.to(yp.dtype.element_ty),
                     mask=m_i[:, None])
            tl.store(ss + o_q * H + i_h, tl.sum(b_x * b_x, 1), mask=m_i)
        else:
            # epilogue: RMSNorm over D, swish read gate, per-head [D, D] projection
            b_nw = tl.load(nw + o_d).to(tl.float32)
            b_r = tl.rsqrt(tl.sum(b_mo * b_mo, 1) / D + 1e-5) * b_z * tl.sigmoid(b_z)
            b_uo = b_mo * b_r[:, None] * b_nw[None, :]
            b_o += dot(b_uo.to(b_ow.dtype), b_ow)
    elif MAMBA2:
        # no memory token read by these rows: m = 0
        tl.store(yp + (o_q * H + i_h)[:, None] * D + o_d[None, :], tl.zeros([BT, D], dtype=tl.float32)
                 .to(yp.dtype.element_ty), mask=m_i[:, None])
        tl.store(ss + o_q * H + i_h, tl.zeros([BT], dtype=tl.float32), mask=m_i)
    tl.store(out + (o_q * H + i_h)[:, None] * D + o_d[None, :], b_o.to(out.dtype.element_ty), mask=m_i[:, None])


@triton.jit
def _fwd_kernel(
    # pointers
    q, kx, vx, sk, sv, z, nw, ow, seq, blocks, gc, hs, vnew, out, yp, ss, lse, ob, lb,
    # sizes
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, W, S, qk_scale, mem_scale,
    # meta
    BT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, MEMORY: tl.constexpr, USE_H0: tl.constexpr,
    MAMBA2: tl.constexpr, STORE_LSE: tl.constexpr, BAND_IN: tl.constexpr = False,
):
    # BM query rows per program (CONFIG["fwd_rows"]), BM = BT or 2 BT: the window part is generic
    # in BM; the memory part (_mem_rows) runs per BT = 64 rows, i.e. per memory chunk and its state
    # (twice per program when BM = 2 BT). ``blocks`` [n, 2]: (sequence, block of BM rows).
    # MAMBA2: the RMSNorm spans the H heads of a token, so this kernel stores the window output
    # in ``out``, the un-normalised projection yp = (x * norm_weight[h]) @ o_weight[h] of the gated
    # readout x = m silu(z) and the partial sum ss = sum_D x^2 (fp32); _mamba2_norm_kernel then
    # adds rsqrt(sum_h ss / (H D) + eps) * yp (the norm's scale is one scalar per token, so it
    # commutes with the projection).
    i_h, i_blk = tl.program_id(0), tl.program_id(1)
    G: tl.constexpr = H // HKV
    i_kv = i_h // G
    i_n, i_b, bos, T = _chunk_at(blocks, seq, i_blk)
    P = tl.load(seq + i_n * 8 + 2)
    kxb = tl.load(seq + i_n * 8 + 3).to(tl.int64)
    kp0 = tl.load(seq + i_n * 8 + 4)
    sb = tl.load(seq + i_n * 8 + 5).to(tl.int64)
    coff = tl.load(seq + i_n * 8 + 6).to(tl.int64)

    o_t = tl.arange(0, BM)
    o_j = tl.arange(0, BN)
    o_d = tl.arange(0, D)
    o_i = i_b * BM + o_t
    m_i = o_i < T
    o_q = bos + o_i
    t_pos = P + o_i  # query positions
    t_lo = P + i_b * BM
    t_hi = P + tl.minimum(i_b * BM + BM, T) - 1

    b_q = tl.load(q + (o_q * H + i_h)[:, None] * D + o_d[None, :], mask=m_i[:, None], other=0.)  # [BM, D]
    if BAND_IN:
        # the band t - W < j <= t over the call's own tokens (positions >= P) was computed outside
        # (band_cudnn): its normalised output ``ob`` (rows as q) and natural-log lse ``lb`` [N, H, T]
        # (uniform T per sequence) start the online softmax, which goes on with the keys the band
        # did not see: the sinks that left the window and, on a cache, the ring tail (positions < P)
        b_acc = tl.load(ob + (o_q * H + i_h)[:, None] * D + o_d[None, :], mask=m_i[:, None], other=0.)
        b_acc = b_acc.to(tl.float32)
        b_m = tl.load(lb + (i_n * H + i_h).to(tl.int64) * T + o_i, mask=m_i, other=0.) * 1.4426950408889634
        b_l = tl.where(m_i, 1., 0.)
    else:
        b_acc = tl.zeros([BM, D], dtype=tl.float32)
        b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BM], dtype=tl.float32)

    # sinks that have left the window of some query of the block: positions j < S, j <= t - W
    n_sink = tl.minimum(S, t_hi - W + 1)
    for j0 in range(0, n_sink, BN):
        o_s = j0 + o_j
        m_s = (o_s < S) & (o_s[None, :] <= t_pos[:, None] - W) & m_i[:, None]
        # sink j is row sb + j of sk / sv: the key stream itself for a prefill from position 0, the
        # cache's sink buffer for the cache path (which writes the sinks among its new tokens there
        # first). One load path: a second, cache-only branch here cost 18% of the whole kernel at
        # T = 131072, W = 32640 (H200, register allocation of the 128-row program)
        m_x = o_s < S
        o_x = ((sb + tl.where(m_x, o_s, 0)) * HKV + i_kv)[:, None] * D + o_d[None, :]
        b_k = tl.load(sk + o_x, mask=m_x[:, None], other=0.)
        b_v = tl.load(sv + o_x, mask=m_x[:, None], other=0.)
        b_acc, b_m, b_l = _attn_block(b_q, b_k, b_v, m_s, b_acc, b_m, b_l, qk_scale, True)

    lo = tl.maximum(kp0, t_lo - W + 1)
    if BAND_IN:
        # the ring tail: window keys at positions lo .. P - 1 (empty for a prefill from position 0)
        for j0 in range(lo, tl.minimum(P, t_hi + 1), BN):
            o_s = j0 + o_j
            m_s = (o_s[None, :] < P) & (o_s[None, :] > t_pos[:, None] - W) & m_i[:, None]
            m_k = o_s < P
            o_x = ((kxb + tl.where(m_k, o_s - kp0, 0)) * HKV + i_kv)[:, None] * D + o_d[None, :]
            b_k = tl.load(kx + o_x, mask=m_k[:, None], other=0.)
            b_v = tl.load(vx + o_x, mask=m_k[:, None], other=0.)
            b_acc, b_m, b_l = _attn_block(b_q, b_k, b_v, m_s, b_acc, b_m, b_l, qk_scale, True)
    else:
        # the window band [t_lo - W + 1, t_hi]: masked lower edge, unmasked interior, masked diagonal
        e1 = tl.minimum(tl.maximum(t_hi - W + 1, lo), t_hi + 1)
        j1 = lo + tl.cdiv(e1 - lo, BN) * BN
        n2 = tl.maximum(tl.cdiv(t_lo - BN + 2 - j1, BN), 0)
        j2 = j1 + n2 * BN
        for j0 in range(lo, e1, BN):
            o_s = j0 + o_j
            m_s = (o_s[None, :] <= t_pos[:, None]) & (o_s[None, :] > t_pos[:, None] - W) & m_i[:, None]
            m_k = o_s <= t_hi
            o_x = ((kxb + tl.where(m_k, o_s - kp0, 0)) * HKV + i_kv)[:, None] * D + o_d[None, :]
            b_k = tl.load(kx + o_x, mask=m_k[:, None], other=0.)
            b_v = tl.load(vx + o_x, mask=m_k[:, None], other=0.)
            b_acc, b_m, b_l = _attn_block(b_q, b_k, b_v, m_s, b_acc, b_m, b_l, qk_scale, True)
        for j0 in range(j1, j2, BN):
            o_x = ((kxb + j0 - kp0 + o_j) * HKV + i_kv)[:, None] * D + o_d[None, :]
            b_k = tl.load(kx + o_x)
            b_v = tl.load(vx + o_x)
            b_acc, b_m, b_l = _attn_block(b_q, b_k, b_v, None, b_acc, b_m, b_l, qk_scale, False)
        for j0 in range(j2, t_hi + 1, BN):
            o_s = j0 + o_j
            m_s = (o_s[None, :] <= t_pos[:, None]) & (o_s[None, :] > t_pos[:, None] - W) & m_i[:, None]
            m_k = o_s <= t_hi
            o_x = ((kxb + tl.where(m_k, o_s - kp0, 0)) * HKV + i_kv)[:, None] * D + o_d[None, :]
            b_k = tl.load(kx + o_x, mask=m_k[:, None], other=0.)
            b_v = tl.load(vx + o_x, mask=m_k[:, None], other=0.)
            b_acc, b_m, b_l = _attn_block(b_q, b_k, b_v, m_s, b_acc, b_m, b_l, qk_scale, True)
    b_o = b_acc / tl.where(b_l > 0, b_l, 1.)[:, None]
    if STORE_LSE:
        # the window softmax's log-sum-exp, log2 domain of the scaled logits (what the backward's
        # dq/dkdv kernels subtract: p = exp2(s qk_scale - lse)); fp32 [tokens, H]. Every row sees
        # itself (W >= 1), so l > 0; a row without keys would get +inf, i.e. p = 0 (not NaN)
        b_lse = tl.where(b_l > 0, b_m + tl.log2(tl.where(b_l > 0, b_l, 1.)), float("inf"))
        tl.store(lse + o_q * H + i_h, b_lse, mask=m_i)

    if not MEMORY:
        tl.store(out + (o_q * H + i_h)[:, None] * D + o_d[None, :], b_o.to(out.dtype.element_ty), mask=m_i[:, None])
    elif BM == BT:
        _mem_rows(b_o, b_q, i_b, i_h, i_kv, bos, T, P, kxb, kp0, coff, W, S, mem_scale,
                  q, kx, z, nw, ow, gc, hs, vnew, out, yp, ss, H, HKV, D, BT, USE_H0, MAMBA2, False)
    else:
        # two memory chunks per program: the readout and epilogue run per 64-row half (the window
        # part above is the one that gains from 128 rows; a 128-row readout wastes half of every
        # product on the other chunk's rows and spills)
        b_o0, b_o1 = tl.split(tl.permute(tl.reshape(b_o, (2, BT, D)), (1, 2, 0)))
        _mem_rows(b_o0, b_o0, 2 * i_b, i_h, i_kv, bos, T, P, kxb, kp0, coff, W, S, mem_scale,
                  q, kx, z, nw, ow, gc, hs, vnew, out, yp, ss, H, HKV, D, BT, USE_H0, MAMBA2, True)
        if 2 * i_b * BT + BT < T:
            _mem_rows(b_o1, b_o1, 2 * i_b + 1, i_h, i_kv, bos, T, P, kxb, kp0, coff, W, S, mem_scale,
                      q, kx, z, nw, ow, gc, hs, vnew, out, yp, ss, H, HKV, D, BT, USE_H0, MAMBA2, True)


@triton.jit
def _mamba2_norm_kernel(
    # pointers
    out, yp, ss,
    # sizes
    NTOK, H: tl.constexpr, D: tl.constexpr, HP: tl.constexpr,
    # meta
    BM: tl.constexpr,
):
    """out += rsqrt(mean_{H*D}(x^2) + 1e-5) * yp for BM tokens: the cross-head end of the Mamba2 norm.

    Bandwidth only, per token: reads out (window output) and yp (H*D each, input dtype) and
    ss (H fp32), writes out; no weights (norm_weight and o_weight were applied per head).
    """
    i_m = tl.program_id(0)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < NTOK
    o_h = tl.arange(0, HP)
    o_d = tl.arange(0, D)
    b_ss = tl.load(ss + o_m[:, None] * H + o_h[None, :], mask=m_m[:, None] & (o_h < H)[None, :], other=0.)  # [BM, HP]
    b_r = tl.rsqrt(tl.sum(b_ss, 1) / (H * D) + 1e-5)  # [BM]
    for i_h in range(H):
        p_o = (o_m * H + i_h)[:, None] * D + o_d[None, :]
        b_o = tl.load(out + p_o, mask=m_m[:, None], other=0.).to(tl.float32)  # [BM, D]
        b_y = tl.load(yp + p_o, mask=m_m[:, None], other=0.).to(tl.float32)  # [BM, D]
        tl.store(out + p_o, (b_o + b_r[:, None] * b_y).to(out.dtype.element_ty), mask=m_m[:, None])


@triton.jit
def _copy_rows(src_ring, src_sink, src_new, dst, o_ring, o_sink, o_new, o_dst, m_ring, m_sink, m_new, m_r,
               o_x, m_x, RW: tl.constexpr, SINK: tl.constexpr):
    # dst rows = ring rows where m_ring, sink rows where m_sink (if SINK), new rows where m_new, 0 elsewhere
    # (RW elements per row); the masks are disjoint, so the masked loads add up to one of them
    b_x = tl.load(src_ring + o_ring[:, None] * RW + o_x[None, :], mask=m_ring[:, None] & m_x[None, :], other=0.)
    if SINK:
        b_x += tl.load(src_sink + o_sink[:, None] * RW + o_x[None, :], mask=m_sink[:, None] & m_x[None, :], other=0.)
    b_x += tl.load(src_new + o_new[:, None] * RW + o_x[None, :], mask=m_new[:, None] & m_x[None, :], other=0.)
    tl.store(dst + o_dst[:, None] * RW + o_x[None, :], b_x, mask=m_r[:, None] & m_x[None, :])


@triton.jit
def _cache_gather_kernel(
    # pointers
    k, v, gn, sink_k, sink_v, ring_k, ring_v, gates, pos, kx, vx, gx, seq,
    # sizes
    T, W, S, NC, KD: tl.constexpr, HG: tl.constexpr,
    # meta
    BR: tl.constexpr, BKD: tl.constexpr, BG: tl.constexpr,
):
    """The cache path's key stream of sequence ``i_b`` (position ``P = pos[i_b]``, read on the device).

    ``W + T`` rows per sequence: row ``r < W`` holds position ``P - W + r`` (the ring tail: a sink from
    the sink buffer, a later position from ring slot ``(p - S) % W``, a position < 0 zeros, never read),
    rows ``W ..`` the new tokens. ``gx``: the same rows' stored ``(g, beta)`` (``HG = 2 H`` floats; 0 for
    sinks and positions < 0). Programs ``(0, b)`` also write row ``b`` of the launch table ``seq``
    (``bos, T, P, kx_bos, kpos0, sink_bos, chunk offset, 0``): no host sync on ``pos``.
    """
    i_r, i_b = tl.program_id(0), tl.program_id(1)
    P = tl.load(pos + i_b)
    o_r = i_r * BR + tl.arange(0, BR)
    m_r = o_r < W + T
    c = P - W + o_r  # positions of the tail rows
    m_tail = o_r < W
    m_ring = m_tail & (c >= S)
    m_sink = m_tail & (c >= 0) & (c < S)
    m_new = m_r & (o_r >= W)
    # int64 row offsets: B (W + T) rows times HKV D elements pass 2^31 at long prompts (and a ring of
    # B W rows at large batches)
    o_ring = (i_b * W + tl.where(m_ring, (c - S) % W, 0)).to(tl.int64)
    o_sink = (i_b * S + tl.where(m_sink, c, 0)).to(tl.int64)
    o_new = (i_b * T + tl.where(m_new, o_r - W, 0)).to(tl.int64)
    o_dst = (i_b * (W + T) + o_r).to(tl.int64)
    o_x = tl.arange(0, BKD)
    m_x = o_x < KD
    _copy_rows(ring_k, sink_k, k, kx, o_ring, o_sink, o_new, o_dst, m_ring, m_sink, m_new, m_r, o_x, m_x, KD, True)
    _copy_rows(ring_v, sink_v, v, vx, o_ring, o_sink, o_new, o_dst, m_ring, m_sink, m_new, m_r, o_x, m_x, KD, True)
    o_g = tl.arange(0, BG)
    m_g = o_g < HG
    _copy_rows(gates, gates, gn, gx, o_ring, o_sink, o_new, o_dst, m_ring, m_sink, m_new, m_r, o_g, m_g, HG,
               False)
    if i_r == 0:
        # the key stream holds position p at row kx_bos + p - kpos0 (kpos0 = max(0, P - W): the first
        # position any new query or the memory reads)
        kp0 = tl.maximum(P - W, 0)
        o_8 = tl.arange(0, 8)
        b_row = tl.where(o_8 == 0, i_b * T, 0) + tl.where(o_8 == 1, T, 0) + tl.where(o_8 == 2, P, 0)
        b_row += tl.where(o_8 == 3, i_b * (W + T) + kp0 - P + W, 0) + tl.where(o_8 == 4, kp0, 0)
        b_row += tl.where(o_8 == 5, i_b * S, 0) + tl.where(o_8 == 6, i_b * NC, 0)
        tl.store(seq + i_b * 8 + o_8, b_row.to(tl.int32))


@triton.jit
def _put_rows(src, d_sink, d_ring, o_src, o_sink, o_ring, m_sink, m_ring, o_x, m_x, RW: tl.constexpr):
    # source rows o_src to sink rows (m_sink) or ring rows (m_ring), RW elements per row
    b_x = tl.load(src + o_src[:, None] * RW + o_x[None, :], mask=(m_sink | m_ring)[:, None] & m_x[None, :], other=0.)
    tl.store(d_sink + o_sink[:, None] * RW + o_x[None, :], b_x, mask=m_sink[:, None] & m_x[None, :])
    tl.store(d_ring + o_ring[:, None] * RW + o_x[None, :], b_x, mask=m_ring[:, None] & m_x[None, :])


@triton.jit
def _cache_scatter_kernel(
    # pointers
    k, v, gn, sink_k, sink_v, ring_k, ring_v, gates, pos,
    # sizes
    T, W, S, N1, KD: tl.constexpr, HG: tl.constexpr,
    # meta
    BR: tl.constexpr, BKD: tl.constexpr, BG: tl.constexpr,
):
    """The cache's new contents from the ``T`` new tokens of sequence ``i_b`` (after every read of the old).

    Programs ``< N1`` cover new tokens ``0 .. min(T, S) - 1`` (those at positions ``< S`` go to the sink
    buffer), the rest the last ``min(T, W)`` tokens (positions ``>= S`` go to ring slot ``(p - S) % W``
    with their gates): distinct rows, so no two writes meet.
    """
    i_r, i_b = tl.program_id(0), tl.program_id(1)
    P = tl.load(pos + i_b)
    first = i_r < N1
    t0 = tl.where(first, i_r * BR, tl.maximum(T - W, 0) + (i_r - N1) * BR)
    o_t = t0 + tl.arange(0, BR)
    c = P + o_t
    m_t = o_t < T
    m_sink = first & m_t & (c < S)
    m_ring = (i_r >= N1) & m_t & (c >= S)
    o_src = (i_b * T + o_t).to(tl.int64)
    o_ring = (i_b * W + tl.where(m_ring, (c - S) % W, 0)).to(tl.int64)
    o_sink = (i_b * S + tl.where(m_sink, c, 0)).to(tl.int64)
    o_x = tl.arange(0, BKD)
    m_x = o_x < KD
    _put_rows(k, sink_k, ring_k, o_src, o_sink, o_ring, m_sink, m_ring, o_x, m_x, KD)
    _put_rows(v, sink_v, ring_v, o_src, o_sink, o_ring, m_sink, m_ring, o_x, m_x, KD)
    o_g = tl.arange(0, BG)
    m_g = o_g < HG
    b_g = tl.load(gn + o_src[:, None] * HG + o_g[None, :], mask=m_ring[:, None] & m_g[None, :], other=0.)
    tl.store(gates + o_ring[:, None] * HG + o_g[None, :], b_g, mask=m_ring[:, None] & m_g[None, :])


# ---------------------------------------------------------------------------------------------
# launchers (allocate, grid, keyword launch; no autograd)
# ---------------------------------------------------------------------------------------------
def _fwd_launch(D: int, window: int):
    """(query rows per ``_fwd_kernel`` program, (BN, num_warps, num_stages)) from CONFIG: ``fwd_rows``
    forces the rows (with ``fwd``); None picks ``fwd_long`` at D = 128 and long windows, else 64 rows."""
    rows = CONFIG["fwd_rows"]
    if rows is not None:
        return rows, CONFIG["fwd"]
    w_long, rows_long, cfg_long = CONFIG["fwd_long"]
    if D == 128 and window >= w_long:
        return rows_long, cfg_long
    return BT, CONFIG["fwd"]


# Launch tables by their contents: a prefill of the same lengths (every step of a training run at a fixed
# sequence length, every layer of one forward) reuses them instead of building them on the host and
# copying them to the device (a synchronous copy from pageable memory: the GPU idled while the host
# went on with the launch). The tensors are read-only: never write into a returned table.
_TABLES: "OrderedDict[tuple, tuple]" = OrderedDict()
_TABLES_MAX = 64


def _cached_table(key: tuple, build):
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    val = build()
    _TABLES[key] = val
    while len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return val


def _to_device(host: torch.Tensor, device) -> torch.Tensor:
    """One host -> device copy without a host sync where CUDA is involved (pinned staging)."""
    device = torch.device(device)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _seq_tables(lens: List[int], starts: List[int], kx_bos: List[int], kpos0: List[int], sink_bos: List[int],
                device) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Per-sequence metadata ``[N, 8]`` int32 and the chunk table ``[NT, 2]`` (sequence, block).

    Row ``n`` of the metadata: ``bos, T, P, kx_bos, kpos0, sink_bos, chunk offset, 0``. Cached by
    contents (``_TABLES``); built with vectorised tensor ops and one pinned copy on a miss.
    """
    key = (tuple(lens), tuple(starts), tuple(kx_bos), tuple(kpos0), tuple(sink_bos), str(torch.device(device)))

    def build():
        n = len(lens)
        ln = torch.tensor(lens, dtype=torch.int64)
        nt = (ln + BT - 1) // BT
        bos = torch.cumsum(ln, 0) - ln
        coff = torch.cumsum(nt, 0) - nt
        NT = int(nt.sum())
        cols = [bos, ln, torch.tensor(starts, dtype=torch.int64), torch.tensor(kx_bos, dtype=torch.int64),
                torch.tensor(kpos0, dtype=torch.int64), torch.tensor(sink_bos, dtype=torch.int64), coff,
                torch.zeros(n, dtype=torch.int64)]
        rows = torch.stack(cols, 1) if n else torch.zeros(0, 8, dtype=torch.int64)
        if NT:
            seq_id = torch.repeat_interleave(torch.arange(n), nt)
            ch = torch.stack([seq_id, torch.arange(NT) - coff[seq_id]], 1)
        else:
            ch = torch.zeros(1, 2, dtype=torch.int64)
        if rows.numel() and int(rows.max()) >= 2 ** 31:
            raise ValueError(f"prefill: {int(ln.sum())} tokens in one call exceed the int32 launch tables")
        both = _to_device(torch.cat([rows.reshape(-1), ch.reshape(-1)]).to(torch.int32), device)
        return both[:rows.numel()].view(n, 8), both[rows.numel():].view(-1, 2), NT

    return _cached_table(key, build)


def _row_blocks(lens: List[int], BM: int, device) -> Tuple[torch.Tensor, int]:
    """The ``_fwd_kernel`` grid's table ``[NB, 2]`` int32 (sequence, block of BM query rows) and NB."""
    def build():
        nb = torch.tensor([triton.cdiv(T, BM) for T in lens], dtype=torch.int64)
        NB = int(nb.sum())
        if NB == 0:
            return _to_device(torch.zeros(1, 2, dtype=torch.int32), device), 0
        seq_id = torch.repeat_interleave(torch.arange(len(lens)), nb)
        first = torch.cumsum(nb, 0) - nb
        rows = torch.stack([seq_id, torch.arange(NB) - first[seq_id]], 1).to(torch.int32)
        return _to_device(rows, device), NB

    return _cached_table(("rows", tuple(lens), BM, str(torch.device(device))), build)


_SIDE: dict = {}


def _side_stream(device) -> torch.cuda.Stream:
    """One side stream per device for the memory passes beside the band attention."""
    idx = torch.device(device).index
    idx = torch.cuda.current_device() if idx is None else idx
    st = _SIDE.get(idx)
    if st is None:
        st = _SIDE[idx] = torch.cuda.Stream(device=idx)
    return st


def _memory_passes(kx, vx, a, b, gx, A_log, dt_bias, seq, chunks, NT, N, H, HKV, D, window, sinks, gates, mamba2,
                   initial_state, bufs, stage):
    gc, w, u, kd, hs, vnew, ht, dummy = bufs
    _prep_kernel[(NT, H)](
        kx=kx, vx=vx, a=a, b=b, gx=gx, A_log=A_log, dt_bias=dt_bias, seq=seq, chunks=chunks, gc=gc, w=w, u=u, kd=kd,
        xs=dummy, H=H, HKV=HKV, D=D, W=window, S=sinks, BT=BT, GATES=gates, MAMBA2=mamba2,
        num_warps=CONFIG["prep_warps"])
    if stage == "prep":  # benchmarks: the parallel prep pass alone
        return
    BV = CONFIG["state_bv"][D]
    h0 = initial_state.float().contiguous() if initial_state is not None else dummy
    _state_kernel[(D // BV, H, N)](
        kd=kd, w=w, u=u, gc=gc, seq=seq, h0=h0, hs=hs, vnew=vnew, ht=ht if ht is not None else dummy,
        H=H, HKV=HKV, D=D, W=window, S=sinks, BT=BT, BV=BV, USE_H0=initial_state is not None,
        STORE_HT=ht is not None, MAMBA2=mamba2, num_warps=CONFIG["state_warps"],
        num_stages=CONFIG["state_stages"])


def _launch(q, kx, vx, sk, sv, a, b, gx, z, A_log, dt_bias, norm_weight, o_weight, window, sinks, kind,
            seq, chunks, NT, N, initial_state, output_final_state, memory=True, stage="all",
            store_lse=False, lens=None, band=None):
    # store_lse: also return the window softmax's lse (fp32 [Tq, H]) for the backward; the cache
    # path (inference) passes False and the kernel skips the store.
    # band: None (the Triton kernel walks the window band) or a callable giving the band over the
    # call's own tokens as (ob [.., H, D] rows as q, lse [N, H, T] natural log, uniform T); it runs on
    # the current stream while the memory passes run on a side stream
    Tq, H, D = q.shape[1], q.shape[2], q.shape[3]
    HKV = kx.shape[-2]
    dev, dt = q.device, q.dtype
    out = empty(1, Tq, H, D, dtype=dt, device=dev)
    ht = empty(N, H, D, D, dtype=torch.float32, device=dev) if output_final_state else None
    lse = empty(Tq, H, dtype=torch.float32, device=dev) if store_lse else None
    if NT == 0:
        if ht is not None:
            ht.copy_(initial_state if initial_state is not None else torch.zeros_like(ht))
        return out, ht, lse
    mamba2 = kind == "mamba2"
    gates = 2 if gx is not None else {"gdn": 0, "dn": 1, "mamba2": 3}[kind]
    dummy = q.new_zeros(16)  # stands in for pointers a constexpr branch never reads
    A_log = A_log.float().contiguous() if A_log is not None else dummy
    dt_bias = dt_bias.float().contiguous() if dt_bias is not None else dummy
    a = a.contiguous() if a is not None else dummy
    b = b.contiguous() if b is not None else dummy
    gx = gx if gx is not None else dummy
    hs = vnew = gc = yp = ss = dummy
    ob = lb = dummy
    if memory:
        gc = empty(Tq, H, dtype=torch.float32, device=dev)
        # Mamba2: no delta correction, so no w, and v_new is u = dt v itself
        w = dummy if mamba2 else empty(Tq, H, D, dtype=dt, device=dev)
        u = empty(Tq, H, D, dtype=dt, device=dev)
        kd = empty(Tq, H, D, dtype=dt, device=dev)
        hs = empty(NT, H, D, D, dtype=dt, device=dev)
        vnew = u if mamba2 else empty(Tq, H, D, dtype=dt, device=dev)
        args = (kx, vx, a, b, gx, A_log, dt_bias, seq, chunks, NT, N, H, HKV, D, window, sinks, gates, mamba2,
                initial_state, (gc, w, u, kd, hs, vnew, ht, dummy))
        if band is not None and stage == "all" and dev.type == "cuda":
            # the memory passes (gates, WY prep, the state chain) need no attention output: they run on
            # a side stream while the band runs here; every buffer was allocated on this stream above,
            # and this stream waits for the side stream before anything reads them or they are freed
            main, side = torch.cuda.current_stream(dev), _side_stream(dev)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                _memory_passes(*args, stage)
            ob, lb = (x.contiguous() for x in band())
            main.wait_stream(side)
        else:
            _memory_passes(*args, stage)
            if stage in ("prep", "state"):  # benchmarks: the memory passes alone
                return out, ht, lse
            if band is not None:
                ob, lb = (x.contiguous() for x in band())
        if mamba2:
            yp = empty(Tq, H, D, dtype=dt, device=dev)
            ss = empty(Tq, H, dtype=torch.float32, device=dev)
    elif band is not None:
        ob, lb = (x.contiguous() for x in band())
    if band is not None:
        BM, (BN, fwd_warps, fwd_stages) = BT, CONFIG["fwd_band_in"]
    else:
        BM, (BN, fwd_warps, fwd_stages) = _fwd_launch(D, window)
    assert BM in (BT, 2 * BT), BM
    # lens: the sequences' query counts (the chunk table holds the same blocks when BM = BT)
    blocks, NB = (chunks, NT) if BM == BT else _row_blocks(lens, BM, dev)
    _fwd_kernel[(H, NB)](
        q=q, kx=kx, vx=vx, sk=sk, sv=sv, z=z.contiguous(), nw=norm_weight.float().contiguous(),
        ow=o_weight.to(dt).contiguous(), seq=seq, blocks=blocks, gc=gc, hs=hs, vnew=vnew, out=out, yp=yp, ss=ss,
        lse=lse if store_lse else dummy, ob=ob, lb=lb, H=H, HKV=HKV, D=D, W=window, S=sinks,
        qk_scale=D ** -0.5 * math.log2(math.e), mem_scale=1.0 if mamba2 else D ** -0.5,
        BT=BT, BM=BM, BN=BN, MEMORY=memory, USE_H0=initial_state is not None,
        MAMBA2=mamba2 and memory, STORE_LSE=store_lse, BAND_IN=band is not None, num_warps=fwd_warps,
        num_stages=fwd_stages)
    if mamba2 and memory:
        BM = CONFIG["norm_bm"]
        _mamba2_norm_kernel[(triton.cdiv(Tq, BM),)](
            out=out, yp=yp, ss=ss, NTOK=Tq, H=H, D=D, HP=triton.next_power_of_2(H), BM=BM, num_warps=4)
    return out, ht, lse


def _band_engine(q: torch.Tensor, uniform: bool) -> bool:
    """Whether the band goes through cuDNN (``band_cudnn``) rather than the Triton kernel's own loop.

    ``CONFIG["band"]``: "auto" (cuDNN where it can run: a CUDA device of compute capability >= 9.0
    with nvidia-cudnn-frontend importable, bf16/fp16, sequences of one length), "cudnn" (required:
    an error where it cannot run) or "triton"."""
    mode = CONFIG["band"]
    if mode not in ("auto", "cudnn", "triton"):
        raise ValueError(f'CONFIG["band"] must be "auto", "cudnn" or "triton", got {mode!r}')
    if mode == "triton" or q.device.type != "cuda":
        if mode == "cudnn":
            raise RuntimeError('CONFIG["band"] = "cudnn" needs a CUDA device')
        return False
    from . import band_cudnn

    why = band_cudnn.unavailable_reason(q.device)
    if why is None and q.dtype not in (torch.bfloat16, torch.float16):
        why = f"the cuDNN band takes bfloat16 or float16, not {q.dtype}"
    if why is None and not uniform:
        why = "sequences of different lengths (cu_seqlens) are not served by the cuDNN band yet"
    if why is not None and mode == "cudnn":
        raise RuntimeError(f'CONFIG["band"] = "cudnn": {why}')
    if why is not None and "not importable" in why and not _WARNED:
        _WARNED.append(why)
        warnings.warn(f"ahn_ops: the prefill's window band runs on the slower Triton kernel on this Hopper GPU: {why}; "
                      'pip install "nvidia-cudnn-frontend>=1.32" (the ahn_ops[hopper] extra) for cuDNN\'s',
                      RuntimeWarning, stacklevel=3)
    return why is None


_WARNED: list = []


def _cudnn_band(q, k, v, window):
    """A ``band`` callable for ``_launch``: cuDNN over ``q [B, T, H, D]``, ``k, v [B, T, HKV, D]``."""
    from . import band_cudnn

    def run():
        return band_cudnn.band_fwd(q, k, v, min(window, q.shape[1]))

    return run


def prefill_fwd(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, window: int, sinks: int, kind: str,
                cu_seqlens: Optional[torch.Tensor] = None, initial_state: Optional[torch.Tensor] = None,
                output_final_state: bool = False, memory: bool = True, stage: str = "all"):
    """Launch the fused prefill (positions from 0) of ``kind`` "gdn"/"dn"/"mamba2" (no autograd).

    Args: as :func:`ahn_ops.ahn_attention`; ``q`` bf16/fp16 ``[B, T, H, D]``, D in (64, 128).
        initial_state: ``[N, H, D, D]`` fp32, the state before token ``S`` (N sequences).
        output_final_state: also return the fp32 state holding tokens ``S .. T-1-W``.
        memory: False gives the window-only path (benchmarks).
    Returns:
        ``(out [B, T, H, D] in q.dtype, final_state [N, H, D, D] fp32 or None, lse [B, T, H] fp32)``;
        ``lse`` is the window softmax's log-sum-exp in the log2 domain of the scaled logits
        (``log2 sum_j 2^(q.k_j D^-0.5 log2(e))``), the backward's normaliser.

    Example:
        >>> from ahn_ops.ops.ahn_attention import prefill as P  # doctest: +SKIP
        >>> out, _, lse = P.prefill_fwd(q, k, v, a, b, z, A_log, dt_bias, nw, ow, 1024, 4, "gdn")  # doctest: +SKIP
    """
    B, T, H, D = q.shape
    if cu_seqlens is not None:
        cs = [int(x) for x in cu_seqlens.tolist()]
    else:
        cs = [i * T for i in range(B + 1)]
    lens = [e - s for s, e in zip(cs[:-1], cs[1:])]
    N = len(lens)
    seq, chunks, NT = _seq_tables(lens, [0] * N, cs[:-1], [0] * N, cs[:-1], q.device)
    flat = lambda x: None if x is None else x.reshape(1, B * T, *x.shape[2:]).contiguous()  # noqa: E731
    qf, kf, vf = flat(q), flat(k), flat(v)
    band = None
    if T > 0 and _band_engine(q, cu_seqlens is None or len(set(lens)) == 1):
        T1 = lens[0]
        band = _cudnn_band(qf.view(N, T1, H, D), kf.view(N, T1, -1, D), vf.view(N, T1, -1, D), window)
    out, ht, lse = _launch(qf, kf, vf, kf, vf, flat(a), flat(b), None, flat(z), A_log, dt_bias, norm_weight,
                           o_weight, window, sinks, kind, seq, chunks, NT, N, initial_state, output_final_state,
                           memory, stage, store_lse=True, lens=lens, band=band)
    return out.view(B, T, H, D), ht, lse.view(B, T, H)


def prefill_cache_fwd(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight,
                      sink_k, sink_v, ring_k, ring_v, gates, state, pos, window: int, sinks: int, kind: str):
    """Prefill ``T`` new tokens per sequence on an AHN cache with kernels; updates the cache in place.

    Same semantics as ``reference.ahn_prefill_cache_ref``. Each sequence's key stream is its whole ring
    tail (positions ``P - W .. P - 1``, gathered by ``_cache_gather_kernel`` with ``P`` read on the
    device) followed by its new tokens; the kernels then run as for a prefill with start position ``P``,
    initial state ``cache.state``, and return the final state. No host sync: the positions never leave
    the device (a ``pos.tolist()`` here idled the GPU ~3 ms per layer of a 131k prefill, H200), so a
    model's layers queue up back to back. Positions must stay below 2^31 (int32 launch tables).
    Returns ``[B, T, H, D]`` in q.dtype.
    """
    from .reference import memory_gates_ref

    B, T, H, D = q.shape
    HKV = k.shape[2]
    W, S = window, sinks
    KD, HG = HKV * D, 2 * H
    dev = q.device
    # the kernels index the cache rows densely; a strided view is served through a contiguous copy
    cache = [sink_k, sink_v, ring_k, ring_v, gates]
    work = [t if t.is_contiguous() else t.contiguous() for t in cache]
    wsk, wsv, wrk, wrv, wg = work
    pc = pos.contiguous()
    g_new, w_new = memory_gates_ref(a, b, A_log, dt_bias, kind, torch.float32)  # [B, T, H]
    gn = torch.stack([g_new, w_new], -1).contiguous()  # [B, T, H, 2], the ring's gate layout
    kc, vc = k.contiguous(), v.contiguous()
    kx = empty(1, B * (W + T), HKV, D, dtype=k.dtype, device=dev)
    vx = empty(1, B * (W + T), HKV, D, dtype=k.dtype, device=dev)
    gx = empty(B * (W + T), H, 2, dtype=torch.float32, device=dev)
    seq = empty(B, 8, dtype=torch.int32, device=dev)
    chunks, NT = _row_blocks([T] * B, BT, dev)
    BR, BKD, BG = 16, triton.next_power_of_2(KD), triton.next_power_of_2(HG)
    # S = 0: the (empty) sink buffer is never read; any valid pointer stands in for it
    psk, psv = (wsk, wsv) if S else (kc, vc)
    _cache_gather_kernel[(triton.cdiv(W + T, BR), B)](
        k=kc, v=vc, gn=gn, sink_k=psk, sink_v=psv, ring_k=wrk, ring_v=wrv, gates=wg, pos=pc, kx=kx, vx=vx, gx=gx,
        seq=seq, T=T, W=W, S=S, NC=triton.cdiv(T, BT), KD=KD, HG=HG, BR=BR, BKD=BKD, BG=BG, num_warps=4)
    # new contents after the gather's reads: new sinks must be in the sink buffer before the attention
    # kernel (it reads every sink from there); the ring is only read through the gathered copy
    N1 = triton.cdiv(min(T, S), BR)
    _cache_scatter_kernel[(N1 + triton.cdiv(min(T, W), BR), B)](
        k=kc, v=vc, gn=gn, sink_k=psk, sink_v=psv, ring_k=wrk, ring_v=wrv, gates=wg, pos=pc,
        T=T, W=W, S=S, N1=N1, KD=KD, HG=HG, BR=BR, BKD=BKD, BG=BG, num_warps=4)
    sk = wsk.reshape(1, B * S, HKV, D) if S else kx
    sv = wsv.reshape(1, B * S, HKV, D) if S else vx
    qf = q.reshape(1, B * T, H, D).contiguous()
    band = _cudnn_band(qf.view(B, T, H, D), kc, vc, W) if T > 0 and _band_engine(q, True) else None
    # inference: no backward, so no lse store
    out, ht, _ = _launch(qf, kx, vx, sk, sv, None, None, gx, z.reshape(1, B * T, H), A_log, dt_bias, norm_weight,
                         o_weight, W, S, kind, seq, chunks, NT, B, state, True, lens=[T] * B, band=band)
    for t, w in zip(cache, work):
        if w is not t:
            t.copy_(w)
    state.copy_(ht)
    pos.add_(T)
    return out.view(B, T, H, D)


# ---------------------------------------------------------------------------------------------
# registration: torch.ops.ahn.prefill_fwd / torch.ops.ahn.prefill_cache (forward only)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("ahn::prefill_fwd", mutates_args=())
def _prefill_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: Optional[torch.Tensor], b: Optional[torch.Tensor],
    z: torch.Tensor, A_log: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor], norm_weight: torch.Tensor,
    o_weight: torch.Tensor, window: int, sinks: int, kind: str, cu_seqlens: Optional[torch.Tensor],
    initial_state: Optional[torch.Tensor], output_final_state: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(out, final_state, lse)``: final_state empty without output_final_state; lse fp32
    ``[B, T, H]`` (window log-sum-exp, log2 domain) is saved by the autograd for the backward."""
    out, ht, lse = prefill_fwd(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, window, sinks, kind,
                               cu_seqlens, initial_state, output_final_state)
    if ht is None:
        ht = q.new_empty(0, dtype=torch.float32)
    return out, ht, lse


@_prefill_fwd_op.register_fake
def _(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, window, sinks, kind, cu_seqlens, initial_state,
      output_final_state):
    B, T, H, D = q.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    ht = q.new_empty(N, H, D, D, dtype=torch.float32) if output_final_state else q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q), ht, q.new_empty(B, T, H, dtype=torch.float32)


@torch.library.custom_op("ahn::prefill_cache",
                         mutates_args=("sink_k", "sink_v", "ring_k", "ring_v", "gates", "state", "pos"))
def _prefill_cache_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: Optional[torch.Tensor], b: Optional[torch.Tensor],
    z: torch.Tensor, A_log: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor], norm_weight: torch.Tensor,
    o_weight: torch.Tensor, sink_k: torch.Tensor, sink_v: torch.Tensor, ring_k: torch.Tensor,
    ring_v: torch.Tensor, gates: torch.Tensor, state: torch.Tensor, pos: torch.Tensor, window: int, sinks: int,
    kind: str,
) -> torch.Tensor:
    return prefill_cache_fwd(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, sink_k, sink_v, ring_k,
                             ring_v, gates, state, pos, window, sinks, kind)


@_prefill_cache_op.register_fake
def _(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, sink_k, sink_v, ring_k, ring_v, gates, state,
      pos, window, sinks, kind):
    return torch.empty_like(q)


# needed by backward.py: the backward of ahn::prefill_fwd (torch.library.register_autograd)
from . import autograd as _autograd  # noqa: E402,F401
