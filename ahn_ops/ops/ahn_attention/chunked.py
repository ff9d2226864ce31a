"""Chunkwise PyTorch implementation of the AHN memory: the fallback where no kernel runs.

The reference (``reference.py``) absorbs memory tokens one at a time, a Python loop of ``T``
steps: clear, but ~5 ms per token per layer on a CPU. This module computes the same math
chunkwise (64 tokens at a time, the WY/UT form of the delta rule, see README.md beside this
file) with batched PyTorch ops and autograd, so fp32 inputs, CPUs and shapes the Triton
kernels do not cover still run at a usable speed (T=2048, H=4, D=64 on 2 CPU cores: 5.1 s with
the reference, about 0.1 s here).

Alignment trick (the same as the Triton kernels): the memory is run as a *stream* with one
element per query. Element ``i`` (the query at position ``t = P + i``) absorbs token ``t - W``
when ``t - W >= S`` and nothing otherwise (g = w = 0, k = 0), so the state after element ``i``
is exactly the state query ``t`` reads, and the readout is the ordinary chunked output.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import reference as ref

CHUNK = 64


def memory_stream_chunked(
    qn: torch.Tensor,
    kn: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    w: torch.Tensor,
    state0: Optional[torch.Tensor],
    kind: str,
    chunk: int = CHUNK,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Readout ``o_i = S_i^T qn_i`` of a (gated) delta-rule or Mamba2 stream, chunkwise.

    Args:
        qn, kn: ``[B, N, H, Dk]`` normalised queries/keys (kn = 0 where nothing is absorbed).
        v: ``[B, N, H, Dv]``; g, w: ``[B, N, H]`` log-decay and write strength.
        state0: ``[B, H, Dk, Dv]`` or None.
        kind: ``"gdn"``/``"dn"`` (delta correction) or ``"mamba2"`` (additive).
    Returns:
        ``(o [B, N, H, Dv], final_state [B, H, Dk, Dv])`` in the dtype of ``qn``.
    """
    B, N, H, Dk = kn.shape
    Dv = v.shape[-1]
    dtype = qn.dtype
    C = chunk
    pad = (-N) % C
    if pad:  # padded elements absorb nothing and are dropped from the output
        def p(x):
            return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        qn, kn, v, g, w = p(qn), p(kn), p(v), p(g), p(w)
    NC = (N + pad) // C
    # [B, H, NC, C, *]
    qc = qn.reshape(B, NC, C, H, Dk).permute(0, 3, 1, 2, 4)
    kc = kn.reshape(B, NC, C, H, Dk).permute(0, 3, 1, 2, 4)
    vc = v.reshape(B, NC, C, H, Dv).permute(0, 3, 1, 2, 4)
    gc = g.reshape(B, NC, C, H).permute(0, 3, 1, 2).cumsum(-1)  # in-chunk cumulative log-decay
    wc = w.reshape(B, NC, C, H).permute(0, 3, 1, 2)
    idx = torch.arange(C, device=qn.device)
    lower = idx[:, None] > idx[None, :]
    causal = idx[:, None] >= idx[None, :]
    # decay between rows of a chunk, exp(gc_i - gc_j) for j <= i (masked before exp: no overflow)
    diff = gc[..., :, None] - gc[..., None, :]
    gamma = torch.exp(diff.masked_fill(~causal, float("-inf")))
    if kind == "mamba2":
        u = vc * wc[..., None]  # additive update: the new values are dt * v
        wk = None
    else:
        # (I + L) with L = tril(diag(w) (K K^T) o Gamma, -1); rows of T = (I + L)^-1
        L = (wc[..., None] * (kc @ kc.transpose(-1, -2)) * gamma).masked_fill(~lower, 0)
        eye = torch.eye(C, dtype=dtype, device=qn.device)
        Tinv = torch.linalg.solve_triangular(eye + L, eye.expand_as(L), upper=False, unitriangular=True)
        u = Tinv @ (vc * wc[..., None])  # [B, H, NC, C, Dv]
        wk = Tinv @ (kc * (wc * torch.exp(gc))[..., None])  # [B, H, NC, C, Dk]
    attn = (qc @ kc.transpose(-1, -2)) * gamma  # [B, H, NC, C, C], causal incl. diagonal
    qdec = qc * torch.exp(gc)[..., None]
    kdec = kc * torch.exp(gc[..., -1:] - gc)[..., None]
    S = torch.zeros(B, H, Dk, Dv, dtype=dtype, device=qn.device) if state0 is None else state0.to(dtype)
    outs = []
    for c in range(NC):
        vnew = u[:, :, c] if wk is None else u[:, :, c] - wk[:, :, c] @ S
        outs.append(qdec[:, :, c] @ S + attn[:, :, c] @ vnew)
        S = S * torch.exp(gc[:, :, c, -1])[..., None, None] + kdec[:, :, c].transpose(-1, -2) @ vnew
    if not outs:  # N = 0
        return qn.new_zeros(B, 0, H, Dv), S
    o = torch.stack(outs, 2).permute(0, 2, 3, 1, 4).reshape(B, NC * C, H, Dv)
    return o[:, :N], S


