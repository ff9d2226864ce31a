"""Fused AHN prefill forward in Triton (kinds "gdn", "dn" and "mamba2"): launchers and the ops
``torch.ops.ahn.prefill_fwd`` / ``torch.ops.ahn.prefill_cache``.

The kernels are in ``prefill_kernels.py`` (what each program computes, the stream alignment, the
positions), the launch tables in ``tables.py``; README.md beside this file has the derivation.
Three launches, four for Mamba2:

1. ``_prep_kernel``   grid (chunks, H), fully parallel: per memory chunk of BT=64 stream elements the
   gates, normalised keys, the WY/UT transform ``w``, ``u`` and the decayed keys.
2. ``_state_kernel``  (``state_chain``) grid (D / BV, H, sequences), sequential over chunks: the state
   before every chunk (input dtype) and ``v_new``; optional initial / final state.
3. ``_fwd_kernel``    grid (H, row blocks): a query block of BM rows (``_fwd_launch``: 64, or 128 for
   long windows): window attention with sinks + memory readout + epilogue, written once in the input
   dtype; also the window softmax's log-sum-exp for the backward (the cache path, inference only,
   skips that store).
   On an H100 / H200 (compute capability 9.0) with the extension's sm_90a kernels (``_sm90_engine``), launch 3
   is ``torch.ops.ahn.prefill_fwd_sm90`` instead: the same work in one warp-specialised kernel (TMA, wgmma).
   Otherwise, on sm_90+ with cuDNN (``CONFIG["band"]``, ``_band_engine``), the window band over the call's own
   tokens runs in cuDNN's fused attention (``band_cudnn``, ``_cudnn_band``) while launches 1-2 run on a
   side stream (``side_stream``); ``_fwd_kernel`` (``BAND_IN``) then starts from the band's output and
   log-sum-exp and walks only the sinks that left the window and, on a cache, the ring tail.
4. Mamba2 only: ``_mamba2_norm_kernel`` (grid: token blocks) applies the cross-head RMSNorm scale
   (``_fwd_kernel`` stops before the norm, which spans the H heads of a token).

The cache path (``prefill_cache_fwd``) first gathers each sequence's key stream (ring tail + new
tokens) and launch table on the device (``_cache_gather_kernel``) and writes the new tokens into the
cache (``_cache_scatter_kernel``), then runs the launches above from the sequences' positions.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from typing import Optional, Tuple

import torch
import triton

from ..common.alloc import empty
from .prefill_kernels import (_cache_gather_kernel, _cache_scatter_kernel, _fwd_kernel, _mamba2_norm_kernel,
                              _prep_kernel, _state_kernel)
from .tables import BT, cached_table, prefill_tables, row_blocks, to_device

__all__ = ["prefill_fwd", "prefill_cache_fwd", "SUPPORTED_D"]

SUPPORTED_D = (64, 128)
# Launch configuration; `python benchmarks/bench_prefill.py --sweep` and `benchmarks/spike_hopper_fwd.py`
# re-derive it (the measurements behind each choice: benchmarks/NOTES_prefill.md, "Launch configuration").
# band: the forward's engine (AHN_PREFILL_ENGINE sets it at import): "auto" (the whole forward after the
#   memory passes in one sm_90a kernel, torch.ops.ahn.prefill_fwd_sm90, where _sm90_engine allows; else the
#   window band from cuDNN where _band_engine allows; else all Triton); "sm90" (as auto, but an error on a
#   device or build without the sm_90a kernel); "no_sm90" (auto without the sm_90a kernel: the engine it is
#   checked and timed against); "cudnn" (required) or "triton" for the band. sm90_variant: the sm_90a
#   kernel's variant (1: the consumer warpgroups' ping-pong; 0: without it; 2: ping-pong with the softmax's row
#   max and sum in four partials, an experiment timed against 1 by benchmarks/bench_sm90.py); sm90_overlap: where
#   the memory passes run on a side stream of priority sm90_side_priority beside it, the state chain with
#   sm90_state_bv value columns per program (fewer programs hold fewer of the SMs the kernel wants) and
#   sm90_state_stages pipeline stages (2: 98 KB of shared memory a program instead of 139, two per SM; never slower
#   at T=32k on an H100, -0.02 ms median over five pairs), the kernel reading its ready counters (tiles whose
#   chunks are not ready finish in a memory-only launch after the passes): "prefill" (prefills from position 0
#   without an initial state), "all" (also the cache path and initial states) or "off"; never
#   under deterministic=True, where those tiles' extra bf16 rounding would make the output depend on the timing
#   (benchmarks/NOTES_prefill.md, "The memory passes beside the kernel"), and only where the kernel is long
#   against the chain: at least sm90_overlap_min = (keys per row W + S, new tokens in the call) (at W = 2048 the
#   kernel outran the chain and the passes beside it cost 18-21%; a 4096-token chunk on a cache lost 0.18 ms);
#   sm90_rows_outer: the kernel's CTA order (None: row blocks over all heads beside the passes, head by head
#   otherwise; True / False force one).
#   side_priority: the memory passes' stream beside cuDNN's band.
# fwd: (BN, num_warps, num_stages) of the all-Triton _fwd_kernel at 64 query rows (more warps or BN=128 spill).
# fwd_band_in: the same for _fwd_kernel behind the cuDNN band (sinks, ring tail, memory, epilogue only).
# fwd_rows: None picks 64 rows, or fwd_long = (min window, rows, cfg) at D = 128 and long windows, where
#   128-row programs read each K/V block of the band half as often; an int forces the rows (with "fwd").
# state_*: the sequential state pass, 16 value columns per program at D = 128 (more programs on a
#   latency-bound chain); prep_warps, norm_bm: the prep pass and the Mamba2 norm kernel; prep_maxnreg: None, or
#   a register cap for the prep pass: 168 fits three programs per SM instead of two on its latency-bound chain
#   (the pass 6% faster at T=32k and 10% at 131k on an H100, at ~300 B of spills; benchmarks/bench_prep.py).
CONFIG = {"band": os.environ.get("AHN_PREFILL_ENGINE") or "auto", "sm90_variant": 1, "sm90_overlap": "prefill",
          "sm90_overlap_min": (4096, 16384), "sm90_side_priority": -1, "sm90_state_bv": 64, "sm90_state_stages": 2,
          "sm90_rows_outer": None,
          "side_priority": 0,
          "fwd": (64, 4, 3), "fwd_band_in": (64, 4, 1), "fwd_rows": None, "fwd_long": (8192, 128, (64, 8, 3)),
          "state_bv": {64: 64, 128: 16}, "state_warps": 4, "state_stages": 3, "prep_warps": 4, "prep_maxnreg": 168,
          "norm_bm": 32}


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


_SIDE: dict = {}


def side_stream(device, priority: int = 0) -> torch.cuda.Stream:
    """One side stream per device and priority (lower is more urgent), created on first use: the forward's
    memory passes beside the band attention, the backward's reverse chain and sink work beside its band."""
    idx = torch.device(device).index
    key = (torch.cuda.current_device() if idx is None else idx, priority)
    st = _SIDE.get(key)
    if st is None:
        st = _SIDE[key] = torch.cuda.Stream(device=key[0], priority=priority)
    return st


