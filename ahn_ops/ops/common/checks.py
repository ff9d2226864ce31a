"""Input validation shared by the public entry points.

Every public function checks its arguments here before any kernel runs or any
cache is written, so that bad input gives a ValueError/TypeError naming the
argument and the expected shape/dtype instead of a crash inside a kernel.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

KINDS = ("gdn", "dn", "mamba2")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_kind(kind) -> str:
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def check_window_sinks(window, sinks) -> None:
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int >= 1, got {type(window).__name__}")
    if isinstance(sinks, bool) or not isinstance(sinks, int):
        raise TypeError(f"sinks must be an int >= 0, got {type(sinks).__name__}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0, got {sinks}")


def check_tensor(
    name: str,
    x,
    shape: Sequence[Optional[int]],
    dtypes=FLOAT_DTYPES,
    device: Optional[torch.device] = None,
) -> None:
    """``shape`` entries of None match any size."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {_fmt(shape)}, got {type(x).__name__}")
    if x.dim() != len(shape) or any(s is not None and s != xs for s, xs in zip(shape, x.shape)):
        raise ValueError(f"{name} must have shape {_fmt(shape)}, got {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} must be on device {device} (like q), got {x.device}")


def _fmt(shape) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def check_ahn_inputs(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, window, sinks, kind,
                     cu_seqlens=None, heads_dim: int = 4):
    """Validate the arguments of ahn_attention / decode. Returns ``(B, T, H, HKV, D)``.

    ``heads_dim`` is 4 for ``[B, T, H, D]`` activations and 3 for decode's ``[B, H, D]``.
    """
    kind = check_kind(kind)
    check_window_sinks(window, sinks)
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != heads_dim:
        want = "[B, T, H, D]" if heads_dim == 4 else "[B, H, D]"
        raise ValueError(f"q must have shape {want}, got {tuple(q.shape)}")
    if q.dtype not in ACT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    dev = q.device
    if heads_dim == 4:
        B, T, H, D = q.shape
        lead = (B, T)
    else:
        B, H, D = q.shape
        T = 1
        lead = (B,)
    if not isinstance(k, torch.Tensor) or k.dim() != heads_dim:
        raise ValueError(f"k must have shape {_fmt(lead + (None, D))}, got "
                         f"{tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__}")
    HKV = k.shape[-2]
    if HKV < 1 or H % HKV != 0:
        raise ValueError(f"number of query heads H={H} must be a multiple of key/value heads HKV={HKV} (k.shape[-2])")
    check_tensor("k", k, lead + (HKV, D), (q.dtype,), dev)
    check_tensor("v", v, lead + (HKV, D), (q.dtype,), dev)
    if kind == "dn":
        if a is not None:
            raise ValueError("a must be None for kind='dn' (DeltaNet has no decay projection)")
    else:
        check_tensor("a", a, lead + (H,), FLOAT_DTYPES, dev)
    if kind == "mamba2":
        if b is not None:
            raise ValueError("b must be None for kind='mamba2' (Mamba2 has no beta projection)")
    else:
        check_tensor("b", b, lead + (H,), FLOAT_DTYPES, dev)
    check_tensor("z", z, lead + (H,), FLOAT_DTYPES, dev)
    if kind != "dn":
        check_tensor("A_log", A_log, (H,), FLOAT_DTYPES, dev)
        check_tensor("dt_bias", dt_bias, (H,), FLOAT_DTYPES, dev)
    check_tensor("norm_weight", norm_weight, (H * D,) if kind == "mamba2" else (D,), FLOAT_DTYPES, dev)
    check_tensor("o_weight", o_weight, (H, D, D), FLOAT_DTYPES, dev)
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must be a 1-D integer tensor [N + 1] of cumulative sequence lengths")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if heads_dim != 4 or B != 1:
            raise ValueError(f"with cu_seqlens, q must be packed as [1, total_T, H, D], got {tuple(q.shape)}")
        cs = cu_seqlens.tolist()
        if cs[0] != 0 or cs[-1] != T or any(e < s for s, e in zip(cs[:-1], cs[1:])):
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={T}, got {cs}")
    return B, T, H, HKV, D
