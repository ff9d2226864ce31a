"""ahn_ops: fused operators for AHN (Artificial Hippocampus Networks) on Qwen2.5.

Public API (see docs/AHN_SPEC.md and README.md):
    ahn_attention(...)   prefill (differentiable), chunked prefill and decode on a cache
    ahn_decode(...)      one decode step on an AHNLayerCache
    AHNCache             constant-size cache: sinks + ring KV, gate ring, fp32 memory state
    generate(model, ...) fast decoding of a patched model: static decode step, CUDA-graph replay
    DecodePlan           what that decode step fuses (generate(..., plan=...)); default: DecodePlan.default
Every fused op is also reachable as ``torch.ops.ahn.<name>``.
"""

from ._ext import load_extension as _load_extension

_load_extension()

from .cache import AHNCache, AHNLayerCache  # noqa: E402
from .ops.ahn_attention import ahn_attention, ahn_decode  # noqa: E402
from .ops.ahn_attention import reference  # noqa: E402

__version__ = "0.1.0"

__all__ = ["ahn_attention", "ahn_decode", "AHNCache", "AHNLayerCache", "reference", "__version__"]

# Qwen2.5 adapter (ahn_ops.models): imported on first use, since it pulls in transformers.
_MODEL_API = ("patch_qwen", "from_pretrained", "AHNModelCache")
__all__ += list(_MODEL_API)
# ahn_ops.generate and its DecodePlan (fast decoding, ahn_ops/fast_decode/): imported on first use, like the
# adapter.
_DECODE_API = ("generate", "DecodePlan")
__all__ += list(_DECODE_API)


def __getattr__(name):
    if name == "models":  # the submodule itself, e.g. ahn_ops.models.cache_kwargs
        import importlib

        return importlib.import_module(".models", __name__)
    if name in _MODEL_API:
        from . import models

        return getattr(models, name)
    if name in _DECODE_API:
        from . import fast_decode

        return getattr(fast_decode, name)
    raise AttributeError(f"module 'ahn_ops' has no attribute {name!r}")
