"""Output allocation for the library's kernels.

Every launcher allocates the tensors its kernels write through :func:`empty`. With
``AHN_OPS_POISON=1`` in the environment (the test conftest sets it) they are filled
with NaN (integers with -1), so an element a kernel forgets to write fails the test
instead of passing on whatever the allocator returned.
"""

from __future__ import annotations

import os

import torch

__all__ = ["empty", "poison_enabled"]


def poison_enabled() -> bool:
    return os.environ.get("AHN_OPS_POISON", "0") not in ("", "0")


def empty(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty``, NaN-filled (integers: -1) when ``AHN_OPS_POISON=1``."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    if poison_enabled():
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out
