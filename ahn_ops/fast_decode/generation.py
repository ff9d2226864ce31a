"""``ahn_ops.generate``: an HF-compatible prefill, then :class:`~.step.StaticDecoder`'s static step per token
(a CUDA graph on the GPU); and :func:`prefill`, the prompt into an :class:`~ahn_ops.AHNModelCache`.

Hugging Face ``generate()`` runs a few milliseconds of Python per token (input preparation, mask building,
logits processors, cache bookkeeping). An AHN model's cache has a constant size, so a whole decode step,
from the token ids to the next token, has fixed shapes and fixed addresses: the step is captured once in a
``torch.cuda.CUDAGraph`` and replayed per token; the host checks "all finished" every ``eos_check_every``
steps only. Without CUDA (or with ``use_cuda_graph=False``) the same step runs eagerly: that is what the CPU
tests compare with ``model.generate()``.
"""

from __future__ import annotations

import time
from typing import List, Optional, Sequence, Union

import torch

from .model_parts import unwrap
from .plan import DecodePlan
from .step import StaticDecoder

__all__ = ["generate", "prefill"]


def _eos_list(model, eos_token_id) -> List[int]:
    if eos_token_id is None:
        gc = getattr(model, "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, torch.Tensor):
        return [int(t) for t in eos_token_id.flatten().tolist()]
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(t) for t in eos_token_id]


def _position_ids(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """As transformers' generate(): cumulative count of real tokens - 1, 0 on padding."""
    if attention_mask is None:
        return None
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def _continuation(cache, attention_mask: Optional[torch.Tensor], T: int, device):
    """``(mask, position_ids, past)`` of ``T`` new columns fed on top of what ``cache`` holds.

    ``past``: columns the cache holds (padding included). ``mask``: the 2-D mask over all ``past + T`` columns
    (None when nothing is padded) and ``position_ids`` ``[B, T]``: each sequence continues from its own count
    of real tokens (the AHN ``pos``). The cached columns' padding is taken as left padding (the first
    ``past - pos`` columns of each sequence), which is what a prefill of a left-padded batch leaves.
    """
    past = cache.get_seq_length() if cache.ahn is not None else 0
    if past == 0:
        return attention_mask, _position_ids(attention_mask), 0
    if cache.ahn_index:
        pos0 = cache.seq_lens().to(device)                                 # [B] real tokens so far
    else:  # no AHN layer counts tokens (every layer full attention): take the columns as tokens
        pos0 = torch.full((cache.ahn.batch_size,), past, dtype=torch.long, device=device)
    if attention_mask is None and not bool((pos0 != past).any()):
        return None, pos0[:, None] + torch.arange(T, device=device), past
    new = attention_mask.long() if attention_mask is not None else torch.ones(pos0.shape[0], T, dtype=torch.long,
                                                                            device=device)
    cols = torch.arange(past, device=device)
    past_mask = (cols[None, :] >= (past - pos0)[:, None]).long()
    position_ids = (pos0[:, None] + new.cumsum(-1) - 1).masked_fill(new == 0, 0)
    return torch.cat([past_mask, new], 1), position_ids, past


def _prefill(model, input_ids, attention_mask, chunk_size, cache):
    """:func:`prefill`, also returning the mask over all columns and the columns cached before."""
    from ..models import AHNModelCache, cache_kwargs

    if cache is None:
        cache = AHNModelCache.from_model(model)
    B, T = input_ids.shape
    mask, position_ids, past = _continuation(cache, attention_mask, T, input_ids.device)
    step = chunk_size or T
    out = None
    for s in range(0, T, step):
        e = min(s + step, T)
        kw = {}
        if mask is not None:
            kw["attention_mask"] = mask[:, :past + e]
        if position_ids is not None:
            kw["position_ids"] = position_ids[:, s:e]
        kw.update(cache_kwargs(cache))
        out = model(input_ids[:, s:e], use_cache=True, logits_to_keep=1, **kw)
    return out.logits[:, -1].float(), cache, mask, past


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
            chunk_size: Optional[int] = None, cache=None):
    """Run the prompt through the patched model's normal forward into an :class:`~ahn_ops.AHNModelCache`.

    Args:
        model: a Qwen2ForCausalLM patched by :func:`ahn_ops.patch_qwen`.
        input_ids: ``[B, T]`` int64. attention_mask: optional ``[B, T]`` (1 = token, 0 = left padding).
        chunk_size: prefill in chunks of this many tokens (constant activation memory).
        cache: an :class:`~ahn_ops.AHNModelCache` to fill (default: a new one). One that already holds tokens
            is continued in place: ``input_ids`` are the new tokens only, their positions continue from each
            sequence's count of real tokens, and ``attention_mask`` covers the new tokens only.
    Returns:
        ``(logits [B, V] float32 of the last column, cache)``.
    """
    logits, cache, _, _ = _prefill(model, input_ids, attention_mask, chunk_size, cache)
    return logits, cache


