"""Which fused kernel serves a call, if any.

``try_prefill_kernel`` returns the output of a fused kernel, or None when no
kernel covers the inputs (then ``ahn_attention`` runs the chunkwise path of ``chunked.py``).
``try_prefill_cache_kernel`` does the same for a prefill of T > 1 tokens on a cache.
``uses_decode_op`` says whether a decode step runs ``torch.ops.ahn.decode_step`` (``ahn_decode`` and the
static decode step of ``ahn_ops.generate`` both ask it).

The Triton prefill (``prefill.py``, ``torch.ops.ahn.prefill_fwd``) covers kinds "gdn", "dn"
and "mamba2", bf16/fp16 activations, D in (64, 128), forward and backward (``autograd.py``
registers ``torch.ops.ahn.prefill_bwd`` as its gradient): CUDA tensors, or CPU tensors when
``TRITON_INTERPRET=1`` (the CI path). fp32/fp64 inputs and other D go to ``chunked.py``.
The cache path is inference only (``ahn_attention`` runs it under ``torch.no_grad``).

Mamba2 takes the same kernels: its forward and gradients pass the same fp32-reference checks on the GPU.
"""

from __future__ import annotations

import os

import torch

_KINDS = ("gdn", "dn", "mamba2")
_DTYPES = (torch.bfloat16, torch.float16)
_D = (64, 128)


def _triton_device_ok(q: torch.Tensor) -> bool:
    if q.is_cuda:
        return True
    return q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _covered(q, kind, tensors, differentiable: bool) -> bool:
    if kind not in _KINDS or q.dtype not in _DTYPES or q.shape[-1] not in _D:
        return False
    if not _triton_device_ok(q):
        return False
    if not differentiable and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False  # the cache op has no autograd: keep gradients on the reference
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _has_op_kernel(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"ahn::{op}", key)
    except RuntimeError:
        return False


def uses_decode_op(backend: str, dtype: torch.dtype, device: torch.device, head_dim: int) -> bool:
    """Whether a decode step of activations in ``dtype`` on ``device`` runs the fused op
    ``torch.ops.ahn.decode_step`` (else the fp32 reference, ``reference.ahn_decode_ref``): not with
    ``backend="reference"`` or float64, only where the extension has a kernel for the device, and on CUDA
    only for ``head_dim`` 64 or 128 (the kernel's template instances)."""
    if backend == "reference" or dtype == torch.float64:
        return False
    if not _has_op_kernel("decode_step", "CUDA" if device.type == "cuda" else "CPU"):
        return False
    return device.type != "cuda" or head_dim in (64, 128)


def try_prefill_kernel(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, window, sinks, kind,
                       cu_seqlens, deterministic: bool = False):
    if not _covered(q, kind, (q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight), differentiable=True):
        return None
    from . import prefill  # noqa: F401  (registers torch.ops.ahn.prefill_fwd)

    out = torch.ops.ahn.prefill_fwd(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, window, sinks,
                                    kind, cu_seqlens, None, False, bool(deterministic))[0]  # (out, final_state, lse)
    return out


def try_prefill_cache_kernel(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, cache):
    """Prefill of T > 1 tokens on a cache (updates it in place), or None when not covered."""
    if not _covered(q, cache.kind, (q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight),
                    differentiable=False):
        return None
    from . import prefill  # noqa: F401  (registers torch.ops.ahn.prefill_cache)

    return torch.ops.ahn.prefill_cache(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, *cache.tensors(),
                                       cache.window, cache.sinks, cache.kind)
