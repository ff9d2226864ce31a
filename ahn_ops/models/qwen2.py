"""Qwen2.5 adapter: turn a Hugging Face ``Qwen2ForCausalLM`` into an AHN model in place.

What :func:`patch_qwen` changes (docs/AHN_SPEC.md, "One decoder layer"):

* every decoder layer ``i`` not in ``fa_layer_ids`` gets ``layer.ahn.fn`` (parameters named as
  the published checkpoints: ``model.layers.{i}.ahn.fn.<name>``) and its ``self_attn`` is
  re-classed to :class:`AHNQwen2Attention`: Qwen's q/k/v projections and RoPE, then
  ``ahn_ops.ahn_attention`` (window + sinks attention plus the memory readout) with the gates
  ``a, b, z`` computed from the layer's pre-normed input, then Qwen's ``o_proj``;
* layers in ``fa_layer_ids`` keep Qwen's full attention (and a growing KV cache);
* a forward pre-hook on ``Qwen2Model`` hands the 2-D padding mask to the AHN layers and creates an
  :class:`~ahn_ops.models.AHNModelCache` when a cache is wanted (inference, ``use_cache``);
* ``generate()`` gets an :class:`~ahn_ops.models.AHNModelCache` instead of a ``DynamicCache``.

Supported: transformers 5.x (tested with 5.0, 5.17 and 5.24; 5.24 renamed ``past_key_values`` to
``cache``, both names are accepted). Left-padded batches are handled: padding tokens
are dropped from the AHN computation (each sequence keeps its own position in the cache), so a
padded batch gives the same tokens as the sequences run one by one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import types
import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..files import read_json_object
from .hf_cache import AHNModelCache
from .modules import KIND_TO_IMPL, AHNBlock, ahn_param_shapes, normalize_kind

AHN_KEY_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.ahn\.fn\.(.+)$")
MIN_TRANSFORMERS = "5.0.0"

__all__ = ["patch_qwen", "from_pretrained", "cache_kwargs", "load_ahn_weights", "ahn_state_dict",
           "save_ahn_weights", "full_attention", "ahn_window", "read_ahn_config", "parse_fa_layer_ids",
           "AHNQwen2Attention", "AHN_KEY_RE"]


# --------------------------------------------------------------------------------------
# config helpers
# --------------------------------------------------------------------------------------
def parse_fa_layer_ids(value) -> List[int]:
    """``"0, 5,9"`` / ``[0, 5, 9]`` / None / ``""`` -> sorted unique ints."""
    if value is None:
        return []
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            return sorted(set(int(p) for p in parts))
        except ValueError:
            raise ValueError(f"fa_layer_ids must be comma-separated layer indices, got {value!r}") from None
    if isinstance(value, int):
        return [value]
    return sorted(set(int(v) for v in value))


def read_ahn_config(path: Union[str, os.PathLike]) -> Dict:
    """AHN fields of a ``config.json`` (or of the directory holding it): kind, window, sinks, fa_layer_ids.

    Returns a dict with the keys that are present: ``kind`` ("gdn"/"dn"/"mamba2"), ``window``
    (``sliding_window``), ``sinks`` (``num_attn_sinks``, default 0), ``fa_layer_ids`` (list),
    and the raw json under ``"raw"``.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    raw = read_json_object(p)
    out: Dict = {"raw": raw}
    if raw.get("_ahn_implementation"):
        out["kind"] = normalize_kind(raw["_ahn_implementation"])
        if raw.get("sliding_window") is not None:
            out["window"] = int(raw["sliding_window"])
        out["sinks"] = int(raw.get("num_attn_sinks") or 0)
        out["fa_layer_ids"] = parse_fa_layer_ids(raw.get("fa_layer_ids"))
        for flag in ("use_q_proj", "use_ahn_router"):
            if raw.get(flag):
                raise NotImplementedError(f"{p}: {flag}=true is not supported by ahn_ops (the published "
                                          "checkpoints use false)")
    return out


def _check_transformers() -> None:
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise RuntimeError(f"ahn_ops.patch_qwen needs transformers >= {MIN_TRANSFORMERS} (tested with 5.0, 5.17, "
                           f"5.24), found {transformers.__version__}")


def _base_model(model: nn.Module) -> nn.Module:
    """The ``Qwen2Model`` (holder of ``.layers``) of a ``Qwen2ForCausalLM`` or the model itself."""
    if hasattr(model, "layers") and hasattr(model, "rotary_emb"):
        return model
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return inner
    raise TypeError(f"expected a transformers Qwen2ForCausalLM or Qwen2Model, got {type(model).__name__}")


# --------------------------------------------------------------------------------------
# the cache argument: transformers >= 5.24 calls it ``cache`` (``past_key_values`` before)
# --------------------------------------------------------------------------------------
_CACHE_NAMES = ("cache", "past_key_values", "past_key_value")


def _pop_cache(kwargs: Dict):
    """Remove and return the cache from a transformers call's kwargs, under whichever name it came."""
    values = {n: kwargs.pop(n) for n in _CACHE_NAMES if n in kwargs}
    found = [n for n, v in values.items() if v is not None]
    if len(found) > 1:
        raise ValueError(f"got a cache under both {found[0]!r} and {found[1]!r}: pass one")
    return values[found[0]] if found else None


