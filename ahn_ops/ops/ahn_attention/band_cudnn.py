"""The sliding-window band of the AHN window attention through cuDNN's fused SDPA (sm_90+).

cuDNN's Hopper attention kernels (warp-specialised, TMA + wgmma) take a diagonal band: with
``diagonal_band_left_bound = W`` and a causal right bound, query ``t`` attends keys ``t - W < j <= t``,
exactly the window part of ``K(t)``. The fused AHN forward then starts its online softmax from the
band's normalised output and log-sum-exp instead of walking the band itself, and adds the sink
keys that left the window and the memory readout (``prefill_kernels._fwd_kernel`` with ``BAND_IN``).

cuDNN is reached through ``nvidia-cudnn-frontend``'s graph API (the ``cudnn`` module) on top of the
``libcudnn`` that PyTorch ships; graphs are built once per shape and cached. A new shape costs ~40-50 ms
of graph building per direction on an H100, and ~0.5 s when the length is not a multiple of 128 (cuDNN
then compiles a kernel), so calls pad the length to a multiple of ``PAD`` (``_padded``): the band is causal,
so zero rows at the end change nothing in the real rows, and their gradients are exactly zero.
The window is part of a graph too, and training draws a new one per step: ``band_window`` gives the window
a caller should ask for, the exact one for the first ``EXACT_WINDOWS`` windows a shape is asked for with (a
model's fixed window), else the window rounded down to a multiple of ``WINDOW_STEP`` (a training job's draws
then share a bounded set of graphs); the fused kernels walk the keys between the two (``WB`` of ``_fwd_kernel``, ``_attn_dq_kernel``, ``_attn_dkdv_kernel``). ``unavailable_reason``
says why this engine cannot run on a device; the Triton band is the fallback everywhere else.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Tuple

import torch

from ..common.alloc import empty
from .tables import lru_get

__all__ = ["band_fwd", "band_bwd", "band_window", "pad_len", "to_batch", "unavailable_reason"]

_HANDLES: dict = {}
_GRAPHS: "OrderedDict[tuple, tuple]" = OrderedDict()
_GRAPHS_MAX = 128
_WORKSPACE: dict = {}
_REASON: dict = {}
PAD = 128  # the length granularity of the graphs (see the module docstring)
WINDOW_STEP = 256  # the window granularity of the graphs of a shape that sees many windows (band_window)
EXACT_WINDOWS = 2  # the distinct windows per shape that get their exact graph (band_window)
_SEEN: "OrderedDict[tuple, list]" = OrderedDict()
_SEEN_MAX = 4096


def _cudnn():
    import cudnn  # noqa: PLC0415  (optional dependency: nvidia-cudnn-frontend)

    return cudnn


def unavailable_reason(device) -> Optional[str]:
    """None when the cuDNN band can run on ``device``; else why not (one line)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "not a CUDA device"
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx in _REASON:
        return _REASON[idx]
    reason = None
    if torch.cuda.get_device_capability(idx)[0] < 9:
        reason = "needs compute capability 9.0 or newer"
    else:
        try:
            _cudnn()
        except Exception as e:  # noqa: BLE001
            reason = f"nvidia-cudnn-frontend is not importable ({type(e).__name__}: {e})"
        if reason is None and (torch.backends.cudnn.version() or 0) < 90500:
            reason = f"cuDNN {torch.backends.cudnn.version()} is older than 9.5"
    _REASON[idx] = reason
    return reason


