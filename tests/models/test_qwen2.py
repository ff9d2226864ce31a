"""Qwen2.5 adapter: patched model == the spec, cache paths == full prefill, generate(), padding, names."""

from __future__ import annotations

import pytest
import torch

from ahn_ops.models import (AHNModelCache, ahn_state_dict, cache_kwargs, count_ahn_params, load_ahn_weights,
                            patch_qwen, save_ahn_weights)
from tests.models.helpers import VOCAB, greedy_reference, patched, randomize_ahn, spec_logits, tiny_model

KINDS = ("gdn", "dn", "mamba2")


def ids(B, T, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ the spec
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window,sinks,fa", [
    pytest.param(8, 2, (), id="W8-S2"),
    pytest.param(5, 0, (1,), id="W5-S0-fa1"),
])
def test_logits_match_spec(kind, window, sinks, fa):
    model = patched(kind, window=window, sinks=sinks, fa_layer_ids=list(fa))
    x = ids(2, 31)
    want = spec_logits(model, x, kind, window, sinks, fa_layer_ids=fa)
    with torch.no_grad():
        got = model(x, use_cache=False).logits.double()
        got_cache = model(x).logits.double()  # prefill through the AHN cache
    assert (got - want).abs().max() < 1e-4
    assert (got_cache - want).abs().max() < 1e-4
    # the memory branch matters in this test (else it would prove little)
    assert (want - spec_logits(model, x, kind, window, sinks, fa_layer_ids=fa, ahn=False)).abs().max() > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_untrained_equals_sliding_window(kind):
    model = patched(kind, window=6, sinks=3, random_ahn=False)  # o_proj.weight = 0 from the init
    assert all((p == 0).all() for n, p in model.named_parameters() if n.endswith("o_proj.weight") and ".ahn." in n)
    x = ids(1, 25, seed=1)
    with torch.no_grad():
        got = model(x, use_cache=False).logits.double()
    want = spec_logits(model, x, kind, 6, 3, ahn=False)
    assert (got - want).abs().max() < 1e-4


def test_window_covering_sequence_equals_unpatched():
    base = tiny_model(3)
    x = ids(2, 20, seed=2)
    with torch.no_grad():
        want = base(x, use_cache=False).logits
    patch_qwen(base, "gdn", window=20, sinks=4, backend="reference")
    randomize_ahn(base)  # the memory stays empty: M(t) = {} for t < W + S
    with torch.no_grad():
        got = base(x, use_cache=False).logits
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_model_under_autocast(kind):
    # autocast (the trainer's on CUDA) leaves the rotary embedding's q, k in fp32 beside a bf16 v: the AHN
    # attention takes all three in the autocast dtype, as the attention it replaces does
    x = ids(2, 31, seed=4)
    model = patched(kind, window=8, sinks=2)
    with torch.no_grad():
        want = model(x, use_cache=False).logits.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x, use_cache=False).logits.float()
        low = model.to(torch.bfloat16)(x, use_cache=False).logits.float()  # the scale: the model cast to bf16
    err, err_low = ((got - want).norm() / want.norm()).item(), ((low - want).norm() / want.norm()).item()
    assert err < 2 * err_low, (err, err_low)


# ------------------------------------------------------------------ cache, generate
@pytest.mark.parametrize("kind", KINDS)
def test_generate_greedy_equals_full_prefill_argmax(kind):
    model = patched(kind, window=7, sinks=2, fa_layer_ids=[2] if kind == "dn" else None)
    x = ids(2, 12, seed=3)
    out = model.generate(x, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(out[:, 12:], greedy_reference(model, x, 10))


def test_chunked_prefill_equals_one_prefill():
    model = patched("gdn", window=6, sinks=2, fa_layer_ids=[0])
    x = ids(2, 27, seed=4)
    with torch.no_grad():
        one = model(x).logits
        cache = AHNModelCache.from_model(model)
        parts = [model(x[:, a:b], **cache_kwargs(cache)).logits for a, b in ((0, 5), (5, 6), (6, 19), (19, 27))]
    assert (torch.cat(parts, 1) - one).abs().max() < 1e-4
    assert cache.get_seq_length() == 27 and cache.seq_lens().tolist() == [27, 27]
    # generate() with transformers' chunked prefill gives the same tokens
    a = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    b = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0, prefill_chunk_size=4)
    assert torch.equal(a, b)