def _cache_name(module) -> str:
    """The name the installed transformers gives the cache argument of ``module.forward`` (module or class)."""
    import inspect

    cls = module if isinstance(module, type) else type(module)
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_kwargs(cache) -> Dict:
    """``{"cache": cache}`` on transformers >= 5.24, ``{"past_key_values": cache}`` before.

    The model call's cache argument under the installed version's name (the old name still works
    on 5.24 but logs a deprecation warning).

    Example:
        >>> cache = ahn_ops.AHNModelCache.from_model(model)
        >>> logits = model(input_ids, **ahn_ops.models.cache_kwargs(cache)).logits
    """
    from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM

    return {_cache_name(Qwen2ForCausalLM): cache}


# --------------------------------------------------------------------------------------
# the attention of an AHN layer
# --------------------------------------------------------------------------------------
def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Qwen2 RoPE on ``[B, T, heads, D]`` (cos/sin ``[B, T, D]``)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)

    def rot(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def _apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """``_rope`` in one Triton launch (``model_glue.rope_prefill``, same rounding steps) where it applies:
    bf16/fp16 on CUDA (or the interpreter), no gradient needed, HF's ``[B or 1, T, D]`` cos/sin. The torch
    code makes ~10 passes over q and k (~2 ms per layer of a 131k prefill, Qwen2.5-3B shape, H200)."""
    from ..ops.ahn_attention.dispatch import _triton_device_ok

    B, T, _, D = q.shape
    fused = (q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype and _triton_device_ok(q)
             and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))
             and D % 2 == 0 and D & (D - 1) == 0
             and all(t.dim() == 3 and t.shape[0] in (1, B) and tuple(t.shape[1:]) == (T, D) and t.stride(-1) == 1
                     for t in (cos, sin)))
    if not fused:
        return _rope(q, k, cos, sin)
    from ..ops.model_glue import rope_prefill

    return rope_prefill(q, k, cos, sin)


def _layer_view(cache, bi: int):
    """The one-sequence view ``bi`` of an AHNLayerCache (writes go to the shared storage)."""
    from ..cache import AHNLayerCache

    return AHNLayerCache(*[t[bi:bi + 1] for t in cache.tensors()], cache.window, cache.sinks, cache.kind)


class AHNQwen2Attention(nn.Module):
    """Forward of a Qwen2 attention module whose layer has an AHN (installed by re-classing).

    Reads ``self._ahn_fn`` (the layer's ``ahn.fn``, not registered here so that parameter
    names stay ``model.layers.{i}.ahn.fn.*``) and ``self._ahn_cfg`` (window, sinks, kind, backend).
    """

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Tuple[torch.Tensor, torch.Tensor] = None,
                attention_mask=None, **kwargs):
        past_key_values = _pop_cache(kwargs)
        cfg = self._ahn_cfg
        fn = self._ahn_fn
        B, T, _ = hidden_states.shape
        D = self.head_dim
        q = self.q_proj(hidden_states).view(B, T, -1, D)
        k = self.k_proj(hidden_states).view(B, T, -1, D)
        v = self.v_proj(hidden_states).view(B, T, -1, D)
        if position_embeddings is None:
            raise ValueError("AHN attention needs position_embeddings (cos, sin) from Qwen2Model")
        cos, sin = position_embeddings
        q, k = _apply_rope(q, k, cos, sin)
        if cfg.get("full_attention"):
            return self.o_proj(_full_causal_attention(self, q, k, v, past_key_values, kwargs)), None
        a, b, z = fn.gates(hidden_states)
        params = fn.op_params()
        op_kw = dict(window=cfg["window"], sinks=cfg["sinks"], kind=cfg["kind"], backend=cfg["backend"])

        layer_cache = None
        if past_key_values is not None:
            if not isinstance(past_key_values, AHNModelCache):
                raise TypeError(f"AHN layers need an ahn_ops.models.AHNModelCache as past_key_values, got "
                                f"{type(past_key_values).__name__} (pass None and the model creates one)")
            layer_cache = past_key_values.ahn_layer(self.layer_idx, k)

        mask2d = kwargs.get("ahn_attention_mask")
        valid = None
        if mask2d is not None:
            valid = mask2d[:, -T:].to(device=q.device, dtype=torch.bool)
            if bool(valid.all()):
                valid = None

        def run(sl_b, sl_t, cache):
            def pick(x):
                return None if x is None else x[sl_b, sl_t]

            return _ahn_call(pick(q), pick(k), pick(v), pick(a), pick(b), pick(z), params, op_kw, cache)

        if valid is None:
            out = run(slice(None), slice(None), layer_cache)
        else:
            # padded batch: each sequence runs on its real tokens only, so padding never enters the
            # sinks, the window or the memory, and each sequence's cache position counts real tokens
            out = q.new_zeros(q.shape)
            for bi in range(B):
                idx = valid[bi].nonzero().squeeze(1)
                if idx.numel() == 0:
                    continue
                cache_bi = None if layer_cache is None else _layer_view(layer_cache, bi)
                o = run(slice(bi, bi + 1), idx, cache_bi)
                out = out.index_put((torch.full_like(idx, bi), idx), o[0])
        if past_key_values is not None:
            past_key_values.advance(self.layer_idx, T)
        out = out.reshape(B, T, -1)
        return self.o_proj(out), None


