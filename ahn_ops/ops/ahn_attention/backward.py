"""Backward of the fused AHN prefill (kinds "gdn", "dn", "mamba2"): launcher and ``torch.ops.ahn.prefill_bwd``.

Given ``dout`` (and optionally ``dht``, the grad of the final state), returns the gradients of
``q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight`` and of the initial state.
The autograd saves the forward's inputs, its output ``out`` and the window attention's ``lse``
(fp32 ``[B, T, H]``, stored by the forward kernel); the backward recomputes the memory branch
and takes the attention's ``delta = rowsum(dout * (out - y_mem))`` from the epilogue backward,
which recomputes ``y_mem`` anyway (9 launches, 10 for mamba2; no attention forward re-run):

==========================  ==========================  ==============================
launch                       grid                        recomputes / produces
==========================  ==========================  ==============================
_prep_kernel                 (chunks, H)                 gc, w, u (as the forward; prefill_kernels.py)
_state_kernel                (D/BV, H, N) sequential     h per chunk, v_new (prefill_kernels.py)
_epi_bwd_kernel              (H, chunks)                 m, y_mem; dm, dz, u, dnorm_weight part,
                                                         window delta (mamba2: twice, README.md §6)
_dh_bwd_kernel               (D/BV, H, N) sequential     dh per chunk, dv_new, dh0
_mem_bwd_h_kernel            (D/BK, H, chunks)           products with h, dh: raw memory d/dqn,
                                                         d/dkn part, dw, dgc partials
_mem_bwd_wy_kernel           (H, chunks)                 WY backward: d/dkn part, dv, dbeta, dg
_attn_dq_kernel              (H, blocks)                 dq (+ memory dq through q's l2norm)
_attn_dkdv_sink_kernel       (sink items, HKV)           sink keys' dk, dv past their band (S > 0)
_attn_dkdv_kernel            (HKV, blocks)               dk, dv (+ memory through k's l2norm, sink
                                                         partials)
==========================  ==========================  ==============================

With ``CONFIG["side_stream"]`` (CUDA) the sink launch and the ``do_weight`` product need only what
``_epi_bwd_kernel`` made (delta, u_epi): they run on a side stream from there, beside the memory
passes (``_dh_bwd``'s sequential chain leaves most of the GPU idle); the dkdv launch waits for them.
Where cuDNN (or the sm_90a kernel) computes the window band's gradients, the reverse chain runs on that side
stream too, beside the band, with 64 value columns per program (``CONFIG["band_beside"]``; -0.44 ms of 13.1
at T=32k on an H100 with cuDNN's band).
``CONFIG["state_epi"]`` runs the state chain's re-run and ``_epi_bwd_kernel`` as one launch
(``_state_epi_kernel``).

Then cheap torch glue on ``[B, T, H]`` gates (sigmoid, softplus, ``-exp(A_log)``
backward, sums over tokens for ``A_log``/``dt_bias``) and one matmul per head for
``do_weight = sum_t u^T dy``; ``dnorm_weight`` sums per-chunk partials. Mamba2 (README.md §6):
no WY part (w = 0, v_new = u = dt v), and the epilogue backward runs in two phases around a
torch sum over heads of ``[tokens, H]`` partials (the norm spans the H heads of a token).

Memory (beyond inputs and grads): ``2 * ceil(T/64) * H * D * D`` elements in the input dtype
for the per-chunk states h and dh, plus ``6 * T * H * D`` row buffers (w, u, v_new, dm, dv_local
(dv_new overwrites it), u_epi in the input dtype, dq partial in fp32 counts 2), fp32 ``[T, H]`` delta and
the saved lse, fp32 ``[T, HKV, D]`` accumulators (dk of the sink ranges, the memory's two
d/dkn parts, dv) and fp32 ``[D/64, T, H]`` dgc partials: ``O(T*H*D + T/64*H*D*D)``.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
import triton

from ..common.alloc import empty
from . import backward_attn as ka
from . import backward_mem as km
from . import prefill as pf
from . import prefill_kernels as pk
from . import tables

__all__ = ["prefill_bwd"]

BT = pf.BT
# Launch configuration; `python benchmarks/bench_backward.py --sweep` (and `--config KEY=VALUE`) re-derives it
# (the measurements behind each choice: benchmarks/NOTES_backward.md, "Launch configuration").
# dq, dkdv: (BN or BM, num_warps, num_stages) of the attention kernels (dkdv at 32 keys per step: fewest spills).
# epi_warps: the epilogue backward's warps (_epi_bwd_kernel, and _state_epi_kernel's launch).
# sink_qs: query tokens per program of the sink key blocks' split; sink: (BM, num_warps, num_stages) of their kernel.
# mem_*: _mem_bwd_h_kernel (BK key columns per program, BV value columns per loop step, warps, stages): its V loop
#   keeps dots in flight across the prefetch copy, safe only because every buffer has the same depth
#   (benchmarks/kernel_regs.py --offline checks it); wy_*: _mem_bwd_wy_kernel; dh_*: the reverse state chain.
# side_stream: the sink kernel and the do_weight product (they need only delta and u_epi) run on a side
#   stream beside the memory passes (_dh_bwd's programs leave most of each SM idle); dkdv waits for it.
# band: "auto" (the window band's gradients from cuDNN where prefill's engine rule takes cuDNN, else the Triton
#   kernels) or "sm90" (the sm_90a band backward, torch.ops.ahn.band_bwd_sm90, at D = 128 in bf16 / fp16).
#   Deterministic calls keep the Triton band either way.
# do_weight_slices: the o_weight gradient's token slices (_do_weight; 0: one cuBLAS product per head).
# band_beside (with side_stream and a band from cuDNN or the sm_90a kernel): 1, the reverse state chain runs on a
#   side stream of priority chain_priority (lower is more urgent) while the band runs on the main stream, with
#   beside_bv value columns per program (fewer programs hold fewer of the SMs the band wants); 0, after the band.
#   (The chunk-parallel memory kernels beside the band too gained nothing: NOTES_backward.md.)
# state_epi: the state chain's re-run and the epilogue backward in one launch (_state_epi_kernel: the chain's
#   programs, state_epi_bv value columns each, count chunks ready; the epilogue's wait for theirs) instead of two.
# chain_join (with band_beside): what the chunk-parallel memory kernels after the band wait for on the side stream,
#   "stream" (all of it: the chain, then the sink kernel and the o_weight product queued behind it) or "event" (the
#   chain alone; the dkdv kernel still waits for the whole side stream).
CONFIG = {"band": "auto", "chain_priority": -1, "dq": (64, 4, 2), "dkdv": (32, 4, 3), "sink_qs": 1024,
          "sink": (32, 4, 3),
          "side_stream": True, "mem_bk": 64, "mem_bv": 64, "mem_warps": 8, "mem_stages": 3, "wy_bv": 32, "wy_warps": 4,
          "dh_warps": 4, "dh_stages": 3, "epi_warps": 4, "do_weight_slices": 0, "band_beside": 1, "beside_bv": 64,
          "state_epi": False, "state_epi_bv": 16, "chain_join": "stream"}


def _mm_f32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y`` with fp32 output for low-precision operands (fp32 accumulation either way)."""
    if x.dtype in (torch.bfloat16, torch.float16) and x.is_cuda:
        try:
            return torch.bmm(x, y, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    return torch.bmm(x.float(), y.float())


def _do_weight(uo: torch.Tensor, dof: torch.Tensor) -> torch.Tensor:
    """``do_weight[h] = sum_t u[t, h]^T dy[t, h]`` (fp32 ``[H, D, D]``). ``CONFIG["do_weight_slices"]``: token
    slices of ``km._do_weight_kernel`` (fp32 partials summed in slice order; the count ~2 waves of programs,
    each at least 512 tokens), or 0 for one ``[D, T] x [T, D]`` cuBLAS product per head."""
    Tt, H, D = uo.shape
    slices = CONFIG["do_weight_slices"]
    if slices == 0:
        return _mm_f32(uo.transpose(0, 1).transpose(1, 2), dof.view(Tt, H, D).transpose(0, 1))
    BK = 64
    n = max(1, min(slices, triton.cdiv(Tt, 512)))
    TS = triton.cdiv(triton.cdiv(Tt, n), BK) * BK
    n = triton.cdiv(Tt, TS)
    part = torch.empty(n, H, D, D, dtype=torch.float32, device=uo.device)
    km._do_weight_kernel[(H, n)](u=uo, dy=dof, part=part, Tt=Tt, TS=TS, H=H, D=D, BK=BK, num_warps=8)
    return part.sum(0)


def _sink_sum_table(lens: List[int], W: int, S: int, QS: int, dev: torch.device, band: bool = True):
    """The deterministic sum of the sink kernel's per-item slots: ``(idx, dst, src)`` on ``dev``.

    ``idx`` [key blocks, most items of one block] int64: the slots of each sink key block's items in
    item order, padded with the zero slot (index ``items``); ``dst`` the token rows of dk_acc / dv_acc the
    blocks' valid keys (``j < min(T, S)``) land on and ``src`` their rows in the ``[key blocks * BT]`` sum."""
    rows = ka.sink_items(lens, W, S, BT, QS, band)
    groups: dict = {}
    for i, (n, i_b, _, _) in enumerate(rows):
        groups.setdefault((n, i_b), []).append(i)
    most = max(len(v) for v in groups.values())
    idx = [v + [len(rows)] * (most - len(v)) for v in groups.values()]
    bos = [0]
    for T in lens:
        bos.append(bos[-1] + T)
    dst, src = [], []
    for g, (n, i_b) in enumerate(groups):
        for r in range(BT):
            if i_b * BT + r < min(lens[n], S):
                dst.append(bos[n] + i_b * BT + r)
                src.append(g * BT + r)
    return tuple(tables.to_device(torch.tensor(x, dtype=torch.int64), dev) for x in (idx, dst, src))


def _sink_sum(slots: torch.Tensor, dk_acc: torch.Tensor, dv_acc: torch.Tensor, table) -> None:
    """Adds the sink kernel's per-item partials (``slots`` [2, items + 1, HKV, BT, D]) into dk_acc / dv_acc,
    summed per key block over its items in a fixed order (a gather and a reduction, no atomics)."""
    idx, dst, src = table
    HKV, D = slots.shape[2], slots.shape[4]
    for part, acc in zip(slots, (dk_acc, dv_acc)):
        blk = part[idx].sum(1).transpose(1, 2).reshape(-1, HKV, D)  # [key blocks * BT, HKV, D]
        acc[dst] = acc[dst] + blk[src]


def _items_table(lens: List[int], W: int, S: int, QS: int, dev: torch.device,
                 band: bool = True) -> Optional[torch.Tensor]:
    """``_attn_dkdv_sink_kernel``'s work table on ``dev`` (int32 ``[items, 4]``), None when empty."""
    rows = ka.sink_items(lens, W, S, BT, QS, band)
    return tables.to_device(torch.tensor(rows, dtype=torch.int32), dev) if rows else None


def _sm90_band(q: torch.Tensor, n_seq: int) -> bool:
    """Whether ``CONFIG["band"]`` sends this call's window band to the sm_90a backward (D = 128, bf16 / fp16, at
    most 65535 sequences); raises where "sm90" was asked for and the device or the build cannot run it."""
    mode = CONFIG["band"]
    if mode not in ("auto", "sm90"):
        raise ValueError(f'backward.CONFIG["band"] must be "auto" or "sm90", got {mode!r}')
    if mode != "sm90":
        return False
    pf._sm90_check_device(q.device)
    return q.shape[-1] == 128 and q.dtype in (torch.bfloat16, torch.float16) and n_seq < 65536


def _sm90_band_bwd(*args) -> None:
    """``torch.ops.ahn.band_bwd_sm90`` (a seam for the CPU tests' stand-in)."""
    torch.ops.ahn.band_bwd_sm90(*args)


def _band_ld(lsef: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The band backward's ``ld`` [2, H, Tpad] fp32: the forward's lse (log2 domain) and delta per head, rows
    padded with zeros to a multiple of 4 (16-byte TMA rows)."""
    Tt, H = lsef.shape
    Tpad = (Tt + 3) // 4 * 4
    ld = torch.zeros(2, H, Tpad, dtype=torch.float32, device=lsef.device)
    ld[0, :, :Tt] = lsef.t()
    ld[1, :, :Tt] = delta.t()
    return ld


def prefill_bwd(dout, dht, q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, out, lse, window: int,
                sinks: int, kind: str, cu_seqlens: Optional[torch.Tensor] = None,
                initial_state: Optional[torch.Tensor] = None, deterministic: bool = False):
    """Gradients of ``prefill_fwd`` (no autograd; the launcher behind ``torch.ops.ahn.prefill_bwd``).

    Args:
        dout: ``[B, T, H, D]`` grad of the output, q's dtype.
        dht: ``[N, H, D, D]`` fp32 grad of the final state, or None.
        out: ``[B, T, H, D]`` the forward's output (q's dtype), for ``delta = rowsum(dout * o_win)``
            with ``o_win = out - y_mem`` (``_epi_bwd_kernel`` recomputes the memory part ``y_mem``).
        lse: ``[B, T, H]`` fp32 window log-sum-exp (log2 domain), the forward's third output.
        deterministic: gradients bitwise identical from run to run: no float atomics whose order decides
            a sum (the sink ranges' partials and, with G > 1 query heads per kv head, the memory's dk / dv
            per head are stored and summed in a fixed order; the band's gradients from the Triton
            kernels, not cuDNN; one stream). Costs two fp32 ``[tokens, H, D]`` buffers with G > 1 and the
            Triton band's time (benchmarks/bench_backward.py --deterministic).
        others: as :func:`ahn_ops.ops.ahn_attention.prefill.prefill_fwd`.
    Returns:
        ``(dq, dk, dv, da, db, dz, dA_log, ddt_bias, dnorm_weight, do_weight, dh0)``; ``da``,
        ``dA_log``, ``ddt_bias`` are None for "dn", ``db`` None for "mamba2", ``dh0`` None without
        an initial state.
    """
    beside = CONFIG["band_beside"]
    if beside not in (0, 1):
        raise ValueError(f'backward.CONFIG["band_beside"] must be 0 or 1, got {beside!r}')
    if CONFIG["chain_join"] not in ("stream", "event"):
        raise ValueError(f'backward.CONFIG["chain_join"] must be "stream" or "event", got {CONFIG["chain_join"]!r}')
    B, T, H, D = q.shape
    HKV = k.shape[2]
    dev, dt = q.device, q.dtype
    W, S = int(window), int(sinks)
    lens, seq, chunks, NT = tables.prefill_tables(B, T, cu_seqlens, dev)
    N = len(lens)
    Tt = B * T
    flat = lambda x: None if x is None else x.reshape(Tt, *x.shape[2:]).contiguous()  # noqa: E731
    qf, kf, vf, dof, outf = flat(q), flat(k), flat(v), flat(dout.to(dt)), flat(out.to(dt))
    lsef = lse.reshape(Tt, H).float().contiguous()
    af, bf, zf = flat(a), flat(b), flat(z)
    dummy = q.new_empty(0)
    use_h0 = initial_state is not None
    use_dht = dht is not None and dht.numel() > 0
    mamba2 = kind == "mamba2"
    gates = {"gdn": 0, "dn": 1, "mamba2": 3}[kind]
    A_logf = A_log.float().contiguous() if A_log is not None else dummy
    dt_biasf = dt_bias.float().contiguous() if dt_bias is not None else dummy
    mem_scale = 1.0 if mamba2 else D ** -0.5
    qk_scale = D ** -0.5 * math.log2(math.e)

    dq = empty(B, T, H, D, dtype=dt, device=dev)
    dk = empty(B, T, HKV, D, dtype=dt, device=dev)
    dv = empty(B, T, HKV, D, dtype=dt, device=dev)
    # fp32 accumulators (tokens never absorbed keep 0): the sink ranges' dk, dv of the sinks and the memory
    # (the memory's dq and d/dkn ones: mem_accumulators below)
    dk_acc = torch.zeros(Tt, HKV, D, dtype=torch.float32, device=dev)
    dv_acc = torch.zeros(Tt, HKV, D, dtype=torch.float32, device=dev)
    # deterministic with G > 1: the memory kernels store dk (both parts) and dv per query head
    mem_det = deterministic and H > HKV
    dg_tok = torch.zeros(Tt, H, dtype=torch.float32, device=dev)
    dbeta_tok = torch.zeros(Tt, H, dtype=torch.float32, device=dev)
    dz = empty(Tt, H, dtype=torch.float32, device=dev)
    dnw_part = empty(max(NT, 1), H, D, dtype=torch.float32, device=dev)
    uo = empty(Tt, H, D, dtype=dt, device=dev)
    dh0 = empty(N, H, D, D, dtype=torch.float32, device=dev) if use_h0 else None
    dow = None
    # the window band's gradients from cuDNN (band_cudnn.band_bwd) where the forward's engine rule allows
    # (prefill._band_engine: sm_90+, bf16/fp16, lengths one or close); the Triton kernels then walk
    # only the sinks past the window and the memory part, and add the band's dq, dk, dv
    # deterministic: the Triton band, whose dq and dk/dv programs own their rows (cuDNN's deterministic
    # backward reduces dq per key tile through a workspace of ~32 GB at T=32k, H=16 and took 2.8x as long)
    # sm90_band: the band's gradients from our sm_90a kernel instead (backward.CONFIG["band"] = "sm90")
    sm90_band = NT > 0 and not deterministic and _sm90_band(q, len(lens))
    cudnn_band = NT > 0 and not deterministic and not sm90_band and pf._band_engine(q, lens)
    ext_band = cudnn_band or sm90_band  # the Triton kernels leave the band t - wb < j <= t to them
    owin = empty(Tt, H, D, dtype=dt, device=dev) if cudnn_band else dummy
    dqb = dkb = dvb = dummy
    wb = W  # the cuDNN band's window (band_cudnn.band_window); the Triton kernels walk t - W < j <= t - wb

    if NT > 0:
        # ---- memory branch: recompute the forward's chunk quantities and states ----
        gc = empty(Tt, H, dtype=torch.float32, device=dev)
        w = dummy if mamba2 else empty(Tt, H, D, dtype=dt, device=dev)  # Mamba2: no delta rule, w = 0
        u = empty(Tt, H, D, dtype=dt, device=dev)
        kd = empty(Tt, H, D, dtype=dt, device=dev)  # forward's decayed keys kn * exp(g_last - gc)
        # the WY inverse X per chunk, [Tt, H, BT] in the input dtype, for _mem_bwd (not recomputed there)
        xs = dummy if mamba2 else empty(Tt, H, BT, dtype=dt, device=dev)
        pk._prep_kernel[(NT, H)](
            kx=kf, vx=vf, a=af if af is not None else dummy, b=bf if bf is not None else dummy,
            A_log=A_logf, dt_bias=dt_biasf, seq=seq, chunks=chunks, gc=gc, w=w, u=u, kd=kd, xs=xs, H=H, HKV=HKV, D=D,
            W=W, S=S, BT=BT, GATES=gates, MAMBA2=mamba2, AB_RS=H, STORE_X=not mamba2, **pf.prep_launch())
        hs = empty(NT, H, D, D, dtype=dt, device=dev)
        vnew = u if mamba2 else empty(Tt, H, D, dtype=dt, device=dev)
        h0 = initial_state.float().contiguous() if use_h0 else None
        # ---- epilogue backward + readout recompute (+ the attention's delta from out - y_mem) ----
        dm = empty(Tt, H, D, dtype=dt, device=dev)
        dvl = empty(Tt, H, D, dtype=dt, device=dev)
        delta = empty(Tt, H, dtype=torch.float32, device=dev)
        qg = empty(Tt, H, D, dtype=dt, device=dev)  # qn e^gc per row, made by _epi_bwd for _dh_bwd
        epi = dict(qg=qg, q=qf, k=kf, z=zf, nw=norm_weight.float().contiguous(), ow=o_weight.to(dt).contiguous(), dy=dof,
                   out=outf, delta=delta, owin=owin, STORE_OWIN=cudnn_band,
                   seq=seq, chunks=chunks, gc=gc, hs=hs, vnew=vnew, dm=dm, dvl=dvl, uo=uo, dz=dz, dnw_part=dnw_part,
                   W=W, S=S, mem_scale=mem_scale, H=H, HKV=HKV, D=D, BT=BT, USE_H0=use_h0, MAMBA2=mamba2,
                   num_warps=CONFIG["epi_warps"])
        # mamba2: the norm spans the H heads of a token: per-head partials first (phase 1), reduced below over
        # heads, then phase 2
        ssp = cp = dummy
        if mamba2:
            ssp = empty(Tt, H, dtype=torch.float32, device=dev)
            cp = empty(Tt, H, dtype=torch.float32, device=dev)
        if CONFIG["state_epi"]:
            # the state chain's re-run and the (first) epilogue launch as one, by ticket (_state_epi_kernel)
            BVc = CONFIG["state_epi_bv"]
            nchain = D // BVc * H * N
            ctr = torch.zeros(1 + NT * H, dtype=torch.int32, device=dev)  # the ticket, then the ready counters
            km._state_epi_kernel[(nchain + H * NT,)](
                ticket=ctr, ready=ctr[1:], kd=kd, w=w, u=u, h0=h0 if use_h0 else dummy, ssp=ssp, cp=cp, rk=dummy,
                NCHAIN=nchain, BV=BVc, PHASE=1 if mamba2 else 0, NTHR=32 * CONFIG["epi_warps"],
                num_stages=pf.CONFIG["state_stages"], **epi)
            del ctr
        else:
            pf.state_chain(kd, w, u, gc, seq, N, H, D, W, S, mamba2, h0, hs, vnew, None, dummy)
            km._epi_bwd_kernel[(H, NT)](ssp=ssp, cp=cp, rk=dummy, PHASE=1 if mamba2 else 0, **epi)
        del u
        if mamba2:
            r = torch.rsqrt(ssp.sum(1) / (H * D) + 1e-5)
            rk = torch.stack([r, r.pow(3) * cp.sum(1) / (H * D)], 1).contiguous()  # [Tt, 2] fp32
            del ssp, cp
            km._epi_bwd_kernel[(H, NT)](ssp=dummy, cp=dummy, rk=rk, PHASE=2, **epi)
        # ---- sink key blocks: the queries past their band, split over programs (atomics into dk/dv_acc);
        # needs only delta, so with CONFIG["side_stream"] it runs on a side stream from here on ----
        # (the work table is cached by contents, as the forward's tables, and made on the main stream)
        QS = CONFIG["sink_qs"]
        items = tables.cached_table(("sink", tuple(lens), W, S, BT, QS, str(dev), ext_band),
                                    lambda: _items_table(lens, W, S, QS, dev, not ext_band))

        # deterministic: one slot of partials per item, each written whole by the sink kernel, plus a zero
        # slot for the padding of _sink_sum
        slots = None
        if deterministic and items is not None:
            slots = empty(2, items.shape[0] + 1, HKV, BT, D, dtype=torch.float32, device=dev)
            slots[:, -1].zero_()

        def sink():
            BM, nw, ns = CONFIG["sink"]
            ka._attn_dkdv_sink_kernel[(items.shape[0], HKV)](
                q=qf, k=kf, v=vf, do=dof, seq=seq, items=items, lse=lsef, delta=delta,
                dk_acc=dk_acc if slots is None else slots[0], dv_acc=dv_acc if slots is None else slots[1],
                W=W, S=S, qk_scale=qk_scale, sm_scale=D ** -0.5, H=H, HKV=HKV, D=D, BT=BT, BM=BM,
                BAND=not ext_band, DET=slots is not None, num_warps=nw, num_stages=ns)

        # the reverse chain beside the band (CONFIG["band_beside"]): the side stream forks here, before the band's
        # launch, so that only what _epi_bwd made is waited for
        use_side = CONFIG["side_stream"] and dev.type == "cuda" and not deterministic
        beside = beside if (use_side and ext_band) else 0
        side = main = None
        dhs = chain_done = None
        if beside:
            # the chain's output allocated before the band's buffers are freed on the main stream (a block freed
            # there after the fork could be handed to it while the band still reads it)
            dhs = empty(NT, H, D, D, dtype=dt, device=dev)
            main = torch.cuda.current_stream(dev)
            side = pf.side_stream(dev, CONFIG["chain_priority"])
            side.wait_stream(main)

        band_args = None
        if sm90_band:
            # the whole band (t - W < j <= t) from the sm_90a kernel, into fp32 buffers (rows as q / k) that the
            # dq / dkdv kernels below add; its lse and delta as [2, H, Tpad] rows
            dqb = torch.zeros(Tt, H, D, dtype=torch.float32, device=dev)
            dkb = torch.zeros(Tt, HKV, D, dtype=torch.float32, device=dev)
            dvb = torch.zeros(Tt, HKV, D, dtype=torch.float32, device=dev)
            band_args = (qf, kf, vf, dof, _band_ld(lsef, delta), W, pf._cu_seqlens(lens, dev), max(lens),
                         dqb, dkb, dvb)

        if cudnn_band:
            # the band's dq, dk, dv: cuDNN's P = exp(s - lse) with the forward's lse over band + sinks and
            # its delta from o_win give exactly the band's share of the gradients
            from . import band_cudnn

            # [N, T, ...] batches (unequal lengths padded to one, as for the forward's band); lse natural log
            (qb, kb, vb, ob_, dob, lse_b), pad_idx = band_cudnn.to_batch(
                lens, *(x.view(Tt, -1, D) for x in (qf, kf, vf, owin, dof)), (lsef * math.log(2.0)).view(Tt, H))
            T1 = qb.shape[1]
            lse_n = lse_b.transpose(1, 2).contiguous()  # [N, H, T]
            wb = band_cudnn.band_window("bwd", qb, kb, W)
            # one length on cuDNN's grid: the band's gradients go straight into dq, dk, dv, which the
            # dq / dkdv kernels below read and rewrite row by row (no second set of buffers)
            direct = pad_idx is None and T1 % band_cudnn.PAD == 0
            out3 = (dq.view(N, T1, H, D), dk.view(N, T1, HKV, D), dv.view(N, T1, HKV, D)) if direct else None
            dqb, dkb, dvb = band_cudnn.band_bwd(qb, kb, vb, ob_, dob, lse_n, wb, out=out3)
            if pad_idx is None:  # rows as q / k (views when cuDNN padded)
                dqb, dkb, dvb = (x.contiguous() for x in (dqb, dkb, dvb))
            else:  # the real rows, packed again
                dqb, dkb, dvb = (x.reshape(N * T1, -1, D).index_select(0, pad_idx) for x in (dqb, dkb, dvb))
            # o_win (and the padded copies) are read by nothing else: free them before the memory passes
            del lse_n, lse_b, owin, epi, qb, kb, vb, ob_, dob

        # ---- reverse state recurrence (a function: beside the band it runs on the side stream) ----
        if dhs is None:
            dhs = empty(NT, H, D, D, dtype=dt, device=dev)
        # dv_new = dv_local + kd dh over dv_local's storage: each element is read and then written by the one chain
        # program that owns its (chunk, value columns)
        dvnew = dvl

        def chain():
            # the forward's state-pass BV (more programs on a latency-bound loop), or fewer, wider programs
            # beside the band
            BV = min(CONFIG["beside_bv"], D) if beside else pf.CONFIG["state_bv"][D]
            km._dh_bwd_kernel[(D // BV, H, N)](
                qg=qg, kd=kd, w=w, gc=gc, dm=dm, dvl=dvl, seq=seq,
                dht=dht.float().contiguous() if use_dht else dummy, dhs=dhs, dvnew=dvnew,
                dh0=dh0 if use_h0 else dummy, W=W, S=S, H=H, D=D, BT=BT, BV=BV, USE_H0=use_h0, USE_DHT=use_dht,
                MAMBA2=mamba2, num_warps=CONFIG["dh_warps"], num_stages=CONFIG["dh_stages"])

        # deterministic: one stream (cuBLAS' do_weight product is reproducible only on one stream
        # without a fixed workspace configuration)
        if use_side:
            if side is None:  # not forked before the band: the side stream takes the sink and do_weight only
                main = torch.cuda.current_stream(dev)
                side = pf.side_stream(dev, 0)
                side.wait_stream(main)
            # cuDNN's band is on the main stream already; ours is launched here, before the chain, so that its
            # CTAs fill the GPU first (the chain, on a stream of higher priority, takes SMs as band CTAs retire).
            # The tensors the side stream reads were allocated before the fork and live until the main stream
            # waits for it, or are marked (record_stream) where freed before that
            if band_args is not None:
                _sm90_band_bwd(*band_args)
            with torch.cuda.stream(side):
                if beside:
                    chain()
                    if CONFIG["chain_join"] == "event":
                        chain_done = torch.cuda.Event()
                        chain_done.record(side)
                if items is not None:
                    sink()
                dow = _do_weight(uo, dof)
            dow.record_stream(main)  # allocated on the side stream, converted on the main one
            uo.record_stream(side)  # freed below while the side stream may still read it
            if not beside:
                chain()
        else:  # one stream: the product now, so that u_epi is freed before the memory passes
            if band_args is not None:
                _sm90_band_bwd(*band_args)
            dow = _do_weight(uo, dof)
            chain()
        uo = None  # u_epi ([tokens, H, D]) is read by nothing else
        if beside:
            # read by the chain on the side stream: its storage waits for it before the main stream reuses it
            kd.record_stream(side)
        # qg's storage ([Tt, H, D], input dtype) is free after _dh_bwd: the chunk-parallel kernels' dw, written in
        # stream order after the chain
        dw_buf = qg
        del qg, kd
        # ---- chunk-parallel memory gradients ----
        # the products with the states, split over key columns (raw d/dqn, d/dkn, dw, dgc parts) ...
        BK = min(CONFIG["mem_bk"], D)
        NK = D // BK
        dgc_part = empty(NK, Tt, H, dtype=torch.float32, device=dev)
        # fp32: the memory's raw d/dqn, and its d/dkn in two parts (state products, WY; l2norm backward of their sum
        # in _attn_dkdv): made here, not held through the band
        dq_acc = empty(Tt, H, D, dtype=torch.float32, device=dev)
        dkm_acc = torch.zeros(Tt, HKV, D, dtype=torch.float32, device=dev)
        dkw_acc = torch.zeros(Tt, HKV, D, dtype=torch.float32, device=dev)
        if mem_det:  # per query head, summed over the G heads below (tokens never absorbed keep 0)
            dkh = torch.zeros(Tt, H, D, dtype=torch.float32, device=dev)
            dvh = torch.zeros(Tt, H, D, dtype=torch.float32, device=dev)
        if beside:  # the chain's dhs and dv_new
            if chain_done is not None:
                main.wait_event(chain_done)
            else:
                main.wait_stream(side)
        km._mem_bwd_h_kernel[(NK, H, NT)](
            q=qf, k=kf, seq=seq, chunks=chunks, gc=gc, hs=hs, dhs=dhs, vnew=vnew, dvnew=dvnew, dm=dm,
            dq_acc=dq_acc, dkm_acc=dkh if mem_det else dkm_acc, dw_buf=dw_buf, dgc_part=dgc_part,
            W=W, S=S, mem_scale=mem_scale, Tt=Tt, H=H, HKV=HKV, D=D, BT=BT, BK=BK, BV=min(CONFIG["mem_bv"], D),
            USE_H0=use_h0, MAMBA2=mamba2, DET=mem_det, num_warps=CONFIG["mem_warps"],
            num_stages=CONFIG["mem_stages"])
        del hs, dhs, dm
        # ... then the WY backward, dv, dbeta and the cumsum of dgc -> dg, per (head, chunk)
        km._mem_bwd_wy_kernel[(H, NT)](
            k=kf, v=vf, a=af if af is not None else dummy, b=bf if bf is not None else dummy, A_log=A_logf,
            dt_bias=dt_biasf, seq=seq, chunks=chunks, gc=gc, xs=xs, dvnew=dvnew, dw_buf=dw_buf, dgc_part=dgc_part,
            dkw_acc=dkh if mem_det else dkw_acc, dv_acc=dvh if mem_det else dv_acc, dg_tok=dg_tok,
            dbeta_tok=dbeta_tok, W=W, S=S, Tt=Tt,
            H=H, HKV=HKV, D=D, BT=BT, BV=min(CONFIG["wy_bv"], D), NK=NK, GATES=gates, USE_H0=use_h0,
            MAMBA2=mamba2, DET=mem_det, num_warps=CONFIG["wy_warps"])
        del w, xs, vnew, dvnew, dvl, dw_buf, dgc_part
        if mem_det:
            dkm_acc = dkh.view(Tt, HKV, H // HKV, D).sum(2)
            dv_acc = dvh.view(Tt, HKV, H // HKV, D).sum(2)
            del dkh, dvh
        # ---- window attention backward (lse from the forward, delta from _epi_bwd_kernel) ----
        BN, nw, ns = CONFIG["dq"]
        ka._attn_dq_kernel[(H, NT)](
            q=qf, k=kf, v=vf, do=dof, seq=seq, chunks=chunks, lse=lsef, delta=delta, dq_acc=dq_acc, dq=dq, dqb=dqb,
            W=W, S=S, qk_scale=qk_scale, sm_scale=D ** -0.5, mem_scale=mem_scale, WB=wb, H=H, HKV=HKV, D=D, BT=BT,
            BN=BN, MAMBA2=mamba2, BAND=not ext_band, num_warps=nw, num_stages=ns)
        BM, nw, ns = CONFIG["dkdv"]
        if side is not None:
            main.wait_stream(side)  # the sink partials in dk_acc / dv_acc
        elif items is not None:
            sink()
        if slots is not None:
            _sink_sum(slots, dk_acc, dv_acc, tables.cached_table(
                ("sinksum", tuple(lens), W, S, BT, QS, str(dev), ext_band),
                lambda: _sink_sum_table(lens, W, S, QS, dev, not ext_band)))
            del slots
        ka._attn_dkdv_kernel[(HKV, NT)](
            q=qf, k=kf, v=vf, do=dof, seq=seq, chunks=chunks, lse=lsef, delta=delta, dk_acc=dk_acc,
            dkm_acc=dkm_acc, dkw_acc=dkw_acc, dv_acc=dv_acc, dk=dk, dv=dv, dkb=dkb, dvb=dvb, W=W, S=S, WB=wb,
            qk_scale=qk_scale, sm_scale=D ** -0.5,
            H=H, HKV=HKV, D=D, BT=BT, BM=BM, MAMBA2=mamba2, BAND=not ext_band, num_warps=nw, num_stages=ns)
    elif use_h0:
        dh0.copy_(dht if use_dht else torch.zeros_like(dh0))

    # ---- torch glue on [tokens, H] gates: sigmoid, softplus, -exp(A_log) ----
    dzo = dz.view(B, T, H).to(z.dtype)
    da = db = dA_log = ddt_bias = None
    if kind != "mamba2":
        beta = torch.sigmoid(bf.float())
        db = (dbeta_tok * beta * (1 - beta)).view(B, T, H).to(b.dtype)
    if kind == "mamba2":
        # dt = softplus(a + dt_bias) is both the write strength and (times -exp(A_log)) the log-decay
        x = af.float() + dt_bias.float()
        decay = -torch.exp(A_log.float())
        ddt = dbeta_tok + dg_tok * decay
        dx = ddt * torch.sigmoid(x)  # softplus' (threshold 20: sigmoid(20) = 1 in fp32)
        da = dx.view(B, T, H).to(a.dtype)
        ddt_bias = dx.sum(0).to(dt_bias.dtype)
        dA_log = (dg_tok * decay * F.softplus(x)).sum(0).to(A_log.dtype)
    elif kind == "gdn":
        x = af.float() + dt_bias.float()
        decay = -torch.exp(A_log.float())
        dgx = dg_tok * decay * torch.sigmoid(x)
        da = dgx.view(B, T, H).to(a.dtype)
        ddt_bias = dgx.sum(0).to(dt_bias.dtype)
        dA_log = (dg_tok * decay * F.softplus(x)).sum(0).to(A_log.dtype)
    if NT == 0:
        dnw = torch.zeros_like(norm_weight)
    elif mamba2:  # norm_weight [H * D]: one slice per head
        dnw = dnw_part[:NT].sum(0).reshape(H * D).to(norm_weight.dtype)
    else:
        dnw = dnw_part[:NT].sum((0, 1)).to(norm_weight.dtype)
    if dow is None:
        dow = _do_weight(uo, dof)
    return dq, dk, dv, da, db, dzo, dA_log, ddt_bias, dnw, dow.to(o_weight.dtype), dh0


# ---------------------------------------------------------------------------------------------
# registration: torch.ops.ahn.prefill_bwd
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("ahn::prefill_bwd", mutates_args=())
def _prefill_bwd_op(
    dout: torch.Tensor, dht: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    a: Optional[torch.Tensor], b: Optional[torch.Tensor], z: torch.Tensor, A_log: Optional[torch.Tensor],
    dt_bias: Optional[torch.Tensor], norm_weight: torch.Tensor, o_weight: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, window: int, sinks: int, kind: str, cu_seqlens: Optional[torch.Tensor],
    initial_state: Optional[torch.Tensor], deterministic: bool = False,
) -> List[torch.Tensor]:
    """Returns 11 tensors in the order of :func:`prefill_bwd`; absent grads are empty tensors."""
    grads = prefill_bwd(dout, dht, q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, out, lse, window, sinks,
                        kind, cu_seqlens, initial_state, deterministic)
    return [q.new_empty(0) if g is None else g for g in grads]


@_prefill_bwd_op.register_fake
def _(dout, dht, q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, out, lse, window, sinks, kind,
      cu_seqlens, initial_state, deterministic=False):
    like = lambda x: q.new_empty(0) if x is None else torch.empty_like(x)  # noqa: E731
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), like(a), like(b), torch.empty_like(z),
            like(A_log), like(dt_bias), torch.empty_like(norm_weight), torch.empty_like(o_weight),
            like(initial_state).float() if initial_state is not None else q.new_empty(0)]
