"""Fast decoding for AHN models: ``ahn_ops.generate``, one static decode step, CUDA-graph replay.

Hugging Face ``generate()`` runs a few milliseconds of Python per token (input preparation,
mask building, logits processors, cache bookkeeping). An AHN model's cache has a constant size,
so a whole decode step, from the token ids to the next token, has fixed shapes and fixed
addresses: :class:`StaticDecoder` writes it as one function over static buffers, and on CUDA it
is captured once in a ``torch.cuda.CUDAGraph`` and replayed per token.

How the step stays capturable (no host synchronisation, no shape change, no allocation outside
the caching allocator):

* RoPE positions come from a device-side ``[B]`` int64 buffer (each sequence's count of real
  tokens, i.e. the AHN cache ``pos``), turned into cos/sin on the device by the model's own
  ``rotary_emb`` (``inv_freq`` times position, as Qwen2 does);
* every AHN layer is a single ``torch.ops.ahn.decode_step`` on the layer's
  :class:`~ahn_ops.AHNLayerCache` (it reads and advances ``pos`` on the device); the input
  checks of :func:`ahn_ops.ahn_decode` run once, on the first (eager) step;
* layers in ``fa_layer_ids`` (full attention) get a preallocated static K/V buffer of
  ``prompt + max_new_tokens`` columns, filled from the prefill's ``DynamicLayer``; a step writes
  its K/V at a device-side column counter (``index_copy_``) and attends all columns under a mask
  ``column <= counter & not padding`` (the graph keeps one shape; masked columns cost bandwidth);
* the next token (argmax, or sampling by the exponential-race trick
  ``argmax(p / Exp(1))`` with an optional device generator: ``torch.multinomial`` syncs to
  validate its input), the EOS bookkeeping (finished sequences emit ``pad_token_id``, as HF
  does) and the counters are updated in place; the host checks "all finished" every
  ``eos_check_every`` steps only.

Without CUDA (or with ``use_cuda_graph=False``) the same step runs eagerly: that is what the CPU
tests compare with ``model.generate()``.
"""

from __future__ import annotations

import os
import time
from typing import List, Optional, Sequence, Union

import torch

__all__ = ["generate", "StaticDecoder", "prefill"]


# --------------------------------------------------------------------------------------
# model plumbing
# --------------------------------------------------------------------------------------
def _unwrap(model):
    """(causal LM, Qwen2Model, info) of a model patched by ahn_ops.patch_qwen."""
    from .models.qwen2 import _base_model

    base = _base_model(model)
    info = getattr(base, "_ahn_info", None)
    if info is None:
        raise ValueError("model is not an AHN model: call ahn_ops.patch_qwen(model, ...) or ahn_ops.from_pretrained")
    if getattr(model, "lm_head", None) is None:
        raise TypeError(f"ahn_ops.generate needs a causal LM with an lm_head (Qwen2ForCausalLM), got "
                        f"{type(model).__name__}")
    return model, base, info


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


# rotary types whose cos/sin depend on the position only (not on the sequence length reached so far)
_STATIC_ROPE = ("default", "linear", "yarn", "llama3")


def _glue_supported(model, base, dtype):
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


def _linear_supported(base, dtype) -> bool:
    """Every o_proj / q_proj / MLP projection a plain ``nn.Linear`` of ``dtype`` (what decode_linear reads)."""
    for l in base.layers:
        lins = [l.self_attn.o_proj, l.self_attn.q_proj, l.mlp.gate_proj, l.mlp.up_proj, l.mlp.down_proj]
        if any(type(m) is not torch.nn.Linear or m.weight.dtype != dtype or not m.weight.is_contiguous()
               for m in lins):
            return False
    return True


def _stack_kv_gates(attn, fn, dtype):
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
    from .models import AHNModelCache, cache_kwargs

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
    from .models import AHNModelCache

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


