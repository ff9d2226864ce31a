"""Public entry point ``ahn_ops.ahn_attention`` and its dispatch.

Prefill from position 0 (training and inference) and, with an
:class:`~ahn_ops.AHNLayerCache`, chunked prefill and decode on a constant-size
cache share one call. Dispatch picks the fastest implementation available for
the inputs and falls back to the chunkwise PyTorch path (``chunked.py``) otherwise;
``backend="reference"`` forces the token-by-token fp32 reference (``reference.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from ...cache import AHNCache, AHNLayerCache
from ..common.checks import check_ahn_inputs
from . import chunked
from . import reference as ref
from . import dispatch
from .dispatch import uses_decode_op

_BACKENDS = ("auto", "reference", "kernel", "chunked")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_layer_cache(cache) -> None:
    """``cache`` must be one layer's :class:`AHNLayerCache` (a whole AHNCache is the easy mistake)."""
    if isinstance(cache, AHNLayerCache):
        return
    if isinstance(cache, AHNCache):
        raise TypeError(f"cache must be one layer's ahn_ops.AHNLayerCache, got the whole AHNCache ({len(cache)} "
                        "layers): pass cache[layer_idx]")
    raise TypeError(f"cache must be an ahn_ops.AHNLayerCache (AHNCache(...)[layer_idx]) or None, "
                    f"got {type(cache).__name__}")