def pad_len(T: int) -> int:
    """The length cuDNN's band runs at for ``T`` rows per sequence: ``T`` rounded up to ``PAD``."""
    return -(-T // PAD) * PAD


def to_batch(lens, *rows):
    """``[N, T, ...]`` batches of the rows (each ``[rows, ...]``) of sequences of ``lens`` packed one after
    the other: views for one length; for unequal ones copies padded with zero rows to the longest length
    rounded up to ``PAD`` (the band is causal, so the zero rows after a sequence change none of its rows).
    Returns ``(batches, idx)``: ``idx`` (None for views) the batch row ``n * T + t`` of each packed row, to
    gather results back with ``x.reshape(N * T, ...).index_select(0, idx)``."""
    from .tables import cached_table

    N = len(lens)
    if len(set(lens)) == 1:
        return [x.view(N, lens[0], *x.shape[1:]) for x in rows], None
    TM = pad_len(max(lens))

    def build():
        ln = torch.tensor(lens, dtype=torch.int64)
        # per sequence: its first packed row minus its first batch row
        shift = torch.cumsum(ln, 0) - ln - torch.arange(N, dtype=torch.int64) * TM
        return (torch.arange(int(ln.sum()), dtype=torch.int64) - torch.repeat_interleave(shift, ln)).to(
            rows[0].device)

    idx = cached_table(("band_pad", tuple(lens), TM, str(rows[0].device)), build)
    batches = []
    for x in rows:
        out = x.new_zeros(N * TM, *x.shape[1:])
        out.index_copy_(0, idx, x)
        batches.append(out.view(N, TM, *x.shape[1:]))
    return batches, idx


def band_window(direction: str, q: torch.Tensor, k: torch.Tensor, window: int) -> int:
    """The band window to ask ``band_fwd`` (``direction`` "fwd") or ``band_bwd`` ("bwd") for, for a call whose
    kernels walk the keys ``t - window < j <= t - returned`` themselves.

    A window covering the whole call (plain causal attention) is asked for as the padded length, so that
    every such call of one padded length shares a graph. Otherwise: ``window`` if it is one of the first
    ``EXACT_WINDOWS`` distinct windows this (direction, shape, dtype) was asked for with, else ``window``
    rounded down to a multiple of ``WINDOW_STEP`` (at least one step). A model with a fixed window gets its
    exact graph from the first call on; a training job drawing a window per step (and calling every layer
    with it) builds at most ``EXACT_WINDOWS`` exact graphs per shape, and its other draws share the
    graphs of the rounded windows, one build each instead of one per draw."""
    B, T, H, D = q.shape
    window = int(window)
    if window >= T:
        return pad_len(T)
    key = (direction, str(q.device), q.dtype, B, pad_len(T), H, k.shape[2], D)
    exact = lru_get(_SEEN, key, list, _SEEN_MAX)
    if window in exact or window <= WINDOW_STEP:
        return window
    if len(exact) < EXACT_WINDOWS:
        exact.append(window)
        return window
    return window - window % WINDOW_STEP


def _handle(device: torch.device):
    cudnn = _cudnn()
    idx = device.index if device.index is not None else torch.cuda.current_device()
    h = _HANDLES.get(idx)
    if h is None:
        with torch.cuda.device(idx):
            h = cudnn.create_handle()
        _HANDLES[idx] = h
    cudnn.set_stream(h, torch.cuda.current_stream(device).cuda_stream)
    return h


def _io_type(dtype: torch.dtype):
    cudnn = _cudnn()
    if dtype == torch.bfloat16:
        return cudnn.data_type.BFLOAT16
    if dtype == torch.float16:
        return cudnn.data_type.HALF
    raise ValueError(f"cuDNN band: dtype must be bfloat16 or float16, got {dtype}")


def _bhsd(x: torch.Tensor) -> Tuple[list, list]:
    """``[B, T, H, D]`` tensor -> cuDNN's (dims, strides) in its [B, H, S, D] order (no copy)."""
    B, T, H, D = x.shape
    sb, st, sh, sd = x.stride()
    return [B, H, T, D], [sb, sh, st, sd]


def _padded(x: torch.Tensor, T_pad: int, dim: int = 1) -> torch.Tensor:
    """``x`` with zero rows along ``dim`` (the length: 1 for ``[B, T, ...]``, 2 for lse ``[B, H, T]``) up to
    ``T_pad``; ``x`` itself if no padding is needed."""
    if x.shape[dim] == T_pad:
        return x
    shape = list(x.shape)
    shape[dim] = T_pad
    out = x.new_zeros(shape)
    out.narrow(dim, 0, x.shape[dim]).copy_(x)
    return out


def _graph_key(direction: str, q, k, v, o, window: int):
    """The handle, cuDNN's (dims, strides) of q, k, v, o and the graph cache key of one call."""
    (qd, qs), (kd, ks), (_, vs), (od, os_) = (_bhsd(x) for x in (q, k, v, o))
    key = (direction, q.device, q.dtype, tuple(qd), tuple(qs), tuple(kd), tuple(ks), tuple(vs), tuple(os_),
           int(window))
    return _handle(q.device), (qd, qs, kd, ks, vs, od, os_), key


def _workspace(device: torch.device, nbytes: int) -> torch.Tensor:
    ws = _WORKSPACE.get(device)
    if ws is None or ws.numel() < nbytes:
        ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
        _WORKSPACE[device] = ws
    return ws


def _new_graph(handle, dtype, qd, qs, kd, ks, vs):
    """A graph with the q, k, v inputs: (cudnn, io type, graph, tq, tk, tv)."""
    cudnn = _cudnn()
    io = _io_type(dtype)
    g = cudnn.pygraph(io_data_type=io, intermediate_data_type=cudnn.data_type.FLOAT,
                      compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    tq = g.tensor(name="q", dim=qd, stride=qs, data_type=io)
    tk = g.tensor(name="k", dim=kd, stride=ks, data_type=io)
    tv = g.tensor(name="v", dim=kd, stride=vs, data_type=io)
    return cudnn, io, g, tq, tk, tv


def _plan(g, tensors):
    """Validate and plan ``g``: (graph, its tensors, workspace bytes)."""
    cudnn = _cudnn()
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return g, tensors, g.get_workspace_size()


def _build_fwd(handle, dtype, qd, qs, kd, ks, vs, od, os_, window: int, scale: float):
    cudnn, io, g, tq, tk, tv = _new_graph(handle, dtype, qd, qs, kd, ks, vs)
    to, tst = g.sdpa(name="band", q=tq, k=tk, v=tv, generate_stats=True, attn_scale=scale,
                     diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT,
                     diagonal_band_left_bound=window, diagonal_band_right_bound=0)
    to.set_output(True).set_dim(od).set_stride(os_).set_data_type(io)
    B, H, T = od[0], od[1], od[2]
    tst.set_output(True).set_dim([B, H, T, 1]).set_stride([H * T, T, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
    return _plan(g, (tq, tk, tv, to, tst))


def band_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
             out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Band attention ``t - window < j <= t`` of ``q [B, T, H, D]`` over ``k, v [B, T, HKV, D]``.

    Returns ``(o [B, T, H, D] in q.dtype, lse [B, H, T] fp32)``: ``o`` normalised over the band,
    ``lse`` the band's natural-log log-sum-exp of the scaled logits (``D^-0.5``). With a length that is
    not a multiple of ``PAD`` both are views of padded results (``out`` is then not written).
    """
    B, T, H, D = q.shape
    T_pad = pad_len(T)
    if T_pad != T:
        o, lse = band_fwd(_padded(q, T_pad), _padded(k, T_pad), _padded(v, T_pad), window)
        return o[:, :T], lse[:, :, :T]
    dev = q.device
    if out is None:
        out = empty(B, T, H, D, dtype=q.dtype, device=dev)
    lse = empty(B, H, T, dtype=torch.float32, device=dev)
    handle, (qd, qs, kd, ks, vs, od, os_), key = _graph_key("fwd", q, k, v, out, window)
    g, (tq, tk, tv, to, tst), ws = lru_get(
        _GRAPHS, key, lambda: _build_fwd(handle, q.dtype, qd, qs, kd, ks, vs, od, os_, int(window), D ** -0.5),
        _GRAPHS_MAX)
    g.execute({tq: q, tk: k, tv: v, to: out, tst: lse}, _workspace(dev, ws), handle=handle)
    return out, lse


def _build_bwd(handle, dtype, qd, qs, kd, ks, vs, os_, window: int, scale: float):
    cudnn, io, g, tq, tk, tv = _new_graph(handle, dtype, qd, qs, kd, ks, vs)
    B, H, T = qd[0], qd[1], qd[2]
    to = g.tensor(name="o", dim=qd, stride=os_, data_type=io)
    tdo = g.tensor(name="do", dim=qd, stride=os_, data_type=io)
    tst = g.tensor(name="stats", dim=[B, H, T, 1], stride=[H * T, T, 1, 1], data_type=cudnn.data_type.FLOAT)
    dq, dk, dv = g.sdpa_backward(name="band_bwd", q=tq, k=tk, v=tv, o=to, dO=tdo, stats=tst, attn_scale=scale,
                                 diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT,
                                 diagonal_band_left_bound=window, diagonal_band_right_bound=0)
    dq.set_output(True).set_dim(qd).set_stride(qs).set_data_type(io)
    dk.set_output(True).set_dim(kd).set_stride(ks).set_data_type(io)
    dv.set_output(True).set_dim(kd).set_stride(vs).set_data_type(io)
    return _plan(g, (tq, tk, tv, to, tdo, tst, dq, dk, dv))


def band_bwd(q, k, v, o, do, lse, window: int, out=None):
    """Gradients of the band attention given the softmax's total ``o`` / ``lse [B, H, T]`` (natural log).

    With ``o`` and ``lse`` of a softmax over the band plus other keys, cuDNN's ``P = exp(s - lse)`` and
    ``D_i = rowsum(dO o)`` give exactly the band's share of dq and the band keys' dk, dv.
    Returns ``(dq, dk, dv)`` shaped like q, k, v (contiguous; views of padded results when the length is
    not a multiple of ``PAD``: the zero rows add nothing to the real rows' gradients). ``out``: contiguous
    ``(dq, dk, dv)`` to write into (the caller's gradient buffers, which its kernels then read and rewrite in
    place); used where no padding is needed, else new tensors.
    """
    T = q.shape[1]
    T_pad = pad_len(T)
    if T_pad != T:
        dq, dk, dv = band_bwd(*(_padded(x, T_pad) for x in (q, k, v, o, do)), _padded(lse, T_pad, 2), window)
        return dq[:, :T], dk[:, :T], dv[:, :T]
    dev = q.device
    q, k, v, o = (x.contiguous() for x in (q, k, v, o))
    do = do.contiguous()
    if out is not None and all(t.is_contiguous() and t.shape == x.shape and t.dtype == x.dtype
                               for t, x in zip(out, (q, k, v))):
        dq, dk, dv = out
    else:
        dq, dk, dv = (empty(*x.shape, dtype=x.dtype, device=dev) for x in (q, k, v))
    handle, (qd, qs, kd, ks, vs, _, os_), key = _graph_key("bwd", q, k, v, o, window)
    g, (tq, tk, tv, to, tdo, tst, tdq, tdk, tdv), ws = lru_get(
        _GRAPHS, key,
        lambda: _build_bwd(handle, q.dtype, qd, qs, kd, ks, vs, os_, int(window), q.shape[-1] ** -0.5),
        _GRAPHS_MAX)
    g.execute({tq: q, tk: k, tv: v, to: o, tdo: do, tst: lse, tdq: dq, tdk: dk, tdv: dv},
              _workspace(dev, ws), handle=handle)
    return dq, dk, dv