def test_cache_memory_is_constant():
    model = patched("gdn", window=8, sinks=2)
    cache = AHNModelCache.from_model(model)
    with torch.no_grad():
        model(ids(1, 10), **cache_kwargs(cache))
        n0 = cache.nbytes
        model(ids(1, 40, seed=5), **cache_kwargs(cache))
    assert cache.nbytes == n0 > 0


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_cache_argument_either_name(name):
    # transformers 5.24 renamed past_key_values to cache: both names reach the AHN layers, on the
    # causal LM and on the inner Qwen2Model, positional included
    model = patched("gdn", window=4, sinks=1, fa_layer_ids=[1])
    x = ids(2, 11, seed=6)
    with torch.no_grad():
        one = model(x).logits
        cache = AHNModelCache.from_model(model)
        a = model(x[:, :7], **{name: cache}).logits
        b = model(x[:, 7:], **{name: cache}).logits
        assert (torch.cat([a, b], 1) - one).abs().max() < 1e-4
        assert cache.seq_lens().tolist() == [11, 11]
        inner = AHNModelCache.from_model(model)
        h = model.model(x[:, :7], None, None, inner).last_hidden_state  # the cache as 4th positional
        assert inner.seq_lens().tolist() == [7, 7] and h.shape == (2, 7, model.config.hidden_size)


@pytest.mark.parametrize("fa", [None, [1]], ids=["all-ahn", "fa1"])
def test_left_padded_batch_equals_single_sequences(fa):
    model = patched("gdn", window=6, sinks=2, fa_layer_ids=fa)
    a, b = ids(1, 17, seed=6), ids(1, 11, seed=7)
    pad = torch.zeros(1, 6, dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], 1)], 0)
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    out = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref_a = model.generate(a, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref_b = model.generate(b, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0, 17:], ref_a[0, 17:])
    assert torch.equal(out[1, 17:], ref_b[0, 11:])


def _host_syncs_of_decode_step(layers):
    """Host synchronisations (``.item()``/``bool()`` on tensors) of one decode step with a 2-D mask."""
    from torch.utils._python_dispatch import TorchDispatchMode

    syncs = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func in syncs
            return func(*args, **(kwargs or {}))

    model = tiny_model(layers=layers)  # backend "auto": the decode op, whose CPU kernel syncs in C++ only
    patch_qwen(model, "gdn", window=4, sinks=1)
    batch, mask = ids(2, 10), torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0  # left padding: generate() passes the 2-D mask on every step
    cache = AHNModelCache.from_model(model)
    with torch.no_grad():
        model(batch, attention_mask=mask, past_key_values=cache)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        with Count():
            model(batch[:, -1:], attention_mask=mask, past_key_values=cache, position_ids=torch.tensor([[6], [9]]))
    return Count.n


def test_decode_step_host_syncs_do_not_grow_with_layers():
    # the padding test of the new columns runs once per forward, not once per AHN layer
    assert _host_syncs_of_decode_step(4) == _host_syncs_of_decode_step(2) <= 1


