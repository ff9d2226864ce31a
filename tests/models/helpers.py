"""Tiny random Qwen2 models, an independent float64 evaluation of docs/AHN_SPEC.md, and the checks that the
decode-step tests share.

``spec_logits`` re-implements the whole model from its state dict in plain torch:
embedding, RMSNorm, Qwen2 q/k/v + RoPE, window+sink attention with an explicit mask,
the memory recurrences written out token by token as in the spec, the epilogue,
Qwen's o_proj, MLP and head. It shares no code with ahn_ops or transformers' modeling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

import ahn_ops
from ahn_ops.fast_decode import DecodePlan
from ahn_ops.models import patch_qwen

VOCAB = 101


def tiny_config(layers=3, hidden=64, heads=4, kv_heads=2, vocab=VOCAB, **kw) -> Qwen2Config:
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                      tie_word_embeddings=False, **kw)
    cfg._attn_implementation = "sdpa"
    return cfg


def tiny_model(seed=0, **kw) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_config(**kw)).eval()
    with torch.no_grad():  # HF init is N(0, 0.02): make the layers matter and the biases non-zero
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else p.shape[-1] ** -0.5))
    return model


@torch.no_grad()
def randomize_ahn(model, seed=1):
    """Random AHN parameters (o_proj != 0 so the memory branch shows in the logits)."""
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if ".ahn.fn." not in n:
            continue
        r = torch.randn(p.shape, generator=g)
        if n.endswith("A_log"):
            v = torch.log(torch.rand(p.shape, generator=g) * 3 + 0.5)
        elif n.endswith("dt_bias") or n.endswith(".D"):
            v = 0.5 * r
        elif "norm" in n:
            v = 1 + 0.1 * r
        elif "o_proj" in n:
            v = r * p.shape[-1] ** -0.5
        else:
            v = r * p.shape[-1] ** -0.5
        p.copy_(v.to(p.dtype))
    return model


def patched(kind="gdn", window=8, sinks=2, fa_layer_ids=None, seed=0, random_ahn=True, **kw):
    model = tiny_model(seed, **kw)
    patch_qwen(model, kind, window=window, sinks=sinks, fa_layer_ids=fa_layer_ids, backend="reference")
    if random_ahn:
        randomize_ahn(model, seed + 1)
    return model


# --------------------------------------------------------------------------------------
# the spec, in float64
# --------------------------------------------------------------------------------------
def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _memory(kind, x, q, k, v, sd, p, window, sinks, H, G, D):
    """y [B, T, H, D] of one layer, the recurrence of docs/AHN_SPEC.md token by token."""
    B, T = q.shape[:2]
    fn = p + "ahn.fn."
    lin = lambda name, bias=None: x @ sd[fn + name + ".weight"].T + (sd[fn + name + ".bias"] if bias else 0)  # noqa: E731
    if kind == "mamba2":
        dt = F.softplus(lin("dt_proj", True) + sd[fn + "dt_bias"])           # [B, T, H]
        decay = torch.exp(dt * -torch.exp(sd[fn + "A_log"]))
        z = lin("g_proj", True)
        kn = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        qn = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    else:
        beta = torch.sigmoid(lin("b_proj"))
        if kind == "gdn":
            g = -torch.exp(sd[fn + "A_log"]) * F.softplus(lin("a_proj") + sd[fn + "dt_bias"])
        else:
            g = torch.zeros_like(beta)
        decay = torch.exp(g)
        z = lin("g_proj")
        kn = k / torch.sqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)
        qn = q / torch.sqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6) * D ** -0.5
    kn = kn.repeat_interleave(G, dim=2)
    ve = v.repeat_interleave(G, dim=2)
    S = torch.zeros(B, H, D, D, dtype=q.dtype)
    m = torch.zeros_like(q)
    for t in range(T):
        j = t - window  # token j leaves the window when t arrives; it enters the memory
        if j >= sinks:
            S = decay[:, j, :, None, None] * S
            if kind == "mamba2":
                S = S + dt[:, j, :, None, None] * kn[:, j, :, :, None] * ve[:, j, :, None, :]
            else:
                pred = torch.einsum("bhkv,bhk->bhv", S, kn[:, j])
                S = S + beta[:, j, :, None, None] * kn[:, j, :, :, None] * (ve[:, j] - pred)[:, :, None, :]
        m[:, t] = torch.einsum("bhkv,bhk->bhv", S, qn[:, t])
    gate = (z * torch.sigmoid(z))[..., None]
    if kind == "mamba2":
        u = (m * gate).reshape(B, T, H * D)
        u = (u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + 1e-5) * sd[fn + "norm.weight"]).view(B, T, H, D)
    else:
        u = m * torch.rsqrt(m.pow(2).mean(-1, keepdim=True) + 1e-5) * sd[fn + "o_norm.weight"] * gate
    return torch.einsum("bthd,hde->bthe", u, sd[fn + "o_proj.weight"])


@torch.no_grad()
def spec_logits(model, input_ids, kind, window, sinks, fa_layer_ids=(), ahn=True):
    """Logits [B, T, V] in float64. ``ahn=False``: window+sinks attention without the memory;
    ``window=None``: full causal attention everywhere (the unpatched model)."""
    cfg = model.config
    sd = {k: v.detach().double().cpu() for k, v in model.state_dict().items()}
    B, T = input_ids.shape
    H, HKV = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    G = H // HKV
    eps = cfg.rms_norm_eps
    theta = cfg.rope_parameters["rope_theta"]
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(x):
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]

    t_idx = torch.arange(T)
    diff = t_idx[:, None] - t_idx[None, :]
    h = sd["model.embed_tokens.weight"][input_ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = _rms(h, sd[p + "input_layernorm.weight"], eps)
        lin = lambda n: x @ sd[p + f"self_attn.{n}.weight"].T + sd[p + f"self_attn.{n}.bias"]  # noqa: E731
        q, k, v = lin("q_proj").view(B, T, H, D), lin("k_proj").view(B, T, HKV, D), lin("v_proj").view(B, T, HKV, D)
        q, k = rope(q), rope(k)
        full = window is None or i in fa_layer_ids
        allowed = (diff >= 0) if full else (diff >= 0) & ((diff < window) | (t_idx[None, :] < sinks))
        s = torch.einsum("bthd,bjhd->bhtj", q, k.repeat_interleave(G, dim=2)) / math.sqrt(D)
        s = s.masked_fill(~allowed, float("-inf"))
        o = torch.einsum("bhtj,bjhd->bthd", s.softmax(-1), v.repeat_interleave(G, dim=2))
        if not full and ahn:
            o = o + _memory(kind, x, q, k, v, sd, p, window, sinks, H, G, D)
        h = h + o.reshape(B, T, H * D) @ sd[p + "self_attn.o_proj.weight"].T
        x = _rms(h, sd[p + "post_attention_layernorm.weight"], eps)
        mlp = F.silu(x @ sd[p + "mlp.gate_proj.weight"].T) * (x @ sd[p + "mlp.up_proj.weight"].T)
        h = h + mlp @ sd[p + "mlp.down_proj.weight"].T
    h = _rms(h, sd["model.norm.weight"], eps)
    return h @ sd["lm_head.weight"].T


def greedy_reference(model, input_ids, steps):
    """Greedy tokens by full re-prefill (no cache) at every step."""
    seq = input_ids
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    return seq[:, input_ids.shape[1]:]


# --------------------------------------------------------------------------------------
# decode-step checks (tests of ahn_ops.generate and of the fused step's kernels)
# --------------------------------------------------------------------------------------
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def assert_greedy_of_full_forward(model, x, out, attention_mask=None, tol=1e-3):
    """Every token ``out`` adds to ``x`` is an argmax of one full forward of the patched model over
    ``out`` (prefill path, no cache), within ``tol`` or one step of the logits' own dtype at the best
    logit, whichever is larger: greedy decoding through a different kernel path may pick another of two
    near-tied logits and then diverge, which is no error; a wrong token is. (bf16 logits near 2 are
    2^-6 apart: two correct paths that round one intermediate differently can swap two neighbours.)"""
    T = x.shape[1]
    m = None
    if attention_mask is not None:
        m = torch.cat([attention_mask, attention_mask.new_ones(out.shape[0], out.shape[1] - T)], 1)
    with torch.no_grad():
        raw = model(out, attention_mask=m).logits[:, T - 1:-1]        # [B, new, V]
    logits = raw.float()
    best = logits.max(-1).values
    chosen = logits.gather(-1, out[:, T:, None])[..., 0]
    step = torch.finfo(raw.dtype).eps * torch.exp2(torch.floor(torch.log2(best.abs().clamp_min(1e-30))))
    excess = best - chosen - torch.clamp(step, min=tol)
    gap = (best - chosen).max().item()
    assert excess.max().item() <= 0, (f"a generated token is {gap:.2e} below the full forward's best logit "
                                      f"(allowed: max({tol:g}, one {raw.dtype} step))")


def decoder_matches_plain_step(kind, batch, new_tokens, seed, plan, with_unmasked=True):
    """A patched model with W=9, S=4 and a full-attention layer (layer 1), prompts of 21 tokens with left
    padding on sequence 1 (and, ``with_unmasked``, without a mask too): ``ahn_ops.generate`` with ``plan``
    gives the tokens of the plain step (fp32 CPU), or on the GPU tokens that are each a best one of a full
    forward (rsqrt / sum order may flip near-ties). Returns ``(model, prompts)``."""
    model = patched(kind, window=9, sinks=4, fa_layer_ids=[1], hidden=256, heads=4, kv_heads=2).to(DEV)
    for attn in (l.self_attn for l in model.model.layers if hasattr(l, "ahn")):
        attn._ahn_cfg["backend"] = "auto"
    x = torch.randint(0, VOCAB, (batch, 21), generator=torch.Generator().manual_seed(seed)).to(DEV)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    for m in (None, mask) if with_unmasked else (mask,):
        plain = ahn_ops.generate(model, x, new_tokens, attention_mask=m, use_cuda_graph=False, plan=DecodePlan())
        fused = ahn_ops.generate(model, x, new_tokens, attention_mask=m, use_cuda_graph=False, plan=plan)
        if DEV == "cpu":
            assert torch.equal(plain, fused)
        else:
            assert_greedy_of_full_forward(model, x, fused, attention_mask=m)
    return model, x