def _full_causal_attention(attn, q, k, v, past_key_values, kwargs):
    """The frozen layer's own attention, full causal, AHN bypassed: the teacher of self-distillation.

    Runs on the same q/k/v projections and RoPE as the student (one copy of the weights). Only for
    a cache-free prefill of unpadded sequences (what ``ahn_ops.distill`` feeds it).
    """
    if past_key_values is not None:
        raise ValueError("full_attention(model) is for cache-free forwards: pass use_cache=False")
    mask2d = kwargs.get("ahn_attention_mask")
    if mask2d is not None and not bool(mask2d.to(torch.bool).all()):
        raise ValueError("full_attention(model) does not support padded batches")
    B, T = q.shape[:2]
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=attn.head_dim ** -0.5,
        enable_gqa=True)
    return o.transpose(1, 2).reshape(B, T, -1)


def _ahn_attentions(model: nn.Module):
    return [layer.self_attn for layer in _base_model(model).layers if getattr(layer.self_attn, "_ahn_patched", False)]


@contextlib.contextmanager
def full_attention(model: nn.Module):
    """Inside the block, the AHN layers of a patched model run full causal attention (no window, no memory).

    The teacher pass of self-distillation (``ahn_ops.distill``): the same module, the same frozen
    weights, only the attention pattern changes, so teacher and student never hold two copies of the
    model. Layers in ``fa_layer_ids`` are full attention anyway. Cache-free, unpadded forwards only.

    Example:
        >>> with torch.no_grad(), ahn_ops.models.full_attention(model):
        ...     teacher_logits = model(input_ids, use_cache=False).logits   # == the unpatched model
    """
    attns = _ahn_attentions(model)
    old = [a._ahn_cfg.get("full_attention", False) for a in attns]
    for a in attns:
        a._ahn_cfg["full_attention"] = True
    try:
        yield model
    finally:
        for a, o in zip(attns, old):
            a._ahn_cfg["full_attention"] = o


@contextlib.contextmanager
def ahn_window(model: nn.Module, window: int, sinks: int):
    """Inside the block, a patched model runs with window ``W`` and ``S`` sinks (run-time ints: no
    kernel recompiles), e.g. the random window of each training step; restored on exit."""
    from ..ops.common.checks import check_window_sinks

    check_window_sinks(window, sinks)
    attns = _ahn_attentions(model)
    info = _base_model(model)._ahn_info
    old = [(a._ahn_cfg["window"], a._ahn_cfg["sinks"]) for a in attns], (info["window"], info["sinks"])
    for a in attns:
        a._ahn_cfg["window"], a._ahn_cfg["sinks"] = int(window), int(sinks)
    info["window"], info["sinks"] = int(window), int(sinks)
    try:
        yield model
    finally:
        for a, (w, s) in zip(attns, old[0]):
            a._ahn_cfg["window"], a._ahn_cfg["sinks"] = w, s
        info["window"], info["sinks"] = old[1]


def _ahn_call(q, k, v, a, b, z, params, op_kw, cache):
    from ..ops.ahn_attention.interface import ahn_attention

    # under autocast the rotary embedding hands q, k back in fp32 (its cos / sin are fp32 in an fp32 model) next
    # to v in the autocast dtype: all in that dtype, as autocast gives the attention it replaces
    dev = q.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype
    q, k, v = (x.to(dt).contiguous() for x in (q, k, v))
    a = None if a is None else a.to(dt)
    b = None if b is None else b.to(dt)
    return ahn_attention(q, k, v, a, b, z.to(dt), params["A_log"],
                         params["dt_bias"], params["norm_weight"], params["o_weight"], cache=cache, **op_kw)


_ATTN_CLASSES: Dict[type, type] = {}


def _ahn_attention_class(cls: type) -> type:
    """A subclass of the model's attention class whose forward is AHNQwen2Attention.forward."""
    if cls not in _ATTN_CLASSES:
        _ATTN_CLASSES[cls] = type("AHN" + cls.__name__, (cls,), {"forward": AHNQwen2Attention.forward,
                                                                 "_ahn_patched": True})
    return _ATTN_CLASSES[cls]


# --------------------------------------------------------------------------------------
# model-level hooks: padding mask, cache creation, generate()
# --------------------------------------------------------------------------------------
_MODEL_ARG_NAMES = ("input_ids", "attention_mask", "position_ids", None, "inputs_embeds", "use_cache")


def _grad_live(module, kwargs) -> bool:
    """Whether this forward records gradients through the AHN layers (grad mode on and some parameter or
    the input embeddings require grad)."""
    if not torch.is_grad_enabled():
        return False
    x = kwargs.get("inputs_embeds")
    if isinstance(x, torch.Tensor) and x.requires_grad:
        return True
    return any(p.requires_grad for p in module.parameters())