# ------------------------------------------------------------------ checkpoint names, counts
SPEC_NAMES = {
    "gdn": {"a_proj.weight", "b_proj.weight", "g_proj.weight", "A_log", "D", "dt_bias", "o_norm.weight",
            "o_proj.weight"},
    "dn": {"b_proj.weight", "g_proj.weight", "o_norm.weight", "o_proj.weight"},
    "mamba2": {"dt_proj.weight", "dt_proj.bias", "g_proj.weight", "g_proj.bias", "A_log", "dt_bias", "norm.weight",
               "o_proj.weight"},
}


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_published_names(kind, tmp_path):
    model = patched(kind, window=8, sinks=2, fa_layer_ids=[1])
    sd = ahn_state_dict(model)
    assert set(sd) == {f"model.layers.{i}.ahn.fn.{n}" for i in (0, 2) for n in SPEC_NAMES[kind]}
    H, D, hidden = 4, 16, 64
    shapes = {"o_proj.weight": (H, D, D), "o_norm.weight": (D,), "norm.weight": (H * D,), "A_log": (H,),
              "dt_bias": (H,), "D": (H,), "dt_proj.bias": (H,), "g_proj.bias": (H,)}
    for k, t in sd.items():
        name = k.split(".ahn.fn.")[1]
        assert tuple(t.shape) == shapes.get(name, (H, hidden)), k
    save_ahn_weights(model, tmp_path)
    # a fresh model reads kind/window/sinks/fa_layer_ids from the AHN config.json
    fresh = patch_qwen(tiny_model(0), weights=tmp_path, backend="reference")
    assert fresh._ahn_info["kind"] == kind and fresh._ahn_info["fa_layer_ids"] == [1]
    assert fresh._ahn_info["window"] == 8 and fresh._ahn_info["sinks"] == 2
    for k, t in ahn_state_dict(fresh).items():
        assert torch.equal(t, sd[k])
    x = ids(1, 20)
    with torch.no_grad():
        assert torch.equal(fresh(x, use_cache=False).logits, model(x, use_cache=False).logits)
    # the same through the weights file: its config.json sits next to it (as ahn-merge reads it)
    from_file = patch_qwen(tiny_model(0), weights=tmp_path / "model.safetensors", backend="reference")
    assert from_file._ahn_info == fresh._ahn_info


def test_strict_loading_names_bad_keys(tmp_path):
    model = patched("gdn", window=8, sinks=2)
    sd = ahn_state_dict(model)
    drop = dict(sd)
    drop.pop("model.layers.1.ahn.fn.dt_bias")
    with pytest.raises(KeyError, match=r"missing keys \(1\): model\.layers\.1\.ahn\.fn\.dt_bias"):
        load_ahn_weights(model, drop)
    extra = dict(sd, **{"model.layers.0.ahn.fn.q_proj.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="unexpected keys.*q_proj"):
        load_ahn_weights(model, extra)
    dn = patched("dn", window=8, sinks=2)
    with pytest.raises(KeyError, match="missing keys|unexpected keys"):
        load_ahn_weights(dn, sd)  # GDN weights into a DN model
    bad = dict(sd, **{"model.layers.0.ahn.fn.o_proj.weight": torch.zeros(4, 8, 8)})
    with pytest.raises(ValueError, match=r"o_proj\.weight: checkpoint shape \[4, 8, 8\]"):
        load_ahn_weights(model, bad)
    with pytest.raises(ValueError, match="already patched"):
        patch_qwen(model, "gdn", window=8)
    with pytest.raises(ValueError, match="window is required"):
        patch_qwen(tiny_model(0), "gdn")


# published sizes (docs/AHN_SPEC.md): hidden, layers, H, Hkv -> params per kind
QWEN25 = {
    "3B": (2048, 36, 16, 2, 11008, {"gdn": 13.0e6, "dn": 11.8e6, "mamba2": 11.9e6}),
    "7B": (3584, 28, 28, 4, 18944, {"gdn": 21.3e6, "dn": 18.5e6, "mamba2": 18.6e6}),
    "14B": (5120, 48, 40, 8, 13824, {"gdn": 61.0e6, "dn": 51.1e6, "mamba2": 51.4e6}),
}


@pytest.mark.parametrize("size", list(QWEN25))
def test_parameter_counts_on_meta(size):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, L, H, HKV, inter, want = QWEN25[size]
    cfg = Qwen2Config(hidden_size=hidden, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=HKV,
                      intermediate_size=inter, vocab_size=151936)
    for kind, n in want.items():
        with torch.device("meta"):
            model = Qwen2ForCausalLM(cfg)
        patch_qwen(model, kind, window=32640, sinks=128)
        got = sum(p.numel() for name, p in model.named_parameters() if ".ahn.fn." in name)
        assert all(p.is_meta for name, p in model.named_parameters() if ".ahn.fn." in name)
        assert got == count_ahn_params(kind, hidden, H, 128, L)
        assert round(got / 1e6, 1) == n / 1e6, (size, kind, got)


def test_models_submodule_is_reachable_from_a_fresh_import():
    # ahn_ops imports the adapter lazily (it pulls in transformers): ahn_ops.models.* must still resolve
    import subprocess
    import sys

    code = "import ahn_ops; f = ahn_ops.models.cache_kwargs; assert ahn_ops.patch_qwen is ahn_ops.models.patch_qwen"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
