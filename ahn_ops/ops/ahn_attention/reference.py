"""Plain PyTorch reference of every formula in docs/AHN_SPEC.md.

Everything here is written for clarity, not speed: fp32 (or fp64) arithmetic on
upcast inputs, a sequential token-by-token memory recurrence, and window
attention evaluated block by block with an explicit position mask. Kernels are
tested against these functions; the public API falls back to them where no
kernel exists (CPU tensors, kinds or shapes a kernel does not cover).

Conventions (see docs/AHN_SPEC.md):
  activations [B, T, H, D], K/V [B, T, HKV, D], head h reads K/V head h // G;
  memory state [B, H, D_k, D_v] in fp32;
  per-token gates: ``g`` the log-decay (<= 0) and ``w`` the write strength
  (GDN/DN: beta = sigmoid(b); Mamba2: dt = softplus(a + dt_bias)).

All functions are differentiable with autograd (no in-place updates of
tensors that require grad), so they also serve as the gradient reference.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

KINDS = ("gdn", "dn", "mamba2")

__all__ = [
    "KINDS",
    "l2norm",
    "unit_norm",
    "normalize_keys",
    "normalize_queries",
    "memory_gates_ref",
    "gate_inputs",
    "ring_gates",
    "window_attention_ref",
    "memory_scan_ref",
    "memory_readout_ref",
    "epilogue_ref",
    "ahn_attention_ref",
    "ahn_prefill_cache_ref",
    "ahn_decode_ref",
    "write_cache_tokens",
]


# --------------------------------------------------------------------------------------
# elementwise pieces
# --------------------------------------------------------------------------------------
def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GDN/DN normalisation: ``x / sqrt(sum x^2 + eps)`` over the last dim."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def unit_norm(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mamba2 normalisation: ``x / max(||x||, eps)`` over the last dim (F.normalize)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def normalize_keys(k: torch.Tensor, kind: str) -> torch.Tensor:
    return unit_norm(k) if kind == "mamba2" else l2norm(k)


def normalize_queries(q: torch.Tensor, kind: str) -> torch.Tensor:
    """Query as the memory reads it: GDN/DN ``l2norm(q) * D^-0.5``; Mamba2 ``q / ||q||``."""
    if kind == "mamba2":
        return unit_norm(q)
    return l2norm(q) * (q.shape[-1] ** -0.5)


def memory_gates_ref(
    a: Optional[torch.Tensor],
    b: Optional[torch.Tensor],
    A_log: Optional[torch.Tensor],
    dt_bias: Optional[torch.Tensor],
    kind: str,
    dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Write gates of each token from its raw projections.

    Args:
        a: ``[..., H]`` GDN ``a_proj(x)`` / Mamba2 ``dt_proj(x)`` (with its bias); None for DN.
        b: ``[..., H]`` GDN/DN ``b_proj(x)``; None for Mamba2.
        A_log, dt_bias: ``[H]`` (GDN, Mamba2); ignored for DN.
    Returns:
        ``(g, w)`` of shape ``[..., H]`` in ``dtype``: log-decay ``g <= 0`` and write strength ``w``.
    """
    if kind == "gdn":
        g = -torch.exp(A_log.to(dtype)) * F.softplus(a.to(dtype) + dt_bias.to(dtype))
        w = torch.sigmoid(b.to(dtype))
    elif kind == "dn":
        w = torch.sigmoid(b.to(dtype))
        g = torch.zeros_like(w)
    elif kind == "mamba2":
        w = F.softplus(a.to(dtype) + dt_bias.to(dtype))
        g = -torch.exp(A_log.to(dtype)) * w
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return g, w


