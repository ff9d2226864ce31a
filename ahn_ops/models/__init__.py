"""Model adapters: a Hugging Face Qwen2.5 becomes an AHN model (see ``qwen2.py``).

    patch_qwen(model, kind, window, sinks, weights=None, fa_layer_ids=None)   in place
    from_pretrained(path, **hf_kwargs)                                        merged checkpoint
    AHNModelCache                                                             the transformers Cache used by generate()
    cache_kwargs(cache)                                                       {"cache"|"past_key_values": cache} for model(...)
    full_attention(model) / ahn_window(model, W, S)                           context managers (teacher pass, per-step W/S)
"""

from .hf_cache import AHNCacheLayer, AHNModelCache
from .modules import (IMPL_TO_KIND, KIND_TO_IMPL, AHNBlock, DeltaNetAHN, GatedDeltaNetAHN, Mamba2AHN,
                      ahn_param_shapes, count_ahn_params, normalize_kind)
from .qwen2 import (ahn_config_fields, ahn_state_dict, ahn_window, cache_kwargs, from_pretrained, full_attention,
                    load_ahn_weights, parse_fa_layer_ids, patch_qwen, read_ahn_config, read_ahn_tensors,
                    save_ahn_weights)

__all__ = [
    "patch_qwen", "from_pretrained", "load_ahn_weights", "save_ahn_weights", "ahn_state_dict", "ahn_config_fields",
    "full_attention", "ahn_window", "cache_kwargs",
    "read_ahn_config", "read_ahn_tensors", "parse_fa_layer_ids", "AHNModelCache", "AHNCacheLayer", "AHNBlock",
    "GatedDeltaNetAHN", "DeltaNetAHN", "Mamba2AHN", "ahn_param_shapes", "count_ahn_params", "normalize_kind",
    "KIND_TO_IMPL", "IMPL_TO_KIND",
]
