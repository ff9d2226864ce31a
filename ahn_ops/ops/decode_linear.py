"""Skinny projections of the decode step (Triton) with their neighbours fused in: RMSNorm before,
RoPE, SiLU * up or the residual add after.

At small batch a decode step's projections are matrix-vector products: they move their weights once
and do next to nothing else, so what costs is the number of launches (each one drains and refills
the GPU, even inside a CUDA graph) and how many bytes are in flight per SM. The plain step runs
per layer (with the fused glue of :mod:`model_glue`) an RMSNorm, the q and stacked k/v/gates
projections, RoPE, o_proj, a residual add + RMSNorm, gate and up projections, SiLU * up and down_proj
(its residual add goes into the next layer's RMSNorm): 10 launches. Here it is 4:

- :func:`norm_qkvg`: RMSNorm of the residual stream, then q_proj and the stacked k/v/gates
  projection (:func:`ahn_ops.fast_decode.model_parts.stack_kv_gates`) in one launch, RoPE on q and k applied
  to the rounded projections in registers;
- :func:`linear_residual`: ``residual + x @ W^T (+ bias)`` (o_proj, down_proj);
- :func:`norm_gate_up`: RMSNorm, gate and up projections, ``silu(gate) * up``.

At batch 1-2 the projections run as :func:`_stream_kernel`: a few programs per SM, each looping over row
blocks with the next block's weights already requested while it reduces one (register double buffering;
Triton's software pipelining covers only loads that feed ``tl.dot``). One block per program left each
slot idle from a program's last load until the next program's first: B=1 gate/up went from 81% to 92% of
the copy bandwidth, the whole 3B step at T=32k from 2.70 to 2.51 ms/token (H200). These
kernels are also chained (:data:`CHAIN`): each is a programmatic dependent launch that lets the next one
launch as it starts and requests its first weight tiles before ``griddepcontrol.wait`` (everything the
previous kernels write is read after it), so the next kernel's programs take the SMs as this one's leave
(2.51 -> 2.40 ms/token at B=1). The same chaining with one block per program had been slower (56.1 vs
54.3 us per layer): its dependents could launch only once every program had started.

Every rounding step of the torch modules is kept (RMSNorm output, projection output rounded to the
activation dtype before RoPE / SiLU / the residual add, as ``_add_rms_norm_kernel`` and
``rope_halves`` in :mod:`model_glue` do), so the fused step differs from the plain one only in fp32
summation order.

Each row block is ``2 * BN2`` output rows, reduced over ``K`` in ``BK`` tiles: a pair of ``[BN2, BK]`` weight tiles
(the two halves of a RoPE pair, the matching rows of gate and up, or two consecutive row blocks)
times the ``[BM, BK]`` activations. At batch 1-2 (and in float32, up to :data:`MAX_BROADCAST_BATCH`)
as a broadcast product summed over ``BK`` (``BM`` = the batch padded to a power of two; ``BK`` large
so that each SM has tens of KB of loads in flight). From batch 3 on in bf16/fp16 (up to
:data:`MAX_BATCH`) on tensor cores: the two tiles as one ``[2 BN2, BK]`` operand times the
activations' ``[BK, 16]`` (the batch zero-padded to :data:`MMA_BM` rows), where the broadcast product
turned compute-bound (B=4: 80.5 us per layer vs cuBLAS + glue 71.9 on the H200). With every projection
fused that path is not faster than cuBLAS + glue at B=8 (H200: 80.7 vs 74.4 us per layer):
its gate/up kernel streams at 47% of the copy bandwidth against cuBLAS's 72%, while q/k/v/gates with
RMSNorm and RoPE beat cuBLAS alone (11.3 vs 12.8 us). So from batch 3 on ``StaticDecoder`` fuses all but
the MLP's gate/up (``DecodePlan.fuse_gate_up``), which stays on cuBLAS: whole 3B-shape step 3-5% faster than
cuBLAS + glue at B = 4, 8, 16 (H200). Tile sizes per
(projection kind, BM) live in :data:`CONFIGS` (``benchmarks/bench_decode_linear.py`` sweeps them).

Internal helpers of :class:`ahn_ops.fast_decode.StaticDecoder` (no autograd); inputs are 2-D
``[B, n]`` with a unit last stride.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from .common.tl_utils import dot
from .model_glue import rope_halves

__all__ = ["norm_qkvg", "linear_residual", "norm_gate_up", "supports", "MAX_BATCH", "CONFIGS"]

MAX_BATCH = 16            # rows per launch (bf16/fp16)
MAX_BROADCAST_BATCH = 4   # float32 (no tensor-core path) and head_dim < 16
MMA_MIN_BATCH = 3         # from this batch on the products run on tensor cores
MMA_BM = 16               # the batch padded to one tensor-core tile

_PROJ, _SILU, _RESID = 0, 1, 2

# (BN2, BK, num_warps, num_stages[, persist]) per (projection, BM), from
# ``benchmarks/bench_decode_linear.py --sweep`` (``--persist`` for the persistent kernel). persist > 0:
# :func:`_stream_kernel` with that many programs per SM, num_stages = weight tiles held in registers (the one
# reduced + 1 or 2 requested ahead).
CONFIGS: Dict[Tuple[str, int], Tuple] = {  # H200 sweep (BM=2: BM=4's)
    # BM = 1, 2: the persistent kernel (5th entry: programs per SM), H200 sweep (`--sweep --persist`),
    # us vs the one-block-per-program configs before it: B=1 qkvg 6.21 vs 6.80, o_proj 4.97 vs 5.26, gate_up
    # 23.89 vs 26.90 (92% of copy bw), down_proj 14.21 vs 16.20; B=2 qkvg 7.04 vs 8.31, o_proj 5.19 vs 6.10,
    # gate_up 24.62 vs 33.98; down_proj at B=2 swept: 14.44 vs 16.7 with B=1's config
    ("qkvg", 1): (1, 2048, 4, 2, 6), ("qkvg", 2): (1, 2048, 4, 2, 4), ("qkvg", 4): (4, 2048, 4, 4),
    ("o_proj", 1): (1, 2048, 4, 2, 4), ("o_proj", 2): (1, 2048, 4, 2, 4),
    ("o_proj", 4): (2, 4096, 4, 3),
    ("down_proj", 1): (1, 4096, 4, 2, 4), ("down_proj", 2): (4, 2048, 4, 2, 2),
    ("down_proj", 4): (4, 4096, 4, 1),
    ("gate_up", 1): (1, 2048, 4, 2, 6), ("gate_up", 2): (2, 2048, 4, 2, 4),
    ("gate_up", 4): (4, 4096, 4, 2),
    # tensor-core path (B = 3..16, BM = MMA_BM), H200 sweep at B=8, us vs cuBLAS alone: qkvg 11.34
    # vs 12.80, o_proj 6.42 vs 6.44, gate_up 46.46 vs 29.69, down_proj 18.02 vs 16.59; whole layer 80.7 vs 74.4
    ("qkvg", 16): (16, 256, 4, 4), ("o_proj", 16): (8, 512, 4, 4), ("down_proj", 16): (8, 512, 4, 4),
    ("gate_up", 16): (16, 128, 4, 2),
}


def _config(key, BM, config):
    """(BN2, BK, num_warps, num_stages, persist): a table entry or ``config``; missing trailing entries are
    num_stages 3, persist 0 (persist: programs per SM of the persistent broadcast-product kernel, 0 = one row
    block per program)."""
    c = tuple(config) if config is not None else CONFIGS[(key, BM)]
    if not 3 <= len(c) <= 5:
        raise ValueError(f"config must be (BN2, BK, num_warps[, num_stages[, persist]]), got {c}")
    return c + (3, 0)[len(c) - 3:]


@triton.jit
def _rms_apply(xv, rstd, wn):
    """Qwen2RMSNorm's steps on raw activations ``xv`` (activation dtype): normalised in fp32 by ``rstd``,
    rounded, times the norm weight ``wn``, rounded (``rstd`` and ``wn`` broadcast against ``xv``)."""
    y = (xv.to(tl.float32) * rstd).to(xv.dtype)
    return (wn.to(tl.float32) * y.to(tl.float32)).to(xv.dtype)


@triton.jit
def _x_tile(xrow, nw, rstd, kk, K, bmask, RMS: tl.constexpr):
    """Activations ``[BM, BK]`` at columns ``kk`` in fp32; with ``RMS`` normalised (:func:`_rms_apply`)."""
    km = kk < K
    xv = tl.load(xrow + kk[None, :], mask=bmask[:, None] & km[None, :], other=0.)
    if RMS:
        xv = _rms_apply(xv, rstd[:, None], tl.load(nw + kk, mask=km, other=0.)[None, :])
    return xv.to(tl.float32)


@triton.jit
def _rstd(xrow, bmask, K, eps, BM: tl.constexpr, BK: tl.constexpr):
    """``rsqrt(mean(x^2) + eps)`` per row of ``x`` ``[BM, K]`` (fp32 sum of squares, as Qwen2RMSNorm)."""
    ss = tl.zeros([BM], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        xv = tl.load(xrow + kk[None, :], mask=bmask[:, None] & (kk < K)[None, :], other=0.).to(tl.float32)
        ss += tl.sum(xv * xv, 1)
    return tl.rsqrt(ss / K + eps)


@triton.jit
def _rows(p, w1, b1, w2, b2, out1, o1_s, out2, o2_s, N1, N2, R1, R2, P1,
          MODE: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, D: tl.constexpr, BN2: tl.constexpr):
    """Which rows row block ``p`` owns, without branches: (weight of the lo tile, of the hi tile, bias of each
    (with whether it exists), output, its row stride, first row of the lo tile, of the hi tile, rows of the
    output, RoPE?).
    SILU (MODE 1): rows ``p BN2 ..`` of gate (w1, lo) and up (w2, hi). Otherwise block ``p`` of w1 (``p < P1``)
    or ``p - P1`` of w2: two consecutive row blocks, or (MODE 0, the first ``R // (2 BN2)`` blocks of the
    weight) the rows d and d + D/2 of one head (a RoPE pair)."""
    HALF: tl.constexpr = D // 2
    if MODE == 1:
        wlo = w1
        whi = w2
        blo = b1
        bhi = b2
        out = out1
        o_s = o1_s
        N = N1
        base_lo = p * BN2
        base_hi = base_lo
        has_lo = HAS_B1
        has_hi = HAS_B2
        rope = False
    else:
        first = p < P1
        wlo = tl.where(first, w1, w2)
        whi = wlo
        blo = tl.where(first, b1, b2)
        bhi = blo
        out = tl.where(first, out1, out2)
        o_s = tl.where(first, o1_s, o2_s)
        N = tl.where(first, N1, N2)
        R = tl.where(first, R1, R2)
        q = tl.where(first, p, p - P1)
        has_lo = tl.where(first, HAS_B1, HAS_B2)
        has_hi = has_lo
        nrope = R // (2 * BN2)
        rope = (q < nrope) & (MODE == 0)
        head = q // (HALF // BN2)
        base_lo = tl.where(rope, head * D + (q % (HALF // BN2)) * BN2, R + (q - nrope) * (2 * BN2))
        base_hi = tl.where(rope, base_lo + HALF, base_lo + BN2)
    return wlo, whi, blo, bhi, has_lo, has_hi, out, o_s, base_lo, base_hi, N, rope


@triton.jit
def _epilogue(acc_lo, acc_hi, blo, bhi, has_lo, has_hi, out, o_s, rows_lo, rows_hi, mlo, mhi, rope,
              bm, bmask, res, r_s, cos, sin, cs_s, MODE: tl.constexpr, D: tl.constexpr):
    """Bias, round to the activation dtype (the projection's output), then the neighbour op and the stores:
    SiLU(gate) * up (MODE 1), the residual add (MODE 2), RoPE on the rounded pair where ``rope`` (MODE 0)."""
    dt = out.dtype.element_ty
    acc_lo += tl.load(blo + rows_lo, mask=mlo & has_lo, other=0.).to(tl.float32)[None, :]
    acc_hi += tl.load(bhi + rows_hi, mask=mhi & has_hi, other=0.).to(tl.float32)[None, :]
    lo = acc_lo.to(dt).to(tl.float32)
    hi = acc_hi.to(dt).to(tl.float32)
    orow = bm.to(tl.int64)[:, None] * o_s
    sm_lo = bmask[:, None] & mlo[None, :]
    sm_hi = bmask[:, None] & mhi[None, :]
    if MODE == 1:
        act = (lo / (1. + tl.exp(-lo))).to(dt).to(tl.float32)
        tl.store(out + orow + rows_lo[None, :], (act * hi).to(dt), mask=sm_lo)
    else:
        if MODE == 2:
            rrow = res + bm.to(tl.int64)[:, None] * r_s
            lo += tl.load(rrow + rows_lo[None, :], mask=sm_lo, other=0.).to(tl.float32)
            hi += tl.load(rrow + rows_hi[None, :], mask=sm_hi, other=0.).to(tl.float32)
        y1 = lo.to(dt)
        y2 = hi.to(dt)
        if MODE == 0:  # RoPE on the rounded projection outputs, as the plain step's rope_qk
            HALF: tl.constexpr = D // 2
            d = rows_lo % D
            crow = bm.to(tl.int64)[:, None] * cs_s
            cm = bmask[:, None] & rope
            c1 = tl.load(cos + crow + d[None, :], mask=cm, other=0.).to(tl.float32)
            c2 = tl.load(cos + crow + HALF + d[None, :], mask=cm, other=0.).to(tl.float32)
            s1 = tl.load(sin + crow + d[None, :], mask=cm, other=0.).to(tl.float32)
            s2 = tl.load(sin + crow + HALF + d[None, :], mask=cm, other=0.).to(tl.float32)
            r1, r2 = rope_halves(y1, y2, c1, c2, s1, s2)
            y1 = tl.where(rope, r1, y1)
            y2 = tl.where(rope, r2, y2)
        tl.store(out + orow + rows_lo[None, :], y1, mask=sm_lo)
        tl.store(out + orow + rows_hi[None, :], y2, mask=sm_hi)


@triton.jit
def _bcast_acc(xrow, nw, rstd, wlo, whi, rows_lo, rows_hi, mlo, mhi, bmask, K,
               RMS: tl.constexpr, BM: tl.constexpr, BN2: tl.constexpr, BK: tl.constexpr):
    """``x @ W^T`` of the lo and hi row tiles as broadcast products summed over ``BK`` (fp32), looping over K."""
    plo = wlo + rows_lo.to(tl.int64)[:, None] * K              # [BN2, 1]
    phi = whi + rows_hi.to(tl.int64)[:, None] * K
    acc_lo = tl.zeros([BM, BN2], dtype=tl.float32)
    acc_hi = tl.zeros([BM, BN2], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < K
        xf = _x_tile(xrow, nw, rstd, kk, K, bmask, RMS)
        wl = tl.load(plo + kk[None, :], mask=mlo[:, None] & km[None, :], other=0.).to(tl.float32)
        wh = tl.load(phi + kk[None, :], mask=mhi[:, None] & km[None, :], other=0.).to(tl.float32)
        acc_lo += tl.sum(xf[:, None, :] * wl[None, :, :], 2)
        acc_hi += tl.sum(xf[:, None, :] * wh[None, :, :], 2)
    return acc_lo, acc_hi


@triton.jit
def _trigger(TRIGGER: tl.constexpr):
    if TRIGGER:  # let the next kernel launch now (programmatic dependent launch; it waits for our writes)
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _skinny_kernel(x, x_s, nw, eps,
                   w1, b1, w2, b2, out1, o1_s, out2, o2_s,
                   res, r_s, cos, sin, cs_s,
                   B, K, N1, N2, R1, R2, P1,
                   MODE: tl.constexpr, RMS: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
                   D: tl.constexpr, BM: tl.constexpr, BN2: tl.constexpr, BK: tl.constexpr,
                   MMA: tl.constexpr = False, TRIGGER: tl.constexpr = False):
    """One row block per program (see the module docstring), on tensor cores (``MMA``) or as a broadcast
    product with a K loop."""
    pid = tl.program_id(0)
    _trigger(TRIGGER)
    bm = tl.arange(0, BM)
    bmask = bm < B
    dt = x.dtype.element_ty
    wlo, whi, blo, bhi, has_lo, has_hi, out, o_s, base_lo, base_hi, N, rope = _rows(
        pid, w1, b1, w2, b2, out1, o1_s, out2, o2_s, N1, N2, R1, R2, P1, MODE, HAS_B1, HAS_B2, D, BN2)
    rows_lo = base_lo + tl.arange(0, BN2)
    rows_hi = base_hi + tl.arange(0, BN2)
    mlo = rows_lo < N
    mhi = rows_hi < N
    xrow = x + bm.to(tl.int64)[:, None] * x_s                      # [BM, 1]
    acc_lo = tl.zeros([BM, BN2], dtype=tl.float32)
    acc_hi = tl.zeros([BM, BN2], dtype=tl.float32)
    rstd = tl.zeros([BM], dtype=tl.float32)
    if RMS:
        rstd = _rstd(xrow, bmask, K, eps, BM, BK)
    if MMA:
        # tensor cores (B > 2, bf16/fp16): the program's 2 BN2 weight rows (lo tile then hi tile) as one
        # [2 BN2, BK] operand times the activations' [BK, BM] (BM = 16 rows, the batch zero-padded): the
        # products are the same exact bf16/fp16 products, summed in fp32 in another order
        ar2 = tl.arange(0, 2 * BN2)
        second = ar2 >= BN2
        rows2 = tl.where(second, base_hi - BN2, base_lo) + ar2
        m2 = rows2 < N
        acc2 = tl.zeros([2 * BN2, BM], dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            km = kk < K
            xb = _x_tile(xrow, nw, rstd, kk, K, bmask, RMS).to(dt)  # exact: already rounded to dt
            off = rows2.to(tl.int64)[:, None] * K + kk[None, :]
            if MODE == 1:  # gate rows, then up rows
                wt = (tl.load(wlo + off, mask=(~second & m2)[:, None] & km[None, :], other=0.)
                      + tl.load(whi + off, mask=(second & m2)[:, None] & km[None, :], other=0.))
            else:
                wt = tl.load(wlo + off, mask=m2[:, None] & km[None, :], other=0.)
            acc2 += dot(wt, tl.trans(xb))  # [2 BN2, BM]
        acc_lo, acc_hi = tl.split(tl.permute(tl.reshape(tl.trans(acc2), (BM, 2, BN2)), (0, 2, 1)))
    if not MMA:
        acc_lo, acc_hi = _bcast_acc(xrow, nw, rstd, wlo, whi, rows_lo, rows_hi, mlo, mhi, bmask, K,
                                    RMS, BM, BN2, BK)
    _epilogue(acc_lo, acc_hi, blo, bhi, has_lo, has_hi, out, o_s, rows_lo, rows_hi, mlo, mhi, rope,
              bm, bmask, res, r_s, cos, sin, cs_s, MODE, D)


@triton.jit
def _stream_x(it, nit, NK, xrow, bmask, K, BK: tl.constexpr):
    """The raw activations ``[BM, 1, BK]`` of K tile ``it % NK`` (zeros past the program's last item)."""
    kk = ((it % NK) * BK + tl.arange(0, BK))[None, None, :]
    return tl.load(xrow[:, :, None] + kk, mask=bmask[:, None, None] & (kk < K) & (it < nit), other=0.)


@triton.jit
def _stream_tiles(it, nit, pid, NPROG, NK, w1, b1, w2, b2, out1, o1_s, out2, o2_s, N1, N2, R1, R2, P1, xrow, bmask, K,
                  MODE: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, D: tl.constexpr,
                  BN2: tl.constexpr, BK: tl.constexpr, XLOAD: tl.constexpr):
    """Issue the loads of work item ``it`` of a :func:`_stream_kernel` program (row block ``pid + (it // NK)
    NPROG``, K tile ``it % NK``): the lo and hi weight tiles ``[1, BN2, BK]`` and (``XLOAD``) the raw
    activations ``[BM, 1, BK]``; all masked off past the program's last item. Nothing here uses the loaded
    values, so the loads stay in flight while the caller reduces the items before."""
    p = pid + (it // NK) * NPROG
    wlo, whi, blo, bhi, has_lo, has_hi, out, o_s, base_lo, base_hi, N, rope = _rows(
        p, w1, b1, w2, b2, out1, o1_s, out2, o2_s, N1, N2, R1, R2, P1, MODE, HAS_B1, HAS_B2, D, BN2)
    rows_lo = (base_lo + tl.arange(0, BN2))[None, :, None]           # [1, BN2, 1]: loaded in the layout of
    rows_hi = (base_hi + tl.arange(0, BN2))[None, :, None]           # the [BM, BN2, BK] product (no shuffle)
    kk = ((it % NK) * BK + tl.arange(0, BK))[None, None, :]
    km = (kk < K) & (it < nit)
    wl = tl.load(wlo + rows_lo.to(tl.int64) * K + kk, mask=(rows_lo < N) & km, other=0.)
    wh = tl.load(whi + rows_hi.to(tl.int64) * K + kk, mask=(rows_hi < N) & km, other=0.)
    if XLOAD:
        xv = _stream_x(it, nit, NK, xrow, bmask, K, BK)
    else:
        xv = tl.zeros([1, 1, 1], dtype=tl.float32)  # not needed (ONEK) or loaded after the grid dependency wait
    return wl, wh, xv


@triton.jit
def _stream_kernel(x, x_s, nw, eps,
                   w1, b1, w2, b2, out1, o1_s, out2, o2_s,
                   res, r_s, cos, sin, cs_s,
                   B, K, N1, N2, R1, R2, P1, NBLK, NPROG, NK,
                   MODE: tl.constexpr, RMS: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
                   D: tl.constexpr, BM: tl.constexpr, BN2: tl.constexpr, BK: tl.constexpr,
                   AHEAD: tl.constexpr, ONEK: tl.constexpr, TRIGGER: tl.constexpr = False,
                   WAIT: tl.constexpr = False):
    """Persistent broadcast-product path: ``NPROG`` programs (a few per SM), program ``i`` takes the row
    blocks ``i, i + NPROG, ...``, each as ``NK`` K tiles (work items). The loads of the next ``AHEAD`` (1
    or 2) items are issued before an item is reduced (register double/triple buffering: Triton does not
    software-pipeline loads that feed no ``tl.dot``), so a program keeps its weight stream in flight
    across row blocks; one block per program leaves a slot idle from a program's last load until the next
    program's first. With one K tile (``ONEK``: ``BK >= K``) the activations are normalised once per
    program. ``WAIT`` (a programmatic dependent launch, sm_90+): the first items' weight tiles are requested
    before ``griddepcontrol.wait``; everything the previous kernels write (activations, residual, cos/sin)
    is read, and every output written, after it. ``TRIGGER``: the next kernel may launch as this one starts
    (its programs become resident as this kernel's programs leave)."""
    pid = tl.program_id(0)
    _trigger(TRIGGER)
    bm = tl.arange(0, BM)
    bmask = bm < B
    xrow = x + bm.to(tl.int64)[:, None] * x_s                      # [BM, 1]
    nit = tl.cdiv(NBLK - pid, NPROG) * NK
    # the first items' weight tiles (the activations: after the wait, below)
    wl0, wh0, xv0 = _stream_tiles(0, nit, pid, NPROG, NK, w1, b1, w2, b2, out1, o1_s, out2, o2_s, N1, N2, R1, R2,
                                  P1, xrow, bmask, K, MODE, HAS_B1, HAS_B2, D, BN2, BK, False)
    if AHEAD == 2:
        wl1, wh1, xv1 = _stream_tiles(1, nit, pid, NPROG, NK, w1, b1, w2, b2, out1, o1_s, out2, o2_s, N1, N2, R1,
                                      R2, P1, xrow, bmask, K, MODE, HAS_B1, HAS_B2, D, BN2, BK, False)
    if WAIT:
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
    rstd = tl.zeros([BM], dtype=tl.float32)
    if RMS:
        rstd = _rstd(xrow, bmask, K, eps, BM, BK)
    if ONEK:  # [BM, 1, BK], normalised and rounded as the plain step rounds it
        xh = _x_tile(xrow, nw, rstd, tl.arange(0, BK), K, bmask, RMS)[:, None, :]
    else:
        xv0 = _stream_x(0, nit, NK, xrow, bmask, K, BK)
        if AHEAD == 2:
            xv1 = _stream_x(1, nit, NK, xrow, bmask, K, BK)
    acc_lo = tl.zeros([BM, BN2], dtype=tl.float32)
    acc_hi = tl.zeros([BM, BN2], dtype=tl.float32)
    for it in range(0, nit):
        wln, whn, xvn = _stream_tiles(it + AHEAD, nit, pid, NPROG, NK, w1, b1, w2, b2, out1, o1_s, out2, o2_s,
                                      N1, N2, R1, R2, P1, xrow, bmask, K, MODE, HAS_B1, HAS_B2, D, BN2, BK, not ONEK)
        kc = it % NK
        if ONEK:
            xf = xh
        else:
            xf = xv0.to(tl.float32)
            if RMS:
                kk = (kc * BK + tl.arange(0, BK))[None, None, :]
                xf = _rms_apply(xv0, rstd[:, None, None], tl.load(nw + kk, mask=kk < K, other=0.)).to(tl.float32)
        part_lo = tl.sum(xf * wl0.to(tl.float32), 2)
        part_hi = tl.sum(xf * wh0.to(tl.float32), 2)
        acc_lo = tl.where(kc == 0, part_lo, acc_lo + part_lo)
        acc_hi = tl.where(kc == 0, part_hi, acc_hi + part_hi)
        if kc == NK - 1:
            p = pid + (it // NK) * NPROG
            wlo, whi, blo, bhi, has_lo, has_hi, out, o_s, base_lo, base_hi, N, rope = _rows(
                p, w1, b1, w2, b2, out1, o1_s, out2, o2_s, N1, N2, R1, R2, P1, MODE, HAS_B1, HAS_B2, D, BN2)
            rows_lo = base_lo + tl.arange(0, BN2)
            rows_hi = base_hi + tl.arange(0, BN2)
            _epilogue(acc_lo, acc_hi, blo, bhi, has_lo, has_hi, out, o_s, rows_lo, rows_hi, rows_lo < N, rows_hi < N,
                      rope, bm, bmask, res, r_s, cos, sin, cs_s, MODE, D)
        if AHEAD == 2:
            wl0, wh0, xv0 = wl1, wh1, xv1
            wl1, wh1, xv1 = wln, whn, xvn
        else:
            wl0, wh0, xv0 = wln, whn, xvn


def _limit(dtype: torch.dtype, half: Optional[int]) -> int:
    """Largest batch: the tensor-core path needs bf16/fp16 and RoPE halves (``half`` = D / 2) of >= 8 rows."""
    low = dtype in (torch.bfloat16, torch.float16) and (half is None or half >= 8)
    return MAX_BATCH if low else MAX_BROADCAST_BATCH


def supports(B: int, dtype: torch.dtype, head_dim: Optional[int] = None) -> bool:
    """Whether the fused projections take a batch of ``B`` rows in ``dtype`` (the tensor-core path, B > 2,
    needs bf16/fp16 and head_dim >= 16; otherwise the broadcast-product path, B <= :data:`MAX_BROADCAST_BATCH`)."""
    return 1 <= B <= _limit(dtype, None if head_dim is None else head_dim // 2)


def _plan(fn: str, B: int, dtype: torch.dtype, half: Optional[int] = None) -> Tuple[int, bool]:
    """(BM, tensor cores?) for a batch of ``B`` rows; ``half``: D / 2 of the RoPE pairs (qkvg)."""
    lim = _limit(dtype, half)
    if not 1 <= B <= lim:
        raise ValueError(f"{fn}: batch must be 1..{MAX_BATCH} (bf16/fp16; float32 and head_dim < 16: "
                         f"1..{MAX_BROADCAST_BATCH}), got {B} in {dtype}")
    mma = B >= MMA_MIN_BATCH and lim == MAX_BATCH
    return (MMA_BM, True) if mma else (triton.next_power_of_2(B), False)


def _tiles(key: str, BM: int, mma: bool, config, K: int, half: Optional[int] = None):
    """(BN2, BK, warps, stages, persist) of one launch: the table's entry or ``config``, clipped to the
    problem (K tile <= K rounded up; RoPE blocks within one half of a head; >= 8 rows per tile half and a
    K tile >= 16 on tensor cores)."""
    BN2, BK, warps, stages, persist = _config(key, BM, config)
    if half is not None:
        BN2 = min(BN2, half)
    BK = min(BK, triton.next_power_of_2(K))
    if mma:
        BN2, BK, persist = max(BN2, 8), max(BK, 16), 0
    return BN2, BK, warps, stages, persist


_SMS: Dict[int, int] = {}


def _num_sms(dev: torch.device) -> int:
    """Streaming multiprocessors of ``dev`` (1 for the CPU / interpreter)."""
    if dev.type != "cuda":
        return 1
    i = dev.index if dev.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


# Programmatic dependent launch between the persistent kernels (``chain=None`` in the wrappers): each one lets
# the next launch as it starts and requests its first weight tiles before waiting for the previous kernel.
# None: on where it can be (sm_90+, not the interpreter). H200, 3B step at T=32k: B=1 2.510 -> 2.403 ms/token,
# B=2 3.113 -> 2.982; bit-identical (tests/ops/test_decode_linear.py).
CHAIN: Optional[bool] = None


def chain_on(dev: torch.device, chain: Optional[bool] = None) -> bool:
    """Whether the persistent kernels on ``dev`` launch chained (``chain``, else :data:`CHAIN`; None = where
    possible)."""
    c = CHAIN if chain is None else chain
    return (c is None or bool(c)) and can_trigger(dev)


def _launch(nblk: int, tiles, mma: bool, dev: torch.device, K: int, args, trigger: bool = False,
            chain: Optional[bool] = None, **meta):
    """Run ``nblk`` row blocks: one per program (:func:`_skinny_kernel`), or with ``persist`` > 0 on
    ``persist`` programs per SM that loop over them (:func:`_stream_kernel`; ``chain``: as a programmatic
    dependent launch that also triggers its own dependents, sm_90+)."""
    BN2, BK, warps, stages, persist = tiles
    meta.update(BN2=BN2, BK=BK, TRIGGER=bool(trigger) and can_trigger(dev), num_warps=warps)
    if persist and not mma:  # stages: tiles in registers (the one reduced + 1 or 2 in flight)
        nprog = min(nblk, persist * _num_sms(dev))
        if chain_on(dev, chain):
            meta.update(TRIGGER=True, WAIT=True, launch_pdl=True)
        _stream_kernel[(nprog,)](*args, nblk, nprog, triton.cdiv(K, BK), AHEAD=min(max(stages - 1, 1), 2),
                                 ONEK=BK >= K, num_stages=1, **meta)
    else:
        _skinny_kernel[(nblk,)](*args, MMA=mma, num_stages=stages, **meta)


def can_trigger(dev: torch.device) -> bool:
    """Whether kernels on ``dev`` can let their dependents launch early (sm_90+, not the interpreter)."""
    return (dev.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(dev)[0] >= 9)


def _check_x(fn, name, x):
    """The activations ``[B, K]`` (unit last stride); returns ``K``."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"{fn}: {name} must be [B, K] with a unit last stride, got {tuple(x.shape)} "
                         f"strides {x.stride()}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{fn}: {name} must be float16, bfloat16 or float32, got {x.dtype}")
    return x.shape[1]


def _check_w(fn, name, w, rows, K, dtype, device):
    if w is None:
        return
    shape = (K,) if rows is None else (rows, K)
    if rows == -1:
        ok = w.dim() == 2 and w.shape[1] == K
    else:
        ok = tuple(w.shape) == shape
    if not ok or w.dtype != dtype or w.device != device or not w.is_contiguous():
        want = f"[N, {K}]" if rows == -1 else str(list(shape))
        raise ValueError(f"{fn}: {name} must be a contiguous {want} {dtype} tensor on {device}, got "
                         f"{tuple(w.shape)} {w.dtype} on {w.device}")


def _check_bias(fn, name, b, n, dtype):
    if b is not None and (tuple(b.shape) != (n,) or b.dtype != dtype or not b.is_contiguous()):
        raise ValueError(f"{fn}: {name} must be a contiguous [{n}] {dtype} tensor, got {tuple(b.shape)} {b.dtype}")


def norm_qkvg(h: torch.Tensor, norm_weight: torch.Tensor, eps: float, wq: torch.Tensor, bq: Optional[torch.Tensor],
              wkvg: torch.Tensor, bkvg: Optional[torch.Tensor], nk: int, cos: torch.Tensor, sin: torch.Tensor,
              head_dim: int, config: Optional[Tuple[int, ...]] = None, trigger_next: bool = False,
              chain: Optional[bool] = None):
    """``x = rms_norm(h) * norm_weight``; ``q = rope(x @ wq^T + bq)`` and ``y = x @ wkvg^T + bkvg`` with RoPE on
    ``y[:, :nk]`` (the k rows of the stacked k/v/gates weight), in one launch.

    ``h``: ``[B, K]``; ``wq``: ``[H * D, K]``; ``wkvg``: ``[N, K]``; ``cos``/``sin``: ``[B, D]`` (or
    ``[B, 1, D]``). Returns ``q`` ``[B, H * D]`` and ``y`` ``[B, N]`` (contiguous, the dtype of ``h``).
    ``trigger_next``: on sm_90+ GPUs, every program lets the next kernel launch as it starts (programmatic
    dependent launch: ``torch.ops.ahn.decode_step(..., overlap_prev=True)`` then streams its cache tiles
    while this kernel runs; a next kernel launched without it is not affected).
    """
    fn = "norm_qkvg"
    D = head_dim
    if D % 2 or D & (D - 1) or D < 4:
        raise ValueError(f"{fn}: head_dim must be a power of two >= 4, got {D}")
    B, K = h.shape[0], _check_x(fn, "h", h)
    dt, dev = h.dtype, h.device
    _check_w(fn, "norm_weight", norm_weight, None, K, dt, dev)
    _check_w(fn, "wq", wq, -1, K, dt, dev)
    _check_w(fn, "wkvg", wkvg, -1, K, dt, dev)
    Nq, Nkvg = wq.shape[0], wkvg.shape[0]
    if Nq % D or nk % D or not 0 < nk <= Nkvg:
        raise ValueError(f"{fn}: wq rows ({Nq}) and nk ({nk}) must be multiples of head_dim={D}, nk <= "
                         f"wkvg rows ({Nkvg})")
    _check_bias(fn, "bq", bq, Nq, dt)
    _check_bias(fn, "bkvg", bkvg, Nkvg, dt)
    cos, sin = cos.reshape(B, D), sin.reshape(B, D)
    if cos.dtype != dt or sin.dtype != dt or cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise ValueError(f"{fn}: cos and sin must be [B={B}, {D}] {dt} with the same unit-last-dim strides")
    BM, mma = _plan(fn, B, dt, D // 2)
    tiles = _tiles("qkvg", BM, mma, config, K, D // 2)
    BN2 = tiles[0]
    q = torch.empty(B, Nq, dtype=dt, device=dev)
    y = torch.empty(B, Nkvg, dtype=dt, device=dev)
    P1 = Nq // (2 * BN2)
    P2 = nk // (2 * BN2) + triton.cdiv(Nkvg - nk, 2 * BN2)
    _launch(P1 + P2, tiles, mma, dev, K,
            (h, h.stride(0), norm_weight, float(eps),
             wq, bq if bq is not None else wq, wkvg, bkvg if bkvg is not None else wkvg,
             q, q.stride(0), y, y.stride(0), h, 0, cos, sin, cos.stride(0),
             B, K, Nq, Nkvg, Nq, nk, P1),
            trigger=trigger_next, chain=chain, MODE=_PROJ, RMS=True, HAS_B1=bq is not None, HAS_B2=bkvg is not None, D=D, BM=BM)
    return q, y


def linear_residual(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor,
                    role: str = "o_proj", config: Optional[Tuple[int, ...]] = None,
                    chain: Optional[bool] = None) -> torch.Tensor:
    """``residual + (x @ w^T + bias)``, the projection rounded to the activation dtype before the add
    (as ``h = residual + o_proj(o)``). ``x``: ``[B, K]``, ``w``: ``[N, K]``, ``residual``: ``[B, N]``;
    ``role`` (``"o_proj"`` or ``"down_proj"``) picks the tile config."""
    fn = "linear_residual"
    if role not in ("o_proj", "down_proj"):
        raise ValueError(f"{fn}: role must be 'o_proj' or 'down_proj', got {role!r}")
    B, K = x.shape[0], _check_x(fn, "x", x)
    dt, dev = x.dtype, x.device
    _check_w(fn, "w", w, -1, K, dt, dev)
    N = w.shape[0]
    _check_bias(fn, "bias", bias, N, dt)
    if residual.shape != (B, N) or residual.dtype != dt or residual.stride(1) != 1:
        raise ValueError(f"{fn}: residual must be [{B}, {N}] {dt} with a unit last stride, got "
                         f"{tuple(residual.shape)} {residual.dtype}")
    BM, mma = _plan(fn, B, dt)
    tiles = _tiles(role, BM, mma, config, K)
    out = torch.empty(B, N, dtype=dt, device=dev)
    P = triton.cdiv(N, 2 * tiles[0])
    _launch(P, tiles, mma, dev, K,
            (x, x.stride(0), x, 0., w, bias if bias is not None else w, w, w, out, out.stride(0), out, 0,
             residual, residual.stride(0), x, x, 0, B, K, N, 0, 0, 0, P),
            chain=chain, MODE=_RESID, RMS=False, HAS_B1=bias is not None, HAS_B2=False, D=2, BM=BM)
    return out


def norm_gate_up(h: torch.Tensor, norm_weight: torch.Tensor, eps: float, w_gate: torch.Tensor,
                 w_up: torch.Tensor, b_gate: Optional[torch.Tensor] = None, b_up: Optional[torch.Tensor] = None,
                 config: Optional[Tuple[int, ...]] = None, chain: Optional[bool] = None) -> torch.Tensor:
    """``silu(x @ w_gate^T) * (x @ w_up^T)`` with ``x = rms_norm(h) * norm_weight`` (Qwen2's post-attention
    norm and MLP up to down_proj). ``h``: ``[B, K]``; ``w_gate``, ``w_up``: ``[N, K]``. Returns ``[B, N]``."""
    fn = "norm_gate_up"
    B, K = h.shape[0], _check_x(fn, "h", h)
    dt, dev = h.dtype, h.device
    _check_w(fn, "norm_weight", norm_weight, None, K, dt, dev)
    _check_w(fn, "w_gate", w_gate, -1, K, dt, dev)
    N = w_gate.shape[0]
    _check_w(fn, "w_up", w_up, N, K, dt, dev)
    _check_bias(fn, "b_gate", b_gate, N, dt)
    _check_bias(fn, "b_up", b_up, N, dt)
    BM, mma = _plan(fn, B, dt)
    tiles = _tiles("gate_up", BM, mma, config, K)
    out = torch.empty(B, N, dtype=dt, device=dev)
    P = triton.cdiv(N, tiles[0])
    _launch(P, tiles, mma, dev, K,
            (h, h.stride(0), norm_weight, float(eps),
             w_gate, b_gate if b_gate is not None else w_gate, w_up, b_up if b_up is not None else w_up,
             out, out.stride(0), out, 0, h, 0, h, h, 0, B, K, N, N, 0, 0, P),
            chain=chain, MODE=_SILU, RMS=True, HAS_B1=b_gate is not None, HAS_B2=b_up is not None, D=2, BM=BM)
    return out
