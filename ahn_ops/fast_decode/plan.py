"""What the decode step fuses, decided in one place: :class:`DecodePlan`.

A step of :class:`~ahn_ops.fast_decode.StaticDecoder` runs one of three variants, each a superset of
the one before:

* plain: the Qwen2 modules' own ops around ``torch.ops.ahn.decode_step`` (~44 kernels per layer at the
  3B shape, B = 1);
* ``fuse_glue``: the norms, residual adds, RoPE and SiLU * up as Triton kernels, and per AHN layer one
  projection for k, v and the gates (``ahn_ops/ops/model_glue.py``; ~13.5 kernels per layer there);
* ``fuse_linear``: the projections too, as skinny Triton GEMVs with their neighbours fused in
  (``ahn_ops/ops/decode_linear.py``; 6 launches per AHN layer instead of 12), with two options,
  ``fuse_gate_up`` and ``overlap``.

:meth:`DecodePlan.default` picks the fastest measured variant for a model, a batch size and a device;
:meth:`DecodePlan.check` refuses a plan the model or the batch cannot run. ``ahn_ops.generate(...,
plan=...)`` and ``StaticDecoder(..., plan=...)`` take either (None = the default). No plan changes a
token beyond fp32 summation order (the fused kernels keep every rounding step of the modules).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Union

import torch

from .model_parts import glue_fits, linear_fits, unwrap

__all__ = ["DecodePlan"]

_LOW = (torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """What one decode step of an AHN model fuses. ``DecodePlan()`` is the plain step (nothing fused).

    Fields (bools):
        fuse_glue: RMSNorm + residual add, RoPE and SiLU * up as fused Triton kernels; each AHN layer
            computes k, v and its gates in one projection; the step starts from a RoPE table (cos/sin of
            every reachable position, computed once by the model's rotary module when its type depends on
            the position only) and, when greedy, ends with ``model_glue.greedy_next`` (argmax in the
            logits' dtype, the end-of-sequence rule and the position step in two launches): ~11 fewer
            kernels per token, the same tokens. Needs SiLU Qwen2 MLPs and Qwen2RMSNorms in fp16/bf16/fp32,
            and the model on CUDA (or the CPU under ``TRITON_INTERPRET=1``).
        fuse_linear: each layer's projections as skinny Triton GEMVs (tensor-core products from batch
            3 on) with the RMSNorm, RoPE, SiLU * up and residual adds inside them. Per layer 1.37x / 1.16x
            faster than cuBLAS + glue at batch 1 / 2 (H200); needs ``fuse_glue``, plain ``nn.Linear``
            projections in the model's dtype, and batch <= 16 in bf16/fp16 (<= 4 in float32 or with
            head_dim < 16).
        fuse_gate_up: with ``fuse_linear``, the MLP's RMSNorm + gate/up + SiLU * up as one fused
            projection too. From batch 3 on it streams its weights slower than cuBLAS (47% of the copy
            bandwidth against 72% at B = 8, H200), so there the MLP runs as RMSNorm, two cuBLAS products and
            SiLU * up while q/k/v/gates, o_proj and down_proj stay fused.
        overlap: with ``fuse_linear`` on an sm_90+ GPU, each AHN layer's decode op starts while the
            q/k/v/gates projection before it runs (programmatic dependent launch: it streams its first
            cache tiles and the state, and reads q, k, v once the projection's writes are visible).

    Example (the plan ``generate`` would pick, then the same without the early launch):
        >>> import dataclasses, torch, ahn_ops
        >>> from transformers import Qwen2Config, Qwen2ForCausalLM
        >>> cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...                   num_attention_heads=4, num_key_value_heads=2)
        >>> model = ahn_ops.patch_qwen(Qwen2ForCausalLM(cfg).eval(), "gdn", window=16, sinks=4)
        >>> plan = ahn_ops.DecodePlan.default(model, batch=2)
        >>> plan                                                   # on the CPU: the plain step
        DecodePlan(fuse_glue=False, fuse_linear=False, fuse_gate_up=False, overlap=False)
        >>> plan = dataclasses.replace(plan, overlap=False)
        >>> out = ahn_ops.generate(model, torch.randint(0, 256, (2, 40)), max_new_tokens=4, plan=plan)
    """

    fuse_glue: bool = False
    fuse_linear: bool = False
    fuse_gate_up: bool = False
    overlap: bool = False

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, bool):
                raise TypeError(f"DecodePlan.{f.name} must be a bool, got {v!r} ({type(v).__name__})")

    @classmethod
    def default(cls, model, batch: int, device: Union[torch.device, str, None] = None) -> "DecodePlan":
        """The plan ``ahn_ops.generate`` runs for ``model`` at batch size ``batch`` on ``device``.

        Args:
            model: a Qwen2ForCausalLM patched by :func:`ahn_ops.patch_qwen`.
            batch: sequences decoded together (``>= 1``).
            device: default: the model's (its embedding's) device.

        Returns:
            On a GPU with a model the glue fits: ``fuse_glue``. On Hopper (sm_90, where the projections'
            tiles were tuned) also ``fuse_linear`` at batch 1-2 in any of its dtypes and at batch 3-16 in
            bf16/fp16 (whole 3B-shape step 4.17 / 5.48 / 7.90 against 4.37 / 5.65 / 8.09 ms/token at B = 4 /
            8 / 16, H200); ``fuse_gate_up`` at batch 1-2 only; ``overlap`` from batch 3 on (1-2% faster at
            B = 4-8; at batch 1-2, behind the persistent chained projections, 2-3% slower at B = 2 and equal
            at B = 1). Off the GPU: the plain step.
        """
        model, base, _ = unwrap(model)
        batch = _check_batch(batch)
        dtype = base.embed_tokens.weight.dtype
        device = base.embed_tokens.weight.device if device is None else torch.device(device)
        glue = device.type == "cuda" and glue_fits(model, base, dtype) is True
        if not glue:
            return cls()
        from ..ops import decode_linear as dl

        linear = (dl.supports(batch, dtype, base.layers[0].self_attn.head_dim) and linear_fits(base, dtype)
                  and (batch <= 2 or dtype in _LOW) and torch.cuda.get_device_capability(device)[0] == 9)
        return cls(fuse_glue=True, fuse_linear=linear, fuse_gate_up=linear and batch <= 2,
                   overlap=linear and dl.can_trigger(device) and batch >= 3)

    def check(self, model, batch: int) -> "DecodePlan":
        """``self`` if ``model`` (on its device) can run it at batch size ``batch``, else a ValueError that
        names the field and the reason."""
        model, base, _ = unwrap(model)
        batch = _check_batch(batch)
        dtype = base.embed_tokens.weight.dtype
        device = base.embed_tokens.weight.device
        if self.fuse_glue:
            ok = glue_fits(model, base, dtype)
            if ok is not True:
                raise ValueError(f"plan.fuse_glue=True: {ok}")
            if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError("plan.fuse_glue=True needs the model on CUDA (or TRITON_INTERPRET=1 on the CPU)")
        if self.fuse_linear:
            from ..ops import decode_linear as dl

            if not (self.fuse_glue and dl.supports(batch, dtype, base.layers[0].self_attn.head_dim)
                    and linear_fits(base, dtype)):
                raise ValueError(f"plan.fuse_linear=True needs fuse_glue, batch <= {dl.MAX_BATCH} in bf16/fp16 or "
                                 f"<= {dl.MAX_BROADCAST_BATCH} in float32 (got {batch} in {dtype}) and plain "
                                 f"nn.Linear projections of {dtype}")
        if self.fuse_gate_up and not self.fuse_linear:
            raise ValueError("plan.fuse_gate_up=True needs fuse_linear")
        if self.overlap:
            from ..ops import decode_linear as dl

            if not (self.fuse_linear and dl.can_trigger(device)):
                raise ValueError("plan.overlap=True needs fuse_linear on an sm_90+ GPU")
        return self

    @classmethod
    def resolve(cls, plan: Optional["DecodePlan"], model, batch: int) -> "DecodePlan":
        """``plan`` checked against ``model`` and ``batch``, or (None) :meth:`default`."""
        if plan is None:
            return cls.default(model, batch)
        if not isinstance(plan, DecodePlan):
            raise TypeError(f"plan must be an ahn_ops.DecodePlan (DecodePlan.default(model, batch), or "
                            f"DecodePlan(fuse_glue=..., ...)) or None, got {type(plan).__name__}")
        return plan.check(model, batch)


def _check_batch(batch) -> int:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    return batch