# --------------------------------------------------------------------------------------
# the static decode step
# --------------------------------------------------------------------------------------
class StaticDecoder:
    """One decode step of a patched Qwen2 model over static buffers, eager or as a CUDA graph.

    Built after a prefill (see :func:`prefill`); each :meth:`step` consumes ``self.tok`` (``[B]``
    int64, the last emitted token of each sequence) at each sequence's own position and writes the
    next token back into ``self.tok``, updating every cache in place. ``capture()`` records the
    step in a CUDA graph; ``step()`` then replays it.

    Args:
        model: the patched Qwen2ForCausalLM.
        cache: the :class:`~ahn_ops.AHNModelCache` filled by the prefill (the first token is
            chosen from the prefill's last logits by :meth:`start`).
        attention_mask: the prompt's ``[B, T]`` mask, or None (no padding).
        prompt_len: ``T`` (columns fed by the prefill).
        max_new_tokens: tokens to emit; full-attention layers get ``T + max_new_tokens`` columns (and the
            RoPE table as many positions); at most ``max_new_tokens`` steps run (a ValueError after).
        eos_token_ids, pad_token_id: finished sequences emit ``pad_token_id``.
        do_sample, temperature, top_k, top_p, generator: token choice (greedy by default).
        fuse_glue: fused Triton glue (see :func:`generate`); None = on for CUDA models it fits. With it the
            step also starts from a RoPE table (cos/sin of every reachable position, computed once by the
            model's rotary module when its type depends on the position only) and, when greedy, ends with
            :func:`ahn_ops.ops.model_glue.greedy_next` (argmax of the logits in their own dtype, the
            end-of-sequence rule and the position step in two launches): ~11 fewer kernels per token, the
            same tokens.
        fuse_linear: projections with their neighbours fused (see :func:`generate`); None = on with
            ``fuse_glue`` on Hopper GPUs at ``B <= 2``, and at ``B <= 16`` in bf16/fp16 (True: any GPU,
            batches ``decode_linear.supports``).
        fuse_gate_up: with ``fuse_linear``, whether the MLP's RMSNorm + gate/up + SiLU*up is one fused
            projection too; None = at ``B <= 2`` only (from batch 3 on the fused gate/up streams its
            weights slower than cuBLAS, so there it runs as RMSNorm, two cuBLAS products and SiLU*up,
            while q/k/v/gates, o_proj and down_proj stay fused).
        overlap: with ``fuse_linear`` on sm_90+, each AHN layer's decode op starts while the q/k/v/gates
            projection before it runs (programmatic dependent launch: it streams its first cache tiles and
            the state, and reads q, k, v once the projection's writes are visible); None = on from batch
            3 (1-2% faster at B = 4-8 on an H200; at B <= 2, behind the persistent projections, 2-3% slower at
            B = 2 and equal at B = 1), False = off. Changes no result.
    """

    def __init__(self, model, cache, attention_mask: Optional[torch.Tensor], prompt_len: int,
                 max_new_tokens: int, eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
                 do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                 fuse_glue: Optional[bool] = None, fuse_linear: Optional[bool] = None,
                 fuse_gate_up: Optional[bool] = None, overlap: Optional[bool] = None):
        from .ops.ahn_attention.interface import _has_op_kernel

        self.model, self.base, self.info = _unwrap(model)
        self.cache = cache
        emb = self.base.embed_tokens.weight
        self.device, self.dtype = emb.device, emb.dtype
        ahn = cache.ahn
        if ahn is None:
            raise ValueError("the cache is empty: run the prefill first")
        B = ahn.batch_size
        self.B = B
        self.do_sample, self.temperature, self.top_k, self.top_p = do_sample, temperature, top_k, top_p
        self.generator = generator
        self.pad_token_id = int(pad_token_id)
        dev = self.device
        self.eos = torch.tensor(list(eos_token_ids), dtype=torch.int64, device=dev) if eos_token_ids else None

        # ---- static state of the step (updated in place, never reallocated)
        self.tok = torch.zeros(B, dtype=torch.int64, device=dev)
        if attention_mask is not None:
            self.pos = attention_mask.long().sum(-1).to(dev)       # real tokens so far = RoPE position
        else:
            self.pos = torch.full((B,), prompt_len, dtype=torch.int64, device=dev)
        self.unfinished = torch.ones(B, dtype=torch.bool, device=dev)

        # ---- full-attention layers: K/V preallocated for every column the run can reach
        self.fa_ids = list(self.info["fa_layer_ids"])
        self.max_cols = prompt_len + max_new_tokens
        self.fa_kv = {}
        if self.fa_ids:
            self.col = torch.full((1,), prompt_len, dtype=torch.int64, device=dev)
            self.col_range = torch.arange(self.max_cols, device=dev)
            self.col_valid = torch.ones(B, self.max_cols, dtype=torch.bool, device=dev)
            if attention_mask is not None:
                self.col_valid[:, :prompt_len] = attention_mask.to(dev, torch.bool)
            for i in self.fa_ids:
                layer = cache.layers[i]
                keys, values = layer.keys, layer.values
                if keys is None or keys.shape[-2] != prompt_len:
                    raise ValueError(f"full-attention layer {i}: expected {prompt_len} cached columns, got "
                                     f"{None if keys is None else keys.shape[-2]}")
                kb = keys.new_zeros(B, keys.shape[1], self.max_cols, keys.shape[3])
                vb = values.new_zeros(B, values.shape[1], self.max_cols, values.shape[3])
                kb[:, :, :prompt_len] = keys
                vb[:, :, :prompt_len] = values
                self.fa_kv[i] = (kb, vb)

        # ---- per AHN layer: its cache, its parameters, and the decode call chosen once
        key = "CUDA" if self.device.type == "cuda" else "CPU"
        self.all_fused = True
        self.ahn_layers = {}
        for i in self.info["ahn_layer_ids"]:
            attn = self.base.layers[i].self_attn
            cfg = attn._ahn_cfg
            D = attn.head_dim
            use_op = (cfg["backend"] != "reference" and self.dtype != torch.float64
                      and _has_op_kernel("decode_step", key)
                      and not (self.device.type == "cuda" and D not in (64, 128)))
            self.all_fused &= use_op
            self.ahn_layers[i] = (cache.ahn[cache.ahn_index[i]], attn._ahn_fn, cfg["backend"], use_op)
        self._checked = False  # the first step goes through ahn_decode (all input checks) once
        self.graph = None

        # ---- fused glue (Triton): residual add + RMSNorm, RoPE, SiLU * up, and per AHN layer one
        # projection for k, v and the gates (stacked weights, ~2 MB per layer at the 3B shape)
        ok = _glue_supported(model, self.base, self.dtype)
        if fuse_glue is None:
            fuse_glue = self.device.type == "cuda" and ok is True
        elif fuse_glue:
            if ok is not True:
                raise ValueError(f"fuse_glue=True: {ok}")
            if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError("fuse_glue=True needs the model on CUDA (or TRITON_INTERPRET=1 on the CPU)")
        self.fuse_glue = bool(fuse_glue)
        # ---- step start and end with the fused glue: RoPE's cos/sin of every position the run can reach,
        # computed once by the model's own rotary module (one gather per step instead of ~9 small kernels),
        # and the greedy choice in two launches (no fp32 copy of the logits, no separate bookkeeping)
        self.max_steps, self._n_steps = int(max_new_tokens), 0
        self.rope_table = None
        rot = getattr(self.base, "rotary_emb", None)
        if self.fuse_glue and rot is not None and getattr(rot, "rope_type", "default") in _STATIC_ROPE:
            P = prompt_len + max_new_tokens
            c, s_ = rot(emb[:1, None], torch.arange(P, device=dev)[None])
            self.rope_table = torch.stack([c[0], s_[0]], 1).to(self.dtype).contiguous()   # [P, 2, D]
        self.greedy_fused = self.fuse_glue and not do_sample
        self._argmax_ws = None
        self.kvg = {}
        if self.fuse_glue:
            for i, (_, fn, _, use_op) in self.ahn_layers.items():
                st = _stack_kv_gates(self.base.layers[i].self_attn, fn, self.dtype) if use_op else None
                if st is not None:
                    self.kvg[i] = st
        # ---- fused projections (batch <= 4): RMSNorm / RoPE / SiLU*up / residual inside the GEMVs
        from .ops import decode_linear as dl

        head_dim = self.base.layers[0].self_attn.head_dim
        lin_ok = self.fuse_glue and dl.supports(B, self.dtype, head_dim) and _linear_supported(self.base, self.dtype)
        if fuse_linear is None:  # H200, per layer vs cuBLAS + glue: 1.37x at B=1, 1.16x at B=2; from
            # B=3 on (tensor cores) only with the MLP's gate/up left to cuBLAS (fuse_gate_up below), whole 3B-shape
            # step 4.17 / 5.48 / 7.90 vs 4.37 / 5.65 / 8.09 ms/token at B = 4 / 8 / 16; tile configs
            # tuned there: auto-on on Hopper (sm_90) only, and from B=3 on in bf16/fp16 only (measured there)
            fuse_linear = (lin_ok and self.device.type == "cuda"
                           and (B <= 2 or self.dtype in (torch.bfloat16, torch.float16))
                           and torch.cuda.get_device_capability(self.device)[0] == 9)
        elif fuse_linear and not lin_ok:
            raise ValueError(f"fuse_linear=True needs fuse_glue, batch <= {dl.MAX_BATCH} in bf16/fp16 or <= "
                             f"{dl.MAX_BROADCAST_BATCH} in float32 (got {B} in {self.dtype}) and plain "
                             f"nn.Linear projections of {self.dtype}")
        self.fuse_linear = bool(fuse_linear)
        if fuse_gate_up and not self.fuse_linear:
            raise ValueError("fuse_gate_up=True needs fuse_linear")
        self.fuse_gate_up = self.fuse_linear and (B <= 2 if fuse_gate_up is None else bool(fuse_gate_up))
        if overlap and not (self.fuse_linear and dl.can_trigger(self.device)):
            raise ValueError("overlap=True needs fuse_linear on an sm_90+ GPU")
        # H200, 3B shape, T=32k, ms/token off / on (two runs): B=1 2.70 / 2.75, B=2 3.41 / 3.39,
        # B=4 4.18 / 4.10, B=8 5.48 / 5.41: on from batch 2 (at batch 1 the early blocks, resident and
        # waiting, slow the projection down more than their early cache tiles gain)
        # (with the persistent chained projections of B <= 2: B=2 2.82 off / 2.88-2.91 on, B=1 equal):
        # on from batch 3, where the projections are one-block-per-program tensor-core kernels
        auto = self.fuse_linear and dl.can_trigger(self.device) and B >= 3
        self.overlap = auto if overlap is None else bool(overlap)

    # ------------------------------------------------------------------ token choice
    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` float32 -> ``[B]`` int64, device-side only."""
        if not self.do_sample:
            return logits.argmax(-1)
        logits = logits / self.temperature
        if self.top_k is not None and 0 < self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:  # as transformers' TopPLogitsWarper
            srt, idx = torch.sort(logits, descending=False, dim=-1)
            drop = srt.softmax(-1).cumsum(-1) <= 1 - self.top_p
            drop[:, -1] = False  # keep at least the most likely token
            logits = logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
        probs = logits.softmax(-1)
        # argmax(p / E), E ~ Exp(1), draws from p: no host sync (torch.multinomial validates p with .item())
        race = torch.empty_like(probs).exponential_(1.0, generator=self.generator)
        return (probs / race).argmax(-1)

    def _emit(self, logits: torch.Tensor, step: bool = False) -> None:
        """The next tokens from ``logits`` into ``tok`` (``step``: the end of a step, which also advances
        ``pos``)."""
        if self.greedy_fused:
            from .ops import model_glue as glue

            has_eos = self.eos is not None
            self._argmax_ws = glue.greedy_next(logits, self.tok, self.unfinished if has_eos else None, self.eos,
                                               self.pad_token_id, self.pos if step else None, self._argmax_ws)
            return
        nxt = self._choose(logits)
        if self.eos is not None:
            nxt = torch.where(self.unfinished, nxt, self.pad_token_id)
            self.unfinished &= ~(nxt[:, None] == self.eos).any(-1)
        self.tok.copy_(nxt)
        if step:
            self.pos += 1

    def start(self, first_logits: torch.Tensor) -> None:
        """Choose the first token from the prefill's logits (eager)."""
        self._emit(first_logits)

    # ------------------------------------------------------------------ the model, one token
    def _ahn_attention(self, i, attn, x, cos, sin):
        from .models.qwen2 import _rope

        _, fn, _, use_op = self.ahn_layers[i]
        B, D = self.B, attn.head_dim
        q = attn.q_proj(x).view(B, 1, -1, D)
        k = attn.k_proj(x).view(B, 1, -1, D)
        v = attn.v_proj(x).view(B, 1, -1, D)
        q, k = _rope(q, k, cos, sin)
        a, b, z = fn.gates(x)
        dt = q.dtype
        a = None if a is None else a.to(dt)[:, 0]
        b = None if b is None else b.to(dt)[:, 0]
        z = z.to(dt)[:, 0]
        q, k, v = q.contiguous()[:, 0], k.contiguous()[:, 0], v.contiguous()[:, 0]
        return self._decode(i, q, k, v, a, b, z, use_op).reshape(B, 1, -1)

    def _decode(self, i, q, k, v, a, b, z, use_op=True, overlap=False):
        """The AHN decode of layer ``i`` (``[B, H, D]`` out): ``torch.ops.ahn.decode_step`` once the first step
        has gone through ``ahn_decode`` (which checks every input against the cache, and is the reference
        path when no kernel covers the call)."""
        from .ops.ahn_attention.interface import ahn_decode

        layer_cache, fn, backend, _ = self.ahn_layers[i]
        p = fn.op_params()
        args = (q, k, v, a, b, z, p["A_log"], p["dt_bias"], p["norm_weight"], p["o_weight"])
        if use_op and self._checked:
            return torch.ops.ahn.decode_step(*args, *layer_cache.tensors(), layer_cache.window,
                                             layer_cache.sinks, layer_cache.kind, overlap)
        return ahn_decode(*args, layer_cache, backend=backend)

    def _kvg_split(self, i, y):
        """``(k, v, a, b, z)`` views of the stacked k/v/gates projection output ``y`` of layer ``i``."""
        nk, oa, ob, oz = self.kvg[i][2]
        B, H, D = self.B, self.ahn_layers[i][1].num_heads, self.base.layers[i].self_attn.head_dim
        a = None if oa is None else y[:, oa:oa + H]
        b = None if ob is None else y[:, ob:ob + H]
        return y[:, :nk].view(B, -1, D), y[:, nk:2 * nk].view(B, -1, D), a, b, y[:, oz:oz + H]

    def _full_attention(self, i, attn, x, cos, sin, allowed):
        from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

        B, D = self.B, attn.head_dim
        q = attn.q_proj(x).view(B, 1, -1, D).transpose(1, 2)     # [B, H, 1, D]
        k = attn.k_proj(x).view(B, 1, -1, D).transpose(1, 2)     # [B, HKV, 1, D]
        v = attn.v_proj(x).view(B, 1, -1, D).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        kb, vb = self.fa_kv[i]
        kb.index_copy_(2, self.col, k)
        vb.index_copy_(2, self.col, v)
        HKV = kb.shape[1]
        qg = q.reshape(B, HKV, -1, D)  # the G query heads of a KV head as G queries: no repeat of K/V
        o = torch.nn.functional.scaled_dot_product_attention(qg, kb, vb, attn_mask=allowed, scale=attn.scaling)
        return o.reshape(B, -1, 1, D).transpose(1, 2).reshape(B, 1, -1)

    def _ahn_attention_glued(self, i, attn, x, cos, sin):
        from .ops import model_glue as glue

        weight, bias, (nk, _, _, _) = self.kvg[i]
        B, D = self.B, attn.head_dim
        x2 = x.view(B, -1)
        y = torch.nn.functional.linear(x2, weight, bias)              # [B, k | v | gates | pad]
        q, k = glue.rope_qk(attn.q_proj(x2), y[:, :nk], cos, sin, D)   # contiguous [B, H|HKV, D]
        _, v, a, b, z = self._kvg_split(i, y)
        return self._decode(i, q, k, v, a, b, z).reshape(B, 1, -1)

    def _step_inputs(self):
        """``(h [B, 1, hidden], cos, sin, allowed)`` of the step: the embedded tokens, RoPE at each
        sequence's position (on the device, from inv_freq) and the full-attention layers' column mask."""
        base = self.base
        h = base.embed_tokens(self.tok[:, None])
        if self.rope_table is not None:
            cs = self.rope_table.index_select(0, self.pos)               # [B, 2, D]
            cos, sin = cs[:, :1], cs[:, 1:]
        else:
            cos, sin = base.rotary_emb(h, self.pos[:, None])
        allowed = None
        if self.fa_ids:
            allowed = (self.col_valid & (self.col_range <= self.col))[:, None, None, :]
        return h, cos, sin, allowed

    def _step_end(self, x) -> torch.Tensor:
        """Logits ``[B, V]`` of the final-normed hidden ``x`` (``[B, hidden]`` or ``[B, 1, hidden]``): float32
        (in the model's dtype for the fused greedy choice); advances the full-attention column."""
        logits = self.model.lm_head(x.reshape(self.B, -1))
        if not self.greedy_fused:  # the fused greedy choice takes the logits in their own dtype
            logits = logits.float()
        if self.fa_ids:
            self.col += 1
        return logits

    def _forward_glued(self) -> torch.Tensor:
        """:meth:`_forward` with the fused glue: per layer 2 add+RMSNorm, 1 RoPE, 1 SiLU*up kernel and, on
        AHN layers, one k/v/gates projection instead of ~30 small kernels and 4 extra projections."""
        from .ops import model_glue as glue

        base = self.base
        layers = base.layers
        h, cos, sin, allowed = self._step_inputs()                   # h [B, 1, hidden]
        ln = layers[0].input_layernorm
        x, _ = glue.add_rms_norm(h, ln.weight, ln.variance_epsilon)
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            if i in self.kvg:
                o = self._ahn_attention_glued(i, attn, x, cos, sin)
            elif i in self.ahn_layers:
                o = self._ahn_attention(i, attn, x, cos, sin)
            else:
                o = self._full_attention(i, attn, x, cos, sin, allowed)
            ln = layer.post_attention_layernorm
            x, h = glue.add_rms_norm(attn.o_proj(o), ln.weight, ln.variance_epsilon, residual=h)
            mlp = layer.mlp
            m = mlp.down_proj(glue.silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))
            ln = layers[i + 1].input_layernorm if i + 1 < len(layers) else base.norm
            x, h = glue.add_rms_norm(m, ln.weight, ln.variance_epsilon, residual=h)
        return self._step_end(x)

    def _forward_linear(self) -> torch.Tensor:
        """:meth:`_forward_glued` with the projections fused too (batches ``decode_linear.supports``): per
        AHN layer RMSNorm + q + k/v/gates + RoPE, the decode op, o_proj + residual, RMSNorm + gate/up +
        SiLU*up, down_proj + residual: 6 launches instead of 12 (``ahn_ops/ops/decode_linear.py``); without
        ``fuse_gate_up`` the MLP's RMSNorm, gate/up (cuBLAS) and SiLU*up are the glued step's kernels."""
        from .ops import decode_linear as dl
        from .ops import model_glue as glue

        base = self.base
        layers = base.layers
        B = self.B
        h, cos, sin, allowed = self._step_inputs()
        h = h.view(B, -1)                                            # [B, hidden]
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            ln = layer.input_layernorm
            if i in self.kvg:
                weight, bias, (nk, _, _, _) = self.kvg[i]
                D, qp = attn.head_dim, attn.q_proj
                q, y = dl.norm_qkvg(h, ln.weight, ln.variance_epsilon, qp.weight, qp.bias, weight, bias, nk,
                                    cos, sin, D, trigger_next=self.overlap)
                k, v, a, b, z = self._kvg_split(i, y)
                o = self._decode(i, q.view(B, -1, D), k, v, a, b, z, overlap=self.overlap).reshape(B, -1)
            else:
                x, _ = glue.add_rms_norm(h, ln.weight, ln.variance_epsilon)
                x = x.view(B, 1, -1)
                if i in self.ahn_layers:
                    o = self._ahn_attention(i, attn, x, cos, sin)
                else:
                    o = self._full_attention(i, attn, x, cos, sin, allowed)
                o = o.reshape(B, -1).contiguous()
            h = dl.linear_residual(o, attn.o_proj.weight, attn.o_proj.bias, h)
            ln, mlp = layer.post_attention_layernorm, layer.mlp
            if self.fuse_gate_up:
                act = dl.norm_gate_up(h, ln.weight, ln.variance_epsilon, mlp.gate_proj.weight, mlp.up_proj.weight,
                                      mlp.gate_proj.bias, mlp.up_proj.bias)
            else:
                x, _ = glue.add_rms_norm(h, ln.weight, ln.variance_epsilon)
                act = glue.silu_mul(mlp.gate_proj(x), mlp.up_proj(x))
            h = dl.linear_residual(act, mlp.down_proj.weight, mlp.down_proj.bias, h, role="down_proj")
        x, _ = glue.add_rms_norm(h, base.norm.weight, base.norm.variance_epsilon)
        return self._step_end(x)

    def _forward(self) -> torch.Tensor:
        if self.fuse_linear:
            return self._forward_linear()
        if self.fuse_glue:
            return self._forward_glued()
        base = self.base
        h, cos, sin, allowed = self._step_inputs()                   # h [B, 1, hidden]
        for i, layer in enumerate(base.layers):
            attn = layer.self_attn
            residual = h
            x = layer.input_layernorm(h)
            if i in self.ahn_layers:
                o = self._ahn_attention(i, attn, x, cos, sin)
            else:
                o = self._full_attention(i, attn, x, cos, sin, allowed)
            h = residual + attn.o_proj(o)
            residual = h
            h = residual + layer.mlp(layer.post_attention_layernorm(h))
        return self._step_end(base.norm(h))

    def _count_step(self) -> None:
        if self._n_steps >= self.max_steps:
            raise ValueError(f"StaticDecoder: {self.max_steps} steps (max_new_tokens) already run; its static "
                             f"buffers cover no more positions")
        self._n_steps += 1

    @torch.no_grad()
    def eager_step(self) -> None:
        """One step, run eagerly."""
        self._count_step()
        self._emit(self._forward(), step=True)
        self._checked = True

    @torch.no_grad()
    def capture(self) -> None:
        """Capture one step in a CUDA graph; :meth:`step` then replays it.

        Call it after at least one :meth:`eager_step` (on a side stream: it initialises cuBLAS
        handles and kernel attributes, and checks the inputs of every AHN layer). Capture itself
        runs nothing: the cache does not move.
        """
        if self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        if not self.all_fused:
            raise ValueError("a CUDA graph needs torch.ops.ahn.decode_step for every AHN layer (backend != "
                             "'reference', head_dim 64 or 128, CUDA kernels built)")
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None and hasattr(graph, "register_generator_state"):
            graph.register_generator_state(self.generator)
        with torch.cuda.graph(graph):
            self._emit(self._forward(), step=True)
        self.graph = graph

    def step(self) -> None:
        """One decode step: graph replay when captured, else eager."""
        if self.graph is not None:
            self._count_step()
            self.graph.replay()
        else:
            self.eager_step()


# --------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask: Optional[torch.Tensor] = None,
             eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
             do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, prefill_chunk_size: Optional[int] = None,
             use_cuda_graph: Optional[bool] = None, generator: Optional[torch.Generator] = None,
             eos_check_every: int = 16, stats: Optional[dict] = None,
             fuse_glue: Optional[bool] = None, fuse_linear: Optional[bool] = None,
             fuse_gate_up: Optional[bool] = None, overlap: Optional[bool] = None, cache=None) -> torch.LongTensor:
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
        fuse_glue: None = on CUDA, the step's norms, residual adds, RoPE and SiLU*up run as fused
            Triton kernels and each AHN layer computes k, v and its gates in one projection
            (``ahn_ops/ops/model_glue.py``; same rounding steps as the modules, the RMSNorm's fp32
            sum order aside); False = the modules' own ops; True = required.
        fuse_linear: None = on with ``fuse_glue`` on Hopper (sm_90, where its tiles were tuned) at
            batch 1 or 2, and at batch 3-16 in bf16/fp16: each layer's projections run as skinny Triton
            GEMVs (tensor-core products from batch 3 on) with the RMSNorm, RoPE, SiLU*up and residual
            adds inside them, 6 launches per AHN layer instead of 12 (``ahn_ops/ops/decode_linear.py``;
            per layer 1.37x / 1.16x faster than cuBLAS + glue at batch 1 / 2 on an H200; from batch 3 on
            the MLP's gate/up stays on cuBLAS, see ``fuse_gate_up``: whole step 3-5% faster at batch
            4-16); False = cuBLAS projections; True = required (any GPU; batch <= 16 in bf16/fp16, <= 4
            in float32; needs ``fuse_glue``).
        fuse_gate_up: with ``fuse_linear``, the MLP's RMSNorm + gate/up + SiLU*up fused too; None = at
            batch <= 2 only (see :class:`StaticDecoder`).
        overlap: with ``fuse_linear`` on sm_90+, each AHN decode op starts while the projection before it
            runs (see :class:`StaticDecoder`); None = on from batch 3.
        stats: optional dict, filled with ``prefill_s``, ``decode_s`` (graph capture included),
            ``new_tokens``, ``cuda_graph`` and ``cache_nbytes`` (AHN cache + static full-attention
            K/V) (the device is synchronised at the boundaries).
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
    model, base, info = _unwrap(model)
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
                        temperature, top_k, top_p, generator, fuse_glue=fuse_glue,
                        fuse_linear=fuse_linear, fuse_gate_up=fuse_gate_up, overlap=overlap)
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
                     cache_nbytes=cache.ahn.nbytes + fa_bytes)
    return torch.cat([input_ids, new], 1)
