"""Peers of the fused AHN ops, written with what is installed (same inputs as ours).

- ``flex_window``: FlexAttention (compiled on CUDA, eager on the CPU) with the window + sinks
  block mask: the attention half of AHN;
- ``fla_memory``: the AHN memory readout with fla (``chunk_gated_delta_rule`` for GDN/DN,
  ``chunk_simple_gla`` for Mamba2) over the tokens that left the window, or the fp32 reference
  scan where fla cannot run (CPU);
- ``unfused_prefill``: the AHN block as the original glue computes it: FlexAttention window,
  gates in torch, fla memory, norm/gate/projection epilogue in torch ops;
- ``unfused_decode``: one AHN decode step in PyTorch ops (ring gather, memory step in torch or
  ``fused_recurrent_gated_delta_rule``, ring write, ``torch.cat`` of sinks + ring + SDPA, readout,
  epilogue).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from common import compiled_flex, sliding_window_block_mask


def flex_window(T: int, W: int, S: int, device: str) -> Callable:
    """``f(qt, kt, vt) -> [B, H, T, D]`` (inputs ``[B, H(KV), T, D]``), window + sinks, GQA."""
    bm = sliding_window_block_mask(T, W, S, device)
    fa = compiled_flex(device)

    def f(qt, kt, vt):
        return fa(qt, kt, vt, block_mask=bm, enable_gqa=True)

    return f


def fla_memory(q, k, v, g, w, W: int, S: int, kind: str, use_fla: bool = True):
    """Memory readout ``m [B, T, H, D]``: query ``t`` reads the state holding tokens ``S .. t-W``.

    The stream of memory tokens is ``S .. T-1-W``; query ``t = W + S + n`` reads the state after
    stream element ``n``, which is what a causal linear-attention kernel returns at ``n`` when it
    is given the query of ``t`` there. Queries ``t < W + S`` read an empty state (zeros).
    """
    B, T, H, D = q.shape
    G = H // k.shape[2]
    off = W + S
    n = T - off
    m = torch.zeros(B, T, H, D, device=q.device, dtype=torch.float32 if not use_fla else q.dtype)
    if n <= 0:
        return m
    kk = k[:, S:S + n].repeat_interleave(G, 2)
    vv = v[:, S:S + n].repeat_interleave(G, 2)
    qq = q[:, off:]
    gg, ww = g[:, S:S + n].float(), w[:, S:S + n].float()
    if not use_fla:
        from ahn_ops.ops.ahn_attention import reference as ref

        qn = ref.normalize_queries(qq.float(), kind)
        kn = ref.normalize_keys(kk.float(), kind)
        ra = torch.arange(1, n + 1, device=q.device)
        for bi in range(B):
            m[bi, off:] = ref.memory_scan_ref(kn[bi], vv[bi].float(), gg[bi], ww[bi], qn[bi], ra, None, kind)[0]
        return m
    if kind == "mamba2":
        from fla.ops.simple_gla import chunk_simple_gla

        qn = F.normalize(qq.float(), dim=-1).to(q.dtype)
        kn = F.normalize(kk.float(), dim=-1).to(q.dtype)
        vw = (vv.float() * ww[..., None]).to(q.dtype)
        o, _ = chunk_simple_gla(qn, kn, vw, g=gg, scale=1.0)
    else:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        o, _ = chunk_gated_delta_rule(qq, kk, vv, g=gg, beta=ww.to(q.dtype), scale=D ** -0.5,
                                      use_qk_l2norm_in_kernel=True)
    m[:, off:] = o
    return m


def unfused_prefill(attn: Callable, use_fla: bool):
    """``f(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, W, S, kind) -> [B, T, H, D]``."""
    from ahn_ops.ops.ahn_attention import reference as ref

    def f(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, W, S, kind):
        o_win = attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        g, w = ref.memory_gates_ref(a, b, A_log, dt_bias, kind, torch.float32)
        m = fla_memory(q, k, v, g, w, W, S, kind, use_fla)
        y = ref.epilogue_ref(m.float(), z, norm_weight, o_weight, kind)
        return (o_win.float() + y).to(q.dtype)

    return f


def unfused_decode(x: dict, c: dict, p: dict, t: int, W: int, S: int, kind: str, use_fla: bool = False):
    """One AHN decode step in PyTorch ops for sequences at host-known position ``t >= S + W``.

    x: q [B, H, D], k/v [B, HKV, D], a/b/z [B, H] (None as in ahn_attention); c: the layer cache
    (sink_k/v, ring_k/v, gates, state, pos); p: A_log, dt_bias, norm_weight, o_weight.
    """
    from ahn_ops.ops.ahn_attention import reference as ref

    B, H, D = x["q"].shape
    G = H // x["k"].shape[1]
    slot = (t - S) % W
    # 1. the token leaving the window is absorbed into the state (its gates from the gate ring)
    kk = c["ring_k"][:, slot].repeat_interleave(G, 1)
    vv = c["ring_v"][:, slot].repeat_interleave(G, 1)
    g, w = ref.ring_gates(c["gates"][:, slot], p["A_log"], p["dt_bias"], kind)   # [B, H] from the raw a, b
    if use_fla and kind != "mamba2":
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

        m, st = fused_recurrent_gated_delta_rule(x["q"][:, None], kk[:, None], vv[:, None], g=g[:, None],
                                                 beta=w[:, None], scale=D ** -0.5, initial_state=c["state"],
                                                 output_final_state=True, use_qk_l2norm_in_kernel=True)
        c["state"].copy_(st)
        m = m[:, 0].float()
    else:
        kn = ref.normalize_keys(kk.float(), kind)
        st = c["state"] * torch.exp(g)[..., None, None]
        upd = vv.float() if kind == "mamba2" else vv.float() - torch.einsum("bhkv,bhk->bhv", st, kn)
        st = st + (w[..., None] * kn)[..., None] * upd[..., None, :]
        c["state"].copy_(st)
        m = torch.einsum("bhkv,bhk->bhv", st, ref.normalize_queries(x["q"].float(), kind))
    # 2. the new token into the ring, its gate inputs into the gate ring
    c["ring_k"][:, slot] = x["k"]
    c["ring_v"][:, slot] = x["v"]
    c["gates"][:, slot] = ref.gate_inputs(x["a"], x["b"], kind, c["gates"].dtype)
    # 3. window attention: torch.cat of sinks + ring, SDPA
    kv_k = torch.cat([c["sink_k"], c["ring_k"]], 1).transpose(1, 2)          # [B, HKV, S+W, D]
    kv_v = torch.cat([c["sink_v"], c["ring_v"]], 1).transpose(1, 2)
    o_win = F.scaled_dot_product_attention(x["q"][:, :, None], kv_k, kv_v, enable_gqa=True)[:, :, 0]
    # 4. norm, gate, per-head projection
    y = ref.epilogue_ref(m, x["z"], p["norm_weight"], p["o_weight"], kind)
    c["pos"].add_(1)
    return (o_win.float() + y).to(x["q"].dtype)


def flash_window(W: int, S: int) -> Optional[Callable]:
    """flash-attn sliding window (``window_size=(W-1, 0)``): no sinks, a lower bound of the window
    attention's cost; None when flash-attn is absent."""
    try:
        from flash_attn import flash_attn_func
    except Exception:  # noqa: BLE001
        return None

    def f(q, k, v):  # [B, T, H(KV), D]
        return flash_attn_func(q, k, v, causal=True, window_size=(W - 1, 0))

    return f
