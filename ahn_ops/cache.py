"""Constant-size inference cache of an AHN model.

Per layer and sequence the cache holds the ``S`` sink tokens, a ring buffer of
the last ``W`` tokens (K, V and their write gates) and the fp32 memory state
``[H, D, D]``: its size does not depend on the context length. Position ``p >= S``
lives at ring slot ``(p - S) % W``; when token ``t`` arrives, token ``t - W``
(same slot) is absorbed into the state and then overwritten.

Each layer keeps its own ``pos`` (tokens processed, per sequence) which the ops
advance in place, so a decode step is free of host synchronisation and can be
captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Union

import torch

from .ops.common.checks import check_kind, check_window_sinks


@dataclass
class AHNLayerCache:
    """The cache of one layer (views into :class:`AHNCache` storage).

    Attributes:
        sink_k, sink_v: ``[B, S, HKV, D]`` (dtype of the model).
        ring_k, ring_v: ``[B, W, HKV, D]``.
        gates: ``[B, W, H, 2]`` fp32: log-decay ``g`` and write strength ``w`` per slot.
        state: ``[B, H, D, D]`` fp32 memory state.
        pos: ``[B]`` int64, tokens processed by each sequence.
    """

    sink_k: torch.Tensor
    sink_v: torch.Tensor
    ring_k: torch.Tensor
    ring_v: torch.Tensor
    gates: torch.Tensor
    state: torch.Tensor
    pos: torch.Tensor
    window: int
    sinks: int
    kind: str

    @property
    def batch_size(self) -> int:
        return self.state.shape[0]

    @property
    def num_heads(self) -> int:
        return self.state.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.ring_k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.ring_k.shape[3]

    def tensors(self):
        return (self.sink_k, self.sink_v, self.ring_k, self.ring_v, self.gates, self.state, self.pos)

    def check_compatible(self, B: int, H: int, HKV: int, D: int, dtype: torch.dtype, device: torch.device,
                         window: int, sinks: int, kind: str) -> None:
        """Raise ValueError/TypeError if this cache cannot serve such a call (before any write)."""
        if (window, sinks, kind) != (self.window, self.sinks, self.kind):
            raise ValueError(
                f"cache was built for window={self.window}, sinks={self.sinks}, kind={self.kind!r}; "
                f"the call has window={window}, sinks={sinks}, kind={kind!r}")
        want = {
            "sink_k": (B, sinks, HKV, D), "sink_v": (B, sinks, HKV, D),
            "ring_k": (B, window, HKV, D), "ring_v": (B, window, HKV, D),
            "gates": (B, window, H, 2), "state": (B, H, D, D), "pos": (B,),
        }
        for name, t in zip(want, self.tensors()):
            if tuple(t.shape) != want[name]:
                raise ValueError(f"cache.{name} must have shape {list(want[name])} for this call, got {list(t.shape)}")
            if t.device != device:
                raise ValueError(f"cache.{name} is on {t.device}, the inputs on {device}")
        for name in ("sink_k", "sink_v", "ring_k", "ring_v"):
            if getattr(self, name).dtype != dtype:
                raise TypeError(f"cache.{name} has dtype {getattr(self, name).dtype}, k/v have {dtype}")
        if self.gates.dtype != torch.float32 or self.state.dtype != torch.float32:
            raise TypeError("cache.gates and cache.state must be float32")
        if self.pos.dtype != torch.int64:
            raise TypeError(f"cache.pos must be int64, got {self.pos.dtype}")


class AHNCache:
    """Sinks + ring KV cache, gate ring and fp32 memory state for ``B`` sequences and ``L`` layers.

    Args:
        batch_size: ``B`` sequences.
        num_layers: ``L`` AHN layers (indexable as ``cache[i]``).
        num_heads, num_kv_heads, head_dim: ``H``, ``HKV``, ``D``.
        window: ``W >= 1`` tokens of exact KV kept per sequence (besides the sinks).
        sinks: ``S >= 0`` first tokens kept forever.
        kind: ``"gdn"``, ``"dn"`` or ``"mamba2"``.
        dtype: dtype of the K/V cache (the model's), default bfloat16.
        device: where to allocate.

    Example:
        >>> cache = AHNCache(batch_size=2, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64,
        ...                  window=128, sinks=4, dtype=torch.float32)
        >>> cache.nbytes  # constant in the context length
        2195520
    """

    def __init__(self, batch_size: int, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 window: int, sinks: int = 0, kind: str = "gdn", dtype: torch.dtype = torch.bfloat16,
                 device: Union[str, torch.device, None] = None):
        check_kind(kind)
        check_window_sinks(window, sinks)
        for name, val in (("batch_size", batch_size), ("num_layers", num_layers), ("num_heads", num_heads),
                          ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        B, L, H, HKV, D, W, S = batch_size, num_layers, num_heads, num_kv_heads, head_dim, window, sinks
        self.window, self.sinks, self.kind, self.dtype = W, S, kind, dtype
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.device = dev
        # one allocation per field, layer-major, so reset/reorder are a few ops for all layers
        self.sink_k = torch.zeros(L, B, S, HKV, D, dtype=dtype, device=dev)
        self.sink_v = torch.zeros_like(self.sink_k)
        self.ring_k = torch.zeros(L, B, W, HKV, D, dtype=dtype, device=dev)
        self.ring_v = torch.zeros_like(self.ring_k)
        self.gates = torch.zeros(L, B, W, H, 2, dtype=torch.float32, device=dev)
        self.state = torch.zeros(L, B, H, D, D, dtype=torch.float32, device=dev)
        self.pos = torch.zeros(L, B, dtype=torch.int64, device=dev)
        self.layers: List[AHNLayerCache] = [
            AHNLayerCache(self.sink_k[i], self.sink_v[i], self.ring_k[i], self.ring_v[i], self.gates[i],
                          self.state[i], self.pos[i], W, S, kind)
            for i in range(L)
        ]

    def __getitem__(self, layer: int) -> AHNLayerCache:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[AHNLayerCache]:
        return iter(self.layers)

    def _fields(self):
        return (self.sink_k, self.sink_v, self.ring_k, self.ring_v, self.gates, self.state, self.pos)

    @property
    def batch_size(self) -> int:
        return self.pos.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache (all layers); independent of the context length."""
        return sum(t.numel() * t.element_size() for t in self._fields())

    def seq_lens(self) -> torch.Tensor:
        """Tokens processed per sequence (of layer 0), ``[B]`` int64."""
        return self.pos[0].clone()

    def reset(self, batch_indices: Optional[Sequence[int]] = None) -> None:
        """Empty the cache of all sequences, or of the given ones (in place)."""
        if batch_indices is None:
            for t in self._fields():
                t.zero_()
            return
        idx = torch.as_tensor(list(batch_indices), dtype=torch.long, device=self.device)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.batch_size):
            raise ValueError(f"batch_indices must lie in [0, {self.batch_size}), got {list(batch_indices)}")
        for t in self._fields():
            t.index_fill_(1, idx, 0)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Reorder sequences in place (beam search): sequence ``i`` becomes old ``beam_idx[i]``."""
        beam_idx = torch.as_tensor(beam_idx, device=self.device).long()
        if beam_idx.shape != (self.batch_size,):
            raise ValueError(f"beam_idx must have shape [{self.batch_size}], got {list(beam_idx.shape)}")
        for t in self._fields():
            t.copy_(t.index_select(1, beam_idx))
