"""Fused glue of the Qwen2 decode step (Triton): residual add + RMSNorm, RoPE on q and k, SiLU * up, the
greedy token choice (argmax of the logits with the end-of-sequence bookkeeping and the position step); and
the RoPE of a prefill (``rope_prefill``: token blocks x all heads, used by the AHN attention's forward).

A decode step of a small batch is a chain of small kernels, each paying launch latency even inside
a CUDA graph: the plain Qwen2 modules spend ~30 elementwise kernels per layer on the two RMSNorms
(fp32 cast, pow, mean, eps, rsqrt, mul, cast, weight), the residual adds, RoPE (mul, cat, neg, add)
and SiLU * up (H100, Qwen2.5-3B shape, B=1: 1572 kernels per token, ``benchmarks/profile_decode.py``).
These kernels do each of those in one launch with the modules' own rounding steps (every
intermediate the torch code rounds to the activation dtype is rounded here too), so the fused
step reproduces the plain one up to the order of the RMSNorm's fp32 sum.

Used by :class:`ahn_ops.fast_decode.StaticDecoder`; inputs are 2-D ``[rows, n]`` with a unit last
stride. They are internal helpers of the decoder (not ``torch.ops.ahn`` operators): no autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["add_rms_norm", "greedy_next", "rope_prefill", "rope_qk", "silu_mul"]


@triton.jit
def _add_rms_norm_kernel(x, res, w, out, hout, x_s, r_s, o_s, h_s, N, eps,
                         HAS_RES: tl.constexpr, BN: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BN)
    m = o < N
    h = tl.load(x + row * x_s + o, mask=m, other=0.)
    if HAS_RES:  # residual + hidden in the activation dtype (one rounding), as the decoder layer adds
        h = (tl.load(res + row * r_s + o, mask=m, other=0.).to(tl.float32) + h.to(tl.float32)).to(h.dtype)
        tl.store(hout + row * h_s + o, h, mask=m)
    hf = h.to(tl.float32)
    var = tl.sum(hf * hf, 0) / N
    # Qwen2RMSNorm: normalise in fp32, round to the input dtype, then times the weight
    y = (hf * tl.rsqrt(var + eps)).to(h.dtype)
    wv = tl.load(w + o, mask=m, other=0.)
    tl.store(out + row * o_s + o, (wv.to(tl.float32) * y.to(tl.float32)).to(out.dtype.element_ty), mask=m)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor = None):
    """``(rms_norm(h) * weight, h)`` with ``h = residual + x`` (or ``x``) over the last dim.

    ``x``, ``residual``: ``[..., N]`` of one float dtype, ``weight``: ``[N]`` of the same dtype.
    Returns tensors shaped like ``x`` (``h`` is ``x`` itself without ``residual``).
    """
    N = x.shape[-1]
    if weight.shape != (N,) or weight.dtype != x.dtype:
        raise ValueError(f"add_rms_norm: weight must be [{N}] of {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"add_rms_norm: residual must be {tuple(x.shape)} {x.dtype}, got "
                         f"{tuple(residual.shape)} {residual.dtype}")
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = None
    if residual is not None:
        r2 = residual.reshape(-1, N)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    rows = x2.shape[0]
    out = torch.empty((rows, N), dtype=x.dtype, device=x.device)
    hout = torch.empty((rows, N), dtype=x.dtype, device=x.device) if residual is not None else x2
    BN = triton.next_power_of_2(N)
    _add_rms_norm_kernel[(rows,)](x2, r2 if r2 is not None else x2, weight.contiguous(), out, hout,
                                  x2.stride(0), (r2 if r2 is not None else x2).stride(0), out.stride(0),
                                  hout.stride(0), N, float(eps), HAS_RES=residual is not None, BN=BN,
                                  num_warps=4 if BN <= 2048 else 8)
    return out.view(x.shape), hout.view(x.shape)


@triton.jit
def rope_halves(x1, x2, c1, c2, s1, s2):
    """RoPE of the two halves ``x1``, ``x2`` of a head (activation dtype; ``c*``, ``s*`` fp32 cos/sin of each
    half): ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)``, both products rounded
    to the activation dtype, then the sum, as the torch code does. Also used by ``decode_linear``."""
    dt = x1.dtype
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    y1 = ((x1f * c1).to(dt).to(tl.float32) + (-x2f * s1).to(dt).to(tl.float32)).to(dt)
    y2 = ((x2f * c2).to(dt).to(tl.float32) + (x1f * s2).to(dt).to(tl.float32)).to(dt)
    return y1, y2


@triton.jit
def _rope_kernel(q, k, cos, sin, qo, ko, q_s, k_s, c_s, s_s, H, D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1)
    HALF: tl.constexpr = D // 2
    o = tl.arange(0, HALF)
    if hh < H:
        src = q + b * q_s + hh * D
        dst = qo + (b * H + hh) * D
    else:
        nk = tl.num_programs(1) - H
        src = k + b * k_s + (hh - H) * D
        dst = ko + (b * nk + hh - H) * D
    x1 = tl.load(src + o)
    x2 = tl.load(src + HALF + o)
    c1 = tl.load(cos + b * c_s + o).to(tl.float32)
    c2 = tl.load(cos + b * c_s + HALF + o).to(tl.float32)
    s1 = tl.load(sin + b * s_s + o).to(tl.float32)
    s2 = tl.load(sin + b * s_s + HALF + o).to(tl.float32)
    y1, y2 = rope_halves(x1, x2, c1, c2, s1, s2)
    tl.store(dst + o, y1)
    tl.store(dst + HALF + o, y2)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int):
    """Qwen2 RoPE of one token per row: ``q`` ``[B, H*D]``, ``k`` ``[B, HKV*D]`` (unit last stride, any row
    stride), ``cos``/``sin`` ``[B, D]`` (or ``[B, 1, D]``) -> contiguous ``[B, H, D]``, ``[B, HKV, D]``."""
    D = head_dim
    B = q.shape[0]
    cos, sin = cos.reshape(B, D), sin.reshape(B, D)
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.shape[0] != B or t.shape[1] % D or t.stride(-1) != 1:
            raise ValueError(f"rope_qk: {name} must be [B={B}, n*{D}] with a unit last stride, got "
                             f"{tuple(t.shape)} strides {t.stride()}")
    if D % 2 or D & (D - 1):
        raise ValueError(f"rope_qk: head_dim must be an even power of two, got {D}")
    H, HKV = q.shape[1] // D, k.shape[1] // D
    qo = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    ko = torch.empty(B, HKV, D, dtype=k.dtype, device=k.device)
    _rope_kernel[(B, H + HKV)](q, k, cos, sin, qo, ko, q.stride(0), k.stride(0), cos.stride(0), sin.stride(0),
                               H, D=D, num_warps=1)
    return qo, ko


@triton.jit
def _rope_rows_kernel(
    # pointers
    q, k, cos, sin, qo, ko,
    # sizes
    T,
    # strides (cos / sin: batch and token; q / k / outputs are contiguous [B, T, heads, D])
    c_sb, c_st, s_sb, s_st,
    # meta
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
):
    # BT tokens x all H + HKV heads per program: cos / sin are read once per token, not once per head
    i_t, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    HALF: tl.constexpr = D // 2
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = (o_t < T)[:, None]
    o_d = tl.arange(0, HALF)[None, :]
    p_c = cos + i_b * c_sb + o_t[:, None].to(tl.int64) * c_st + o_d
    p_s = sin + i_b * s_sb + o_t[:, None].to(tl.int64) * s_st + o_d
    c1 = tl.load(p_c, mask=m_t, other=0.).to(tl.float32)  # [BT, HALF]
    c2 = tl.load(p_c + HALF, mask=m_t, other=0.).to(tl.float32)
    s1 = tl.load(p_s, mask=m_t, other=0.).to(tl.float32)
    s2 = tl.load(p_s + HALF, mask=m_t, other=0.).to(tl.float32)
    o_row = (i_b * T + o_t).to(tl.int64)[:, None]
    for i_h in range(H):
        p = (o_row * H + i_h) * D + o_d
        y1, y2 = rope_halves(tl.load(q + p, mask=m_t), tl.load(q + p + HALF, mask=m_t), c1, c2, s1, s2)
        tl.store(qo + p, y1, mask=m_t)
        tl.store(qo + p + HALF, y2, mask=m_t)
    for i_h in range(HKV):
        p = (o_row * HKV + i_h) * D + o_d
        y1, y2 = rope_halves(tl.load(k + p, mask=m_t), tl.load(k + p + HALF, mask=m_t), c1, c2, s1, s2)
        tl.store(ko + p, y1, mask=m_t)
        tl.store(ko + p + HALF, y2, mask=m_t)


def rope_prefill(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Qwen2 RoPE of a prefill in one launch: ``q`` ``[B, T, H, D]``, ``k`` ``[B, T, HKV, D]``, ``cos``/``sin``
    ``[B or 1, T, D]`` (any strides) -> new contiguous ``q``, ``k`` with the torch code's rounding steps.

    The torch code (``models.qwen2._rope``: mul, neg, cat, mul, add on q and on k) makes ~10 passes over
    q and k; at T = 131072 on the Qwen2.5-3B shape those cost ~2 ms per layer (H200). No autograd.
    """
    B, T, H, D = q.shape
    HKV = k.shape[2]
    if k.shape != (B, T, HKV, D) or k.dtype != q.dtype:
        raise ValueError(f"rope_prefill: k must be [{B}, {T}, HKV, {D}] of {q.dtype}, got {tuple(k.shape)} {k.dtype}")
    if D % 2 or D & (D - 1):
        raise ValueError(f"rope_prefill: head_dim must be an even power of two, got {D}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1:] != (T, D) or t.stride(-1) != 1:
            raise ValueError(f"rope_prefill: {name} must be [{B} or 1, {T}, {D}] with a unit last stride, got "
                             f"{tuple(t.shape)} strides {t.stride()}")
    q, k = q.contiguous(), k.contiguous()
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    if q.numel() == 0:
        return qo, ko
    BT = 16
    sb = lambda t: 0 if t.shape[0] == 1 else t.stride(0)  # noqa: E731
    _rope_rows_kernel[(triton.cdiv(T, BT), B)](
        q=q, k=k, cos=cos, sin=sin, qo=qo, ko=ko, T=T, c_sb=sb(cos), c_st=cos.stride(1), s_sb=sb(sin),
        s_st=sin.stride(1), H=H, HKV=HKV, D=D, BT=BT, num_warps=4)
    return qo, ko


@triton.jit
def _silu_mul_kernel(g, u, out, n, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    gv = tl.load(g + o, mask=m, other=0.)
    gf = gv.to(tl.float32)
    act = (gf / (1. + tl.exp(-gf))).to(gv.dtype)  # silu, rounded as torch's activation output
    uv = tl.load(u + o, mask=m, other=0.)
    tl.store(out + o, (act.to(tl.float32) * uv.to(tl.float32)).to(out.dtype.element_ty), mask=m)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (Qwen2MLP's ``act_fn(gate_proj(x)) * up_proj(x)``), same shapes and dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul: gate and up must match, got {tuple(gate.shape)} {gate.dtype} and "
                         f"{tuple(up.shape)} {up.dtype}")
    g, u = gate.contiguous(), up.contiguous()
    out = torch.empty_like(g)
    n = g.numel()
    BLOCK = 1024
    _silu_mul_kernel[(triton.cdiv(n, BLOCK),)](g, u, out, n, BLOCK=BLOCK, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------------------
# greedy token choice: argmax over the vocabulary in two launches (row blocks, then one program per row)
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _argmax_part_kernel(x, pv, pi, pn, x_s, V, NB, BLOCK: tl.constexpr):
    """Per block of ``BLOCK`` logits: the max (NaN-free), the first index reaching it, and the first NaN's
    index (``V`` if none)."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    o = blk * BLOCK + tl.arange(0, BLOCK)
    m = o < V
    v = tl.load(x + row * x_s + o, mask=m, other=float("-inf")).to(tl.float32)
    nan = v != v
    v = tl.where(nan, float("-inf"), v)
    mx = tl.max(v, 0)
    # lanes past V hold -inf too, but every block has a valid lane before them, and min takes the first
    first = tl.min(tl.where(v == mx, o, V), 0)
    first_nan = tl.min(tl.where(nan & m, o, V), 0)
    tl.store(pv + row * NB + blk, mx)
    tl.store(pi + row * NB + blk, first)
    tl.store(pn + row * NB + blk, first_nan)


@triton.jit
def _argmax_final_kernel(pv, pi, pn, tok, unfinished, eos, pos, V, NB, n_eos, pad,
                         NBP: tl.constexpr, NEP: tl.constexpr, HAS_EOS: tl.constexpr, HAS_POS: tl.constexpr):
    """One program per row: the first index of the row max (torch.argmax: a NaN counts as the max, the
    first max wins), then the decoder's ``_emit`` bookkeeping and ``pos += 1``."""
    row = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, NBP)
    m = o < NB
    v = tl.load(pv + row * NB + o, mask=m, other=float("-inf"))
    i = tl.load(pi + row * NB + o, mask=m, other=V)
    first_nan = tl.min(tl.load(pn + row * NB + o, mask=m, other=V), 0)
    mx = tl.max(v, 0)
    best = tl.min(tl.where(v == mx, i, V), 0)
    nxt = tl.where(first_nan < V, first_nan, best).to(tl.int64)
    if HAS_EOS:  # finished rows emit the pad token; a row that emits an end token is finished
        u = tl.load(unfinished + row) != 0
        nxt = tl.where(u, nxt, pad)
        e = tl.arange(0, NEP)
        ev = tl.load(eos + e, mask=e < n_eos, other=-1)
        hit = tl.sum((ev == nxt).to(tl.int32), 0) > 0
        tl.store(unfinished + row, (u & (hit == 0)).to(tl.int8))
    tl.store(tok + row, nxt)
    if HAS_POS:
        tl.store(pos + row, tl.load(pos + row) + 1)


_ARGMAX_BLOCK = 2048


def greedy_next(logits: torch.Tensor, tok: torch.Tensor, unfinished: torch.Tensor = None, eos: torch.Tensor = None,
                pad_token_id: int = 0, pos: torch.Tensor = None, workspace=None):
    """Greedy decoding's next tokens, in place: ``tok[b] = argmax(logits[b])`` (exactly ``torch.argmax``: the
    first maximum wins, a NaN counts as the maximum), with :class:`ahn_ops.fast_decode.StaticDecoder`'s
    end-of-sequence rule when ``eos`` is given (``unfinished`` rows take their token, finished ones
    ``pad_token_id``; a row whose token is in ``eos`` becomes finished) and ``pos += 1`` when ``pos`` is given.

    ``logits``: ``[B, V]`` float (any float dtype: no fp32 copy is made); ``tok``, ``pos``: ``[B]`` int64;
    ``unfinished``: ``[B]`` bool; ``eos``: ``[n]`` int64. ``workspace``: optional tuple from a previous call
    (reused, so that a CUDA graph allocates nothing). Returns the workspace. Two launches.
    """
    if logits.dim() != 2 or not logits.is_floating_point() or logits.stride(1) != 1:
        raise ValueError(f"greedy_next: logits must be [B, V] float with a unit last stride, got "
                         f"{tuple(logits.shape)} {logits.dtype}")
    B, V = logits.shape
    dev = logits.device
    for name, t, dt in (("tok", tok, torch.int64), ("pos", pos, torch.int64), ("unfinished", unfinished, torch.bool)):
        if t is not None and (t.shape != (B,) or t.dtype != dt or t.device != dev or t.stride(0) != 1):
            raise ValueError(f"greedy_next: {name} must be [{B}] {dt} on {dev}, got {tuple(t.shape)} {t.dtype} "
                             f"on {t.device}")
    if (eos is None) != (unfinished is None):
        raise ValueError("greedy_next: eos and unfinished go together")
    if eos is not None and (eos.dim() != 1 or eos.dtype != torch.int64 or eos.device != dev or eos.numel() == 0):
        raise ValueError(f"greedy_next: eos must be a non-empty [n] int64 tensor on {dev}, got {tuple(eos.shape)} "
                         f"{eos.dtype}")
    if V >= 2 ** 31 - 1:
        raise ValueError(f"greedy_next: vocabulary of {V} entries (int32 indices)")
    NB = triton.cdiv(V, _ARGMAX_BLOCK)
    if workspace is None or workspace[0].shape != (B, NB) or workspace[0].device != dev:
        workspace = (torch.empty(B, NB, dtype=torch.float32, device=dev),
                     torch.empty(B, NB, dtype=torch.int32, device=dev),
                     torch.empty(B, NB, dtype=torch.int32, device=dev))
    pv, pi, pn = workspace
    _argmax_part_kernel[(B, NB)](logits, pv, pi, pn, logits.stride(0), V, NB, BLOCK=_ARGMAX_BLOCK, num_warps=4)
    u8 = unfinished.view(torch.int8) if unfinished is not None else tok
    _argmax_final_kernel[(B,)](pv, pi, pn, tok, u8, eos if eos is not None else tok,
                               pos if pos is not None else tok, V, NB,
                               eos.numel() if eos is not None else 0, int(pad_token_id),
                               NBP=triton.next_power_of_2(NB),
                               NEP=triton.next_power_of_2(eos.numel()) if eos is not None else 1,
                               HAS_EOS=eos is not None, HAS_POS=pos is not None, num_warps=4)
    return workspace
