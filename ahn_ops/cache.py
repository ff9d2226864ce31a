"""Constant-size inference cache of an AHN model.

Per layer and sequence the cache holds the ``S`` sink tokens, a ring buffer of
the last ``W`` tokens (K, V and the raw projections their write gates come from) and the fp32
memory state
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
from typing import Dict, Iterator, List, Mapping, Sequence, Union

import torch

from .ops.common.checks import check_kind, check_window_sinks

# K/V cache dtypes the ops accept (float64: the reference/chunked paths, for checks against the spec)
CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# the stacked ``[L, B, ...]`` tensors of an AHNCache, in the order of ``_fields()``
FIELDS = ("sink_k", "sink_v", "ring_k", "ring_v", "gates", "state", "pos")


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
        gates: ``[B, W, 2, H]`` (dtype of the model): the gate inputs of each slot's token, row 0 ``a``
            (GDN ``a_proj(x)``, Mamba2 ``dt_proj(x)``; 0 for DN), row 1 ``b`` (GDN/DN ``b_proj(x)``; 0 for
            Mamba2). The log-decay and write strength are made from them when the token leaves the window,
            with the same formula as for a token absorbed during a prefill.
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
            "gates": (B, window, 2, H), "state": (B, H, D, D), "pos": (B,),
        }
        for name, t in zip(want, self.tensors()):
            if tuple(t.shape) != want[name]:
                raise ValueError(f"cache.{name} must have shape {list(want[name])} for this call, got {list(t.shape)}")
            if t.device != device:
                raise ValueError(f"cache.{name} is on {t.device}, the inputs on {device}")
        for name in ("sink_k", "sink_v", "ring_k", "ring_v", "gates"):
            if getattr(self, name).dtype != dtype:
                raise TypeError(f"cache.{name} has dtype {getattr(self, name).dtype}, k/v have {dtype}")
        if self.state.dtype != torch.float32:
            raise TypeError(f"cache.state must be float32, got {self.state.dtype}")
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
        self.gates = torch.zeros(L, B, W, 2, H, dtype=dtype, device=dev)
        self.state = torch.zeros(L, B, H, D, D, dtype=torch.float32, device=dev)
        self.pos = torch.zeros(L, B, dtype=torch.int64, device=dev)
        self._build_layers()

    def _build_layers(self) -> None:
        W, S, kind = self.window, self.sinks, self.kind
        self.layers: List[AHNLayerCache] = [
            AHNLayerCache(self.sink_k[i], self.sink_v[i], self.ring_k[i], self.ring_v[i], self.gates[i],
                          self.state[i], self.pos[i], W, S, kind)
            for i in range(self.pos.shape[0])
        ]

    @classmethod
    def _wrap(cls, fields: Dict[str, torch.Tensor], window: int, sinks: int, kind: str) -> "AHNCache":
        """An AHNCache over the given layer-major tensors, without a copy (the caller checked them)."""
        self = cls.__new__(cls)
        self.window, self.sinks, self.kind = window, sinks, kind
        self.dtype, self.device = fields["ring_k"].dtype, fields["ring_k"].device
        for name in FIELDS:
            setattr(self, name, fields[name])
        self._build_layers()
        return self

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

    # ------------------------------------------------------------------ tensors in and out, forks
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The cache's tensors by field name (``sink_k``, ..., ``pos``; layer-major ``[L, B, ...]``).

        References to the live storage, as ``nn.Module.state_dict`` returns them: clone to keep a snapshot.
        """
        return {name: getattr(self, name) for name in FIELDS}

    @staticmethod
    def check_state_dict(sd: Mapping[str, torch.Tensor], window: int, sinks: int, src: str = "state dict") -> Dict:
        """Check that ``sd`` holds the tensors of one AHNCache with this ``window`` and ``sinks``.

        Returns its sizes (``num_layers``, ``batch_size``, ``num_heads``, ``num_kv_heads``, ``head_dim``, ``dtype``);
        raises ValueError naming ``src``, the field and what was expected otherwise.
        """
        if not isinstance(sd, Mapping):
            raise ValueError(f"{src}: expected a mapping of field name -> tensor, got {type(sd).__name__}")
        missing = [n for n in FIELDS if n not in sd]
        extra = sorted(set(sd) - set(FIELDS))
        if missing or extra:
            raise ValueError(f"{src}: AHN cache fields must be {list(FIELDS)}; missing {missing}, unexpected {extra}")
        for n in FIELDS:
            if not isinstance(sd[n], torch.Tensor):
                raise ValueError(f"{src}: {n} must be a tensor, got {type(sd[n]).__name__}")
        rk = sd["ring_k"]
        if rk.dim() != 5:
            raise ValueError(f"{src}: ring_k must be [L, B, W, HKV, D], got shape {list(rk.shape)}")
        L, B, _, HKV, D = rk.shape
        st = sd["state"]
        H = st.shape[2] if st.dim() == 5 else -1
        want = {"sink_k": (L, B, sinks, HKV, D), "sink_v": (L, B, sinks, HKV, D), "ring_k": (L, B, window, HKV, D),
                "ring_v": (L, B, window, HKV, D), "gates": (L, B, window, 2, H), "state": (L, B, H, D, D),
                "pos": (L, B)}
        for n, shape in want.items():
            if tuple(sd[n].shape) != shape:
                raise ValueError(f"{src}: {n} must have shape {list(shape)} (window={window}, sinks={sinks}), "
                                 f"got {list(sd[n].shape)}")
        if min(L, B, H, HKV, D) < 1 or H % HKV:
            raise ValueError(f"{src}: no valid cache sizes (layers={L}, batch={B}, heads={H}, kv heads={HKV}, "
                             f"head dim={D})")
        dtype = rk.dtype
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"{src}: ring_k has dtype {dtype}, expected a floating K/V dtype")
        for n, dt in (("sink_k", dtype), ("sink_v", dtype), ("ring_v", dtype), ("gates", dtype),
                      ("state", torch.float32), ("pos", torch.int64)):
            if sd[n].dtype != dt:
                raise ValueError(f"{src}: {n} must have dtype {dt}, got {sd[n].dtype}")
        if bool((sd["pos"] < 0).any()):
            raise ValueError(f"{src}: pos must be >= 0 (tokens processed), got {sd['pos'].min().item()}")
        return dict(num_layers=L, batch_size=B, num_heads=H, num_kv_heads=HKV, head_dim=D, dtype=dtype)

    def load_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Copy tensors of :meth:`state_dict` form into this cache (same sizes and dtypes), in place.

        Everything is checked (and moved to the cache's device) before the first write: on error the
        cache is unchanged.
        """
        sizes = self.check_state_dict(sd, self.window, self.sinks)
        for n in FIELDS:
            if tuple(sd[n].shape) != tuple(getattr(self, n).shape) or sd[n].dtype != getattr(self, n).dtype:
                raise ValueError(f"state dict: {n} has shape {list(sd[n].shape)} {sd[n].dtype}, this cache "
                                 f"{list(getattr(self, n).shape)} {getattr(self, n).dtype} "
                                 f"(batch_size={self.batch_size}; the state dict has {sizes['batch_size']})")
        staged = {n: sd[n].to(self.device) for n in FIELDS}
        for n in FIELDS:
            getattr(self, n).copy_(staged[n])

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], window: int, sinks: int, kind: str,
                        device: Union[str, torch.device, None] = None) -> "AHNCache":
        """A new cache holding a copy of the tensors of :meth:`state_dict` (checked first) on ``device``
        (default: where the tensors are)."""
        check_kind(kind)
        check_window_sinks(window, sinks)
        cls.check_state_dict(sd, window, sinks)
        dev = torch.device(device) if device is not None else sd["ring_k"].device
        # a copy even on the same device: the new cache must not alias the caller's tensors
        return cls._wrap({n: sd[n].to(dev, copy=True).contiguous() for n in FIELDS}, window, sinks, kind)

    def clone(self) -> "AHNCache":
        """An independent copy (same device): writes to either cache leave the other unchanged."""
        return self._wrap({n: t.clone() for n, t in self.state_dict().items()}, self.window, self.sinks, self.kind)

    def select(self, batch_indices: Union[Sequence[int], torch.Tensor, int]) -> "AHNCache":
        """A new cache of the chosen sequences: sequence ``i`` of it is a copy of ``batch_indices[i]`` of this one.

        ``batch_indices``: int indices in ``[0, B)`` (tensor, list or one int; repeats allowed, e.g. ``[0, 0, 0]``
        forks sequence 0 three times) or a bool mask of shape ``[B]``; at least one sequence. One
        ``index_select`` per field for all layers, on the cache's device. This cache is unchanged.
        """
        idx = _batch_index("batch_indices", batch_indices, self.batch_size, allow_mask=True)
        if idx.numel() == 0:
            raise ValueError("batch_indices must select at least one sequence, got none")
        return self._take(idx.to(self.device))

    def _take(self, idx: torch.Tensor) -> "AHNCache":
        """A new cache of sequences ``idx`` (int64 on the cache's device, already checked): no host sync."""
        return self._wrap({n: t.index_select(1, idx) for n, t in self.state_dict().items()},
                          self.window, self.sinks, self.kind)

    def expand(self, n: int) -> "AHNCache":
        """A new cache with each sequence repeated ``n`` times (``[a, b]`` -> ``[a]*n + [b]*n``, as
        ``repeat_interleave``): on a batch-1 cache, ``n`` independent continuations of one prefix.
        This cache is unchanged."""
        if _is_bool(n) or not hasattr(n, "__index__") or operator.index(n) < 1:
            raise ValueError(f"n must be an int >= 1 (copies per sequence), got {n!r}")
        n = operator.index(n)
        return self._wrap({f: t.repeat_interleave(n, dim=1) for f, t in self.state_dict().items()},
                          self.window, self.sinks, self.kind)