def state_chain(kd, w, u, gc, seq, N, H, D, window, sinks, mamba2, h0, hs, vnew, ht, dummy, ready=None, bv=None,
                stages=None):
    """The memory's state chain over the prep pass's ``kd, w, u, gc`` (the forward and the backward's
    re-run): stores ``hs`` (the state before every chunk, input dtype), ``v_new`` (not for Mamba2: ``vnew``
    is ``u``) and, if ``ht`` is given, the final state. ``h0``: fp32 [N, H, D, D] or None.

    One program per (BV value columns, head, sequence), sequential over chunks. A two-level scan (segment
    summaries in parallel, a short chain over segments, a replay) was measured slower: the chain moves
    ~0.8 GB at T=32k and runs at half the copy bandwidth, so tripling its work does not pay
    (benchmarks/NOTES_prefill.md, "The Hopper engine"). ``bv``: value columns per program (default
    ``CONFIG["state_bv"][D]``). ``ready`` (int32 [chunks * H], zeros): each chunk's counter reaches ``D // bv``
    times the program's threads once its hs and v_new are stored (:func:`state_ready_target` for the chain beside
    the sm_90a kernel). ``stages``: the loop's pipeline depth (default ``CONFIG["state_stages"]``)."""
    BV = bv or CONFIG["state_bv"][D]
    _state_kernel[(D // BV, H, N)](
        kd=kd, w=w, u=u, gc=gc, seq=seq, h0=h0 if h0 is not None else dummy, hs=hs, vnew=vnew,
        ht=ht if ht is not None else dummy, ready=ready if ready is not None else dummy, H=H, D=D, W=window,
        S=sinks, BT=BT, BV=BV, USE_H0=h0 is not None, STORE_HT=ht is not None, MAMBA2=mamba2,
        READY=ready is not None, NTHR=_chain_threads(), num_warps=CONFIG["state_warps"],
        num_stages=stages or CONFIG["state_stages"])


def _chain_threads() -> int:
    # a state chain program's threads: each releases its own stores, so a ready counter gains this per program
    return 32 * CONFIG["state_warps"]


def state_ready_target(D: int) -> int:
    """The value of a chunk's ``ready`` counter once the state chain beside the sm_90a kernel
    (``CONFIG["sm90_state_bv"]`` columns per program) has stored it: its programs per head times their threads
    (each thread releases its own stores)."""
    return D // CONFIG["sm90_state_bv"] * _chain_threads()


def prep_launch() -> dict:
    """The prep pass's launch options (the forward's and the backward's re-run): its warps, and its register cap
    where CONFIG sets one."""
    cap = CONFIG["prep_maxnreg"]
    return {"num_warps": CONFIG["prep_warps"], **({"maxnreg": cap} if cap else {})}


def _memory_passes(kx, vx, a, b, ab_rs, A_log, dt_bias, seq, chunks, NT, N, H, HKV, D, window, sinks, gates, mamba2,
                   initial_state, bufs, stage, ready=None):
    gc, w, u, kd, hs, vnew, ht, dummy = bufs
    _prep_kernel[(NT, H)](
        kx=kx, vx=vx, a=a, b=b, A_log=A_log, dt_bias=dt_bias, seq=seq, chunks=chunks, gc=gc, w=w, u=u, kd=kd,
        xs=dummy, H=H, HKV=HKV, D=D, W=window, S=sinks, BT=BT, GATES=gates, MAMBA2=mamba2, AB_RS=ab_rs,
        **prep_launch())
    if stage == "prep":  # benchmarks: the parallel prep pass alone
        return
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    beside = ready is not None
    state_chain(kd, w, u, gc, seq, N, H, D, window, sinks, mamba2, h0, hs, vnew, ht, dummy, ready,
                CONFIG["sm90_state_bv"] if beside else None, CONFIG["sm90_state_stages"] if beside else None)


def _launch(q, kx, vx, sk, sv, a, b, ab_rs, z, A_log, dt_bias, norm_weight, o_weight, window, sinks, kind,
            seq, chunks, NT, N, initial_state, output_final_state, memory=True, stage="all",
            store_lse=False, lens=None, band=None, sm90=False, cache=None, deterministic=False):
    # store_lse: also return the window softmax's lse (fp32 [Tq, H]) for the backward; the cache
    # path (inference) passes False and the kernel skips the store.
    # sm90: after the memory passes, the window + sinks attention, the memory readout and the epilogue in one
    # sm_90a kernel (_sm90_engine said yes); cache: the cache path's (pos, sink_k, sink_v) for it (kx, vx are
    # then the key streams: each sequence's W ring-tail rows, then its new tokens).
    # deterministic: the memory passes before the sm_90a kernel, not beside it (CONFIG["sm90_overlap"])
    # band: None (the Triton kernel walks the window band) or a callable giving the band over the
    # call's own tokens (_cudnn_band: ob [N, TM, H, D], natural-log lse [N, H, TM], its window wb <= window,
    # the kernel walking the keys between, and TM); it runs on the current stream while the memory
    # passes run on a side stream
    Tq, H, D = q.shape[1], q.shape[2], q.shape[3]
    HKV = kx.shape[-2]
    dev, dt = q.device, q.dtype
    sm90 = sm90 and NT > 0  # the sm_90a op returns its own output and lse
    out = None if sm90 else empty(1, Tq, H, D, dtype=dt, device=dev)
    ht = empty(N, H, D, D, dtype=torch.float32, device=dev) if output_final_state else None
    lse = empty(Tq, H, dtype=torch.float32, device=dev) if store_lse and not sm90 else None
    if NT == 0:
        if ht is not None:
            ht.copy_(initial_state if initial_state is not None else torch.zeros_like(ht))
        return out, ht, lse
    mamba2 = kind == "mamba2"
    gates = {"gdn": 0, "dn": 1, "mamba2": 3}[kind]
    dummy = q.new_zeros(16)  # stands in for pointers a constexpr branch never reads
    A_log = A_log.float().contiguous() if A_log is not None else dummy
    dt_bias = dt_bias.float().contiguous() if dt_bias is not None else dummy
    if ab_rs is None:  # [tokens, H] projections; else views into the cache path's [rows, 2, H] gate inputs
        a = a.contiguous() if a is not None else dummy
        b = b.contiguous() if b is not None else dummy
        ab_rs = H
    hs = vnew = gc = yp = ss = dummy
    side = None  # the memory passes' stream when they run beside the band
    if memory:
        gc = empty(Tq, H, dtype=torch.float32, device=dev)
        # Mamba2: no delta correction, so no w, and v_new is u = dt v itself
        w = dummy if mamba2 else empty(Tq, H, D, dtype=dt, device=dev)
        u = empty(Tq, H, D, dtype=dt, device=dev)
        kd = empty(Tq, H, D, dtype=dt, device=dev)
        hs = empty(NT, H, D, D, dtype=dt, device=dev)
        vnew = u if mamba2 else empty(Tq, H, D, dtype=dt, device=dev)
        args = (kx, vx, a, b, ab_rs, A_log, dt_bias, seq, chunks, NT, N, H, HKV, D, window, sinks, gates, mamba2,
                initial_state, (gc, w, u, kd, hs, vnew, ht, dummy), stage)
        # the sm_90a kernel beside the memory passes: it reads the state chain's per-chunk ready counters
        overlap = CONFIG["sm90_overlap"]
        if overlap not in ("prefill", "all", "off"):
            raise ValueError(f'prefill.CONFIG["sm90_overlap"] must be "prefill", "all" or "off", got {overlap!r}')
        min_keys, min_rows = CONFIG["sm90_overlap_min"]
        beside = (sm90 and stage == "all" and dev.type == "cuda" and not deterministic
                  and window + sinks >= min_keys and Tq >= min_rows
                  and (overlap == "all" or overlap == "prefill" and cache is None and initial_state is None))
        ready = torch.zeros(NT * H, dtype=torch.int32, device=dev) if beside else None
        if (band is not None or ready is not None) and stage == "all" and dev.type == "cuda":
            # the memory passes (gates, WY prep, the state chain) need no attention output: they run on
            # a side stream while the band runs here; every buffer was allocated on this stream above,
            # and this stream waits for the side stream (below) before anything reads them or they are freed
            side = side_stream(dev, CONFIG["sm90_side_priority" if ready is not None else "side_priority"])
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                _memory_passes(*args, ready=ready)
        else:
            _memory_passes(*args)
            if stage in ("prep", "state"):  # benchmarks: the memory passes alone
                return out, ht, lse
        if mamba2:
            yp = empty(Tq, H, D, dtype=dt, device=dev)
            ss = empty(Tq, H, dtype=torch.float32, device=dev)
    if sm90:
        out, lse_e = _sm90_launch(q, kx, vx, vnew, hs, o_weight, gc, z, norm_weight, window, sinks, lens, N, seq, cache,
                                  initial_state is not None, (yp, ss) if mamba2 else None, side, ready)
        if store_lse:  # the backward's normaliser: log2 domain, [tokens, H]
            lse = lse_e.transpose(1, 2).reshape(Tq, H) * math.log2(math.e)
    else:
        _fwd_launch_band_in(q, kx, vx, sk, sv, z, norm_weight, o_weight, seq, chunks, NT, lens, gc, hs, vnew, out,
                            yp, ss, lse if store_lse else dummy, window, sinks, band, side, memory,
                            initial_state is not None, mamba2, store_lse, dummy)
    if mamba2 and memory:
        BM = CONFIG["norm_bm"]
        _mamba2_norm_kernel[(triton.cdiv(Tq, BM),)](
            out=out, yp=yp, ss=ss, NTOK=Tq, H=H, D=D, HP=triton.next_power_of_2(H), BM=BM, num_warps=4)
    return out, ht, lse


def _fwd_launch_band_in(q, kx, vx, sk, sv, z, norm_weight, o_weight, seq, chunks, NT, lens, gc, hs, vnew, out, yp, ss,
                        lse, window, sinks, band, side, memory, use_h0, mamba2, store_lse, dummy):
    # _fwd_kernel: the window band (its own loop, or beside cuDNN's band: the keys between), the memory readout
    # and epilogue
    H, D, HKV, dev = q.shape[2], q.shape[3], kx.shape[-2], q.device
    ob = lb = dummy
    wb, tm = window, 0
    if band is not None:
        ob, lb, wb, tm = band()
        if side is not None:
            torch.cuda.current_stream(dev).wait_stream(side)
        BM, (BN, fwd_warps, fwd_stages) = BT, CONFIG["fwd_band_in"]
    else:
        BM, (BN, fwd_warps, fwd_stages) = _fwd_launch(D, window)
    assert BM in (BT, 2 * BT), BM
    # lens: the sequences' query counts (the chunk table holds the same blocks when BM = BT)
    blocks, NB = (chunks, NT) if BM == BT else row_blocks(lens, BM, dev)
    _fwd_kernel[(H, NB)](
        q=q, kx=kx, vx=vx, sk=sk, sv=sv, z=z.contiguous(), nw=norm_weight.float().contiguous(),
        ow=o_weight.to(q.dtype).contiguous(), seq=seq, blocks=blocks, gc=gc, hs=hs, vnew=vnew, out=out, yp=yp,
        ss=ss, lse=lse, ob=ob, lb=lb, H=H, HKV=HKV, D=D, W=window, S=sinks, WB=wb, TM=tm,
        qk_scale=D ** -0.5 * math.log2(math.e), mem_scale=1.0 if mamba2 else D ** -0.5,
        BT=BT, BM=BM, BN=BN, MEMORY=memory, USE_H0=use_h0,
        MAMBA2=mamba2 and memory, STORE_LSE=store_lse, BAND_IN=band is not None, num_warps=fwd_warps,
        num_stages=fwd_stages)


def _sm90_launch(q, kx, vx, vnew, hs, o_weight, gc, z, norm_weight, window, sinks, lens, N, seq, cache, use_h0,
                 mamba2_out, side=None, ready=None):
    # torch.ops.ahn.prefill_fwd_sm90 on _launch's buffers ([1, tokens, ...]): (out [1, tokens, H, D], its
    # natural-log lse [Nb, H, T]); sequences of one length as the kernel's batch rows, else packed along T
    # with cu_seqlens; cache: (pos, sink_k, sink_v) with kx, vx the key streams; mamba2_out: (yp, ss).
    # ready: the memory passes run on the stream side with these counters; this stream waits for it before
    # the memory-only launch that finishes the tiles the first one deferred
    Tq, H, D = q.shape[1], q.shape[2], q.shape[3]
    Nb = N if len(set(lens)) == 1 else 1
    rows = lambda x: x.reshape(Nb, Tq // Nb, *x.shape[-2:])  # noqa: E731  (tokens -> [Nb, T])
    cu = None if Nb == N else _cu_seqlens(lens, q.device)
    # packed: each sequence's first chunk in hs, column 6 of the sequence table (tables.seq_tables)
    chunk_start = None if cu is None else seq[:, 6]
    pos, sink_k, sink_v = cache if cache is not None else (None, None, None)
    kxs, vxs = (kx, vx) if cache is not None else (rows(kx), rows(vx))
    # a prefill's window past its longest sequence changes nothing (every key in the band, no memory key, no
    # sink below the band) and would overflow the kernel's int32 rows; the cache's ring is real rows
    if cache is None:
        window = min(window, max(lens))
    yp, ss = (rows(mamba2_out[0]), mamba2_out[1].view(Nb, Tq // Nb, H)) if mamba2_out is not None else (None, None)
    args = (rows(q), kxs, vxs, rows(vnew), hs, o_weight.to(q.dtype).contiguous(), gc.view(Nb, Tq // Nb, H),
            z.reshape(Nb, Tq // Nb, H).contiguous(), norm_weight.float().contiguous(), window, sinks,
            1.0 if mamba2_out is not None else D ** -0.5, CONFIG["sm90_variant"], cu, max(lens), pos, sink_k, sink_v,
            use_h0, yp, ss)
    # the CTAs' order: row block by row block over all heads beside the state chain (which makes the chunks
    # ready in that order, so fewer tiles are deferred), head by head otherwise; CONFIG["sm90_rows_outer"] forces
    # one (benchmarks). The grid's second dimension holds at most 65535 row blocks
    n_mblocks = triton.cdiv(max(lens), 128)
    rows_outer = CONFIG["sm90_rows_outer"]
    rows_outer = (ready is not None if rows_outer is None else rows_outer) and n_mblocks < 65536
    if ready is None:
        o4, lse_e = _sm90_fwd(*args, chunk_start=chunk_start, rows_outer=rows_outer)
    else:
        deferred = torch.zeros(n_mblocks * H * N, dtype=torch.uint8, device=q.device)
        o4, lse_e = _sm90_fwd(*args, ready, state_ready_target(D), deferred, chunk_start=chunk_start,
                              rows_outer=rows_outer)
        torch.cuda.current_stream(q.device).wait_stream(side)
        _sm90_fwd(*args, None, 0, deferred, True, o4, chunk_start=chunk_start, rows_outer=rows_outer)
    return o4.view(1, Tq, H, D), lse_e


# unequal lengths take the cuDNN band padded to the longest while the padding adds at most this share of rows
BAND_PAD_WASTE = 0.25


def _band_engine(q: torch.Tensor, lens) -> bool:
    """Whether the band over sequences of ``lens`` goes through cuDNN (``band_cudnn``) rather than the Triton
    kernel's own loop.

    ``CONFIG["band"]``: "auto" (cuDNN where it can run: a CUDA device of compute capability >= 9.0
    with nvidia-cudnn-frontend importable, bf16/fp16, sequences of one length or of lengths close enough
    that padding them to the longest adds at most ``BAND_PAD_WASTE`` of the rows), "cudnn" (required: an
    error where it cannot run) or "triton". Short calls take cuDNN too: a question of 64 tokens on a saved
    128k-token cache reached its first token in 0.072 s that way and in 0.097 s on the Triton band (H100,
    bench_ttft.py); lengths within 128 tokens share a graph (band_cudnn.band_window)."""
    mode = CONFIG["band"]
    if mode not in _BAND_MODES:
        raise ValueError(f'the prefill engine (AHN_PREFILL_ENGINE or prefill.CONFIG["band"]) must be one of '
                         f'{", ".join(map(repr, _BAND_MODES))}, got {mode!r}')
    mode = "auto" if mode in ("sm90", "no_sm90") else mode
    if mode == "triton" or q.device.type != "cuda":
        if mode == "cudnn":
            raise RuntimeError('CONFIG["band"] = "cudnn" needs a CUDA device')
        return False
    from . import band_cudnn

    why = band_cudnn.unavailable_reason(q.device)
    if why is None and q.dtype not in (torch.bfloat16, torch.float16):
        why = f"the cuDNN band takes bfloat16 or float16, not {q.dtype}"
    padded_rows = len(lens) * band_cudnn.pad_len(max(lens)) if len(set(lens)) > 1 else sum(lens)
    if why is None and padded_rows > (1 + BAND_PAD_WASTE) * sum(lens):
        why = (f"sequences of lengths too unequal for one padded cuDNN band (padding would add more than "
               f"{BAND_PAD_WASTE:.0%} rows)")
    if why is not None and mode == "cudnn":
        raise RuntimeError(f'CONFIG["band"] = "cudnn": {why}')
    if why is not None and "not importable" in why and not _WARNED:
        _WARNED.append(why)
        warnings.warn(f"ahn_ops: the prefill's window band runs on the slower Triton kernel on this Hopper GPU: {why}; "
                      'pip install "nvidia-cudnn-frontend>=1.32" (the ahn_ops[hopper] extra) for cuDNN\'s',
                      RuntimeWarning, stacklevel=3)
    return why is None


_WARNED: list = []
_BAND_MODES = ("auto", "no_sm90", "sm90", "cudnn", "triton")


def _sm90_engine(q, z, lens, memory) -> bool:
    """Whether this call's forward runs on the sm_90a kernel: ``CONFIG["band"]`` "auto" (on a compute capability
    9.0 GPU with the kernels built) or "sm90", and D = 128, bf16 / fp16, the read gate ``z`` in q's dtype (the
    kernel reads it so; another dtype takes the other engines rather than being rounded), with the memory, at
    most 65535 sequences. Raises where "sm90" was asked for and the device or the build cannot run it at all."""
    mode = CONFIG["band"]
    if mode == "auto":
        if not _sm90_available(q.device):
            return False
    elif mode == "sm90":
        _sm90_check_device(q.device)
    else:
        return False
    return (memory and q.shape[-1] == 128 and q.dtype in (torch.bfloat16, torch.float16) and z.dtype == q.dtype
            and len(lens) < 65536)


def _written_sinks(sink_k, sink_v, pos, T):
    """The sink buffers ``[B, S, HKV, D]`` for the sm_90a kernel on the cache path, the rows no token has
    written yet (positions ``>= pos + T``: anything, NaN in the tests) as zeros: the kernel loads whole sink
    blocks, and a masked score (probability 0) times a NaN value is NaN. ``(None, None)`` for ``S = 0``."""
    S = sink_k.shape[1]
    if S == 0:
        return None, None
    written = (torch.arange(S, device=pos.device)[None, :] < pos[:, None] + T)[:, :, None, None]
    return torch.where(written, sink_k, 0), torch.where(written, sink_v, 0)


def _cu_seqlens(lens, device) -> torch.Tensor:
    """The int32 ``cu_seqlens`` of sequences of ``lens`` on ``device`` (cached by contents)."""
    return cached_table(("cu", tuple(lens), str(torch.device(device))),
                        lambda: to_device(torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32), device))


def _sm90_available(device) -> bool:
    """Whether "auto" may take the sm_90a kernel on ``device`` (cached per CUDA device). On an H100 / H200 whose
    build lacks the kernels, a warning says so once."""
    key = str(device)
    if key not in _SM90_AVAILABLE:
        if device.type != "cuda":
            return False
        try:
            why = _sm90_missing(device)
        except ImportError:  # no extension at all: the ops that need it say so
            why = "extension"
        _SM90_AVAILABLE[key] = why is None
        if why == "build":
            warnings.warn("ahn_ops: the prefill forward runs on the slower cuDNN / Triton engine on this "
                          "H100 / H200: the extension was built without its sm_90a kernels (pip install "
                          "--no-deps nvidia-cutlass, then reinstall ahn_ops)", RuntimeWarning, stacklevel=4)
    return _SM90_AVAILABLE[key]


_SM90_AVAILABLE: dict = {}


def _sm90_missing(device) -> Optional[str]:
    """None where the sm_90a kernels can run on ``device``, else what is missing: "device" (not a compute
    capability 9.0 GPU) or "build" (the extension built without them)."""
    from ..._ext import has_sm90_kernels

    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return "device"
    return None if has_sm90_kernels() else "build"


def _sm90_check_device(device) -> None:
    """Raises where "sm90" was asked for and ``device`` or the build cannot run the kernels."""
    why = _sm90_missing(device)
    if why == "device":
        raise RuntimeError('CONFIG["band"] = "sm90" needs a compute capability 9.0 GPU (H100 / H200)')
    if why == "build":
        raise RuntimeError('CONFIG["band"] = "sm90": ahn_ops was built without its sm_90a kernels (the CUTLASS '
                           'headers: pip install --no-deps nvidia-cutlass, then rebuild)')


def _sm90_fwd(*args, **kwargs):
    """``torch.ops.ahn.prefill_fwd_sm90`` (a function of its own so that a CPU test can stand in for it)."""
    return torch.ops.ahn.prefill_fwd_sm90(*args, **kwargs)


def _cudnn_band(qf, kf, vf, lens, window):
    """A ``band`` callable for ``_launch``: cuDNN over the rows ``qf [1, rows, H, D]``, ``kf, vf [1, rows, HKV,
    D]`` of sequences of ``lens`` packed one after the other. Gives ``(ob, lb, wb, TM)``: the band's output
    ``[N, TM, H, D]`` and lse ``[N, H, TM]`` (row ``t`` of sequence ``n`` at ``n * TM + t``; views of cuDNN's
    padded results where the length is off its grid), for the window ``wb <= window``
    (``band_cudnn.band_window``). Unequal lengths are padded to one (``band_cudnn.to_batch``)."""
    from . import band_cudnn

    H, D = qf.shape[-2], qf.shape[-1]

    def run():
        (q, k, v), _ = band_cudnn.to_batch(lens, qf[0], kf[0], vf[0])
        wb = band_cudnn.band_window("fwd", q, k, window)
        ob, lb = band_cudnn.band_fwd(q, k, v, wb)
        TM = lb.stride(1)  # the rows per sequence of both (cuDNN's padded length where it padded)
        if ob.stride() != (TM * H * D, H * D, D, 1) or lb.stride() != (H * TM, TM, 1):
            ob, lb, TM = ob.contiguous(), lb.contiguous(), ob.shape[1]
        return ob, lb, wb, TM

    return run


def prefill_fwd(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, window: int, sinks: int, kind: str,
                cu_seqlens: Optional[torch.Tensor] = None, initial_state: Optional[torch.Tensor] = None,
                output_final_state: bool = False, memory: bool = True, stage: str = "all",
                deterministic: bool = False):
    """Launch the fused prefill (positions from 0) of ``kind`` "gdn"/"dn"/"mamba2" (no autograd).

    Args: as :func:`ahn_ops.ahn_attention`; ``q`` bf16/fp16 ``[B, T, H, D]``, D in (64, 128).
        initial_state: ``[N, H, D, D]`` fp32, the state before token ``S`` (N sequences).
        output_final_state: also return the fp32 state holding tokens ``S .. T-1-W``.
        memory: False gives the window-only path (benchmarks).
        deterministic (or ``torch.use_deterministic_algorithms(True)``): the same bits on every run. Without
            it the sm_90a engine runs the memory passes beside its kernel, and a tile whose memory chunks were
            not ready in time adds them after its window output was rounded (up to one bf16 ulp apart).
    Returns:
        ``(out [B, T, H, D] in q.dtype, final_state [N, H, D, D] fp32 or None, lse [B, T, H] fp32)``;
        ``lse`` is the window softmax's log-sum-exp in the log2 domain of the scaled logits
        (``log2 sum_j 2^(q.k_j D^-0.5 log2(e))``), the backward's normaliser.

    Example:
        >>> from ahn_ops.ops.ahn_attention import prefill as P  # doctest: +SKIP
        >>> out, _, lse = P.prefill_fwd(q, k, v, a, b, z, A_log, dt_bias, nw, ow, 1024, 4, "gdn")  # doctest: +SKIP
    """
    B, T, H, D = q.shape
    lens, seq, chunks, NT = prefill_tables(B, T, cu_seqlens, q.device)
    N = len(lens)
    flat = lambda x: None if x is None else x.reshape(1, B * T, *x.shape[2:]).contiguous()  # noqa: E731
    qf, kf, vf = flat(q), flat(k), flat(v)
    band = None
    sm90 = T > 0 and stage == "all" and _sm90_engine(q, z, lens, memory)
    if T > 0 and not sm90 and _band_engine(q, lens):
        band = _cudnn_band(qf, kf, vf, lens, window)
    out, ht, lse = _launch(qf, kf, vf, kf, vf, flat(a), flat(b), None, flat(z), A_log, dt_bias, norm_weight,
                           o_weight, window, sinks, kind, seq, chunks, NT, N, initial_state, output_final_state,
                           memory, stage, store_lse=True, lens=lens, band=band, sm90=sm90,
                           deterministic=deterministic or torch.are_deterministic_algorithms_enabled())
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
    from .reference import gate_inputs

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
    # the new tokens' gate inputs as the ring stores them ([B, T, 2, H], the cache dtype): their gates come
    # from these whether they join the memory in this call or from the ring later
    gn = gate_inputs(a, b, kind, gates.dtype).contiguous()
    kc, vc = k.contiguous(), v.contiguous()
    kx = empty(1, B * (W + T), HKV, D, dtype=k.dtype, device=dev)
    vx = empty(1, B * (W + T), HKV, D, dtype=k.dtype, device=dev)
    gx = empty(B * (W + T), 2, H, dtype=gates.dtype, device=dev)
    seq = empty(B, 8, dtype=torch.int32, device=dev)
    chunks, NT = row_blocks([T] * B, BT, dev)
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
    sm90 = T > 0 and _sm90_engine(q, z, [T] * B, True)
    band = (_cudnn_band(qf, kc.reshape(1, B * T, HKV, D), vc.reshape(1, B * T, HKV, D), [T] * B, W)
            if T > 0 and not sm90 and _band_engine(q, [T] * B) else None)
    # inference: no backward, so no lse store
    gxf = gx.view(-1)  # a = row half 0, b = row half 1 of each [2, H] row
    out, ht, _ = _launch(qf, kx, vx, sk, sv, gxf, gxf[H:], 2 * H, z.reshape(1, B * T, H), A_log, dt_bias, norm_weight,
                         o_weight, W, S, kind, seq, chunks, NT, B, state, True, lens=[T] * B, band=band, sm90=sm90,
                         cache=(pc, *_written_sinks(wsk, wsv, pc, T)) if sm90 else None,
                         deterministic=torch.are_deterministic_algorithms_enabled())
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
    initial_state: Optional[torch.Tensor], output_final_state: bool, deterministic: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(out, final_state, lse)``: final_state empty without output_final_state; lse fp32
    ``[B, T, H]`` (window log-sum-exp, log2 domain) is saved by the autograd for the backward.
    ``deterministic``: the same bits on every run, forward (:func:`prefill_fwd`) and backward (``prefill_bwd``)."""
    out, ht, lse = prefill_fwd(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, window, sinks, kind,
                               cu_seqlens, initial_state, output_final_state, deterministic=deterministic)
    if ht is None:
        ht = q.new_empty(0, dtype=torch.float32)
    return out, ht, lse


@_prefill_fwd_op.register_fake
def _(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, window, sinks, kind, cu_seqlens, initial_state,
      output_final_state, deterministic=False):
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
