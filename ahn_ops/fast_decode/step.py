"""The static decode step: :class:`StaticDecoder`, one token of a patched Qwen2 model over static buffers,
eager or replayed as a CUDA graph.

How the step stays capturable (no host synchronisation, no shape change, no allocation outside the
caching allocator):

* RoPE positions come from a device-side ``[B]`` int64 buffer (each sequence's count of real tokens,
  i.e. the AHN cache ``pos``), turned into cos/sin on the device by the model's own ``rotary_emb``
  (``inv_freq`` times position, as Qwen2 does), or gathered from a table of every reachable position;
* every AHN layer is a single ``torch.ops.ahn.decode_step`` on the layer's
  :class:`~ahn_ops.AHNLayerCache` (it reads and advances ``pos`` on the device); the input checks of
  :func:`ahn_ops.ahn_decode` run once, on the first (eager) step;
* layers in ``fa_layer_ids`` (full attention) get a preallocated static K/V buffer of ``prompt +
  max_new_tokens`` columns, filled from the prefill's ``DynamicLayer``; a step writes its K/V at a
  device-side column counter (``index_copy_``) and attends all columns under a mask ``column <= counter &
  not padding`` (the graph keeps one shape; masked columns cost bandwidth);
* the next token (argmax, or sampling by the exponential-race trick ``argmax(p / Exp(1))`` with an
  optional device generator: ``torch.multinomial`` syncs to validate its input), the EOS bookkeeping
  (finished sequences emit ``pad_token_id``, as HF does) and the counters are updated in place.

The step's body is one of three variants, the one its :class:`~.plan.DecodePlan` names
(:meth:`StaticDecoder._forward`): :meth:`~StaticDecoder._forward_plain` (the modules' own ops),
:meth:`~StaticDecoder._forward_glued` (``fuse_glue``) or :meth:`~StaticDecoder._forward_linear`
(``fuse_linear``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .model_parts import STATIC_ROPE, stack_kv_gates, unwrap
from .plan import DecodePlan

__all__ = ["StaticDecoder"]


class StaticDecoder:
    """One decode step of a patched Qwen2 model over static buffers, eager or as a CUDA graph.

    Built after a prefill (see :func:`~ahn_ops.fast_decode.prefill`); each :meth:`step` consumes
    ``self.tok`` (``[B]`` int64, the last emitted token of each sequence) at each sequence's own position and
    writes the next token back into ``self.tok``, updating every cache in place. ``capture()`` records the
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
        plan: what the step fuses (:class:`~.plan.DecodePlan`, checked against the model and the batch);
            None = ``DecodePlan.default(model, B)``. No plan changes a token beyond fp32 summation order.
    """

    def __init__(self, model, cache, attention_mask: Optional[torch.Tensor], prompt_len: int,
                 max_new_tokens: int, eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
                 do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                 plan: Optional[DecodePlan] = None):
        from ..ops.ahn_attention.dispatch import uses_decode_op

        self.model, self.base, self.info = unwrap(model)
        self.cache = cache
        emb = self.base.embed_tokens.weight
        self.device, self.dtype = emb.device, emb.dtype
        ahn = cache.ahn
        if ahn is None:
            raise ValueError("the cache is empty: run the prefill first")
        B = ahn.batch_size
        self.B = B
        self.plan = DecodePlan.resolve(plan, model, B)
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
        self.all_fused = True
        self.ahn_layers = {}
        for i in self.info["ahn_layer_ids"]:
            attn = self.base.layers[i].self_attn
            cfg = attn._ahn_cfg
            use_op = uses_decode_op(cfg["backend"], self.dtype, self.device, attn.head_dim)
            self.all_fused &= use_op
            self.ahn_layers[i] = (cache.ahn[cache.ahn_index[i]], attn._ahn_fn, cfg["backend"], use_op)
        self._checked = False  # the first step goes through ahn_decode (all input checks) once
        self.graph = None

        # ---- step start and end with the fused glue: RoPE's cos/sin of every position the run can reach,
        # computed once by the model's own rotary module (one gather per step instead of ~9 small kernels),
        # and the greedy choice in two launches (no fp32 copy of the logits, no separate bookkeeping)
        self.max_steps, self._n_steps = int(max_new_tokens), 0
        self.rope_table = None
        rot = getattr(self.base, "rotary_emb", None)
        if self.plan.fuse_glue and rot is not None and getattr(rot, "rope_type", "default") in STATIC_ROPE:
            P = prompt_len + max_new_tokens
            c, s_ = rot(emb[:1, None], torch.arange(P, device=dev)[None])
            self.rope_table = torch.stack([c[0], s_[0]], 1).to(self.dtype).contiguous()   # [P, 2, D]
        self.greedy_fused = self.plan.fuse_glue and not do_sample
        self._argmax_ws = None
        # ---- fused glue: per AHN layer one projection for k, v and the gates (stacked weights, ~2 MB per
        # layer at the 3B shape)
        self.kvg = {}
        if self.plan.fuse_glue:
            for i, (_, fn, _, use_op) in self.ahn_layers.items():
                st = stack_kv_gates(self.base.layers[i].self_attn, fn, self.dtype) if use_op else None
                if st is not None:
                    self.kvg[i] = st

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
            from ..ops import model_glue as glue

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
        from ..models.qwen2 import _rope

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
        from ..ops.ahn_attention.interface import ahn_decode

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
        from ..ops import model_glue as glue

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

    def _forward(self) -> torch.Tensor:
        """Logits ``[B, V]`` of one step, through the body that the plan names."""
        if self.plan.fuse_linear:
            return self._forward_linear()
        if self.plan.fuse_glue:
            return self._forward_glued()
        return self._forward_plain()

    def _forward_plain(self) -> torch.Tensor:
        """Logits ``[B, V]`` of one step through the modules' own ops (see :meth:`_step_end`)."""
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

    def _forward_glued(self) -> torch.Tensor:
        """:meth:`_forward_plain` with the fused glue: per layer 2 add+RMSNorm, 1 RoPE, 1 SiLU*up kernel and, on
        AHN layers, one k/v/gates projection instead of ~30 small kernels and 4 extra projections."""
        from ..ops import model_glue as glue

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
        ``plan.fuse_gate_up`` the MLP's RMSNorm, gate/up (cuBLAS) and SiLU*up are the glued step's kernels."""
        from ..ops import decode_linear as dl
        from ..ops import model_glue as glue

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
                                    cos, sin, D, trigger_next=self.plan.overlap)
                k, v, a, b, z = self._kvg_split(i, y)
                o = self._decode(i, q.view(B, -1, D), k, v, a, b, z, overlap=self.plan.overlap).reshape(B, -1)
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
            if self.plan.fuse_gate_up:
                act = dl.norm_gate_up(h, ln.weight, ln.variance_epsilon, mlp.gate_proj.weight, mlp.up_proj.weight,
                                      mlp.gate_proj.bias, mlp.up_proj.bias)
            else:
                x, _ = glue.add_rms_norm(h, ln.weight, ln.variance_epsilon)
                act = glue.silu_mul(mlp.gate_proj(x), mlp.up_proj(x))
            h = dl.linear_residual(act, mlp.down_proj.weight, mlp.down_proj.bias, h, role="down_proj")
        x, _ = glue.add_rms_norm(h, base.norm.weight, base.norm.variance_epsilon)
        return self._step_end(x)

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