def gate_inputs(a: Optional[torch.Tensor], b: Optional[torch.Tensor], kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The cache's form of the raw gate projections ``a, b [..., H]``: ``[..., 2, H]`` in ``dtype``, row 0
    ``a`` (0 for DN), row 1 ``b`` (0 for Mamba2). The cache keeps these, not the gates: half the bytes of
    fp32 gates in a 16-bit model, and the gates made from them (:func:`ring_gates`) are those of
    :func:`memory_gates_ref` on the same (stored) inputs."""
    ref = b if a is None else a
    zero = torch.zeros(ref.shape, dtype=dtype, device=ref.device)
    ra = zero if kind == "dn" else a.to(dtype)
    rb = zero if kind == "mamba2" else b.to(dtype)
    return torch.stack([ra, rb], -2)


def ring_gates(gi: torch.Tensor, A_log, dt_bias, kind: str, dtype: torch.dtype = torch.float32):
    """``(g, w) [..., H]`` in ``dtype`` of stored gate inputs ``gi [..., 2, H]`` (:func:`gate_inputs`)."""
    return memory_gates_ref(None if kind == "dn" else gi[..., 0, :], None if kind == "mamba2" else gi[..., 1, :],
                            A_log, dt_bias, kind, dtype)


# --------------------------------------------------------------------------------------
# window attention with sinks
# --------------------------------------------------------------------------------------
def window_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    sinks: int,
    q_pos: Optional[torch.Tensor] = None,
    k_pos: Optional[torch.Tensor] = None,
    block: int = 512,
    dtype: torch.dtype = torch.float32,
    return_lse: bool = False,
):
    """Softmax attention of each query over its window and the sinks.

    Query at position ``t`` sees key at position ``j`` iff ``j <= t`` and
    (``t - j < window`` or ``j < sinks``). Scale ``D^-0.5``; fp32 softmax.

    Args:
        q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, HKV, D]`` (K/V never repeated to H heads).
        q_pos: ``[Tq]`` positions of the queries (default ``arange(Tq)``).
        k_pos: ``[Tk]`` positions of the keys (default ``arange(Tk)``); a key may be
            masked for every query (padding) by giving it a position ``> max(q_pos)``.
        block: queries per block (bounds the score matrix to ``block x Tk``).
        return_lse: also return the softmax's natural-log log-sum-exp of the scaled scores.
    Returns:
        ``[B, Tq, H, D]`` in ``dtype``; every query must see at least one key. With ``return_lse``,
        ``(out, lse [B, H, Tq] in dtype)``.
    """
    B, Tq, H, D = q.shape
    Tk, HKV = k.shape[1], k.shape[2]
    G = H // HKV
    dev = q.device
    if q_pos is None:
        q_pos = torch.arange(Tq, device=dev)
    if k_pos is None:
        k_pos = torch.arange(Tk, device=dev)
    scale = D ** -0.5
    kf, vf = k.to(dtype), v.to(dtype)
    outs, lses = [], []
    for t0 in range(0, Tq, block):
        qb = q[:, t0:t0 + block].to(dtype)  # [B, bt, H, D]
        qp = q_pos[t0:t0 + block]
        # only keys that some query of the block can see: sinks and [min(qp) - W + 1, max(qp)]
        need = (k_pos <= qp.max()) & ((k_pos < sinks) | (k_pos > qp.min() - window))
        idx = need.nonzero().squeeze(1)
        kb, vb, kp = kf[:, idx], vf[:, idx], k_pos[idx]  # [B, nk, HKV, D]
        bt = qb.shape[1]
        qg = qb.view(B, bt, HKV, G, D)
        s = torch.einsum("btkgd,bjkd->bkgtj", qg, kb) * scale  # [B, HKV, G, bt, nk]
        diff = qp[:, None] - kp[None, :]
        allowed = (diff >= 0) & ((diff < window) | (kp[None, :] < sinks))
        s = s.masked_fill(~allowed, float("-inf"))
        if return_lse:
            lses.append(torch.logsumexp(s, dim=-1).reshape(B, H, bt))
        p = torch.softmax(s, dim=-1)
        o = torch.einsum("bkgtj,bjkd->btkgd", p, vb)
        outs.append(o.reshape(B, bt, H, D))
    out = torch.cat(outs, dim=1) if outs else q.new_zeros(B, 0, H, D, dtype=dtype)  # Tq = 0
    if not return_lse:
        return out
    return out, torch.cat(lses, dim=2) if lses else q.new_zeros(B, H, 0, dtype=dtype)


# --------------------------------------------------------------------------------------
# the memory: a token-by-token recurrence
# --------------------------------------------------------------------------------------
def memory_scan_ref(
    kn: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    w: torch.Tensor,
    qn: torch.Tensor,
    read_after: torch.Tensor,
    state0: Optional[torch.Tensor],
    kind: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Absorb memory tokens one by one; read the state for queries in between.

    One sequence, heads already expanded. Per head, for token ``n``:
    ``S = exp(g_n) S``; GDN/DN: ``S += w_n kn_n (v_n - S^T kn_n)^T``; Mamba2:
    ``S += w_n kn_n v_n^T``. A query reads ``m = S^T qn`` from the state holding
    the first ``read_after`` memory tokens.

    Args:
        kn: ``[N, H, Dk]`` normalised keys; v: ``[N, H, Dv]``; g, w: ``[N, H]``.
        qn: ``[Tq, H, Dk]`` normalised (and scaled) queries.
        read_after: ``[Tq]`` int, in ``[0, N]``.
        state0: ``[H, Dk, Dv]`` or None (zeros).
    Returns:
        ``(m [Tq, H, Dv], final_state [H, Dk, Dv])``.
    """
    N, H, Dk = kn.shape
    Dv = v.shape[-1]
    Tq = qn.shape[0]
    dtype = kn.dtype
    S = torch.zeros(H, Dk, Dv, dtype=dtype, device=kn.device) if state0 is None else state0.to(dtype).clone()
    order = torch.argsort(read_after, stable=True)
    ra_sorted = read_after[order].tolist()
    pieces = []
    i = 0

    def read(upto: int, S: torch.Tensor) -> None:
        nonlocal i
        j = i
        while j < Tq and ra_sorted[j] == upto:
            j += 1
        if j > i:
            qs = qn[order[i:j]]  # [n, H, Dk]
            pieces.append(torch.einsum("hkv,nhk->nhv", S, qs))
            i = j

    read(0, S)
    for n in range(N):
        S = S * torch.exp(g[n])[:, None, None]
        k_n = kn[n]  # [H, Dk]
        if kind == "mamba2":
            upd = v[n]
        else:
            upd = v[n] - torch.einsum("hkv,hk->hv", S, k_n)
        S = S + (w[n][:, None, None] * k_n[:, :, None]) * upd[:, None, :]
        read(n + 1, S)
    assert i == Tq, "read_after out of range"
    if Tq:
        m_sorted = torch.cat(pieces, 0)
        m = m_sorted[torch.argsort(order)]
    else:
        m = qn.new_zeros(0, H, Dv)
    return m, S


