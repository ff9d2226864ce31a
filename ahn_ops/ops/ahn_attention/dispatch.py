"""Which fused kernel serves a prefill call, if any.

``try_prefill_kernel`` returns the output of a fused kernel, or None when no
kernel covers the inputs (then ``ahn_attention`` runs the fp32 reference).
"""

from __future__ import annotations

import torch


def try_prefill_kernel(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, window, sinks, kind,
                       cu_seqlens):
    # The Triton prefill (prefill.py) registers itself here once it lands; until then no kernel.
    return None