def _model_pre_hook(module, args, kwargs):
    info = module._ahn_info
    name = info["cache_name"]
    if args:  # positional call of Qwen2Model.forward: name them
        for arg_name, val in zip(_MODEL_ARG_NAMES, args):
            kwargs[arg_name or name] = val
        args = ()
    pkv = _pop_cache(kwargs)  # any name the caller used -> the installed transformers' name
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(module.config, "use_cache", False)
    if pkv is None and use_cache and (module.training or _grad_live(module, kwargs)):
        # no cache asked for and gradients wanted: the differentiable full-sequence path. The cache path is
        # inference-only (it refuses inputs that require grad), and transformers' own DynamicCache cannot
        # serve AHN layers, so no cache is made at all
        kwargs["use_cache"] = False
    elif pkv is None and use_cache:
        pkv = AHNModelCache.from_model(module)
    elif pkv is not None and not isinstance(pkv, AHNModelCache):
        raise TypeError(f"a model patched by ahn_ops.patch_qwen needs past_key_values=None (cache=None) or an "
                        f"ahn_ops.models.AHNModelCache, got {type(pkv).__name__}")
    if pkv is not None:
        kwargs[name] = pkv
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        # the AHN layers need the mask only when the new columns hold padding: test that once per
        # forward here (one host sync) rather than in every layer (a sync per layer per decode step)
        x = kwargs.get("input_ids")
        x = kwargs.get("inputs_embeds") if x is None else x
        T = x.shape[1] if isinstance(x, torch.Tensor) else mask.shape[1]
        if not bool(mask[:, -T:].to(torch.bool).all()):
            kwargs["ahn_attention_mask"] = mask
        if not info["fa_layer_ids"]:
            # no full-attention layer reads a 4-D mask: skip building a [B, 1, T, T + past] one
            kwargs["attention_mask"] = {"full_attention": None, "sliding_attention": None}
    elif not info["fa_layer_ids"] and mask is None:
        kwargs["attention_mask"] = {"full_attention": None, "sliding_attention": None}
    return args, kwargs


def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
    """generate(): an AHNModelCache unless the caller brought a cache or asked for none.

    A cache the caller brings (``model.generate(ids, past_key_values=cache)``) is continued in place, as
    transformers does with its own caches, and under transformers' contract: ``input_ids`` is the FULL
    sequence, the cached prefix followed by the new tokens (transformers feeds only the columns after
    ``cache.get_seq_length()``), or the new tokens only with an ``attention_mask`` covering prefix + new
    tokens. Checked here: the cache belongs to this model, its batch size, and that the input is longer
    than the cached prefix. (``ahn_ops.generate(model, new_ids, cache=cache)`` takes the new tokens only and
    leaves the cache unchanged.)
    """
    name = _cache_name(self)
    if (model_kwargs.get(name) is None and generation_config.use_cache is not False
            and generation_config.cache_implementation in (None, "dynamic")):
        model_kwargs[name] = AHNModelCache.from_model(self)
        return None
    pkv = model_kwargs.get(name)
    if isinstance(pkv, AHNModelCache):
        pkv.check_model(self, "past_key_values")
    if isinstance(pkv, AHNModelCache) and pkv.ahn is not None:
        batch_size = kwargs.get("batch_size", args[1] if len(args) > 1 else None)
        expand = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        if isinstance(batch_size, int) and pkv.ahn.batch_size != batch_size * expand:
            raise ValueError(f"past_key_values holds {pkv.ahn.batch_size} sequence(s), generate() runs "
                             f"{batch_size * expand} (batch {batch_size} x {expand} beams/returned sequences): fork "
                             "it first with cache.expand(n) or cache.select(indices)")
        mask = model_kwargs.get("attention_mask")
        # generate() drops an all-ones mask before this call and keeps its length for slicing the input
        length = mask.shape[-1] if isinstance(mask, torch.Tensor) else getattr(generation_config, "_mask_length", None)
        past = pkv.get_seq_length()
        if isinstance(length, int) and length <= past:
            raise ValueError(f"input_ids: past_key_values holds {past} columns, so generate() expects the full "
                             f"sequence (the cached prefix followed by the new tokens, as for transformers' own "
                             f"caches), got {length} columns; ahn_ops.generate(model, new_ids, cache=cache) takes "
                             "the new tokens only")
    if pkv is None and generation_config.use_cache is not False:
        raise ValueError(f"cache_implementation={generation_config.cache_implementation!r} is not supported by "
                         "an AHN model; leave it unset (an AHNModelCache is used)")
    return type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)