def _stream(k, v, g, w, src, active, kind, G, dtype):
    """Per-element stream arrays: element ``i`` absorbs token ``src[i]`` of ``k, v, g, w`` if ``active[i]``.

    ``k, v`` ``[B, n, HKV, D]``, ``g, w`` ``[B, n, H]``; inactive elements get k = 0, g = w = 0.
    """
    src = torch.where(active, src, torch.zeros_like(src))
    kk = ref.normalize_keys(k[:, src].to(dtype), kind) * active[None, :, None, None]
    vv = v[:, src].to(dtype)
    gg = g[:, src] * active[None, :, None]
    ww = w[:, src] * active[None, :, None]
    return kk.repeat_interleave(G, 2), vv.repeat_interleave(G, 2), gg, ww


def ahn_attention_chunked(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, window, sinks, kind,
                          cu_seqlens=None, dtype=torch.float32):
    """Same result as :func:`reference.ahn_attention_ref` (prefill from position 0), chunkwise."""
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        return torch.cat([
            ahn_attention_chunked(q[:, s:e], k[:, s:e], v[:, s:e], None if a is None else a[:, s:e],
                                  None if b is None else b[:, s:e], z[:, s:e], A_log, dt_bias, norm_weight,
                                  o_weight, window, sinks, kind, None, dtype)
            for s, e in zip(bounds[:-1], bounds[1:])], 1)
    T, H, HKV = q.shape[1], q.shape[2], k.shape[2]
    o_win = ref.window_attention_ref(q, k, v, window, sinks, dtype=dtype)
    g, w = ref.memory_gates_ref(a, b, A_log, dt_bias, kind, dtype)
    src = torch.arange(T, device=q.device) - window
    kk, vv, gg, ww = _stream(k, v, g, w, src, src >= sinks, kind, H // HKV, dtype)
    m, _ = memory_stream_chunked(ref.normalize_queries(q.to(dtype), kind), kk, vv, gg, ww, None, kind)
    return o_win + ref.epilogue_ref(m, z, norm_weight, o_weight, kind)


def ahn_prefill_cache_chunked(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight,
                              sink_k, sink_v, ring_k, ring_v, gates, state, pos, window, sinks, kind,
                              dtype=torch.float32):
    """Same result and cache update as :func:`reference.ahn_prefill_cache_ref`, chunkwise."""
    B, T, H, _ = q.shape
    G = H // k.shape[2]
    W, S = window, sinks
    dev = q.device
    gi_new = ref.gate_inputs(a, b, kind, gates.dtype)  # [B, T, 2, H], as the ring stores them
    g_new, w_new = ref.ring_gates(gi_new, A_log, dt_bias, kind, dtype)
    outs, states = [], []
    for bi in range(B):
        P = int(pos[bi])
        lo = max(S, P - W)
        sp = torch.arange(min(S, P), device=dev)
        rp = torch.arange(lo, max(lo, P), device=dev)  # cached ring tokens, in position order
        rslot = (rp - S) % W
        np_ = P + torch.arange(T, device=dev)
        # every position the window or the stream may touch: sinks, ring, new tokens
        k_pos = torch.cat([sp, rp, np_])
        k_all = torch.cat([sink_k[bi, :len(sp)], ring_k[bi, rslot], k[bi]], 0)[None]
        v_all = torch.cat([sink_v[bi, :len(sp)], ring_v[bi, rslot], v[bi]], 0)[None]
        o_win = ref.window_attention_ref(q[bi:bi + 1], k_all, v_all, W, S, q_pos=np_, k_pos=k_pos, dtype=dtype)
        # stream sources by position: dense arrays over [base, P + T) with the ring and new tokens
        base = min(lo, P)
        n_src = P + T - base
        kd = k.new_zeros(1, n_src, k.shape[2], k.shape[3])
        vd = v.new_zeros(1, n_src, v.shape[2], v.shape[3])
        gd = torch.zeros(1, n_src, H, dtype=dtype, device=dev)
        wd = torch.zeros(1, n_src, H, dtype=dtype, device=dev)
        kd[0, rp - base], vd[0, rp - base] = ring_k[bi, rslot], ring_v[bi, rslot]
        gd[0, rp - base], wd[0, rp - base] = ref.ring_gates(gates[bi, rslot], A_log, dt_bias, kind, dtype)
        kd[0, np_ - base], vd[0, np_ - base] = k[bi], v[bi]
        gd[0, np_ - base], wd[0, np_ - base] = g_new[bi], w_new[bi]
        src = np_ - W  # the token each query's stream element absorbs (>= base whenever >= S)
        kk, vv, gg, ww = _stream(kd, vd, gd, wd, src - base, src >= S, kind, G, dtype)
        m, S_fin = memory_stream_chunked(ref.normalize_queries(q[bi:bi + 1].to(dtype), kind), kk, vv, gg, ww,
                                         state[bi:bi + 1], kind)
        outs.append(o_win[0] + ref.epilogue_ref(m[0], z[bi], norm_weight, o_weight, kind))
        states.append(S_fin[0])
        with torch.no_grad():
            ref.write_cache_tokens(bi, P, k[bi], v[bi], gi_new[bi], sink_k, sink_v, ring_k, ring_v, gates, W, S)
    with torch.no_grad():
        state.copy_(torch.stack(states).to(state.dtype))
        pos.add_(T)
    return torch.stack(outs)