def memory_readout_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    w: torch.Tensor,
    window: int,
    sinks: int,
    kind: str,
    initial_state: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Memory readout of a prefill from position 0 (one call = whole sequences).

    Query ``t`` reads the state after token ``t - W`` holding ``{S <= j <= t - W}``.

    Args:
        q: ``[B, T, H, D]``; k, v: ``[B, T, HKV, D]``; g, w: ``[B, T, H]``.
        initial_state: ``[B, H, D, D]`` added before token ``S`` (default zeros).
    Returns:
        ``(m [B, T, H, D], final_state [B, H, D, D])`` in ``dtype``; final state holds
        tokens ``S .. T-1-W``.
    """
    B, T, H, D = q.shape
    G = H // k.shape[2]
    qn = normalize_queries(q.to(dtype), kind)
    kn = normalize_keys(k.to(dtype), kind).repeat_interleave(G, dim=2)
    ve = v.to(dtype).repeat_interleave(G, dim=2)
    lo, hi = sinks, T - window  # memory tokens: positions lo .. hi - 1 ... i.e. j <= T-1-W
    t = torch.arange(T, device=q.device)
    read_after = (t - window - sinks + 1).clamp(0, max(hi - lo, 0))
    ms, states = [], []
    for bi in range(B):
        sl = slice(lo, max(hi, lo))
        m, S = memory_scan_ref(
            kn[bi, sl], ve[bi, sl], g[bi, sl].to(dtype), w[bi, sl].to(dtype), qn[bi], read_after,
            None if initial_state is None else initial_state[bi], kind,
        )
        ms.append(m)
        states.append(S)
    if B == 0:
        return q.new_zeros(0, T, H, D, dtype=dtype), q.new_zeros(0, H, D, D, dtype=dtype)
    return torch.stack(ms), torch.stack(states)


def epilogue_ref(
    m: torch.Tensor,
    z: torch.Tensor,
    norm_weight: torch.Tensor,
    o_weight: torch.Tensor,
    kind: str,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Norm, gate and per-head projection of the memory readout.

    GDN/DN: ``u = rmsnorm_D(m) * norm_weight * silu(z)``; Mamba2:
    ``u = rmsnorm_{H*D}(m * silu(z)) * norm_weight``; then ``y[h] = u[h] @ o_weight[h]``.

    Args:
        m: ``[..., H, D]``; z: ``[..., H]`` (one gate per head);
        norm_weight: ``[D]`` (GDN/DN) or ``[H*D]`` (Mamba2); o_weight: ``[H, D, D]``.
    """
    dtype = m.dtype
    H, D = m.shape[-2], m.shape[-1]
    zz = z.to(dtype)
    gate = (zz * torch.sigmoid(zz))[..., None]
    if kind == "mamba2":
        x = m * gate
        flat = x.reshape(*x.shape[:-2], H * D)
        u = flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.to(dtype)
        u = u.view_as(x)
    else:
        u = m * torch.rsqrt(m.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.to(dtype) * gate
    return torch.einsum("...hd,hde->...he", u, o_weight.to(dtype))


# --------------------------------------------------------------------------------------
# the whole block
# --------------------------------------------------------------------------------------
def ahn_attention_ref(
    q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight,
    window: int,
    sinks: int = 0,
    kind: str = "gdn",
    cu_seqlens: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
    return_parts: bool = False,
):
    """Prefill from position 0: ``o_win + y`` for every token, in ``dtype``.

    Same arguments as :func:`ahn_ops.ahn_attention`. With ``cu_seqlens`` (int, ``[N+1]``),
    ``B`` must be 1 and each packed sequence starts at position 0.
    With ``return_parts`` returns ``(out, o_win, y, final_state)``.
    """
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        parts = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            sl = slice(s, e)
            parts.append(ahn_attention_ref(
                q[:, sl], k[:, sl], v[:, sl],
                None if a is None else a[:, sl], None if b is None else b[:, sl], z[:, sl],
                A_log, dt_bias, norm_weight, o_weight, window, sinks, kind, None, dtype, True))
        out = torch.cat([p[0] for p in parts], 1)
        if return_parts:
            return (out, torch.cat([p[1] for p in parts], 1), torch.cat([p[2] for p in parts], 1),
                    torch.cat([p[3] for p in parts], 0))
        return out
    o_win = window_attention_ref(q, k, v, window, sinks, dtype=dtype)
    g, w = memory_gates_ref(a, b, A_log, dt_bias, kind, dtype)
    m, state = memory_readout_ref(q, k, v, g, w, window, sinks, kind, dtype=dtype)
    y = epilogue_ref(m, z, norm_weight, o_weight, kind)
    out = o_win + y
    if return_parts:
        return out, o_win, y, state
    return out


def ahn_prefill_cache_ref(
    q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight,
    sink_k, sink_v, ring_k, ring_v, gates, state, pos,
    window: int,
    sinks: int,
    kind: str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Prefill ``T`` new tokens per sequence on top of a cache, updating it in place.

    Cache layout (one layer): ``sink_k/v [B, S, HKV, D]`` hold positions ``< S``;
    ``ring_k/v [B, W, HKV, D]`` hold position ``p >= S`` at slot ``(p - S) % W``;
    ``gates [B, W, 2, H]`` (the cache dtype) hold the raw gate inputs ``(a, b)`` of the token in the same
    slot (:func:`gate_inputs`), from which its gates are made when it joins the memory;
    ``state [B, H, D, D]`` fp32 holds memory tokens ``S .. pos-1-W``;
    ``pos [B]`` int64 is the number of tokens each sequence has processed.
    Sequences may be at different positions. Returns ``[B, T, H, D]`` in ``dtype``.
    """
    B, T, H, D = q.shape
    HKV = k.shape[2]
    G = H // HKV
    W, S = window, sinks
    dev = q.device
    # the new tokens' gates from their inputs as the cache stores them: a token gets the same gates
    # whether it joins the memory in this call or from the ring later
    gi_new = gate_inputs(a, b, kind, gates.dtype)  # [B, T, 2, H]
    g_new, w_new = ring_gates(gi_new, A_log, dt_bias, kind, dtype)  # [B, T, H]
    outs = []
    new_states = []
    for bi in range(B):
        P = int(pos[bi])
        # what the cache holds: sinks [0, min(S, P)) and ring [max(S, P - W), P)
        sp = torch.arange(min(S, P), device=dev)
        lo = max(S, P - W)
        rp = torch.arange(lo, max(lo, P), device=dev)
        rslot = (rp - S) % W
        np_ = P + torch.arange(T, device=dev)
        k_all = torch.cat([sink_k[bi, : len(sp)], ring_k[bi, rslot], k[bi]], 0)[None]
        v_all = torch.cat([sink_v[bi, : len(sp)], ring_v[bi, rslot], v[bi]], 0)[None]
        k_pos = torch.cat([sp, rp, np_])
        o_win = window_attention_ref(q[bi:bi + 1], k_all, v_all, W, S, q_pos=np_, k_pos=k_pos, dtype=dtype)[0]
        # memory stream: cached ring tokens then new tokens, positions S .. P+T-1-W
        last = P + T - 1 - W
        r_mem = rp <= last
        n_mem = (np_ >= S) & (np_ <= last)
        mem_pos = torch.cat([rp[r_mem], np_[n_mem]])
        kk = torch.cat([ring_k[bi, rslot[r_mem]], k[bi, n_mem]], 0).to(dtype)
        vv = torch.cat([ring_v[bi, rslot[r_mem]], v[bi, n_mem]], 0).to(dtype)
        g_r, w_r = ring_gates(gates[bi, rslot[r_mem]], A_log, dt_bias, kind, dtype)
        gg = torch.cat([g_r, g_new[bi, n_mem]], 0)
        ww = torch.cat([w_r, w_new[bi, n_mem]], 0)
        kn = normalize_keys(kk, kind).repeat_interleave(G, dim=1)
        ve = vv.repeat_interleave(G, dim=1)
        qn = normalize_queries(q[bi].to(dtype), kind)
        read_after = torch.searchsorted(mem_pos, np_ - W, right=True)
        m, S_fin = memory_scan_ref(kn, ve, gg, ww, qn, read_after, state[bi], kind)
        y = epilogue_ref(m, z[bi], norm_weight, o_weight, kind)
        outs.append(o_win + y)
        new_states.append(S_fin)
        # cache update, after every read of this sequence
        with torch.no_grad():
            write_cache_tokens(bi, P, k[bi], v[bi], gi_new[bi], sink_k, sink_v, ring_k, ring_v, gates, W, S)
    with torch.no_grad():
        state.copy_(torch.stack(new_states).to(state.dtype))
        pos.add_(T)
    return torch.stack(outs)


def write_cache_tokens(bi, P, k, v, gi, sink_k, sink_v, ring_k, ring_v, gates, window, sinks) -> None:
    """Write the ``T`` new tokens of sequence ``bi`` (at positions ``P ..``) into its cache.

    ``k, v`` ``[T, HKV, D]``, ``gi`` ``[T, 2, H]`` (:func:`gate_inputs`). Positions ``< S`` go to the
    sinks; of the others only the last ``W`` survive in the ring (slot ``(p - S) % W``), with their
    gate inputs.
    """
    W, S = window, sinks
    T = k.shape[0]
    for ti in range(min(T, max(0, S - P))):
        sink_k[bi, P + ti] = k[ti]
        sink_v[bi, P + ti] = v[ti]
    first = max(max(0, S - P), T - W)  # older new tokens would be overwritten anyway
    if first < T:
        slots = (P + torch.arange(first, T, device=k.device) - S) % W
        ring_k[bi, slots] = k[first:].to(ring_k.dtype)  # index_put does not cast on every torch build
        ring_v[bi, slots] = v[first:].to(ring_v.dtype)
        gates[bi, slots] = gi[first:].to(gates.dtype)


def ahn_decode_ref(
    q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight,
    sink_k, sink_v, ring_k, ring_v, gates, state, pos,
    window: int,
    sinks: int,
    kind: str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One decode step, same arguments and cache semantics as ``torch.ops.ahn.decode_step``.

    ``q [B, H, D]``, ``k, v [B, HKV, D]``, ``a, b, z [B, H]``; updates the cache in place
    (new token written, leaving token absorbed into ``state``, ``pos += 1``) and returns
    ``[B, H, D]`` in ``dtype``.
    """
    def t1(x):
        return None if x is None else x[:, None]

    out = ahn_prefill_cache_ref(
        t1(q), t1(k), t1(v), t1(a), t1(b), t1(z), A_log, dt_bias, norm_weight, o_weight,
        sink_k, sink_v, ring_k, ring_v, gates, state, pos, window, sinks, kind, dtype)
    return out[:, 0]