# --------------------------------------------------------------------------------------
# patch_qwen
# --------------------------------------------------------------------------------------
def patch_qwen(model: nn.Module, kind: Optional[str] = None, window: Optional[int] = None,
               sinks: Optional[int] = None, weights=None, fa_layer_ids=None, *,
               prefill_chunk_size: Optional[int] = None, backend: str = "auto", strict: bool = True) -> nn.Module:
    """Make a Hugging Face Qwen2 model an AHN model, in place.

    Args:
        model: ``transformers.Qwen2ForCausalLM`` (or ``Qwen2Model``), any dtype/device.
        kind: ``"gdn"`` (default), ``"dn"``, ``"mamba2"`` (or ``"GatedDeltaNet"``, ...).
        window: ``W``, exact-KV tokens per sequence besides the sinks. Required unless the
            ``config.json`` next to ``weights`` gives ``sliding_window``.
        sinks: ``S`` first tokens kept forever (default: config's ``num_attn_sinks`` or 0).
        weights: AHN-only weights: a directory (``config.json`` + ``*.safetensors``), a
            ``.safetensors``/``.bin``/``.pt`` file, or a state dict with keys
            ``model.layers.{i}.ahn.fn.<name>``. Loaded strictly: missing or unexpected keys raise
            (tensors of the ``fa_layer_ids`` layers, which get no AHN, are ignored with a warning).
            Without weights the AHN starts as in training (``o_proj.weight = 0``: the model equals
            the sliding-window model).
        fa_layer_ids: layers that keep full attention and get no AHN (list or ``"0,5"``).
        prefill_chunk_size: if set, ``generate()`` prefills long prompts in chunks of this many
            tokens (``model.generation_config.prefill_chunk_size``).
        backend: passed to :func:`ahn_ops.ahn_attention` (``"auto"``, ``"reference"``, ``"kernel"``).
        strict: raise on missing/unexpected keys in ``weights``.

    Returns:
        ``model`` (patched in place). On any error the model is left as it was: ``weights`` are read
        and checked (keys, shapes, dtypes, the model size of their ``config.json``) before the model
        is touched, and a failure while patching undoes what was done.

    Example:
        >>> from transformers import Qwen2ForCausalLM
        >>> model = Qwen2ForCausalLM.from_pretrained("Qwen/Qwen2.5-3B-Instruct", dtype=torch.bfloat16)
        >>> ahn_ops.patch_qwen(model, weights="AHN-GDN-for-Qwen-2.5-Instruct-3B")  # kind/W/S from its config
        >>> out = model.generate(input_ids, max_new_tokens=64)     # constant-size AHN cache
    """
    _check_transformers()
    base = _base_model(model)
    if getattr(base, "_ahn_info", None) is not None:
        raise ValueError("model is already patched by ahn_ops.patch_qwen")
    tensors, cfg_from, src = _read_weights(weights) if weights is not None else (None, {}, None)
    kind = normalize_kind(kind if kind is not None else cfg_from.get("kind", "gdn"))
    window = window if window is not None else cfg_from.get("window")
    if window is None:
        raise ValueError("window is required (or an AHN config.json with sliding_window next to the weights)")
    sinks = sinks if sinks is not None else cfg_from.get("sinks", 0)
    fa_ids = parse_fa_layer_ids(fa_layer_ids if fa_layer_ids is not None else cfg_from.get("fa_layer_ids"))
    from ..ops.common.checks import check_window_sinks

    check_window_sinks(window, sinks)
    config = base.config
    dims = _model_dims(config)
    L, H, HKV, D = dims["num_hidden_layers"], dims["num_attention_heads"], dims["num_key_value_heads"], dims["head_dim"]
    bad = [i for i in fa_ids if not 0 <= i < L]
    if bad:
        raise ValueError(f"fa_layer_ids {bad} out of range for a model with {L} layers")
    ahn_ids = [i for i in range(L) if i not in fa_ids]
    to_load = None
    if weights is not None:
        _check_config_matches(cfg_from, dims, src)
        shapes = ahn_param_shapes(kind, config.hidden_size, H, D)
        expected = {f"model.layers.{i}.ahn.fn.{n}": s for i in ahn_ids for n, s in shapes.items()}
        to_load = _check_ahn_tensors(tensors, expected, dims, fa_ids, src, strict=strict, kind=kind)

    undo: List = []  # closures that take back each change, run in reverse if anything below fails
    try:
        ref = next(base.parameters())
        for i in ahn_ids:
            layer = base.layers[i]
            attn = layer.self_attn
            layer.ahn = AHNBlock(kind, config.hidden_size, H, D, device=ref.device, dtype=ref.dtype)
            undo.append(lambda layer=layer: delattr(layer, "ahn"))
            undo.append(lambda attn=attn, cls=type(attn): _unpatch_attention(attn, cls))
            attn.__class__ = _ahn_attention_class(type(attn))
            object.__setattr__(attn, "_ahn_fn", layer.ahn.fn)
            attn._ahn_cfg = dict(window=window, sinks=sinks, kind=kind, backend=backend)

        info = dict(kind=kind, window=window, sinks=sinks, fa_layer_ids=fa_ids, ahn_layer_ids=ahn_ids, num_layers=L,
                    num_heads=H, num_kv_heads=HKV, head_dim=D, cache_name=_cache_name(base))
        for m in {id(base): base, id(model): model}.values():
            _set_attr(m, "_ahn_info", info, undo)
        hook = base.register_forward_pre_hook(_model_pre_hook, with_kwargs=True)
        undo.append(hook.remove)
        _set_attr(base, "_ahn_hook", hook, undo)
        if hasattr(model, "generate"):
            _set_attr(model, "_prepare_cache_for_generation",
                      types.MethodType(_prepare_cache_for_generation, model), undo)
            if prefill_chunk_size is not None and getattr(model, "generation_config", None) is not None:
                _set_attr(model.generation_config, "prefill_chunk_size", int(prefill_chunk_size), undo)

        # the spec's config fields, so that save_pretrained / merge write an AHN config
        fields = dict(_layer_implementation="Qwen2MemDecoderLayer", _ahn_implementation=KIND_TO_IMPL[kind],
                      sliding_window=window, num_attn_sinks=sinks, fa_layer_ids=",".join(str(i) for i in fa_ids),
                      use_q_proj=False, use_ahn_router=False)
        for c in {id(config): config, id(getattr(model, "config", config)): getattr(model, "config", config)}.values():
            for name, value in fields.items():
                _set_attr(c, name, value, undo)

        if to_load:
            _copy_into(_ahn_params(model), to_load)
    except BaseException:
        for fn in reversed(undo):
            fn()
        raise
    return model


