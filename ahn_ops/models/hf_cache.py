"""``AHNModelCache``: the transformers ``Cache`` of a patched Qwen2 model.

``generate()`` and ``model(..., past_key_values=cache)`` see an ordinary
``transformers.Cache``; inside, the AHN layers share one
:class:`ahn_ops.AHNCache` (sinks + ring KV, gate ring, fp32 memory state: a
size independent of the context length) and the layers listed in
``fa_layer_ids`` keep a normal growing ``DynamicLayer``.

The :class:`ahn_ops.AHNCache` is allocated at the first forward, when batch
size, dtype and device are known (or up front with :meth:`allocate`).
Sequences of a batch may be at different positions: the AHN cache keeps a
position per sequence and only counts real (unpadded) tokens, while
``get_seq_length()`` reports the number of columns fed (padding included), as
transformers expects for slicing its 2-D attention mask.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from ..cache import AHNCache, AHNLayerCache


class AHNCacheLayer(CacheLayerMixin):
    """Bookkeeping of one AHN layer inside :class:`AHNModelCache` (its tensors live in the shared AHNCache)."""

    # Not a full-attention layer: transformers then sizes its causal mask on an fa_layer_ids layer, if any.
    is_sliding = True
    is_compileable = False
    is_croppable = False

    def __init__(self, owner: "AHNModelCache", layer_idx: int, ahn_idx: int):
        super().__init__()
        self.owner, self.layer_idx, self.ahn_idx = owner, layer_idx, ahn_idx
        self.seen = 0  # columns fed through this layer (padding included)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.owner.allocate(key_states.shape[0], key_states.dtype, key_states.device)

    @property
    def is_initialized(self) -> bool:  # noqa: D401  (CacheLayerMixin sets it as an attribute)
        return self.owner.ahn is not None

    @is_initialized.setter
    def is_initialized(self, value) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError(f"layer {self.layer_idx} is an AHN layer: its cache is written by ahn_attention, "
                           "not by Cache.update (was the model patched with ahn_ops.patch_qwen?)")

    def get_mask_sizes(self, query_length: int):
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # its abstract name before transformers 5.17

    def reset(self) -> None:
        self.seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        pass  # the owner reorders the shared storage once

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("an AHN cache cannot be cropped: tokens that left the window are already "
                                      "absorbed into the memory state (assisted/speculative decoding is unsupported)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        pass

    def offload(self):
        pass

    def prefetch(self):
        pass


class AHNModelCache(Cache):
    """Constant-size cache of a Qwen2 model patched by :func:`ahn_ops.patch_qwen`.

    Args:
        num_layers: decoder layers of the model.
        ahn_layer_ids: layers with an AHN (the others, ``fa_layer_ids``, keep a growing KV cache).
        num_heads, num_kv_heads, head_dim: attention shape (``H``, ``HKV``, ``D``).
        window, sinks, kind: AHN settings (``W``, ``S``, ``"gdn" | "dn" | "mamba2"``).
        batch_size, dtype, device: if all given, allocate now; otherwise at the first forward.

    Example:
        >>> cache = AHNModelCache.from_model(model)             # model patched by ahn_ops.patch_qwen
        >>> out = model(input_ids, past_key_values=cache)       # prefill
        >>> out = model(next_ids, past_key_values=cache)        # one decode step
        >>> cache.nbytes                                        # bytes held, constant in the context length
    """

    def __init__(self, num_layers: int, ahn_layer_ids: Iterable[int], num_heads: int, num_kv_heads: int,
                 head_dim: int, window: int, sinks: int, kind: str, batch_size: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None, device=None):
        ahn_ids = sorted(set(int(i) for i in ahn_layer_ids))
        self.ahn_index: Dict[int, int] = {li: j for j, li in enumerate(ahn_ids)}
        layers: List[CacheLayerMixin] = [
            AHNCacheLayer(self, i, self.ahn_index[i]) if i in self.ahn_index else DynamicLayer()
            for i in range(num_layers)
        ]
        super().__init__(layers=layers)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.window, self.sinks, self.kind = window, sinks, kind
        self.ahn: Optional[AHNCache] = None
        if batch_size is not None and dtype is not None and device is not None:
            self.allocate(batch_size, dtype, device)

    @classmethod
    def from_model(cls, model, batch_size: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                   device=None) -> "AHNModelCache":
        """A cache for ``model`` (a patched ``Qwen2ForCausalLM`` or ``Qwen2Model``)."""
        info = getattr(model, "_ahn_info", None)
        if info is None:
            base = getattr(model, "model", None)
            info = getattr(base, "_ahn_info", None)
        if info is None:
            raise ValueError("model is not patched: call ahn_ops.patch_qwen(model, ...) first")
        return cls(info["num_layers"], info["ahn_layer_ids"], info["num_heads"], info["num_kv_heads"],
                   info["head_dim"], info["window"], info["sinks"], info["kind"], batch_size, dtype, device)

    # ---------------------------------------------------------------- storage
    def allocate(self, batch_size: int, dtype: torch.dtype, device) -> AHNCache:
        """Allocate the AHN storage (idempotent for the same batch size, dtype and device)."""
        device = torch.device(device)
        if self.ahn is not None:
            if (self.ahn.batch_size, self.ahn.dtype) != (batch_size, dtype) or self.ahn.device.type != device.type:
                raise ValueError(
                    f"this AHNModelCache holds batch_size={self.ahn.batch_size}, dtype={self.ahn.dtype} on "
                    f"{self.ahn.device}; the input has batch_size={batch_size}, dtype={dtype} on {device}. "
                    "Use a new cache (or cache.reset() for a new batch of the same size).")
            return self.ahn
        n = max(len(self.ahn_index), 1)
        self.ahn = AHNCache(batch_size, n, self.num_heads, self.num_kv_heads, self.head_dim, self.window,
                            self.sinks, self.kind, dtype=dtype, device=device)
        return self.ahn

    def ahn_layer(self, layer_idx: int, like: torch.Tensor) -> AHNLayerCache:
        """The :class:`ahn_ops.AHNLayerCache` of decoder layer ``layer_idx`` (allocated on first use like ``like``)."""
        ahn = self.allocate(like.shape[0], like.dtype, like.device)
        return ahn[self.ahn_index[layer_idx]]

    def advance(self, layer_idx: int, num_columns: int) -> None:
        self.layers[layer_idx].seen += num_columns

    @property
    def nbytes(self) -> int:
        """Bytes held: the AHN storage (constant in the context) plus the KV of full-attention layers."""
        total = self.ahn.nbytes if self.ahn is not None else 0
        for layer in self.layers:
            if isinstance(layer, DynamicLayer) and layer.is_initialized and layer.keys is not None:
                total += layer.keys.numel() * layer.keys.element_size() * 2
        return total

    def seq_lens(self) -> torch.Tensor:
        """Real (unpadded) tokens processed per sequence, ``[B]`` int64."""
        if self.ahn is None:
            raise ValueError("the cache is empty")
        return self.ahn.seq_lens()

    # ---------------------------------------------------------------- transformers Cache API
    def reset(self):
        super().reset()
        if self.ahn is not None:
            self.ahn.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        if self.ahn is not None:
            self.ahn.reorder(beam_idx.to(self.ahn.device))

    def _reindex(self, index: torch.Tensor) -> None:
        old = self.ahn
        if old is None:
            return
        index = index.to(old.device).long()
        new = AHNCache(int(index.numel()), len(old), self.num_heads, self.num_kv_heads, self.head_dim,
                       self.window, self.sinks, self.kind, dtype=old.dtype, device=old.device)
        for dst, src in zip(new._fields(), old._fields()):
            dst.copy_(src.index_select(1, index))
        self.ahn = new

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.ahn is not None:
            self._reindex(torch.arange(self.ahn.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._reindex(torch.as_tensor(indices))

    @property
    def is_croppable(self) -> bool:
        return False

    def __repr__(self):
        n_fa = len(self.layers) - len(self.ahn_index)
        return (f"AHNModelCache(kind={self.kind!r}, window={self.window}, sinks={self.sinks}, "
                f"ahn_layers={len(self.ahn_index)}, full_attention_layers={n_fa}, "
                f"batch_size={None if self.ahn is None else self.ahn.batch_size}, nbytes={self.nbytes})")