def _check_cache_no_grad(**tensors) -> None:
    """The cache paths run without autograd (the cache is written in place): refuse inputs that would
    otherwise get a silently missing gradient."""
    if not torch.is_grad_enabled():
        return
    names = [n for n, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    if names:
        raise RuntimeError(
            f"ahn_attention/ahn_decode with cache= is inference-only (not differentiable), but {', '.join(names)} "
            "require grad and grad mode is on: run it under torch.no_grad() or torch.inference_mode(), or call "
            "ahn_attention without cache= (prefill from position 0, the differentiable path)")


def ahn_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: Optional[torch.Tensor],
    b: Optional[torch.Tensor],
    z: torch.Tensor,
    A_log: Optional[torch.Tensor],
    dt_bias: Optional[torch.Tensor],
    norm_weight: torch.Tensor,
    o_weight: torch.Tensor,
    *,
    window: int,
    sinks: int = 0,
    kind: str = "gdn",
    cu_seqlens: Optional[torch.Tensor] = None,
    cache=None,
    backend: str = "auto",
    deterministic: bool = False,
) -> torch.Tensor:
    """AHN attention block: sliding-window attention with sinks plus the AHN memory readout.

    For query ``t``: exact softmax attention over the sinks ``j < S`` and the window
    ``t - W < j <= t``, plus ``y = o_proj(norm(gate(S_{t-W}^T q)))`` read from the memory
    that has absorbed every token ``S <= j <= t - W`` (see docs/AHN_SPEC.md).

    Args:
        q: ``[B, T, H, D]`` queries after RoPE (float16, bfloat16 or float32).
        k: ``[B, T, HKV, D]`` keys after RoPE, ``H % HKV == 0``; same dtype as q.
        v: ``[B, T, HKV, D]`` values.
        a: ``[B, T, H]`` GDN ``a_proj(x)``, Mamba2 ``dt_proj(x)`` (with its bias); None for DN.
        b: ``[B, T, H]`` GDN/DN ``b_proj(x)``; None for Mamba2.
        z: ``[B, T, H]`` ``g_proj(x)``, the read gate.
        A_log, dt_bias: ``[H]`` (GDN, Mamba2); None for DN.
        norm_weight: ``[D]`` (GDN/DN ``o_norm.weight``) or ``[H*D]`` (Mamba2 ``norm.weight``).
        o_weight: ``[H, D, D]`` per-head output projection (``o_proj.weight``).
        window: ``W >= 1``. sinks: ``S >= 0``. kind: ``"gdn"``, ``"dn"`` or ``"mamba2"``.
        cu_seqlens: optional ``[N+1]`` int32/int64 offsets of packed sequences (then ``B == 1``);
            each sequence starts at position 0. Not combinable with ``cache``.
        cache: optional :class:`ahn_ops.AHNLayerCache` (``AHNCache(...)[layer]``): the ``T`` tokens
            continue the cached sequences, each at its own position, and the cache is updated in
            place (``T == 1`` is a decode step). Inference-only: inputs that require grad raise a
            RuntimeError while grad mode is on (use ``torch.no_grad()`` / ``torch.inference_mode()``).
        backend: ``"auto"`` (fastest available: fused kernels, else the chunkwise PyTorch path of
            ``chunked.py``), ``"chunked"`` (that path), ``"reference"`` (the token-by-token fp32
            reference) or ``"kernel"`` (fail if no fused kernel covers the call).
        deterministic: the fused kernels give bitwise identical outputs and gradients from run to run
            (the backward without float atomics whose order decides a sum, which costs time and, with
            several query heads per kv head, two fp32 ``[tokens, H, D]`` buffers; the forward on an
            H100 / H200 with its memory passes before the sm_90a kernel rather than beside it, where a
            late chunk can leave a tile one bf16 rounding apart). ``torch.use_deterministic_algorithms(True)``
            turns it on too. The PyTorch paths (``"chunked"``, ``"reference"``) follow that global switch.

    Returns:
        ``[B, T, H, D]`` in q's dtype (before Qwen's ``o_proj``).

    Example:
        >>> import torch, ahn_ops
        >>> B, T, H, HKV, D = 1, 40, 4, 2, 16
        >>> q = torch.randn(B, T, H, D); k = torch.randn(B, T, HKV, D); v = torch.randn(B, T, HKV, D)
        >>> a, b, z = torch.randn(3, B, T, H).unbind(0)
        >>> out = ahn_ops.ahn_attention(q, k, v, a, b, z, torch.zeros(H), torch.zeros(H), torch.ones(D),
        ...                             torch.randn(H, D, D) * 0.1, window=8, sinks=2, kind="gdn")
        >>> out.shape
        torch.Size([1, 40, 4, 16])
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    B, T, H, HKV, D = check_ahn_inputs(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight,
                                       window, sinks, kind, cu_seqlens)
    if cache is not None:
        _check_layer_cache(cache)
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens cannot be combined with cache (the cache holds B padded sequences)")
        _check_cache_no_grad(q=q, k=k, v=v, a=a, b=b, z=z, A_log=A_log, dt_bias=dt_bias, norm_weight=norm_weight,
                             o_weight=o_weight)
        cache.check_compatible(B, H, HKV, D, k.dtype, q.device, window, sinks, kind)
        if T == 1:
            return ahn_decode(q[:, 0], k[:, 0], v[:, 0], None if a is None else a[:, 0],
                              None if b is None else b[:, 0], z[:, 0], A_log, dt_bias, norm_weight,
                              o_weight, cache, backend=backend)[:, None]
        with torch.no_grad():
            if backend in ("auto", "kernel"):
                out = dispatch.try_prefill_cache_kernel(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight,
                                                        cache)
                if out is not None:
                    return out
                if backend == "kernel":
                    raise NotImplementedError(
                        f"no fused cache-prefill kernel for kind={kind!r}, device={q.device.type}, D={D}, "
                        f"dtype={q.dtype}")
            impl = ref.ahn_prefill_cache_ref if backend == "reference" else chunked.ahn_prefill_cache_chunked
            out = impl(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, *cache.tensors(), window, sinks,
                       kind, _compute_dtype(q))
        return out.to(q.dtype)

    if backend in ("auto", "kernel"):
        out = dispatch.try_prefill_kernel(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight,
                                          window, sinks, kind, cu_seqlens, deterministic=deterministic)
        if out is not None:
            return out
        if backend == "kernel":
            raise NotImplementedError(
                f"no fused prefill kernel for kind={kind!r}, device={q.device.type}, D={D}, dtype={q.dtype}")
    impl = ref.ahn_attention_ref if backend == "reference" else chunked.ahn_attention_chunked
    out = impl(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, window, sinks, kind, cu_seqlens,
               dtype=_compute_dtype(q))
    return out.to(q.dtype)


def ahn_decode(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, cache, *, backend: str = "auto"):
    """One decode step for a batch of sequences, each at its own position.

    Args:
        q: ``[B, H, D]``; k, v: ``[B, HKV, D]``; a, b, z: ``[B, H]`` (None as in ahn_attention);
        parameters as in :func:`ahn_attention`; cache: :class:`ahn_ops.AHNLayerCache` (``AHNCache(...)[layer]``).
        Inference-only, like ``ahn_attention(..., cache=...)``.
    Returns:
        ``[B, H, D]`` in q's dtype; the cache is updated in place (the token leaving the window
        absorbed into the state, the new token written to the ring, ``pos += 1``). Runs as the
        single op ``torch.ops.ahn.decode_step`` when the extension has a kernel for the device.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    _check_layer_cache(cache)
    window, sinks, kind = cache.window, cache.sinks, cache.kind
    B, _, H, HKV, D = check_ahn_inputs(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight,
                                       window, sinks, kind, heads_dim=3)
    _check_cache_no_grad(q=q, k=k, v=v, a=a, b=b, z=z, A_log=A_log, dt_bias=dt_bias, norm_weight=norm_weight,
                         o_weight=o_weight)
    cache.check_compatible(B, H, HKV, D, k.dtype, q.device, window, sinks, kind)
    use_op = uses_decode_op(backend, q.dtype, q.device, D)
    if backend == "kernel" and not use_op:
        raise NotImplementedError(f"no decode_step kernel for device {q.device.type} / dtype {q.dtype}")
    if use_op:
        return torch.ops.ahn.decode_step(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight,
                                         *cache.tensors(), window, sinks, kind)
    with torch.no_grad():
        out = ref.ahn_decode_ref(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight,
                                 *cache.tensors(), window, sinks, kind, _compute_dtype(q))
    return out.to(q.dtype)
