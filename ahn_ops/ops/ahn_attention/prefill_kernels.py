"""Triton kernels of the fused AHN prefill forward (kinds "gdn", "dn" and "mamba2").

``prefill.py`` launches them (grids, launch configuration, buffers, the ops); the backward
(``backward.py``) re-runs ``_prep_kernel`` and ``_state_kernel`` for its recompute. README.md beside
this file has the derivation. The jit helpers shared with the backward's kernels are
``ahn_ops/ops/common/jit_helpers.py``'s, imported here under their former names (``_chunk_at``,
``_norm_rows``, ``_load_gates``).

1. ``_prep_kernel``   one program per (memory chunk, head), fully parallel. Per memory chunk of BT=64
   stream elements: write gates from the raw ``a, b`` projections, l2norm of k, in-chunk cumsum of
   the log-decay, the WY/UT inverse ``A = (I + tril(diag(beta) K K^T * decay, -1))^-1`` and
   ``w = A (beta exp(gc) k)``, ``u = A (beta v)`` (``_wy_prep``), and the decayed keys the state pass adds.
2. ``_state_kernel``  one program per (BV value columns, head, sequence), sequential over chunks: the fp32
   state ``h`` [D, BV] in registers; stores the state before every chunk (input dtype) and
   ``v_new = u - w h``; optional initial / final state.
3. ``_fwd_kernel``    one program per (head, block of BM query rows): for BM = 64 or 128 rows (one or two
   memory chunks, each read from the state before it), the sliding-window flash attention with sinks
   (``_attn_block``: online softmax in fp32, K/V read at head ``h // G``, only the sink blocks and the
   window band are visited, masks only on edge blocks) PLUS the memory readout of the same rows from
   the chunk state, RMSNorm, swish gate, per-head [D, D] projection and the sum (``_mem_read``, ``_mem_rows``, per
   64-row chunk), written once in the input dtype. ``STORE_LSE``: also the window softmax's
   log-sum-exp (fp32 ``[tokens, H]``, log2 domain) for the backward, which so needs no attention re-run.
   ``BAND_IN``: the window band over the call's own tokens came from outside (cuDNN, ``band_cudnn``); the
   kernel starts from the band's output and log-sum-exp and walks only the sinks that left the window
   and, on a cache, the ring tail (positions before the call's).
4. ``_mamba2_norm_kernel`` (Mamba2 only): its RMSNorm spans the H heads of a token, so ``_fwd_kernel``
   stops before the norm (window output, un-normalised projection ``yp``, per-head sum of squares) and
   this kernel applies the cross-head scale per block of tokens: ``out += r * yp``.
   Mamba2 has no delta correction: the prep pass skips the WY inverse (``w = 0``, ``u = dt v``),
   the state pass skips ``w h`` and ``u`` serves as ``v_new``.
5. ``_cache_gather_kernel`` / ``_cache_scatter_kernel`` (``_copy_rows``, ``_put_rows``): the cache path's
   key stream (ring tail + new tokens, with their gate inputs) and launch table from positions read on
   the device, and the new tokens' rows written into the cache's sink buffer / ring.

The AHN alignment: the memory is a plain gated delta rule over a *stream* with one element
per query row ``i`` (position ``t = P + i``). Element ``i`` absorbs token ``t - W`` (beta = 0,
g = 0 when ``t - W < S``, so the state stays 0), and the delta rule's output for element
``i`` is exactly what query ``t`` reads. Memory chunks are stream chunks, so a query block
of BT rows is one memory chunk and the readout needs nothing but the state before it.

Positions: every sequence ``n`` carries ``P_n`` (tokens before the first query row; 0 for a
prefill from scratch). Keys come from ``kx`` rows holding positions ``kpos0_n ..``: for a
prefill ``kx`` is ``k`` itself; on a cache it is the ring tail followed by the new tokens.
The kernels read them from the ``[N, 8]`` int32 table ``seq`` (row ``n``: ``bos, T, P, kx_bos, kpos0,
sink_bos, chunk offset, 0``; ``tables.py``) and take their work items from ``[n, 2]`` (sequence, block) tables.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..common.jit_helpers import band_blocks as _band_blocks
from ..common.jit_helpers import chunk_at as _chunk_at
from ..common.jit_helpers import load_gates as _load_gates
from ..common.jit_helpers import norm_rows as _norm_rows
from ..common.tl_utils import dot, tri_inverse


@triton.jit
def _l2norm_rows(b_x):
    # l2norm(a) = a / sqrt(sum a^2 + 1e-6), the docs/AHN_SPEC.md normalisation of q and k (fp32)
    return b_x * tl.rsqrt(tl.sum(b_x * b_x, 1) + 1e-6)[:, None]


@triton.jit
def _wy_prep(b_kn, b_v, b_beta, b_gc, w, xs, o_q, o_t, o_d, i_h, m_i, H: tl.constexpr, D: tl.constexpr,
             BT: tl.constexpr, STORE_X: tl.constexpr, DT: tl.constexpr):
    # delta rule (GDN/DN): stores w = A (beta exp(gc) k), returns u = A (beta v) [BT, D] fp32;
    # STORE_X (the backward's recompute): also stores A in the input dtype, [tokens, H, BT] rows, which
    # is the X that backward_mem._mem_bwd_wy_kernel would otherwise invert again (the same bits).
    # Only input-dtype tiles (v, w's operand) are live across the inverse, not fp32 ones: 255 registers
    # and 656 bytes of spills before, 212 and none after at D = 128 (triton 3.8, sm_90a, kernel_regs.py)
    m_low = o_t[:, None] > o_t[None, :]
    b_kk = dot(b_kn.to(DT), tl.trans(b_kn.to(DT)))  # [BT, BT]
    # w's operand in the input dtype before the inverse: the fp32 keys are not live across it
    b_kw = (b_kn * (b_beta * tl.exp(b_gc))[:, None]).to(DT)
    b_dec = tl.exp(tl.where(m_low, b_gc[:, None] - b_gc[None, :], 0.))
    b_L = tl.where(m_low, b_beta[:, None] * b_kk * b_dec, 0.)  # strictly lower part of I + L
    b_A = tri_inverse(b_L, BT, DT)  # (I + L)^-1, fp32
    b_Ac = b_A.to(DT)
    if STORE_X:
        tl.store(xs + (o_q * H + i_h)[:, None] * BT + o_t[None, :], b_Ac, mask=m_i[:, None])
    b_w = dot(b_Ac, b_kw)  # [BT, D]
    tl.store(w + (o_q * H + i_h)[:, None] * D + o_d[None, :], b_w.to(w.dtype.element_ty), mask=m_i[:, None])
    return dot(b_Ac, (b_v.to(tl.float32) * b_beta[:, None]).to(DT))  # [BT, D]


@triton.jit
def _prep_kernel(
    # pointers
    kx, vx, a, b, A_log, dt_bias, seq, chunks, gc, w, u, kd, xs,
    # sizes
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, W, S,
    # meta
    BT: tl.constexpr, GATES: tl.constexpr, MAMBA2: tl.constexpr, AB_RS: tl.constexpr, STORE_X: tl.constexpr = False,
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
        p_kv = (o_row * HKV + i_h // G)[:, None] * D + o_d[None, :]
        b_kn = _norm_rows(tl.load(kx + p_kv, mask=m_act[:, None], other=0.).to(tl.float32), MAMBA2)  # [BT, D]
        # the delta rule's v comes in while the inverse runs; Mamba2 (no inverse) loads it after the decayed
        # keys are stored: 143 registers instead of 188, three programs per SM instead of two
        if not MAMBA2:
            b_v = tl.load(vx + p_kv, mask=m_act[:, None], other=0.)
        b_g, b_beta = _load_gates(a, b, A_log, dt_bias, o_row, m_act, i_h, AB_RS, GATES)
        b_gc = tl.cumsum(b_g, 0)  # [BT] in-chunk cumulative log-decay (0 for DN)
        # the state pass adds kn^T (v_new * exp(g_last - gc)): store its decayed keys once here, first, so
        # that they are not live across the inverse
        b_glast = tl.sum(tl.where(o_i == tl.minimum(i_b * BT + BT, T) - 1, b_gc, 0.), 0)
        b_kd = b_kn * tl.exp(tl.where(m_act, b_glast - b_gc, 0.))[:, None]
        tl.store(kd + (o_q * H + i_h)[:, None] * D + o_d[None, :], b_kd.to(kd.dtype.element_ty), mask=m_i[:, None])
        tl.store(gc + o_q * H + i_h, b_gc, mask=m_i)
        if MAMBA2:
            # no delta correction: no inverse, w = 0 (not stored), and the new values are u = dt v
            b_u = tl.load(vx + p_kv, mask=m_act[:, None], other=0.).to(tl.float32) * b_beta[:, None]  # [BT, D]
        else:
            b_u = _wy_prep(b_kn, b_v, b_beta, b_gc, w, xs, o_q, o_t, o_d, i_h, m_i, H, D, BT,
                           STORE_X, kx.dtype.element_ty)
        tl.store(u + (o_q * H + i_h)[:, None] * D + o_d[None, :], b_u.to(u.dtype.element_ty), mask=m_i[:, None])


@triton.jit
def _chunk_ready(ready, idx, ok, NTHR: tl.constexpr):
    # a chunk's counter gains NTHR (the program's threads) per program: every thread releases its own stores of
    # the chunk (release, GPU scope) with one add, so no CTA barrier is needed before the add. A barrier in the
    # chain's loop kept Triton's pipeliner from pipelining the loop's loads at all (triton 3.6 and 3.8: every tile
    # of the step a plain load, none copied ahead)
    o = tl.arange(0, NTHR)  # one element per thread (o < NTHR is all true: it makes ok a per-thread mask)
    tl.atomic_add(ready + idx + o * 0, 1, mask=ok & (o < NTHR), sem="release", scope="gpu")


@triton.jit
def _state_kernel(
    # pointers
    kd, w, u, gc, seq, h0, hs, vnew, ht, ready,
    # sizes
    H: tl.constexpr, D: tl.constexpr, W, S,
    # meta
    BT: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr, MAMBA2: tl.constexpr,
    READY: tl.constexpr, NTHR: tl.constexpr,
):
    # READY: once chunk c's hs and v_new are stored, ready[chunk, head] += NTHR (the launch's threads; release, GPU
    # scope; D / BV programs per head): the sm_90a kernel running beside this one reads them to use the chunk
    state_chain_program(tl.program_id(0), tl.program_id(1), tl.program_id(2), kd, w, u, gc, seq, h0, hs, vnew, ht,
                        ready, H, D, W, S, BT, BV, USE_H0, STORE_HT, MAMBA2, READY, NTHR)


@triton.jit
def state_chain_program(i_v, i_h, i_n, kd, w, u, gc, seq, h0, hs, vnew, ht, ready, H: tl.constexpr, D: tl.constexpr,
                        W, S, BT: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
                        MAMBA2: tl.constexpr, READY: tl.constexpr, NTHR: tl.constexpr):
    # one program of the state chain: value columns i_v * BV.., head i_h, sequence i_n (_state_kernel's grid;
    # also the first role of the backward's _state_epi_kernel)
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
            if READY:
                _chunk_ready(ready, (coff + i_c) * H + i_h, True, NTHR)
    else:
        b_h = tl.zeros([D, BV], dtype=tl.float32)
    # the decay over each chunk, exp(gc at its last row), is loaded one chunk ahead: a load issued in the step that
    # uses it sat on the chain's critical path (a dependent global load per step; nothing pipelines a scalar load)
    b_gnext = tl.load(gc + (bos + tl.minimum(c0 * BT + BT, T) - 1) * H + i_h, mask=c0 < NT, other=0.)
    for i_c in range(c0, NT):
        if READY:
            # the chunk before is marked ready now, a step after its stores were issued: the release waits for
            # this thread's outstanding stores, which by now are that chunk's alone, and long done
            _chunk_ready(ready, (coff + i_c - 1) * H + i_h, i_c > c0, NTHR)
        b_glast = b_gnext
        b_gnext = tl.load(gc + (bos + tl.minimum(i_c * BT + 2 * BT, T) - 1) * H + i_h)  # the next chunk's (or this)
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
        b_h = b_h * tl.exp(b_glast) + dot(tl.trans(b_kd), b_vn.to(b_kd.dtype))  # [D, BV]
    if READY:  # the last chunk
        _chunk_ready(ready, (coff + NT - 1) * H + i_h, c0 < NT, NTHR)
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
def _mem_read(b_q, i_c, i_h, i_kv, bos, T, P, kxb, kp0, coff, W, S, mem_scale,
              q, kx, z, nw, ow, gc, hs, vnew, yp, ss,
              H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, USE_H0: tl.constexpr,
              MAMBA2: tl.constexpr, LOAD_Q: tl.constexpr):
    # memory readout + epilogue of the BT query rows of chunk i_c: their share of out [BT, D] fp32 (Mamba2:
    # 0, its yp and ss stored here). The rows read the state before chunk i_c (one chunk state per BT
    # rows) and the in-chunk pairs. b_q: the rows' q (LOAD_Q: loaded here; b_q is then a placeholder).
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
    b_y = tl.zeros([BT, D], dtype=tl.float32)
    if do_mem:
        if LOAD_Q:
            b_qx = tl.load(q + (o_q * H + i_h)[:, None] * D + o_d[None, :], mask=m_i[:, None], other=0.)
        else:
            b_qx = b_q
        DT = b_qx.dtype
        b_qn = _norm_rows(b_qx.to(tl.float32), MAMBA2) * mem_scale  # [BT, D]
        b_gc = tl.load(gc + o_q * H + i_h, mask=m_i, other=0.)  # [BT], cumsum within the chunk
        pos = t_pos - W
        m_act = m_i & (pos >= S)
        o_row = kxb + tl.where(m_act, pos - kp0, 0)
        b_k = tl.load(kx + (o_row * HKV + i_kv)[:, None] * D + o_d[None, :], mask=m_act[:, None], other=0.)
        # in-chunk causal pairs first (gc is a per-chunk cumsum: exp(gc_i - gc_j) within the chunk), then only
        # input-dtype operands stay live into the products with the state and the new values
        m_low = o_t[:, None] >= o_t[None, :]
        b_s = dot(b_qn.to(DT), tl.trans(_norm_rows(b_k.to(tl.float32), MAMBA2).to(DT)))  # [BT, BT]
        b_s = tl.where(m_low, b_s * tl.exp(tl.where(m_low, b_gc[:, None] - b_gc[None, :], 0.)), 0.).to(DT)
        b_qe = (b_qn * tl.exp(b_gc)[:, None]).to(DT)  # [BT, D]
        b_hc = tl.load(hs + (((coff + i_c) * H + i_h) * D + o_d[:, None]) * D + o_d[None, :])  # [D, D]
        b_mo = dot(b_qe, b_hc)  # [BT, D]
        b_vn = tl.load(vnew + (o_q * H + i_h)[:, None] * D + o_d[None, :], mask=m_act[:, None], other=0.)
        b_mo += dot(b_s, b_vn)  # [BT, D]
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
            b_y = dot(b_uo.to(b_ow.dtype), b_ow)
    elif MAMBA2:
        # no memory token read by these rows: m = 0
        tl.store(yp + (o_q * H + i_h)[:, None] * D + o_d[None, :], tl.zeros([BT, D], dtype=tl.float32)
                 .to(yp.dtype.element_ty), mask=m_i[:, None])
        tl.store(ss + o_q * H + i_h, tl.zeros([BT], dtype=tl.float32), mask=m_i)
    return b_y


@triton.jit
def _mem_rows(b_o, b_q, i_c, i_h, i_kv, bos, T, P, kxb, kp0, coff, W, S, mem_scale,
              q, kx, z, nw, ow, gc, hs, vnew, out, yp, ss,
              H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, USE_H0: tl.constexpr,
              MAMBA2: tl.constexpr, LOAD_Q: tl.constexpr):
    # the BT rows of chunk i_c: window output b_o [BT, D] fp32 plus the memory's share (_mem_read), stored
    b_y = _mem_read(b_q, i_c, i_h, i_kv, bos, T, P, kxb, kp0, coff, W, S, mem_scale, q, kx, z, nw, ow, gc, hs,
                    vnew, yp, ss, H, HKV, D, BT, USE_H0, MAMBA2, LOAD_Q)
    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, D)
    o_q = bos + i_c * BT + o_t
    m_i = i_c * BT + o_t < T
    tl.store(out + (o_q * H + i_h)[:, None] * D + o_d[None, :], (b_o + b_y).to(out.dtype.element_ty),
             mask=m_i[:, None])


# WB: a window drawn per step; TM: the band's padded length: no compile per divisibility of either
@triton.jit(do_not_specialize=["WB", "TM"])
def _fwd_kernel(
    # pointers
    q, kx, vx, sk, sv, z, nw, ow, seq, blocks, gc, hs, vnew, out, yp, ss, lse, ob, lb,
    # sizes
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, W, S, qk_scale, mem_scale, WB, TM,
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
    # behind an outside band the memory's share comes first: the band's output is then not live across the
    # readout and the epilogue, whose tiles are the kernel's largest (the window part left is a few key blocks)
    MEM_FIRST: tl.constexpr = MEMORY and BAND_IN and BM == BT
    if MEM_FIRST:
        b_y = _mem_read(b_q, i_b, i_h, i_kv, bos, T, P, kxb, kp0, coff, W, S, mem_scale, q, kx, z, nw, ow, gc, hs,
                        vnew, yp, ss, H, HKV, D, BT, USE_H0, MAMBA2, False)
    if BAND_IN:
        # the band t - WB < j <= t (WB <= W) over the call's own tokens (positions >= P) was computed
        # outside (band_cudnn): its normalised output ``ob`` [N, TM, H, D] and natural-log lse ``lb``
        # [N, H, TM] (TM rows per sequence: its length, or the padded length of unequal ones) start the
        # online softmax, which goes on with the keys the band did not see: the sinks that left the
        # window, the window's far part t - W < j <= t - WB (band_cudnn's graphs take a window rounded
        # down when W is new) and, on a cache, the ring tail
        o_b = i_n.to(tl.int64) * TM + o_i  # the band's rows of this block
        b_acc = tl.load(ob + (o_b * H + i_h)[:, None] * D + o_d[None, :], mask=m_i[:, None], other=0.)
        b_acc = b_acc.to(tl.float32)
        b_m = tl.load(lb + (i_n * H + i_h).to(tl.int64) * TM + o_i, mask=m_i, other=0.) * 1.4426950408889634
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
        # window keys the band did not see: positions lo .. P - 1 (the ring tail; none for a prefill from
        # position 0) and t - W < j <= t - WB
        hi_far = tl.where(WB < W, t_hi - WB + 1, 0)
        for j0 in range(lo, tl.maximum(tl.minimum(P, t_hi + 1), hi_far), BN):
            o_s = j0 + o_j
            m_s = (((o_s[None, :] < P) | (o_s[None, :] <= t_pos[:, None] - WB)) &
                   (o_s[None, :] > t_pos[:, None] - W) & m_i[:, None])
            m_k = o_s <= t_hi
            o_x = ((kxb + tl.where(m_k, o_s - kp0, 0)) * HKV + i_kv)[:, None] * D + o_d[None, :]
            b_k = tl.load(kx + o_x, mask=m_k[:, None], other=0.)
            b_v = tl.load(vx + o_x, mask=m_k[:, None], other=0.)
            b_acc, b_m, b_l = _attn_block(b_q, b_k, b_v, m_s, b_acc, b_m, b_l, qk_scale, True)
    else:
        # the window band [t_lo - W + 1, t_hi]: masked lower edge, unmasked interior, masked diagonal
        j1, j2 = _band_blocks(t_lo, t_hi, lo, W, BN)
        for j0 in range(lo, j1, BN):
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

    if MEM_FIRST:
        b_o += b_y
    if MEM_FIRST or not MEMORY:
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
    rows ``W ..`` the new tokens. ``gx``: the same rows' gate inputs ``[2, H]`` (``HG = 2 H`` values; 0 for
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
    with their gate inputs): distinct rows, so no two writes meet.
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