def _set_attr(obj, name: str, value, undo: List) -> None:
    """``setattr`` that records how to take it back (the old value, or no attribute at all)."""
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)
    undo.append(lambda: setattr(obj, name, old) if had else delattr(obj, name))


def _unpatch_attention(attn: nn.Module, cls: type) -> None:
    attn.__class__ = cls
    for name in ("_ahn_fn", "_ahn_cfg"):
        vars(attn).pop(name, None)


# --------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------
_SIZE_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
_GATE_PROJS = ("a_proj", "b_proj", "g_proj", "dt_proj")  # [H, hidden] weights of every kind


def _ahn_params(model: nn.Module) -> Dict[str, nn.Parameter]:
    """``model.layers.{i}.ahn.fn.<name>`` -> parameter."""
    base = _base_model(model)
    return {f"model.{n}": p for n, p in base.named_parameters() if ".ahn.fn." in n}


def _model_dims(config) -> Dict[str, int]:
    """The size fields of a Qwen2 config that an AHN checkpoint must match."""
    H = config.num_attention_heads
    return dict(num_hidden_layers=config.num_hidden_layers, hidden_size=config.hidden_size, num_attention_heads=H,
                num_key_value_heads=config.num_key_value_heads,
                head_dim=getattr(config, "head_dim", None) or config.hidden_size // H)


def _safetensors_files(directory: Path) -> List[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no weight_map")
        files = [directory / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise FileNotFoundError(f"{index} lists files that are missing: {absent}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {directory}")
    return files


def read_ahn_tensors(source, only_ahn: bool = False) -> Dict[str, torch.Tensor]:
    """Tensors of a directory / file / state dict. With ``only_ahn``, only the ``.ahn.fn.`` keys are read.

    A file that cannot be read (corrupt, truncated, not a state dict) raises ValueError naming it."""
    if isinstance(source, Mapping):
        return {k: v for k, v in source.items() if not only_ahn or ".ahn.fn." in k}
    p = Path(source)
    if not p.exists():
        raise FileNotFoundError(f"AHN weights not found: {p}")
    files = _safetensors_files(p) if p.is_dir() else [p]
    out: Dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(f), framework="pt") as sf:
                    for k in sf.keys():
                        if not only_ahn or ".ahn.fn." in k:
                            out[k] = sf.get_tensor(k)
                continue
            sd = torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as e:  # safetensors / pickle raise assorted types: one message that names the file
            raise ValueError(f"{f}: cannot read AHN weights, corrupt or truncated? ({type(e).__name__}: {e})") from e
        if not isinstance(sd, Mapping):
            raise ValueError(f"{f}: expected a state dict (name -> tensor), got {type(sd).__name__}")
        out.update({k: v for k, v in sd.items() if not only_ahn or ".ahn.fn." in k})
    return out


def _read_weights(weights) -> Tuple[Dict, Dict, str]:
    """``(tensors, AHN config fields, name for messages)`` of a directory / file / state dict."""
    if isinstance(weights, Mapping):
        return dict(weights), {}, "(state dict)"
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be a directory, a file or a state dict, got {type(weights).__name__}")
    p = Path(weights)
    if not p.exists():
        raise FileNotFoundError(f"weights {str(p)!r}: the path does not exist")
    cfg_dir = p if p.is_dir() else p.parent  # dir, or a file in it
    cfg = read_ahn_config(cfg_dir) if (cfg_dir / "config.json").exists() else {}
    return read_ahn_tensors(p), cfg, str(p)


def _check_config_matches(ahn_cfg: Mapping, dims: Mapping[str, int], src: str) -> None:
    """An AHN ``config.json`` names the model size it was trained on: it must be this model's."""
    if "kind" not in ahn_cfg:  # not an AHN config (e.g. a base model's next to a loose file): says nothing
        return
    raw = dict(ahn_cfg.get("raw") or {})
    if raw.get("head_dim") is None and raw.get("hidden_size") and raw.get("num_attention_heads"):
        raw["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
    diff = [f"{f}={raw[f]} (this model: {dims[f]})" for f in _SIZE_FIELDS
            if raw.get(f) is not None and raw[f] != dims[f]]
    if diff:
        raise ValueError(f"AHN checkpoint {src} does not match this model: its config.json has " + ", ".join(diff)
                         + " (an AHN for another model size?)")


def _canonical_key(k: str) -> str:
    m = AHN_KEY_RE.match(k)
    return f"model.layers.{m.group(1)}.ahn.fn.{m.group(2)}" if m else k


def _layer_of(k: str) -> Optional[int]:
    m = AHN_KEY_RE.match(k)
    return int(m.group(1)) if m else None


def _fmt_keys(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def drop_fa_layer_tensors(tensors: Mapping[str, torch.Tensor], fa_layer_ids: Sequence[int],
                          src: str = "AHN weights") -> Dict[str, torch.Tensor]:
    """``tensors`` without the ``.ahn.fn.`` keys of full-attention layers, with a warning naming them.

    The official AHN checkpoints with ``fa_layer_ids`` also carry (unused) AHN tensors for those layers."""
    fa = set(fa_layer_ids)
    dropped = [k for k in tensors if _layer_of(k) in fa]
    if not dropped:
        return dict(tensors)
    layers = sorted({_layer_of(k) for k in dropped})
    warnings.warn(f"{src}: ignored {len(dropped)} AHN tensors of the full-attention layers {layers} "
                  f"(fa_layer_ids: these layers have no AHN): {_fmt_keys(dropped, 4)}", UserWarning, stacklevel=3)
    return {k: v for k, v in tensors.items() if k not in set(dropped)}


def _inferred_size(shapes: Mapping[str, Tuple[int, ...]], dims: Mapping[str, int]) -> str:
    """``", it has hidden_size=32 (this model: 64)"`` where all the checkpoint's shapes agree on another
    model size (one odd tensor is a broken checkpoint, not another model)."""
    seen: Dict[str, set] = {"hidden_size": set(), "num_attention_heads": set(), "head_dim": set()}
    for k, shape in shapes.items():
        name = k.split(".ahn.fn.", 1)[-1]
        if name.split(".")[0] in _GATE_PROJS and name.endswith(".weight") and len(shape) == 2:
            seen["num_attention_heads"].add(shape[0])
            seen["hidden_size"].add(shape[1])
        elif name == "o_proj.weight" and len(shape) == 3:
            seen["num_attention_heads"].add(shape[0])
            seen["head_dim"].add(shape[1])
    diff = [f"{f}={next(iter(v))} (this model: {dims[f]})" for f, v in seen.items()
            if len(v) == 1 and next(iter(v)) != dims[f]]
    return f", it has {', '.join(diff)}" if diff else ""


def _check_ahn_tensors(tensors: Mapping, expected: Mapping[str, Tuple[int, ...]], dims: Mapping[str, int],
                       fa_ids: Sequence[int], src: str, strict: bool = True, kind: Optional[str] = None
                       ) -> Dict[str, torch.Tensor]:
    """The tensors to load, keyed as ``expected`` (name -> shape); raises if they do not fit the model.

    ValueError for another model size (layers, shapes), non-tensors or non-float dtypes; KeyError for
    missing / unexpected keys of a model of the right size (with ``strict``)."""
    canon: Dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        ck = _canonical_key(k)
        if ck in canon:
            raise ValueError(f"AHN weights {src}: {ck} appears twice (with and without the 'model.' prefix)")
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"AHN weights {src}: {k} is a {type(v).__name__}, expected a tensor")
        canon[ck] = v
    canon = drop_fa_layer_tensors(canon, fa_ids, f"AHN weights {src}")

    L = dims["num_hidden_layers"]
    have = {_layer_of(k) for k in canon} - {None}
    want = {_layer_of(k) for k in expected}
    if have and max(have) >= L:
        raise ValueError(f"AHN checkpoint {src} does not match this model: it has AHN tensors for layer {max(have)} "
                         f"but the model has {L} layers (num_hidden_layers; an AHN for another model size?)")
    if strict and have and want and max(have) < max(want):  # the last layers are missing altogether
        raise ValueError(f"AHN checkpoint {src} does not match this model: it has AHN tensors for layers up to "
                         f"{max(have)} only, the model has {L} layers (num_hidden_layers; an AHN for another model "
                         "size, or other fa_layer_ids?)")

    bad = [(k, tuple(canon[k].shape)) for k in sorted(canon) if k in expected
           and tuple(canon[k].shape) != tuple(expected[k])]
    if bad:
        k, shape = bad[0]
        inferred = _inferred_size({k: tuple(v.shape) for k, v in canon.items()}, dims)
        raise ValueError(f"AHN checkpoint {src} does not match this model{inferred}: {len(bad)} "
                         f"tensor(s) of another shape, e.g. {k}: checkpoint shape {list(shape)} != model shape "
                         f"{list(expected[k])} (this model: hidden_size={dims['hidden_size']}, "
                         f"num_attention_heads={dims['num_attention_heads']}, head_dim={dims['head_dim']})")

    missing = [k for k in expected if k not in canon]
    unexpected = [k for k in canon if k not in expected]
    if strict and (missing or unexpected):
        msg = []
        if missing:
            msg.append(f"missing keys ({len(missing)}): {_fmt_keys(missing)}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
        what = f"kind={kind!r}" if kind else "kind"
        raise KeyError(f"AHN weights {src} do not match the patched model (check {what} and fa_layer_ids "
                       f"{list(fa_ids)}): " + "; ".join(msg))

    not_float = [k for k in sorted(canon) if k in expected and not canon[k].is_floating_point()]
    if not_float:
        k = not_float[0]
        raise ValueError(f"AHN weights {src}: {k} has dtype {canon[k].dtype}, expected a floating-point dtype "
                         f"({len(not_float)} such tensor(s); integer values would be loaded truncated)")
    return {k: canon[k] for k in expected if k in canon}


@torch.no_grad()
def _copy_into(params: Mapping[str, nn.Parameter], tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy checked tensors into the parameters; all conversions happen before the first copy."""
    staged = {k: t.to(device=params[k].device, dtype=params[k].dtype) for k, t in tensors.items()}
    for k, t in staged.items():
        params[k].copy_(t)


@torch.no_grad()
def load_ahn_weights(model: nn.Module, weights, strict: bool = True) -> None:
    """Load AHN-only weights (dir / file / state dict) into a patched model; strict by default.

    Everything is checked before the first parameter changes (see :func:`patch_qwen`); tensors of
    the model's ``fa_layer_ids`` layers are ignored with a warning."""
    params = _ahn_params(model)
    if not params:
        raise ValueError("model has no AHN modules: call ahn_ops.patch_qwen first")
    base = _base_model(model)
    info = getattr(base, "_ahn_info", None) or {}
    tensors, cfg, src = _read_weights(weights)
    dims = _model_dims(base.config)
    _check_config_matches(cfg, dims, src)
    expected = {k: tuple(p.shape) for k, p in params.items()}
    _copy_into(params, _check_ahn_tensors(tensors, expected, dims, info.get("fa_layer_ids", ()), src, strict=strict,
                                          kind=info.get("kind")))


def ahn_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The AHN parameters of a patched model under their checkpoint names (detached, on CPU)."""
    return {k: p.detach().cpu().contiguous() for k, p in _ahn_params(model).items()}


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Union[str, os.PathLike]) -> None:
    """``safetensors.torch.save_file`` through a plain ``open()``: the file gets the umask's mode like
    every other file written (``save_file`` creates it 0600)."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    with open(path, "wb") as f:
        f.write(data)


def save_ahn_weights(model: nn.Module, out_dir: Union[str, os.PathLike],
                     tensors: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Write an AHN-only checkpoint: ``model.safetensors`` (AHN keys) + ``config.json`` (model config + AHN fields).

    ``tensors``: the AHN weights to write instead of the model's own (a sharded model's, gathered whole)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = ahn_state_dict(model) if tensors is None else {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_safetensors(sd, out / "model.safetensors")
    cfg = getattr(model, "config", _base_model(model).config).to_dict()
    cfg.update(ahn_config_fields(model))
    with open(out / "config.json", "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def ahn_config_fields(model: nn.Module) -> Dict:
    info = _base_model(model)._ahn_info
    return {
        "_layer_implementation": "Qwen2MemDecoderLayer",
        "_ahn_implementation": KIND_TO_IMPL[info["kind"]],
        "sliding_window": info["window"],
        "num_attn_sinks": info["sinks"],
        "fa_layer_ids": ",".join(str(i) for i in info["fa_layer_ids"]),
        "use_q_proj": False,
        "use_ahn_router": False,
    }


# --------------------------------------------------------------------------------------
# merged checkpoints
# --------------------------------------------------------------------------------------
def from_pretrained(path: Union[str, os.PathLike], *, kind: Optional[str] = None, window: Optional[int] = None,
                    sinks: Optional[int] = None, prefill_chunk_size: Optional[int] = None, backend: str = "auto",
                    **hf_kwargs) -> nn.Module:
    """Load a merged AHN checkpoint (base + AHN weights, ``config.json`` with ``_ahn_implementation``).

    Args:
        path: directory written by ``ahn-merge`` (or any Qwen2 checkpoint with the AHN fields).
        kind, window, sinks: override the config (e.g. a longer window at inference).
        prefill_chunk_size, backend: as in :func:`patch_qwen`.
        **hf_kwargs: passed to ``Qwen2ForCausalLM.from_pretrained`` (``dtype``, ``device_map``, ...).

    Returns:
        a patched ``Qwen2ForCausalLM`` in eval mode.

    Example:
        >>> model = ahn_ops.from_pretrained("Qwen2.5-3B-AHN-GDN", dtype=torch.bfloat16, device_map="cuda")
        >>> model.generate(input_ids, max_new_tokens=32)
    """
    from transformers import Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    p = Path(path)
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{p}/config.json not found")
    ahn_cfg = read_ahn_config(p)
    if "kind" not in ahn_cfg:
        raise ValueError(f"{p}/config.json has no _ahn_implementation: not a merged AHN checkpoint "
                         "(for a base model plus AHN-only weights use ahn_ops.patch_qwen(model, weights=...))")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the .ahn.fn. keys are "unexpected" to Qwen2ForCausalLM: loaded below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = Qwen2ForCausalLM.from_pretrained(str(p), **hf_kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    patch_qwen(model, kind=kind or ahn_cfg["kind"], window=window or ahn_cfg.get("window"),
               sinks=sinks if sinks is not None else ahn_cfg.get("sinks", 0), fa_layer_ids=ahn_cfg.get("fa_layer_ids"),
               weights=read_ahn_tensors(p, only_ahn=True), prefill_chunk_size=prefill_chunk_size, backend=backend)
    model.eval()
    return model
