"""Backward of the AHN memory branch (chunked gated delta rule + epilogue), Triton.

Mamba2 (constexpr ``MAMBA2``) is the special case X = I, w = 0 (no delta correction), with
F.normalize for q/k and a norm over all H heads of a token (README.md §6).

Same stream as the forward (prefill.py): one stream element per query row ``i`` of a
sequence, element ``i`` absorbs the token at ``i - W`` (beta = g = 0 while ``i - W < S``),
chunks of BT = 64 elements are query blocks. Per chunk ``c`` with state ``h_c`` before it,
in-chunk cumulative log-decay ``gc``, ``E_rs = exp(gc_r - gc_s)``, ``qn = l2norm(q) D^-0.5``,
``kn = l2norm(k)``, ``X = (I + tril(diag(beta) kn kn^T * E, -1))^-1``, ``w = X (beta e^gc kn)``,
``u = X (beta v)``, ``v_new = u - w h_c``:

    m      = e^gc * (qn h_c) + tril(qn kn^T * E) v_new                         (readout)
    h_c+1  = e^g_last h_c + (kn * e^(g_last - gc))^T v_new

Backward, given ``dy`` (grad of the op output; the epilogue turns it into ``dm``):

1. ``_epi_bwd_kernel`` (chunk-parallel): recompute ``m`` from ``h_c``; epilogue backward
   (RMSNorm, swish gate, per-head projection) -> ``dm``, ``dz``, ``u`` (for ``do_weight``),
   per-chunk partial ``dnorm_weight``; and ``dv_local = tril(qn kn^T * E)^T dm``; stores
   ``qg = qn e^gc`` (input dtype) for the next launch.
2. ``_dh_bwd_kernel`` (sequential over chunks, grid (D/BV, H, N)): ``dh`` in registers, reading
   ``qg`` and the prep pass's ``kd = kn e^(g_last - gc)`` (no normalisation in the sequential loop),
   ``dv_new = dv_local + (kn e^(g_last-gc)) dh_c+1`` (stored over dv_local: each element is read, then
   written, by the one program that owns it),
   ``dh_c = e^g_last dh_c+1 + (qn e^gc)^T dm - w^T dv_new``; stores ``dh_c+1`` per chunk.
3. ``_mem_bwd_h_kernel`` (chunk-parallel, grid (D/BK, H, N)): the products with the chunk states
   for BK key columns (V taken in BV-column slices of h, dh, v_new, dv_new, dm): raw d/dqn into
   ``dq_acc``, the readout / state-transition part of d/dkn into ``dkm_acc``, ``dw = -dv_new h_c^T``
   (input dtype) and per-column-slice partials of d/dgc.
4. ``_mem_bwd_wy_kernel`` (chunk-parallel, grid (H, N)): the WY backward through ``X`` (stored by
   the backward's prep pass), its part of d/dkn into ``dkw_acc``, dv, dbeta, and the in-chunk
   reverse cumsum of dgc -> dg. The l2norm backwards of q and k run in ``_attn_dq_kernel`` and
   ``_attn_dkdv_kernel`` (backward_attn.py). dk/dv of the G query heads of a kv group meet in fp32
   atomics on ``[tokens, HKV, D]`` buffers (never ``[tokens, H, D]``); the two d/dkn parts have
   separate buffers, so with G = 1 every address has one writer and the sums are deterministic.

Memory of the backward: the per-chunk states ``h`` and ``dh`` (``2 * T/64 * H * D * D`` in the
input dtype) plus ``O(T * H * D)`` row buffers (among them ``qg``, ``kd`` and the WY inverse ``X``,
``T * H * BT``, all in the input dtype); the forward saves only its inputs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..common.jit_helpers import chunk_at as _chunk_at
from ..common.jit_helpers import inv_norm as _inv_norm
from ..common.jit_helpers import load_gates as _load_gates
from ..common.jit_helpers import norm_rows as _norm_rows
from .prefill_kernels import state_chain_program


@triton.jit
def _store_delta(out, delta, b_dy, b_y, p_row, o_q, i_h, m_i, H: tl.constexpr, owin, STORE_OWIN: tl.constexpr):
    # the window attention's delta = rowsum(dy * o_win) [BT] fp32, with o_win = out - y_mem: out as
    # stored by the forward (input dtype) and y_mem the memory branch's part of it, recomputed here
    # as the forward's epilogue computes it. o_win so carries out's rounding (bf16: 2^-9 |out|), the
    # same order as flash-attention's delta from the stored bf16 O when |y_mem| is not >> |o_win|
    b_out = tl.load(out + p_row, mask=m_i[:, None], other=0.).to(tl.float32)  # [BT, D]
    tl.store(delta + o_q * H + i_h, tl.sum(b_dy.to(tl.float32) * (b_out - b_y), 1), mask=m_i)
    if STORE_OWIN:
        # o_win itself, for a band backward that takes the softmax's output (cuDNN's computes delta from it)
        tl.store(owin + p_row, (b_out - b_y).to(owin.dtype.element_ty), mask=m_i[:, None])


@triton.jit(do_not_specialize=["W", "S"])
def _epi_bwd_kernel(
    # pointers
    q, k, z, nw, ow, dy, out, delta, seq, chunks, gc, hs, vnew, dm, dvl, uo, dz, dnw_part, ssp, cp, rk, qg, owin,
    # sizes
    W, S, mem_scale,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    # meta
    BT: tl.constexpr, USE_H0: tl.constexpr, MAMBA2: tl.constexpr, PHASE: tl.constexpr,
    STORE_OWIN: tl.constexpr = False,
):
    ready = delta  # not read (WAIT is off)
    # MAMBA2 (x = m silu(z), n = x r, r = rsqrt(mean_{H*D} x^2 + eps), u = n nw, y = u @ ow[h]):
    # dx = r dU nw - x r^3 C / (H D) with dU = dy ow[h]^T and C = sum over the token's H heads of
    # sum_D dU nw x, a cross-head sum. PHASE 1 stores the per-head partials ssp = sum_D x^2 and
    # cp = sum_D dU nw x; the launcher reduces them over heads into rk = (r, r^3 C / (H D)) per
    # token; PHASE 2 recomputes m and dU (cheaper than storing two [T, H, D] rows) and finishes.
    # Every row also gets the window attention's delta (_store_delta): PHASE 0, or PHASE 2 for
    # MAMBA2 (y_mem = r yp needs r); y_mem = 0 in chunks that read no memory.
    _epi_bwd_program(tl.program_id(0), tl.program_id(1), q, k, z, nw, ow, dy, out, delta, seq, chunks, gc, hs, vnew,
                     dm, dvl, uo, dz, dnw_part, ssp, cp, rk, qg, owin, W, S, mem_scale, H, HKV, D, BT, USE_H0, MAMBA2,
                     PHASE, STORE_OWIN, ready, 0, False)


@triton.jit
def _epi_bwd_program(i_h, i_c, q, k, z, nw, ow, dy, out, delta, seq, chunks, gc, hs, vnew, dm, dvl, uo, dz, dnw_part,
                     ssp, cp, rk, qg, owin, W, S, mem_scale, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                     BT: tl.constexpr, USE_H0: tl.constexpr, MAMBA2: tl.constexpr, PHASE: tl.constexpr,
                     STORE_OWIN: tl.constexpr, ready, target, WAIT: tl.constexpr):
    # one (head, chunk) of _epi_bwd_kernel; WAIT (the second role of _state_epi_kernel): first wait until the
    # chain beside it has stored the chunk's state and v_new rows (ready[chunk, head] reaches target, acquire)
    G: tl.constexpr = H // HKV
    i_n, i_b, bos, T = _chunk_at(chunks, seq, i_c)
    coff = tl.load(seq + i_n * 8 + 6).to(tl.int64)

    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, D)
    o_i = i_b * BT + o_t
    m_i = o_i < T
    o_q = bos + o_i
    p_row = (o_q * H + i_h)[:, None] * D + o_d[None, :]
    t_hi = tl.minimum(i_b * BT + BT, T) - 1
    if USE_H0 or (t_hi - W >= S):
        if WAIT:
            # the chain marks every chunk that reads memory (from c0 = (S + W) // BT on, all with an initial
            # state); its programs hold the first tickets, so they are running and never wait: no deadlock
            p_rdy = ready + (coff + i_b) * H + i_h
            cnt = tl.atomic_add(p_rdy, 0, sem="acquire", scope="gpu")
            while cnt < target:
                cnt = tl.atomic_add(p_rdy, 0, sem="acquire", scope="gpu")
            tl.debug_barrier()
        b_q = tl.load(q + p_row, mask=m_i[:, None], other=0.)  # [BT, D]
        b_qn = _norm_rows(b_q.to(tl.float32), MAMBA2) * mem_scale  # [BT, D]
        b_gc = tl.load(gc + o_q * H + i_h, mask=m_i, other=0.)  # [BT]
        b_hc = tl.load(hs + (((coff + i_b) * H + i_h) * D + o_d[:, None]) * D + o_d[None, :])  # [D, D]
        b_qg = (b_qn * tl.exp(b_gc)[:, None]).to(b_q.dtype)  # [BT, D]
        if PHASE != 1:
            tl.store(qg + p_row, b_qg, mask=m_i[:, None])  # for _dh_bwd_kernel (one normalisation)
        b_mo = tl.dot(b_qg, b_hc)  # [BT, D]
        pos = o_i - W
        m_act = m_i & (pos >= S)
        o_row = bos + tl.where(m_act, pos, 0)
        b_k = tl.load(k + (o_row * HKV + i_h // G)[:, None] * D + o_d[None, :], mask=m_act[:, None], other=0.)
        b_kn = _norm_rows(b_k.to(tl.float32), MAMBA2)  # [BT, D]
        # rows past the end have gc = 0: keep exp(gc_r - gc_s) off them (inf * 0 = NaN)
        m_low = (o_t[:, None] >= o_t[None, :]) & m_i[:, None]
        b_s = tl.dot(b_qn.to(b_q.dtype), tl.trans(b_kn.to(b_q.dtype)))  # [BT, BT]
        b_s = tl.where(m_low, b_s * tl.exp(tl.where(m_low, b_gc[:, None] - b_gc[None, :], 0.)), 0.)
        b_vn = tl.load(vnew + p_row, mask=m_act[:, None], other=0.)  # [BT, D]
        b_mo += tl.dot(b_s.to(b_q.dtype), b_vn)  # [BT, D]

        b_z = tl.load(z + o_q * H + i_h, mask=m_i, other=0.).to(tl.float32)  # [BT]
        b_sg = tl.sigmoid(b_z)
        b_gate = b_z * b_sg
        b_dy = tl.load(dy + p_row, mask=m_i[:, None], other=0.)  # [BT, D]
        b_ow = tl.load(ow + (i_h * D + o_d[:, None]) * D + o_d[None, :])  # [D, D]
        b_du = tl.dot(b_dy, tl.trans(b_ow))  # [BT, D]
        b_du = tl.where(m_i[:, None], b_du, 0.)
        if MAMBA2:
            b_nw = tl.load(nw + i_h * D + o_d).to(tl.float32)  # [D], this head's slice of [H * D]
            b_x = b_mo * b_gate[:, None]  # [BT, D]
            if PHASE == 1:
                tl.store(ssp + o_q * H + i_h, tl.sum(b_x * b_x, 1), mask=m_i)
                tl.store(cp + o_q * H + i_h, tl.sum(b_du * b_nw[None, :] * b_x, 1), mask=m_i)
            else:
                b_r = tl.load(rk + o_q * 2, mask=m_i, other=0.)  # [BT]
                b_k2 = tl.load(rk + o_q * 2 + 1, mask=m_i, other=0.)  # [BT]
                b_n = b_x * b_r[:, None]  # [BT, D]
                tl.store(uo + p_row, (b_n * b_nw[None, :]).to(uo.dtype.element_ty), mask=m_i[:, None])
                tl.store(dnw_part + (i_c * H + i_h) * D + o_d, tl.sum(b_n * b_du, 0))
                b_dx = b_r[:, None] * b_du * b_nw[None, :] - b_k2[:, None] * b_x  # [BT, D]
                b_dgate = tl.sum(b_dx * b_mo, 1)  # [BT]
                tl.store(dz + o_q * H + i_h, b_dgate * (b_sg + b_gate * (1. - b_sg)), mask=m_i)
                b_dm = b_dx * b_gate[:, None]  # [BT, D]
                tl.store(dm + p_row, b_dm.to(dm.dtype.element_ty), mask=m_i[:, None])
                b_dvl = tl.dot(tl.trans(b_s.to(b_q.dtype)), b_dm.to(b_q.dtype))  # [BT, D]
                tl.store(dvl + p_row, b_dvl.to(dvl.dtype.element_ty), mask=m_i[:, None])
                # y_mem = r yp, yp rounded to the input dtype as the forward stores it
                b_yp = tl.dot((b_x * b_nw[None, :]).to(b_ow.dtype), b_ow).to(b_q.dtype).to(tl.float32)  # [BT, D]
                _store_delta(out, delta, b_dy, b_r[:, None] * b_yp, p_row, o_q, i_h, m_i, H, owin, STORE_OWIN)
        else:
            # epilogue backward: u = m * rs * nw * z sigmoid(z); y = u @ ow[h]
            b_nw = tl.load(nw + o_d).to(tl.float32)  # [D]
            b_rs = tl.rsqrt(tl.sum(b_mo * b_mo, 1) / D + 1e-5)  # [BT]
            b_n = b_mo * b_rs[:, None]  # [BT, D]
            b_uo = (b_n * b_nw[None, :] * b_gate[:, None]).to(uo.dtype.element_ty)  # [BT, D]
            tl.store(uo + p_row, b_uo, mask=m_i[:, None])
            tl.store(dnw_part + (i_c * H + i_h) * D + o_d, tl.sum(b_n * b_gate[:, None] * b_du, 0))
            b_dgate = tl.sum(b_n * b_nw[None, :] * b_du, 1)  # [BT]
            tl.store(dz + o_q * H + i_h, b_dgate * (b_sg + b_gate * (1. - b_sg)), mask=m_i)
            b_dn = b_du * b_nw[None, :] * b_gate[:, None]
            b_dm = b_rs[:, None] * (b_dn - b_n * (tl.sum(b_dn * b_n, 1) / D)[:, None])  # [BT, D]
            tl.store(dm + p_row, b_dm.to(dm.dtype.element_ty), mask=m_i[:, None])
            b_dvl = tl.dot(tl.trans(b_s.to(b_q.dtype)), b_dm.to(b_q.dtype))  # [BT, D]
            tl.store(dvl + p_row, b_dvl.to(dvl.dtype.element_ty), mask=m_i[:, None])
            # y_mem = u @ ow[h], as the forward's epilogue (u rounded to the input dtype); last, so
            # that the product's tile is not live beside b_s and dm (ptxas sm_90a, triton 3.8, 4
            # warps: 1.3 KB/thread of spill stores here vs 2.9 KB right after the u store)
            _store_delta(out, delta, b_dy, tl.dot(b_uo.to(b_ow.dtype), b_ow), p_row, o_q, i_h, m_i, H, owin, STORE_OWIN)
    elif MAMBA2 and PHASE == 1:
        tl.store(ssp + o_q * H + i_h, tl.zeros([BT], dtype=tl.float32), mask=m_i)
        tl.store(cp + o_q * H + i_h, tl.zeros([BT], dtype=tl.float32), mask=m_i)
    else:
        # no row of the chunk reads a memory token: the readout is 0 and so are u, dz and y_mem
        b_dy = tl.load(dy + p_row, mask=m_i[:, None], other=0.)  # [BT, D]
        _store_delta(out, delta, b_dy, 0., p_row, o_q, i_h, m_i, H, owin, STORE_OWIN)
        tl.store(uo + p_row, tl.zeros([BT, D], dtype=tl.float32).to(uo.dtype.element_ty), mask=m_i[:, None])
        tl.store(dz + o_q * H + i_h, tl.zeros([BT], dtype=tl.float32), mask=m_i)
        tl.store(dnw_part + (i_c * H + i_h) * D + o_d, tl.zeros([D], dtype=tl.float32))


@triton.jit(do_not_specialize=["W", "S"])
def _state_epi_kernel(
    # pointers: the ticket counter and per-(chunk, head) ready counters (int32 zeros), the state chain's, _epi_bwd's
    ticket, ready, kd, w, u, h0, q, k, z, nw, ow, dy, out, delta, seq, chunks, gc, hs, vnew, dm, dvl, uo, dz, dnw_part,
    ssp, cp, rk, qg, owin,
    # sizes: NCHAIN = D / BV * H * N chain programs; NTHR: the launch's threads (a chunk's counter gains NTHR per
    # chain program: each thread releases its own stores)
    W, S, mem_scale, NCHAIN,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    # meta
    BT: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr, MAMBA2: tl.constexpr, PHASE: tl.constexpr,
    STORE_OWIN: tl.constexpr, NTHR: tl.constexpr,
):
    # The backward's re-run of the state chain and _epi_bwd_kernel in one launch, by ticket (the order in which
    # programs start, not their ids): the first NCHAIN tickets run the chain (each a _state_kernel program that
    # counts its chunks ready), the rest run _epi_bwd's (head, chunk) items in chunk order, each waiting for its
    # chunk. The chain is latency-bound and leaves most of each SM idle; the epilogue's items fill it instead of
    # running after the whole chain (their programs fit beside the chain's on one SM).
    t = tl.atomic_add(ticket, 1, sem="relaxed")  # the order in which programs start (no data rides on it)
    NV: tl.constexpr = D // BV
    if t < NCHAIN:
        state_chain_program(t % NV, (t // NV) % H, t // (NV * H), kd, w, u, gc, seq, h0, hs, vnew, hs, ready,
                            H, D, W, S, BT, BV, USE_H0, False, MAMBA2, True, NTHR)
    else:
        e = t - NCHAIN
        _epi_bwd_program(e % H, e // H, q, k, z, nw, ow, dy, out, delta, seq, chunks, gc, hs, vnew, dm, dvl, uo, dz,
                         dnw_part, ssp, cp, rk, qg, owin, W, S, mem_scale, H, HKV, D, BT, USE_H0, MAMBA2, PHASE,
                         STORE_OWIN, ready, NV * NTHR, True)


@triton.jit(do_not_specialize=["W", "S"])
def _dh_bwd_kernel(
    # pointers
    qg, kd, w, gc, dm, dvl, seq, dht, dhs, dvnew, dh0,
    # sizes
    W, S,
    H: tl.constexpr, D: tl.constexpr,
    # meta
    BT: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr, USE_DHT: tl.constexpr, MAMBA2: tl.constexpr,
):
    # the per-chunk rows it reads were made once by the chunk-parallel kernels, not per V slice here:
    # kd = kn e^(g_last - gc) (the prep pass, as the forward's state pass reads it) and
    # qg = qn e^gc (_epi_bwd_kernel, the readout's left operand), both in the input dtype
    i_v, i_h, i_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(seq + i_n * 8).to(tl.int64)
    T = tl.load(seq + i_n * 8 + 1)
    coff = tl.load(seq + i_n * 8 + 6).to(tl.int64)
    NT = tl.cdiv(T, BT)

    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, D)
    o_v = i_v * BV + tl.arange(0, BV)
    p_hv = (i_n * H + i_h) * D * D + o_d[:, None] * D + o_v[None, :]
    if USE_DHT:
        b_dh = tl.load(dht + p_hv).to(tl.float32)  # [D, BV]
    else:
        b_dh = tl.zeros([D, BV], dtype=tl.float32)
    # chunks before the first one that reads memory see a zero state; without an initial
    # state their dh is never used (same c0 as the forward's state kernel)
    if USE_H0:
        c0 = 0
    else:
        c0 = tl.maximum(S + W, 0) // BT
    # exp(gc at each chunk's last row) and dv_local, dv_new's first term, loaded one chunk ahead: issued in the step
    # that uses them, they sat on the chain's critical path (dv_local is the first product's accumulator, not an
    # operand, so the pipeliner leaves it a plain load). dv_new is stored over dv_local chunk by chunk: the chunk
    # read ahead is written one step later, by the same program
    b_gnext = tl.load(gc + (bos + T - 1) * H + i_h, mask=c0 < NT, other=0.)
    o_n = (NT - 1) * BT + o_t
    b_dvl_next = tl.load(dvl + ((bos + o_n) * H + i_h)[:, None] * D + o_v[None, :],
                         mask=((o_n < T) & (c0 < NT))[:, None], other=0.)
    for i_r in range(0, NT - c0):
        i_c = NT - 1 - i_r
        b_glast = b_gnext
        b_dvl = b_dvl_next.to(tl.float32)  # [BT, BV]
        b_gnext = tl.load(gc + (bos + tl.minimum(tl.maximum(i_c, 1) * BT, T) - 1) * H + i_h)  # the chunk before's
        o_n = (i_c - 1) * BT + o_t
        b_dvl_next = tl.load(dvl + ((bos + o_n) * H + i_h)[:, None] * D + o_v[None, :],
                             mask=((o_n >= 0) & (o_n < T) & (i_c > c0))[:, None], other=0.)
        tl.store(dhs + (((coff + i_c) * H + i_h) * D + o_d[:, None]) * D + o_v[None, :], b_dh.to(dhs.dtype.element_ty))
        o_i = i_c * BT + o_t
        m_i = o_i < T
        o_q = bos + o_i
        p_d = (o_q * H + i_h)[:, None] * D + o_d[None, :]
        b_kd = tl.load(kd + p_d, mask=m_i[:, None], other=0.)  # [BT, D], 0 on rows without a memory token
        p_v = (o_q * H + i_h)[:, None] * D + o_v[None, :]
        b_dvn = b_dvl + tl.dot(b_kd, b_dh.to(b_kd.dtype))  # [BT, BV]
        tl.store(dvnew + p_v, b_dvn.to(dvnew.dtype.element_ty), mask=m_i[:, None])
        b_qg = tl.load(qg + p_d, mask=m_i[:, None], other=0.)  # [BT, D]
        b_dm = tl.load(dm + p_v, mask=m_i[:, None], other=0.)  # [BT, BV]
        b_dh = b_dh * tl.exp(b_glast) + tl.dot(tl.trans(b_qg), b_dm.to(b_qg.dtype))  # [D, BV]
        if not MAMBA2:
            # v_new = u - w h_c (Mamba2 has no delta correction: v_new = u does not depend on h)
            b_w = tl.load(w + p_d, mask=m_i[:, None], other=0.)  # [BT, D]
            b_dh -= tl.dot(tl.trans(b_w), b_dvn.to(b_w.dtype))  # [D, BV]
    if USE_H0:
        tl.store(dh0 + p_hv, b_dh)


@triton.jit(do_not_specialize=["W", "S"])
def _mem_bwd_h_kernel(
    # pointers
    q, k, seq, chunks, gc, hs, dhs, vnew, dvnew, dm, dq_acc, dkm_acc, dw_buf, dgc_part,
    # sizes
    W, S, mem_scale, Tt,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    # meta
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr, MAMBA2: tl.constexpr,
    DET: tl.constexpr = False,
):
    # DET (deterministic): dkm_acc is [Tt, H, D], one writer per address (plain stores; the G heads are
    # summed afterwards in a fixed order) instead of [Tt, HKV, D] with atomics.
    # The products with the chunk states, for the BK key columns o_k of one (head, chunk): grid
    # (D/BK, H, chunks). Everything here is linear in the key columns, so the columns split over
    # programs (two [64, 64] programs at D = 128 instead of one [64, 128] one: ~128 fp32 registers
    # of accumulators per thread instead of ~256, and twice the programs); the results stay raw:
    #   dq_acc[:, o_k]  = e^gc (dm h^T) + tril(dm v_new^T E) kn           (d/dqn, l2norm bwd in _attn_dq)
    #   dkm_acc[:, o_k] += tril(dm v_new^T E)^T qn + e^(glast-gc) (v_new dh^T)  (d/dkn, atomics over
    #                      the G heads and with _mem_bwd_wy_kernel; l2norm bwd in _attn_dkdv)
    #   dw_buf[:, o_k]  = -dv_new h^T                                      (input dtype, for the WY part)
    #   dgc_part[i_k]   = this column slice's terms of d/dgc (all sums over key columns)
    i_k, i_h, i_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    G: tl.constexpr = H // HKV
    i_kv = i_h // G
    i_n, i_b, bos, T = _chunk_at(chunks, seq, i_c)
    coff = tl.load(seq + i_n * 8 + 6).to(tl.int64)

    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, D)
    o_k = i_k * BK + tl.arange(0, BK)
    o_i = i_b * BT + o_t
    m_i = o_i < T
    o_q = bos + o_i
    p_rowk = (o_q * H + i_h)[:, None] * D + o_k[None, :]
    t_hi = tl.minimum(i_b * BT + BT, T) - 1
    if USE_H0 or (t_hi - W >= S):
        pos = o_i - W
        m_act = m_i & (pos >= S)
        o_row = bos + tl.where(m_act, pos, 0)
        p_kv = (o_row * HKV + i_kv)[:, None] * D
        # the row norms need whole rows; the column slice is loaded again (L1/L2 hit)
        b_rk = _inv_norm(tl.load(k + p_kv + o_d[None, :], mask=m_act[:, None], other=0.).to(tl.float32), MAMBA2)
        b_k = tl.load(k + p_kv + o_k[None, :], mask=m_act[:, None], other=0.)  # [BT, BK]
        dt = b_k.dtype
        b_kn = b_k.to(tl.float32) * b_rk[:, None]  # [BT, BK]
        b_gc = tl.load(gc + o_q * H + i_h, mask=m_i, other=0.)  # [BT]
        i_last = t_hi - i_b * BT
        b_glast = tl.sum(tl.where(o_t == i_last, b_gc, 0.), 0)
        b_eg = tl.exp(b_gc)  # [BT]
        b_ekd = tl.where(m_act, tl.exp(b_glast - b_gc), 0.)  # [BT]
        m_low = (o_t[:, None] >= o_t[None, :]) & m_i[:, None]
        m_slow = (o_t[:, None] > o_t[None, :]) & m_i[:, None]

        # products over V, slice by slice
        b_ds = tl.zeros([BT, BT], dtype=tl.float32)  # dm v_new^T
        b_dqi = tl.zeros([BT, BK], dtype=tl.float32)  # dm h^T
        b_dkh = tl.zeros([BT, BK], dtype=tl.float32)  # v_new dh^T
        b_dw = tl.zeros([BT, BK], dtype=tl.float32)  # dv_new h^T
        # sum(h * dh) as the trace of h dh^T: a tensor-core product, so that h and dh feed only tl.dot in
        # this loop. With an elementwise h * dh here (a register use of the two tiles) the pipeliner of
        # triton 3.6 (3.8 builds the same TTGIR) gave h and dh 2 buffers for a 2-ahead prefetch while
        # the iteration's tl.dot ran asynchronously on the same buffer: a race (H200, run-to-run
        # gradients 8e-2 apart; benchmarks/NOTES_backward.md has the analysis)
        b_hdh = tl.zeros([BK, BK], dtype=tl.float32)  # h dh^T
        p_st = ((coff + i_b) * H + i_h) * D * D + o_k[:, None] * D
        for i_v in range(D // BV):
            o_v = i_v * BV + tl.arange(0, BV)
            p_rv = (o_q * H + i_h)[:, None] * D + o_v[None, :]
            b_hc = tl.load(hs + p_st + o_v[None, :])  # [BK, BV]
            b_dhn = tl.load(dhs + p_st + o_v[None, :])  # [BK, BV]
            b_vn = tl.load(vnew + p_rv, mask=m_act[:, None], other=0.)  # [BT, BV]
            b_dm = tl.load(dm + p_rv, mask=m_i[:, None], other=0.)  # [BT, BV]
            b_ds += tl.dot(b_dm, tl.trans(b_vn))  # [BT, BT]
            b_dqi += tl.dot(b_dm, tl.trans(b_hc))  # [BT, BK]
            b_dkh += tl.dot(b_vn, tl.trans(b_dhn))  # [BT, BK]
            b_hdh += tl.dot(b_hc, tl.trans(b_dhn))  # [BK, BK]
            if not MAMBA2:
                b_dvn = tl.load(dvnew + p_rv, mask=m_i[:, None], other=0.)  # [BT, BV]
                b_dw += tl.dot(b_dvn, tl.trans(b_hc))  # [BT, BK]
        if not MAMBA2:
            # v_new = u - w h_c: dw = -dv_new h^T
            tl.store(dw_buf + p_rowk, (-b_dw).to(dt), mask=m_i[:, None])

        # readout: m = e^gc (qn h) + tril(qn kn^T E) v_new
        p_row = (o_q * H + i_h)[:, None] * D
        b_rq = _inv_norm(tl.load(q + p_row + o_d[None, :], mask=m_i[:, None], other=0.).to(tl.float32), MAMBA2)
        b_qn = tl.load(q + p_row + o_k[None, :], mask=m_i[:, None], other=0.).to(tl.float32) * \
            (b_rq * mem_scale)[:, None]  # [BT, BK]
        b_E = tl.exp(tl.where(m_low, b_gc[:, None] - b_gc[None, :], 0.))  # [BT, BT]
        b_ds = tl.where(m_low, b_ds * b_E, 0.)  # [BT, BT]
        b_dqi = b_dqi * b_eg[:, None]
        tl.store(dq_acc + p_rowk, b_dqi + tl.dot(b_ds.to(dt), b_kn.to(dt)), mask=m_i[:, None])
        # d/dgc of the readout, from P_rs = ds_rs (qn_r . kn_s): + row sums, - column sums, and
        # qn . dq_inter. Not as qn.dq - kn.dk: there the diagonal P_rr enters twice and cancels
        # only in exact arithmetic; with strong decay (E ~ 0 off the diagonal) the bf16 rounding
        # of that cancellation swamped dg (rel err 0.47 on dA_log-side grads, H100, bf16).
        b_P = tl.where(m_slow, b_ds * tl.dot(b_qn.to(dt), tl.trans(b_kn.to(dt))), 0.)  # [BT, BT]
        b_dgc = tl.sum(b_qn * b_dqi, 1) + tl.sum(b_P, 1) - tl.sum(b_P, 0)  # [BT]
        # state transition h_c+1 = e^glast h_c + (kn e^(glast - gc))^T v_new
        b_dkh = b_dkh * b_ekd[:, None]
        b_t = tl.sum(b_kn * b_dkh, 1)  # [BT]
        b_dgc -= b_t
        b_dglast = tl.sum(b_t, 0) + tl.exp(b_glast) * \
            tl.sum(tl.sum(tl.where(tl.arange(0, BK)[:, None] == tl.arange(0, BK)[None, :], b_hdh, 0.), 1), 0)
        b_dgc += tl.where(o_t == i_last, b_dglast, 0.)
        tl.store(dgc_part + (i_k * Tt + o_q) * H + i_h, b_dgc, mask=m_i)
        b_dk = tl.dot(tl.trans(b_ds.to(dt)), b_qn.to(dt)) + b_dkh  # [BT, BK]
        if DET:
            tl.store(dkm_acc + (o_row * H + i_h)[:, None] * D + o_k[None, :], b_dk, mask=m_act[:, None])
        else:
            tl.atomic_add(dkm_acc + (o_row * HKV + i_kv)[:, None] * D + o_k[None, :], b_dk, mask=m_act[:, None],
                          sem="relaxed")
    else:
        tl.store(dq_acc + p_rowk, tl.zeros([BT, BK], dtype=tl.float32), mask=m_i[:, None])


@triton.jit(do_not_specialize=["W", "S"])
def _mem_bwd_wy_kernel(
    # pointers
    k, v, a, b, A_log, dt_bias, seq, chunks, gc, xs, dvnew, dw_buf, dgc_part, dkw_acc, dv_acc, dg_tok, dbeta_tok,
    # sizes
    W, S, Tt,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    # meta
    BT: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, GATES: tl.constexpr, USE_H0: tl.constexpr,
    MAMBA2: tl.constexpr, DET: tl.constexpr = False,
):
    # DET (deterministic): dv_acc and dkw_acc are [Tt, H, D] with one writer per address; dkw_acc is
    # _mem_bwd_h_kernel's dkm_acc, whose rows this program reads and rewrites (plain loads and stores;
    # the G heads are summed afterwards in a fixed order).
    # The rest of the chunk's memory gradients, after _mem_bwd_h_kernel: grid (H, chunks). The WY
    # backward through X (stored by the backward's prep pass): u = X Vb -> dv, dbeta; w = X Kb with
    # dw from _mem_bwd_h_kernel -> dX, dL = -X^T dX X^T -> dk (d/dkn, into dkw_acc: not dkm_acc, so
    # that with one query head per kv head every address has one writer and the sums are
    # deterministic), dbeta, dgc; then the in-chunk reverse
    # cumsum of dgc (this kernel's terms plus the NK column partials) -> dg. MAMBA2: X = I, w = 0,
    # u = dt v: only dv = dt dv_new and d(dt) = dv_new . v.
    i_h, i_c = tl.program_id(0), tl.program_id(1)
    G: tl.constexpr = H // HKV
    i_kv = i_h // G
    i_n, i_b, bos, T = _chunk_at(chunks, seq, i_c)

    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, D)
    o_i = i_b * BT + o_t
    m_i = o_i < T
    o_q = bos + o_i
    t_hi = tl.minimum(i_b * BT + BT, T) - 1
    if USE_H0 or (t_hi - W >= S):
        pos = o_i - W
        m_act = m_i & (pos >= S)
        o_row = bos + tl.where(m_act, pos, 0)
        b_g, b_beta = _load_gates(a, b, A_log, dt_bias, o_row, m_act, i_h, H, GATES)
        b_dgc = tl.zeros([BT], dtype=tl.float32)
        for i_k in range(NK):
            b_dgc += tl.load(dgc_part + (i_k * Tt + o_q) * H + i_h, mask=m_i, other=0.)
        b_dbeta = tl.zeros([BT], dtype=tl.float32)
        dt = k.dtype.element_ty
        if not MAMBA2:
            b_Xc = tl.load(xs + (o_q * H + i_h)[:, None] * BT + o_t[None, :], mask=m_i[:, None], other=0.)
            b_dXv = tl.zeros([BT, BT], dtype=tl.float32)  # dv_new Vb^T
        for i_v in range(D // BV):
            o_v = i_v * BV + tl.arange(0, BV)
            p_rv = (o_q * H + i_h)[:, None] * D + o_v[None, :]
            p_kvv = (o_row * HKV + i_kv)[:, None] * D + o_v[None, :]
            b_dvn = tl.load(dvnew + p_rv, mask=m_i[:, None], other=0.)  # [BT, BV]
            b_v = tl.load(v + p_kvv, mask=m_act[:, None], other=0.).to(tl.float32)  # [BT, BV]
            if MAMBA2:
                b_dVb = b_dvn.to(tl.float32)  # u = dt v: dv = dt du, d(dt) = du . v
            else:
                b_Vb = (b_v * b_beta[:, None]).to(dt)
                b_dXv += tl.dot(b_dvn, tl.trans(b_Vb))  # [BT, BT]
                # u = X Vb: dVb = X^T dv_new, dv = beta dVb
                b_dVb = tl.dot(tl.trans(b_Xc), b_dvn)  # [BT, BV]
            b_dbeta += tl.sum(b_dVb * b_v, 1)
            if DET:
                tl.store(dv_acc + (o_row * H + i_h)[:, None] * D + o_v[None, :], b_dVb * b_beta[:, None],
                         mask=m_act[:, None])
            else:
                tl.atomic_add(dv_acc + p_kvv, b_dVb * b_beta[:, None], mask=m_act[:, None], sem="relaxed")
        if not MAMBA2:
            # the keys after the value loop, so that their fp32 tile is not live across it
            p_kv = (o_row * HKV + i_kv)[:, None] * D + o_d[None, :]
            b_kf = tl.load(k + p_kv, mask=m_act[:, None], other=0.).to(tl.float32)  # [BT, D]
            b_kn = b_kf * _inv_norm(b_kf, MAMBA2)[:, None]  # [BT, D]
            b_gc = tl.load(gc + o_q * H + i_h, mask=m_i, other=0.)  # [BT]
            b_eg = tl.exp(b_gc)  # [BT]
            m_low = (o_t[:, None] >= o_t[None, :]) & m_i[:, None]
            m_slow = (o_t[:, None] > o_t[None, :]) & m_i[:, None]
            # w = X Kb, dw = -dv_new h^T from _mem_bwd_h_kernel (input dtype)
            b_dw = tl.load(dw_buf + (o_q * H + i_h)[:, None] * D + o_d[None, :], mask=m_i[:, None], other=0.)
            b_Kb = b_kn * (b_beta * b_eg)[:, None]  # [BT, D]
            b_dX = tl.dot(b_dw, tl.trans(b_Kb.to(dt))) + b_dXv  # [BT, BT]
            b_dKb = tl.dot(tl.trans(b_Xc), b_dw)  # [BT, D]
            b_dk = b_dKb * (b_beta * b_eg)[:, None]
            b_dbeta += tl.sum(b_dKb * b_kn, 1) * b_eg
            b_dgc += tl.sum(b_dKb * b_Kb, 1)
            # dL = -X^T dX X^T on the strictly lower triangle
            b_dL = -tl.dot(tl.dot(tl.trans(b_Xc), b_dX.to(dt)).to(dt), tl.trans(b_Xc))  # [BT, BT]
            b_E = tl.exp(tl.where(m_low, b_gc[:, None] - b_gc[None, :], 0.))  # [BT, BT]
            b_kk = tl.dot(b_kn.to(dt), tl.trans(b_kn.to(dt)))  # [BT, BT]
            b_dLE = tl.where(m_slow, b_dL * b_E * b_kk, 0.)  # d/dbeta_r of L_rs, times dL
            b_dbeta += tl.sum(b_dLE, 1)
            b_dLL = b_dLE * b_beta[:, None]  # dL * L
            b_dgc += tl.sum(b_dLL, 1) - tl.sum(b_dLL, 0)
            b_Gm = tl.where(m_slow, b_dL * b_E * b_beta[:, None], 0.).to(dt)
            b_dk += tl.dot(b_Gm, b_kn.to(dt)) + tl.dot(tl.trans(b_Gm), b_kn.to(dt))
            if DET:
                p_kh = (o_row * H + i_h)[:, None] * D + o_d[None, :]
                b_dk += tl.load(dkw_acc + p_kh, mask=m_act[:, None], other=0.)
                tl.store(dkw_acc + p_kh, b_dk, mask=m_act[:, None])
            else:
                tl.atomic_add(dkw_acc + p_kv, b_dk, mask=m_act[:, None], sem="relaxed")

        # gc is the in-chunk inclusive cumsum of g: dg_p = sum_{r >= p} dgc_r
        b_dgc = tl.where(m_i, b_dgc, 0.)
        b_dg = tl.sum(tl.where(o_t[:, None] <= o_t[None, :], b_dgc[None, :], 0.), 1)  # [BT]
        tl.store(dg_tok + o_row * H + i_h, b_dg, mask=m_act)
        tl.store(dbeta_tok + o_row * H + i_h, b_dbeta, mask=m_act)


@triton.jit
def _do_weight_kernel(u, dy, part, Tt, TS, H: tl.constexpr, D: tl.constexpr, BK: tl.constexpr):
    # do_weight[h] = sum_t u[t, h]^T dy[t, h], split over token slices: program (head, slice) stores the fp32
    # partial of its TS tokens, [slices, H, D, D], which the caller sums in slice order (deterministic). One
    # [D, Tt] x [Tt, D] product per head leaves H x (D / tile)^2 output tiles, each reducing over every token
    # (cuBLAS: 0.58 ms at T = 32k, H = 16, D = 128 on an H100 for 268 MB of reads)
    i_h, i_s = tl.program_id(0), tl.program_id(1)
    o_d = tl.arange(0, D)
    t1 = tl.minimum(i_s * TS + TS, Tt)
    b_acc = tl.zeros([D, D], dtype=tl.float32)
    for t in range(i_s * TS, t1, BK):
        o_t = t + tl.arange(0, BK)
        m_t = o_t < t1
        p_x = (o_t.to(tl.int64) * H + i_h)[:, None] * D + o_d[None, :]
        b_u = tl.load(u + p_x, mask=m_t[:, None], other=0.)  # [BK, D]
        b_dy = tl.load(dy + p_x, mask=m_t[:, None], other=0.)
        b_acc += tl.dot(tl.trans(b_u), b_dy)
    tl.store(part + ((i_s * H + i_h) * D + o_d[:, None]) * D + o_d[None, :], b_acc)
