"""Fake (meta) implementation of the C++ op ``torch.ops.ahn.decode_step``.

The op's schema and its CPU/CUDA kernels live in ``csrc/``; this registration lets
``torch.compile`` and FakeTensor tracing see its output shape without running it (the cache
arguments are declared mutable in the schema, so the tracer knows they are written in place).
"""

from __future__ import annotations

import torch


def _decode_step_fake(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, sink_k, sink_v, ring_k, ring_v,
                      gates, state, pos, window, sinks, kind, overlap_prev=False):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# the schema comes from the extension (ahn_ops._C); without it (the benchmarks' Triton-only stub of
# ahn_ops._ext, benchmarks/common.py) there is no op to describe
if hasattr(torch.ops.ahn, "decode_step"):
    torch.library.register_fake("ahn::decode_step")(_decode_step_fake)
