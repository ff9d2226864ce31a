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

Read once, ask many: :meth:`AHNModelCache.save` / :meth:`AHNModelCache.load` keep a prefilled cache
in a safetensors file (checked against the model on load), and :meth:`~AHNModelCache.clone`,
:meth:`~AHNModelCache.select` and :meth:`~AHNModelCache.expand` fork its sequences into independent
continuations on the device.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
import weakref
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from ..cache import FIELDS, AHNCache, AHNLayerCache, _batch_index

# version of the file layout written by AHNModelCache.save (bump on any incompatible change).
# 2: the gate ring holds each token's raw gate inputs [L, B, W, 2, H] in the model's dtype (1: fp32 gates
# [L, B, W, H, 2], which cannot be turned back into their inputs: such a file is refused).
CACHE_FORMAT_VERSION = 2
CACHE_FILE_KIND = "ahn_ops.AHNModelCache"
# base config fields that change what the cached K/V and memory states mean (not, e.g., the context limit)
_BASE_CONFIG_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
                       "rope_parameters", "rope_theta", "rope_scaling")
# elements read from the start of each base parameter for the base-weights fingerprint: hashing whole
# multi-GB weights on every load would cost seconds; a sample tells two fine-tunes of one architecture apart
_BASE_SAMPLE = 1024


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
        >>> cache.save("doc.safetensors")                       # read once ...
        >>> doc = AHNModelCache.load("doc.safetensors", model)  # ... ask many (doc itself is never modified):
        >>> ahn_ops.generate(model, question_ids, 64, cache=doc)
        >>> ahn_ops.generate(model, questions_ids, 64, cache=doc.expand(4))   # 4 questions in one batch
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
        self._model_ref = None        # weakref to the Qwen2Model the cache was made (or loaded) for
        self._ahn_sha256 = None       # fingerprint of that model's AHN weights, once computed
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
        cache = cls(info["num_layers"], info["ahn_layer_ids"], info["num_heads"], info["num_kv_heads"],
                    info["head_dim"], info["window"], info["sinks"], info["kind"], batch_size, dtype, device)
        # which model filled it: check_model() then skips hashing the weights for that very model
        cache._model_ref = weakref.ref(_base_of(model))
        return cache

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
        self.ahn = old._take(index.to(old.device).long())

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

    # ---------------------------------------------------------------- forks (read once, ask many)
    def _require(self, what: str) -> AHNCache:
        if self.ahn is None:
            raise ValueError(f"cannot {what} an empty cache: run a prefill through it first")
        return self.ahn

    def _fork(self, ahn: Optional[AHNCache], take_fa) -> "AHNModelCache":
        """A new cache of this layout over ``ahn``, with ``take_fa`` applied to the full-attention K/V."""
        new = type(self)(len(self.layers), self.ahn_index, self.num_heads, self.num_kv_heads, self.head_dim,
                         self.window, self.sinks, self.kind)
        new._model_ref, new._ahn_sha256 = self._model_ref, self._ahn_sha256
        new.ahn = ahn
        for old, layer in zip(self.layers, new.layers):
            if isinstance(old, AHNCacheLayer):
                layer.seen = old.seen
            elif _fa_kv(old) is not None:
                k, v = _fa_kv(old)
                _set_fa_kv(layer, take_fa(k), take_fa(v))
        return new

    def clone(self) -> "AHNModelCache":
        """An independent copy on the same device (AHN storage and full-attention K/V)."""
        return self._fork(None if self.ahn is None else self.ahn.clone(), torch.clone)

    def select(self, batch_indices: Union[Sequence[int], torch.Tensor, int]) -> "AHNModelCache":
        """A new cache of the chosen sequences: its sequence ``i`` is a copy of ``batch_indices[i]`` of this one.

        ``batch_indices``: int indices in ``[0, B)`` (list, tensor or one int; repeats allowed: ``[0, 0, 0]`` forks
        sequence 0 into three) or a bool mask of shape ``[B]``; at least one sequence. Checked before anything is
        copied (ValueError naming ``batch_indices``); tensor indexing on the cache's device only. This cache is
        unchanged.
        """
        ahn = self._require("select from")
        idx = _batch_index("batch_indices", batch_indices, ahn.batch_size, allow_mask=True)
        if idx.numel() == 0:
            raise ValueError("batch_indices must select at least one sequence, got none")
        idx = idx.to(ahn.device)
        return self._fork(ahn._take(idx), lambda t: t.index_select(0, idx))

    def expand(self, n: int) -> "AHNModelCache":
        """A new cache with each sequence repeated ``n`` times (``repeat_interleave`` order): a batch-1 cache gives
        ``n`` independent continuations of one prefix. This cache is unchanged."""
        ahn = self._require("expand")
        new_ahn = ahn.expand(n)  # checks n
        return self._fork(new_ahn, lambda t: t.repeat_interleave(int(n), dim=0))

    # ---------------------------------------------------------------- belongs to which model
    def _layout(self) -> Dict:
        return dict(num_layers=len(self.layers), ahn_layer_ids=sorted(self.ahn_index), num_heads=self.num_heads,
                    num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, window=self.window, sinks=self.sinks,
                    kind=self.kind)

    def check_model(self, model, name: str = "cache") -> None:
        """Raise ValueError unless this cache can continue on ``model`` (a patched Qwen2).

        Compares the layout (layers, AHN layers, heads, head dim, window, sinks, kind), the dtype and device
        of the storage and, when the cache was made for another model object, the fingerprints of both models
        (AHN weights, base config, a sample of the base weights). The message names each field that differs,
        expected (the model) vs found (the cache); ``name`` is the argument the cache came in.
        """
        base, info = _info_of(model)
        want = dict(num_layers=info["num_layers"], ahn_layer_ids=sorted(info["ahn_layer_ids"]),
                    num_heads=info["num_heads"], num_kv_heads=info["num_kv_heads"], head_dim=info["head_dim"],
                    window=info["window"], sinks=info["sinks"], kind=info["kind"])
        have = self._layout()
        diffs = [f"{f}: expected {want[f]!r}, found {have[f]!r}" for f in want if want[f] != have[f]]
        if self.ahn is not None:
            w = base.embed_tokens.weight
            if self.ahn.dtype != w.dtype:
                diffs.append(f"dtype: expected {_dtype_name(w.dtype)}, found {_dtype_name(self.ahn.dtype)}")
            if self.ahn.device != w.device:
                diffs.append(f"device: expected {w.device}, found {self.ahn.device}")
        if not diffs:
            owner = self._model_ref() if self._model_ref is not None else None
            if owner is not None and owner is not base:
                mine, theirs = fingerprints(owner), fingerprints(base)
                diffs = _fingerprint_diffs(theirs, mine)
            elif owner is None and self._ahn_sha256 is not None:
                sha = fingerprints(base)["ahn_weights_sha256"]
                if sha != self._ahn_sha256:
                    diffs = [f"ahn_weights_sha256: expected {sha[:16]}..., found {self._ahn_sha256[:16]}..."]
        if diffs:
            raise ValueError(f"{name} was not made for this model (expected: the model, found: the cache): "
                             + "; ".join(diffs))

    # ---------------------------------------------------------------- save / load
    def save(self, path: Union[str, os.PathLike], model=None) -> None:
        """Write the cache to ``path`` (safetensors), atomically.

        Holds the AHN storage (sinks, ring K/V, gate ring, fp32 states, positions: constant in the context) and
        the growing K/V of the ``fa_layer_ids`` layers, with metadata: format version, kind, ``W``, ``S``, dtype,
        per-sequence positions, the model shape, fingerprints of the AHN weights, the base config and a sample of
        the base weights, and a checksum of the whole content. ``model``: the model the cache belongs to (default:
        the one it was made for by :meth:`from_model` / :meth:`load`). The bytes go to a temporary file in the
        same directory, then ``os.replace``: a failure leaves no partial file and ``path`` as it was.
        """
        ahn = self._require("save")
        if model is None:
            model = self._model_ref() if self._model_ref is not None else None
            if model is None:
                raise ValueError("model: this cache does not know its model (not made by from_model/load, or the "
                                 "model is gone); pass cache.save(path, model)")
        self.check_model(model, "cache")
        base, info = _info_of(model)
        cols = self._columns()
        pos = ahn.pos
        if pos.shape[0] > 1 and not bool((pos == pos[:1]).all()):
            raise ValueError("cache: its AHN layers are at different positions (an interrupted forward?): not saved")
        fp = fingerprints(model)
        tensors = {f"ahn.{n}": t for n, t in ahn.state_dict().items()}
        for i, layer in enumerate(self.layers):
            kv = _fa_kv(layer)
            if kv is not None:
                tensors[f"fa.{i}.keys"], tensors[f"fa.{i}.values"] = kv
        tensors, buf, offs = _to_host(tensors)
        meta = dict(_expected_meta(base, info, fp), batch_size=str(ahn.batch_size), columns=str(cols),
                    positions=json.dumps(pos[0].tolist()), fa_layer_ids=json.dumps(sorted(info["fa_layer_ids"])))
        meta["content_sha256"] = _content_sha256(tensors, meta)
        meta["format"] = "pt"
        header = _st_header(tensors, offs, meta)
        _atomic_write(Path(path), lambda f: (f.write(header), f.write(memoryview(buf.numpy()))))
        self._ahn_sha256 = fp["ahn_weights_sha256"]

    def _columns(self) -> int:
        """Columns fed (padding included), the same in every layer of a consistent cache."""
        cols = {layer.get_seq_length() for layer in self.layers}
        if len(cols) > 1:
            raise ValueError(f"cache: its layers hold different column counts {sorted(cols)} (an interrupted "
                             "forward?)")
        return cols.pop() if cols else 0

    @classmethod
    def load(cls, path: Union[str, os.PathLike], model, device=None) -> "AHNModelCache":
        """A cache read from a file written by :meth:`save`, for ``model`` (on ``device``, default the model's).

        Refused with a ValueError (nothing is half-loaded: a new cache is returned only when everything
        checked out) when the file is torn, truncated or corrupt (it names the file), or was made for another
        model: each field that differs is named, expected (this model) vs found (the file): kind, window,
        sinks, model shape, dtype, AHN weights, base config field, base weights.
        """
        path = Path(path)
        base, info = _info_of(model)
        dev = torch.device(device) if device is not None else base.embed_tokens.weight.device
        try:
            tensors, meta = _st_read(path, pin=dev.type == "cuda")
        except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read the AHN cache file, torn or truncated? "
                             f"({type(e).__name__}: {e})") from None
        if meta.get("ahn_cache") != CACHE_FILE_KIND:
            raise ValueError(f"{path}: not an AHN cache file (metadata ahn_cache={meta.get('ahn_cache')!r}, "
                             f"expected {CACHE_FILE_KIND!r})")
        if meta.get("format_version") != str(CACHE_FORMAT_VERSION):
            raise ValueError(f"{path}: format_version: expected {CACHE_FORMAT_VERSION}, found "
                             f"{meta.get('format_version')!r} (written by another ahn_ops version; "
                             f"rebuild the cache with a prefill of the same context and save it again)")
        if _content_sha256(tensors, meta) != meta.get("content_sha256"):
            raise ValueError(f"{path}: content does not match its checksum (corrupt file)")

        fp = fingerprints(base)
        want = _expected_meta(base, info, fp)
        want["fa_layer_ids"] = json.dumps(sorted(info["fa_layer_ids"]))
        diffs = []
        for f, v in want.items():
            if f == "base_config":
                continue
            if meta.get(f) != v:
                if f == "base_config_sha256":
                    diffs += _config_diffs(json.loads(want["base_config"]), _json_or_none(meta.get("base_config")))
                else:
                    diffs.append(f"{f}: expected {_short(v)}, found {_short(meta.get(f))}")
        if diffs:
            raise ValueError(f"{path}: cache made for another model or AHN (expected: this model, found: the "
                             "file): " + "; ".join(diffs))

        W, S, kind = info["window"], info["sinks"], info["kind"]
        src = str(path)
        ahn_sd = {n: tensors[f"ahn.{n}"] for n in FIELDS if f"ahn.{n}" in tensors}
        sizes = AHNCache.check_state_dict(ahn_sd, W, S, src)
        try:
            B, cols, positions = int(meta["batch_size"]), int(meta["columns"]), json.loads(meta["positions"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{src}: metadata batch_size/columns/positions missing or malformed ({e})") from None
        n_ahn = max(len(info["ahn_layer_ids"]), 1)
        if sizes["num_layers"] != n_ahn or sizes["batch_size"] != B:
            raise ValueError(f"{src}: AHN tensors for {sizes['num_layers']} layers x {sizes['batch_size']} "
                             f"sequences, expected {n_ahn} x {B}")
        if ahn_sd["pos"].tolist() != [positions] * n_ahn:
            raise ValueError(f"{src}: the positions in the tensors differ from the metadata's {positions}")
        expected_keys = {f"ahn.{n}" for n in FIELDS}
        fa = {}
        for i in info["fa_layer_ids"]:
            if cols == 0:
                continue
            shape = (B, info["num_kv_heads"], cols, info["head_dim"])
            for part in ("keys", "values"):
                t = tensors.get(f"fa.{i}.{part}")
                if t is None or tuple(t.shape) != shape or t.dtype != sizes["dtype"]:
                    found = None if t is None else f"{list(t.shape)} {_dtype_name(t.dtype)}"
                    raise ValueError(f"{src}: fa.{i}.{part}: expected {list(shape)} {_dtype_name(sizes['dtype'])}, "
                                     f"found {found}")
                expected_keys.add(f"fa.{i}.{part}")
            fa[i] = (tensors[f"fa.{i}.keys"], tensors[f"fa.{i}.values"])
        extra = sorted(set(tensors) - expected_keys)
        if extra:
            raise ValueError(f"{src}: unexpected tensors {extra}")

        cache = cls.from_model(base)
        cache.ahn = AHNCache.from_state_dict(ahn_sd, W, S, kind, device=dev)
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, AHNCacheLayer):
                layer.seen = cols
            elif i in fa:
                _set_fa_kv(layer, fa[i][0].to(dev), fa[i][1].to(dev))
        cache._ahn_sha256 = fp["ahn_weights_sha256"]
        return cache

    def __repr__(self):
        n_fa = len(self.layers) - len(self.ahn_index)
        return (f"AHNModelCache(kind={self.kind!r}, window={self.window}, sinks={self.sinks}, "
                f"ahn_layers={len(self.ahn_index)}, full_attention_layers={n_fa}, "
                f"batch_size={None if self.ahn is None else self.ahn.batch_size}, nbytes={self.nbytes})")


# --------------------------------------------------------------------------------------
# helpers of save / load / check_model
# --------------------------------------------------------------------------------------
def _base_of(model):
    from .qwen2 import _base_model

    return _base_model(model)


def _info_of(model):
    base = _base_of(model)
    info = getattr(base, "_ahn_info", None)
    if info is None:
        raise ValueError("model is not patched: call ahn_ops.patch_qwen(model, ...) first")
    return base, info


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _fa_kv(layer):
    """``(keys, values)`` of a full-attention layer holding columns, else None."""
    if isinstance(layer, AHNCacheLayer) or not getattr(layer, "is_initialized", False):
        return None
    k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
    if k is None or v is None or k.numel() == 0:
        return None
    return k, v


def _set_fa_kv(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    layer.lazy_initialization(keys, values)  # sets what each transformers version keeps besides keys/values
    layer.keys, layer.values = keys, values


def _update_tensor(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}|{_dtype_name(t.dtype)}|{list(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())


def base_config_fields(model) -> Dict:
    """The fields of the base config that a cache depends on (JSON values)."""
    cfg = _base_of(model).config
    out = {}
    for f in _BASE_CONFIG_FIELDS:
        v = getattr(cfg, f, None)
        if f == "head_dim" and v is None:
            v = cfg.hidden_size // cfg.num_attention_heads
        if v is not None:
            out[f] = json.loads(json.dumps(v, sort_keys=True, default=str))
    return out


def fingerprints(model) -> Dict[str, str]:
    """sha256 fingerprints of what a cache depends on: ``ahn_weights_sha256`` (every AHN parameter, by name,
    as float32 so that one set of weights in two dtypes agrees: the dtype is checked on its own),
    ``base_weights_sample_sha256`` (names, shapes and the first elements of each base parameter),
    ``base_config_sha256`` and ``base_config`` (the JSON of :func:`base_config_fields`)."""
    base = _base_of(model)
    params = sorted(base.named_parameters(), key=lambda kv: kv[0])
    ha, hb = hashlib.sha256(), hashlib.sha256()
    for n, p in params:
        if ".ahn.fn." in n:
            _update_tensor(ha, n, p.detach().float())
        elif ".ahn." not in n:
            hb.update(f"{n}|{list(p.shape)}|".encode())
            _update_tensor(hb, n, p.detach().flatten()[:_BASE_SAMPLE].float())
    cfg = json.dumps(base_config_fields(base), sort_keys=True)
    return dict(ahn_weights_sha256=ha.hexdigest(), base_weights_sample_sha256=hb.hexdigest(),
                base_config_sha256=hashlib.sha256(cfg.encode()).hexdigest(), base_config=cfg)


def _expected_meta(base, info: Dict, fp: Dict[str, str]) -> Dict[str, str]:
    """The metadata a cache file of this model carries (the per-cache fields aside), in the order of checks."""
    return {"ahn_cache": CACHE_FILE_KIND, "format_version": str(CACHE_FORMAT_VERSION), "kind": info["kind"],
            "window": str(info["window"]), "sinks": str(info["sinks"]), "num_layers": str(info["num_layers"]),
            "hidden_size": str(base.config.hidden_size), "num_heads": str(info["num_heads"]),
            "num_kv_heads": str(info["num_kv_heads"]), "head_dim": str(info["head_dim"]),
            "dtype": _dtype_name(base.embed_tokens.weight.dtype), **fp}


def _content_sha256(tensors: Dict[str, torch.Tensor], meta: Dict[str, str]) -> str:
    """Checksum of the tensors and the metadata: a flipped byte anywhere in a file is found on load."""
    h = hashlib.sha256()
    rest = {k: v for k, v in meta.items() if k not in ("content_sha256", "format")}
    h.update(json.dumps(rest, sort_keys=True).encode())
    for name in sorted(tensors):
        _update_tensor(h, name, tensors[name])
    return h.hexdigest()


# the safetensors layout (8-byte little-endian header length, the JSON header, then the raw bytes), written and
# read here without safetensors' serialiser, whose Python-side copies took ~5 s per GB: one host buffer,
# one copy from the device (pinned), one write; on load one read into a pinned buffer and views into it
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_ST_TORCH = {v: k for k, v in _ST_DTYPES.items()}


def _to_host(tensors: Dict[str, torch.Tensor]):
    """The tensors as views of one host buffer (pinned when any is on a GPU), laid out as safetensors lays them
    out (larger element sizes first, then by name: every offset aligned to its element size, no holes):
    ``(views in file order, the uint8 buffer, offsets by name)``."""
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    offs, n = {}, 0
    for k in names:
        offs[k] = n
        n += tensors[k].numel() * tensors[k].element_size()
    cuda = any(t.is_cuda for t in tensors.values())
    buf = torch.empty(n, dtype=torch.uint8, pin_memory=cuda)
    views = {}
    for k in names:
        t = tensors[k].detach()
        v = buf[offs[k]:offs[k] + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        v.copy_(t, non_blocking=True)
        views[k] = v
    if cuda:  # the copies were queued on the current streams of the tensors' devices
        for d in {t.device for t in tensors.values() if t.is_cuda}:
            torch.cuda.current_stream(d).synchronize()
    return views, buf, offs


def _st_header(views: Dict[str, torch.Tensor], offs: Dict[str, int], meta: Dict[str, str]) -> bytes:
    """The length-prefixed JSON header of ``views`` at ``offs`` (:func:`_to_host`), padded with spaces to a
    multiple of 8 bytes so that the data starts aligned."""
    head: Dict[str, object] = {"__metadata__": meta}
    for k, v in views.items():
        nb = v.numel() * v.element_size()
        head[k] = {"dtype": _ST_DTYPES[v.dtype], "shape": list(v.shape), "data_offsets": [offs[k], offs[k] + nb]}
    js = json.dumps(head, separators=(",", ":")).encode()
    js += b" " * (-(len(js) + 8) % 8)
    return struct.pack("<Q", len(js)) + js


def _st_read(path: Path, pin: bool):
    """``(tensors, metadata)`` of a safetensors file, the tensors views of one host buffer (pinned if ``pin``).
    A header that does not parse, offsets outside the data, sizes that do not match the shapes, or a file
    shorter or longer than its header says raise ValueError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise ValueError(f"header of {n} bytes in a file of {size}")
        head = json.loads(f.read(n))
        if not isinstance(head, dict):
            raise ValueError("the header is not a JSON object")
        meta = head.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise ValueError("__metadata__ is not a JSON object")
        data = size - 8 - n
        end = 0
        for k, e in head.items():
            b0, b1 = (int(x) for x in e["data_offsets"])
            dt = _ST_TORCH[e["dtype"]]
            want = dt.itemsize
            for d in e["shape"]:
                want *= int(d)
            if not 0 <= b0 <= b1 <= data or b1 - b0 != want:
                raise ValueError(f"{k}: data_offsets {[b0, b1]} do not fit {want} bytes in {data} bytes of data")
            end = max(end, b1)
        if end != data:
            raise ValueError(f"{data} bytes of data, the tensors end at {end}")
        buf = torch.empty(data, dtype=torch.uint8, pin_memory=pin)
        if f.readinto(memoryview(buf.numpy())) != data:
            raise ValueError("the file ended early")
    tensors = {}
    for k, e in head.items():
        b0, b1 = e["data_offsets"]
        dt = _ST_TORCH[e["dtype"]]
        raw = buf[b0:b1] if b0 % dt.itemsize == 0 else buf[b0:b1].clone()
        tensors[k] = raw.view(dt).view([int(d) for d in e["shape"]])
    return tensors, meta


def _json_or_none(s):
    try:
        v = json.loads(s)
    except (TypeError, ValueError):
        return None
    return v if isinstance(v, dict) else None


def _short(v) -> str:
    """A metadata value for a message: sha256 digests shortened, a missing field said so."""
    if v is None:
        return "(missing)"
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:16] + "..."
    return str(v)


def _config_diffs(want: Dict, have: Optional[Dict]) -> List[str]:
    if have is None:
        return ["base_config: missing or malformed"]
    out = [f"base config {k}: expected {want.get(k)!r}, found {have.get(k)!r}"
           for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
    return out or ["base_config_sha256: differs"]


def _fingerprint_diffs(want: Dict[str, str], have: Dict[str, str]) -> List[str]:
    out = []
    for k in ("ahn_weights_sha256", "base_weights_sample_sha256"):
        if want[k] != have[k]:
            out.append(f"{k}: expected {_short(want[k])}, found {_short(have[k])}")
    if want["base_config_sha256"] != have["base_config_sha256"]:
        out += _config_diffs(json.loads(want["base_config"]), json.loads(have["base_config"]))
    return out


def _atomic_write(path: Path, data) -> None:
    """``data`` (bytes, or a callable that writes into the open file) into ``path`` through a temporary file of
    the same directory and ``os.replace``: readers see the old file or the whole new one, never a partial one;
    on failure the temporary file is removed."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"path: directory {str(parent)!r} does not exist")
    tmp = parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as f:  # a plain open: the file gets the umask's mode, like other outputs
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
