"""Autograd of ``torch.ops.ahn.prefill_fwd``: ``register_autograd`` with ``setup_context``.

The forward saves its inputs plus two of its own outputs: ``out`` (no extra memory: the caller
holds it anyway) and the window attention's ``lse`` (fp32 ``[B, T, H]``, 1/64 of ``out``'s bytes
at D=128 bf16), so the backward needs no attention re-run for lse and delta. No states or other
activations are saved; the backward is the single op ``torch.ops.ahn.prefill_bwd`` (backward.py),
which recomputes the memory branch. Both
ops are opaque to ``torch.compile`` (fake impls registered) and the pair recomputes cleanly
under activation checkpointing. ``W`` and ``S`` stay plain ints: a new value per call does
not recompile any kernel.
"""

from __future__ import annotations

import torch

from . import backward  # noqa: F401  (registers torch.ops.ahn.prefill_bwd)

# saved tensors, by schema name; grads come back from prefill_bwd in this order
_TENSORS = ("q", "k", "v", "a", "b", "z", "A_log", "dt_bias", "norm_weight", "o_weight")
_GRADS = _TENSORS + ("initial_state",)


def _schema_names():
    return [arg.name for arg in torch.ops.ahn.prefill_fwd.default._schema.arguments]


def _setup_context(ctx, inputs, output):
    args = dict(zip(_schema_names(), inputs))
    out, _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(*(args[n] for n in _TENSORS), out, lse, args["cu_seqlens"], args["initial_state"])
    ctx.window, ctx.sinks, ctx.kind = args["window"], args["sinks"], args["kind"]
    # the op's flag or PyTorch's global switch (torch.use_deterministic_algorithms)
    ctx.deterministic = bool(args.get("deterministic", False)) or torch.are_deterministic_algorithms_enabled()


def _backward(ctx, dout, dht, dlse):
    # dlse: lse is non-differentiable (an internal of the softmax), its grad is ignored
    saved = dict(zip(_TENSORS + ("out", "lse", "cu_seqlens", "initial_state"), ctx.saved_tensors))
    if dht is not None and dht.numel() == 0:
        dht = None
    if dout is None:
        dout = torch.zeros_like(saved["q"])
    grads = torch.ops.ahn.prefill_bwd(
        dout.contiguous(), dht, *(saved[n] for n in _TENSORS), saved["out"], saved["lse"], ctx.window,
        ctx.sinks, ctx.kind, saved["cu_seqlens"], saved["initial_state"], ctx.deterministic)
    # an input this kind ignores (b for mamba2; a, A_log, dt_bias for dn) gets None: the output does
    # not depend on it, and prefill_bwd returns an empty tensor in its place
    by_name = {n: (g if saved[n] is not None and (g.numel() or not saved[n].numel()) else None)
               for n, g in zip(_GRADS, grads)}
    return tuple(by_name.get(n) for n in _schema_names())


torch.library.register_autograd("ahn::prefill_fwd", _backward, setup_context=_setup_context)
