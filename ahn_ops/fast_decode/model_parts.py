"""What the decode step reads from a model patched by :func:`ahn_ops.patch_qwen`: its parts, whether its
modules fit the fused paths (:mod:`.plan` decides from these), and the stacked k/v/gates weight of an AHN
layer."""

from __future__ import annotations

import torch

# rotary types whose cos/sin depend on the position only (not on the sequence length reached so far)
STATIC_ROPE = ("default", "linear", "yarn", "llama3")


def unwrap(model):
    """(causal LM, Qwen2Model, info) of a model patched by ahn_ops.patch_qwen."""
    from ..models.qwen2 import _base_model

    base = _base_model(model)
    info = getattr(base, "_ahn_info", None)
    if info is None:
        raise ValueError("model is not an AHN model: call ahn_ops.patch_qwen(model, ...) or ahn_ops.from_pretrained")
    if getattr(model, "lm_head", None) is None:
        raise TypeError(f"ahn_ops.generate needs a causal LM with an lm_head (Qwen2ForCausalLM), got "
                        f"{type(model).__name__}")
    return model, base, info


def glue_fits(model, base, dtype):
    """True when the fused glue reproduces this model's decode step, else the reason it does not."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} (fp16, bf16 or fp32 only)"
    act = getattr(model.config, "hidden_act", None)
    if act not in ("silu", "swish"):
        return f"hidden_act {act!r} (SiLU MLPs only)"
    norms = [base.norm] + [n for l in base.layers for n in (l.input_layernorm, l.post_attention_layernorm)]
    for n in norms:
        w = getattr(n, "weight", None)
        if w is None or getattr(n, "variance_epsilon", None) is None or w.dtype != dtype or w.dim() != 1:
            return f"norm {type(n).__name__} is not a Qwen2RMSNorm of {dtype}"
    for l in base.layers:
        if not all(hasattr(l.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return f"MLP {type(l.mlp).__name__} is not a Qwen2MLP"
    return True


def linear_fits(base, dtype) -> bool:
    """Every o_proj / q_proj / MLP projection a plain ``nn.Linear`` of ``dtype`` (what decode_linear reads)."""
    for l in base.layers:
        lins = [l.self_attn.o_proj, l.self_attn.q_proj, l.mlp.gate_proj, l.mlp.up_proj, l.mlp.down_proj]
        if any(type(m) is not torch.nn.Linear or m.weight.dtype != dtype or not m.weight.is_contiguous()
               for m in lins):
            return False
    return True


def stack_kv_gates(attn, fn, dtype):
    """(weight, bias, (nk, off_a, off_b, off_z)) of one projection computing k, v and the AHN gates
    (rows padded to a multiple of 8 so that every row of the output stays 16-byte aligned), or None
    when the layer does not fit (another dtype, a module without plain weights)."""
    try:
        gl = fn.gate_linears()
    except NotImplementedError:
        return None
    lins = [attn.k_proj, attn.v_proj] + [g for g in gl if g is not None]
    if any(not isinstance(l, torch.nn.Linear) or l.weight.dtype != dtype for l in lins):
        return None
    w = torch.cat([l.weight for l in lins], 0)
    bias = torch.cat([l.bias if l.bias is not None else w.new_zeros(l.out_features) for l in lins])
    pad = (-w.shape[0]) % 8
    if pad:
        w = torch.cat([w, w.new_zeros(pad, w.shape[1])], 0)
        bias = torch.cat([bias, bias.new_zeros(pad)])
    nk = attn.k_proj.out_features
    offs, o = [], 2 * nk
    for g in gl:
        offs.append(None if g is None else o)
        o += 0 if g is None else g.out_features
    return w.contiguous(), bias.contiguous(), (nk, *offs)
