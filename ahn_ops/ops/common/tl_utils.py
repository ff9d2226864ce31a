"""Small Triton building blocks shared by the kernels."""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton's CPU interpreter (3.8) multiplies bf16 operands of tl.dot as their int16 bit
# patterns; under TRITON_INTERPRET=1 we upcast dot operands to fp32 (products of bf16/fp16
# values are exact in fp32, so this is the same math the GPU does with fp32 accumulation).
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def dot(a, b):
    """``tl.dot(a, b)`` with fp32 accumulation; interpreter-safe for bf16 operands."""
    if INTERPRET:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def dot_f32(a, b):
    """fp32 x fp32 product at near-fp32 accuracy on tensor cores (3 tf32 passes).

    Used for the triangular-inverse merges, where plain tf32 (10-bit mantissa) would
    perturb the WY factors at the 1e-3 level.
    """
    if INTERPRET:
        c = tl.dot(a, b)
    else:
        c = tl.dot(a, b, input_precision="tf32x3")
    return c
