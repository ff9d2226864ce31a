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

import operator
from dataclasses import dataclass
from typing import Iterator, List, Sequence, Union

import torch

from .ops.common.checks import check_kind, check_window_sinks

# K/V cache dtypes the ops accept (float64: the reference/chunked paths, for checks against the spec)
CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_bool(x) -> bool:
    return isinstance(x, bool) or (isinstance(x, torch.Tensor) and x.dtype == torch.bool)


def _batch_index(name: str, x, batch_size: int, *, allow_mask: bool) -> torch.Tensor:
    """Validate ``x`` and return it as 1-D int64 indices in ``[0, batch_size)`` (on x's device).

    Accepts int indices (tensor, sequence, or a single int if ``allow_mask``, i.e. for ``reset``) and, if
    ``allow_mask``, a bool mask of shape ``[batch_size]``; anything else raises ValueError naming ``name``.
    """
    want = f"int indices in [0, {batch_size})" + (f" or a bool mask of shape [{batch_size}]" if allow_mask else
                                                  f", shape [{batch_size}]")
    if isinstance(x, torch.Tensor):
        t = x
    elif hasattr(x, "__array__") and hasattr(x, "dtype"):  # numpy array or scalar
        t = torch.as_tensor(x)
    elif isinstance(x, (str, bytes)) or not hasattr(x, "__iter__"):
        if not allow_mask or _is_bool(x) or not hasattr(x, "__index__"):
            raise ValueError(f"{name} must be {want}, got {x!r}")
        t = torch.tensor([operator.index(x)], dtype=torch.int64)
    else:
        items = list(x)
        # Python bools are ints ([True, False] would index 1, 0): a list is all bools (a mask) or all ints
        n_bool = sum(_is_bool(i) for i in items)
        if 0 < n_bool < len(items):
            raise ValueError(f"{name} must be {want}, got a list mixing bools and other values: {items}")
        if n_bool:
            t = torch.tensor([bool(i) for i in items], dtype=torch.bool)
        else:
            try:
                t = torch.tensor([operator.index(i) for i in items], dtype=torch.int64)
            except TypeError:
                raise ValueError(f"{name} must be {want}, got non-integer values {items}") from None
    if t.dtype == torch.bool:
        if not allow_mask:
            raise ValueError(f"{name} must be {want}, got a bool tensor (a mask cannot reorder sequences)")
        if t.shape != (batch_size,):
            raise ValueError(f"{name} as a bool mask must have shape [{batch_size}] (one entry per sequence), "
                             f"got {list(t.shape)}")
        return t.nonzero().flatten()
    if t.dtype == torch.uint8:  # torch's legacy mask dtype: ambiguous between a mask and indices
        raise ValueError(f"{name} must be {want}, got uint8 (ambiguous: pass a bool mask or int64 indices)")
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must be {want}, got a {str(t.dtype).replace('torch.', '')} tensor")
    if t.dim() > 1 or (t.dim() == 0 and not allow_mask):
        raise ValueError(f"{name} must be 1-D ({want}), got shape {list(t.shape)}")
    t = t.reshape(-1).long()
    if not allow_mask and t.numel() != batch_size:
        raise ValueError(f"{name} must have shape [{batch_size}] (one source per sequence), got [{t.numel()}]")
    if t.numel():
        bad = t[(t < 0) | (t >= batch_size)]
        if bad.numel():
            raise ValueError(f"{name} must be {want} (negative indices are not supported), got out-of-range "
                             f"{bad.tolist()[:8]}")
    return t


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
        if dtype not in CACHE_DTYPES:
            names = ", ".join(str(d).replace("torch.", "") for d in CACHE_DTYPES)
            raise ValueError(f"dtype must be a floating K/V dtype ({names}), got {dtype!r}")
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

    def reset(self, batch_indices: Union[Sequence[int], torch.Tensor, None] = None) -> None:
        """Empty the cache of all sequences, or of some (in place).

        ``batch_indices``: int indices in ``[0, B)`` (tensor, list or one int; repeats allowed), or a bool
        mask of shape ``[B]`` (reset where True). Anything else raises ValueError, cache untouched.
        """
        if batch_indices is None:
            for t in self._fields():
                t.zero_()
            return
        idx = _batch_index("batch_indices", batch_indices, self.batch_size, allow_mask=True).to(self.device)
        for t in self._fields():
            t.index_fill_(1, idx, 0)

    def reorder(self, beam_idx: Union[Sequence[int], torch.Tensor]) -> None:
        """Reorder sequences in place (beam search): sequence ``i`` becomes old ``beam_idx[i]``.

        ``beam_idx``: ``B`` int indices in ``[0, B)`` (tensor or list; repeats allowed). Bool masks, floats,
        another length or out-of-range values raise ValueError, cache untouched.
        """
        idx = _batch_index("beam_idx", beam_idx, self.batch_size, allow_mask=False).to(self.device)
        for t in self._fields():
            t.copy_(t.index_select(1, idx))