def _fork_given_cache(model, cache, B: int):
    """The cache ``generate`` continues from: checked against the model and the batch, then forked so that the
    caller's cache stays as it was."""
    from ..models import AHNModelCache

    if not isinstance(cache, AHNModelCache):
        raise TypeError(f"cache must be an ahn_ops.AHNModelCache (AHNModelCache.from_model / .load), got "
                        f"{type(cache).__name__}")
    cache.check_model(model, "cache")                       # layout, dtype, device, weights fingerprints
    if cache.ahn is None:
        return cache.clone()
    if cache.ahn.batch_size != B:
        raise ValueError(f"cache holds {cache.ahn.batch_size} sequence(s) but input_ids has {B} rows: fork it first "
                         f"(cache.expand({B}) for a batch-1 cache, or cache.select(indices))")
    # the AHN storage is written in place by the prefill and the decode steps: copy it. The full-attention K/V
    # need no copy: DynamicLayer.update concatenates into new tensors and the decoder copies them into its own
    # static buffers, so the caller's K/V are never written.
    return cache._fork(cache.ahn.clone(), lambda t: t)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask: Optional[torch.Tensor] = None,
             eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
             do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, prefill_chunk_size: Optional[int] = None,
             use_cuda_graph: Optional[bool] = None, generator: Optional[torch.Generator] = None,
             eos_check_every: int = 16, stats: Optional[dict] = None, plan: Optional[DecodePlan] = None,
             cache=None) -> torch.LongTensor:
    """Generate with an AHN model: HF-compatible prefill, then a static decode step (a CUDA graph on GPU).

    Greedy decoding returns the same tokens as ``model.generate(input_ids, do_sample=False, ...)``
    with default logits processing (no repetition penalty etc.).

    Args:
        model: a ``Qwen2ForCausalLM`` patched by :func:`ahn_ops.patch_qwen` or loaded by
            :func:`ahn_ops.from_pretrained`, in eval mode.
        input_ids: ``[B, T]`` int64 prompt (left-padded when ``attention_mask`` has zeros).
        max_new_tokens: tokens to generate per sequence (``>= 1``).
        attention_mask: optional ``[B, T]``, 1 for tokens and 0 for left padding (right padding is
            rejected: it would put padding between the prompt and the new tokens).
        eos_token_id: int or list; default ``model.generation_config.eos_token_id``. A sequence
            that emitted one emits ``pad_token_id`` after it; generation stops when all have.
        pad_token_id: default ``generation_config.pad_token_id``, else the first EOS id, else 0.
        do_sample, temperature, top_k, top_p: sampling (``top_k=None`` / ``top_p=None``: off; unlike
            HF there is no default ``top_k=50``). generator: a ``torch.Generator`` on the model's device.
        prefill_chunk_size: prefill in chunks of this many tokens (default
            ``model.generation_config.prefill_chunk_size`` if set).
        use_cuda_graph: None = on when the model is on CUDA and every AHN layer runs the fused
            ``torch.ops.ahn.decode_step``; True = required (error if impossible); False = eager steps.
        eos_check_every: steps between the host's "all finished?" checks (each one syncs).
        plan: what the decode step fuses, an :class:`ahn_ops.DecodePlan` (checked against the model and the
            batch: ValueError naming the field it cannot run); None = ``DecodePlan.default(model, B)``: on a
            GPU the fused glue, and on Hopper the fused projections (at batch 1-2, and 3-16 in bf16/fp16),
            as measured fastest there (see :class:`~ahn_ops.DecodePlan`). No plan changes a token beyond fp32
            summation order.
        stats: optional dict, filled with ``prefill_s``, ``decode_s`` (graph capture included),
            ``new_tokens``, ``cuda_graph``, ``plan`` (the :class:`~ahn_ops.DecodePlan` that ran) and
            ``cache_nbytes`` (AHN cache + static full-attention K/V) (the device is synchronised at the
            boundaries).
        cache: an :class:`~ahn_ops.AHNModelCache` holding a prefix (e.g. ``AHNModelCache.load(path, model)``,
            or a fork of one by ``expand`` / ``select``) to continue from: ``input_ids`` (and
            ``attention_mask``) are then the NEW tokens only, prefilled (chunked as above) on top of the
            cache with positions continuing from each sequence's own; then decoding as usual. Its batch size
            must be ``B``, and it must belong to this model (layout, dtype, device, weights: ValueError
            otherwise). The given cache is not modified (generation runs on a fork of it): ask many prompts
            against one prefilled document by passing the same cache each time.

    Returns:
        ``[B, T + n]`` int64: the prompt followed by ``n <= max_new_tokens`` new tokens, as
        ``model.generate`` returns it (with ``cache``: the new prompt tokens, not the cached prefix).

    Example (a tiny random model; a real one: ``ahn_ops.from_pretrained(path, dtype=torch.bfloat16).cuda()``):
        >>> import torch, ahn_ops
        >>> from transformers import Qwen2Config, Qwen2ForCausalLM
        >>> cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...                   num_attention_heads=4, num_key_value_heads=2)
        >>> model = ahn_ops.patch_qwen(Qwen2ForCausalLM(cfg).eval(), "gdn", window=16, sinks=4)
        >>> ids = torch.randint(0, 256, (2, 40))
        >>> out = ahn_ops.generate(model, ids, max_new_tokens=8)     # CUDA graph when on a GPU
        >>> torch.equal(out, model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0))
        True
    """
    model, base, info = unwrap(model)
    if model.training:
        raise ValueError("ahn_ops.generate needs the model in eval mode (model.eval())")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be [B, T] int64, got {list(input_ids.shape)} {input_ids.dtype}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    device = base.embed_tokens.weight.device
    input_ids = input_ids.to(device=device, dtype=torch.int64)
    B, T = input_ids.shape
    if T < 1:
        raise ValueError("input_ids must hold at least one token per sequence")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have shape {list(input_ids.shape)}, got "
                             f"{list(attention_mask.shape)}")
        attention_mask = attention_mask.to(device)
        m = attention_mask.bool()
        if bool(m.all()):
            attention_mask = None  # as generate(): no padding, no mask
        else:
            if not bool(m[:, -1].all()) or bool((m[:, 1:].int() - m[:, :-1].int()).lt(0).any()):
                raise ValueError("attention_mask must describe left padding (0s, then 1s, last column all 1); "
                                 "right-padded prompts are not supported")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, the model on {device}")
    if use_cuda_graph and device.type != "cuda":
        raise ValueError(f"use_cuda_graph=True needs the model on CUDA (it is on {device})")
    plan = DecodePlan.resolve(plan, model, B)    # before the prefill: a plan this batch cannot run fails fast
    if cache is not None:
        cache = _fork_given_cache(model, cache, B)

    gc = getattr(model, "generation_config", None)
    eos = _eos_list(model, eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(gc, "pad_token_id", None) if gc is not None else None
        if isinstance(pad_token_id, (list, tuple)):
            pad_token_id = pad_token_id[0] if pad_token_id else None
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
    if prefill_chunk_size is None and gc is not None:
        prefill_chunk_size = getattr(gc, "prefill_chunk_size", None)

    def now():
        if stats is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    t0 = now()
    first_logits, cache, mask, past = _prefill(model, input_ids, attention_mask, prefill_chunk_size, cache)
    t1 = now()
    dec = StaticDecoder(model, cache, mask, past + T, max_new_tokens, eos, pad_token_id, do_sample,
                        temperature, top_k, top_p, generator, plan=plan)
    if use_cuda_graph is None:
        use_cuda_graph = device.type == "cuda" and dec.all_fused
    elif use_cuda_graph and not dec.all_fused:
        raise ValueError("use_cuda_graph=True, but some AHN layer has no fused decode_step (backend='reference', "
                         "head_dim not 64/128, or the CUDA kernels are not built)")

    out = torch.empty(B, max_new_tokens, dtype=torch.int64, device=device)
    dec.start(first_logits)
    out[:, 0] = dec.tok
    n = 1
    check = max(int(eos_check_every), 1)
    all_done = dec.eos is not None and not bool(dec.unfinished.any())
    warmup = 1  # eager steps before capture: kernel attributes, cuBLAS handles, lazy inits
    while n < max_new_tokens and not all_done:
        if use_cuda_graph and dec.graph is None and n > warmup:
            dec.capture()
        if use_cuda_graph and dec.graph is None:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                dec.eager_step()
            torch.cuda.current_stream(device).wait_stream(side)
        else:
            dec.step()
        out[:, n] = dec.tok
        n += 1
        if dec.eos is not None and n % check == 0:
            all_done = not bool(dec.unfinished.any())

    new = out[:, :n]
    if dec.eos is not None:
        # stop where the last sequence finished (later columns only hold padding)
        hit = (new[:, :, None] == dec.eos).any(-1)
        done = hit.any(-1)
        if bool(done.all()):
            n = int(hit.int().argmax(-1).max()) + 1
            new = new[:, :n]
    if stats is not None:
        fa_bytes = sum(t.numel() * t.element_size() for kv in dec.fa_kv.values() for t in kv)
        stats.update(prefill_s=t1 - t0, decode_s=now() - t1, new_tokens=n, cuda_graph=dec.graph is not None,
                     plan=dec.plan, cache_nbytes=cache.ahn.nbytes + fa_bytes)
    return torch.cat([input_ids, new], 1)
