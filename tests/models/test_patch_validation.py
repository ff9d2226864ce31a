"""patch_qwen / load_ahn_weights with bad weights: a clear error and the model left exactly as it was.

Every kind of bad weights is refused before the model changes (or the change is undone), so a retry with
good weights works and gives the logits of patching with good weights directly. Checkpoints with AHN
tensors for their full-attention layers (official releases with ``fa_layer_ids``) load with a warning.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from ahn_ops.models import ahn_state_dict, load_ahn_weights, patch_qwen, save_ahn_weights
from ahn_ops.models import qwen2 as qwen2_mod
from tests.models.helpers import VOCAB, patched, tiny_model

W, S = 6, 2


def _ids():
    return torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(_ids(), use_cache=False).logits


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """An AHN-only checkpoint (dir) of the 3-layer tiny model, its state dict and reference logits."""
    root = tmp_path_factory.mktemp("ahn")
    model = patched("gdn", window=W, sinks=S)
    save_ahn_weights(model, root / "good")
    direct = patch_qwen(tiny_model(0), weights=root / "good", backend="reference")
    return root, ahn_state_dict(model), _logits(direct)


def _snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()], model.config.to_dict(), dict(vars(model.config)),
            len(model.model._forward_pre_hooks), "_prepare_cache_for_generation" in vars(model))


def _assert_unchanged(model, snap):
    sd, types, cfg, cfg_vars, hooks, gen = snap
    now = model.state_dict()
    assert list(now) == list(sd)
    assert all(torch.equal(now[k], v) for k, v in sd.items())
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert model.config.to_dict() == cfg and dict(vars(model.config)) == cfg_vars
    assert len(model.model._forward_pre_hooks) == hooks
    assert ("_prepare_cache_for_generation" in vars(model)) == gen
    assert getattr(model.model, "_ahn_info", None) is None and getattr(model, "_ahn_info", None) is None
    assert not any(hasattr(layer.self_attn, "_ahn_cfg") for layer in model.model.layers)


def _write_dir(root, name, sd, cfg_from=None):
    """A checkpoint dir: ``sd`` as model.safetensors next to a copy of ``cfg_from``'s config.json."""
    d = root / name
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    if cfg_from is not None:
        (d / "config.json").write_text((cfg_from / "config.json").read_text())
    return d


def _other_size(tmp_path, **size):
    model = patched("gdn", window=W, sinks=S, **size)
    save_ahn_weights(model, tmp_path / "other")
    return model


def _bad_weights(case, root, sd, tmp_path):
    """(weights, extra patch_qwen kwargs, exception type, message regex) for one kind of bad weights."""
    kw = dict(kind="gdn", window=W, sinks=S)
    key = "model.layers.0.ahn.fn.o_proj.weight"
    if case == "wrong_shape":
        return dict(sd, **{key: torch.zeros(4, 8, 8)}), kw, ValueError, r"o_proj\.weight: checkpoint shape \[4, 8, 8\]"
    if case == "other_hidden_dir":
        _other_size(tmp_path, hidden=32)
        return tmp_path / "other", {}, ValueError, r"does not match this model.*hidden_size=32 \(this model: 64\)"
    if case == "other_layers_dir":
        _other_size(tmp_path, layers=4)
        return tmp_path / "other", {}, ValueError, r"does not match this model.*num_hidden_layers=4 \(this model: 3\)"
    if case == "other_heads_dir":
        _other_size(tmp_path, heads=8, kv_heads=2)
        return tmp_path / "other", {}, ValueError, r"does not match this model.*num_attention_heads=8"
    if case == "other_hidden_no_config":
        return (ahn_state_dict(_other_size(tmp_path, hidden=32)), kw, ValueError,
                r"does not match this model.*it has hidden_size=32 \(this model: 64\)")
    if case == "more_layers_no_config":
        return (ahn_state_dict(_other_size(tmp_path, layers=4)), kw, ValueError,
                r"does not match this model: it has AHN tensors for layer 3 but the model has 3 layers")
    if case == "fewer_layers_no_config":
        return (ahn_state_dict(_other_size(tmp_path, layers=2)), kw, ValueError,
                r"does not match this model: it has AHN tensors for layers up to 1 only, the model has 3 layers")
    if case == "corrupt_file":
        d = _write_dir(tmp_path, "corrupt", sd, root / "good")
        (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
        return d, {}, ValueError, r"corrupt/model\.safetensors: cannot read AHN weights"
    if case == "truncated_file":
        d = _write_dir(tmp_path, "truncated", sd, root / "good")
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
        return d / "model.safetensors", {}, ValueError, r"truncated/model\.safetensors: cannot read AHN weights"
    if case == "corrupt_pt":
        (tmp_path / "w.pt").write_bytes(b"PK\x03\x04 not a zip")
        return tmp_path / "w.pt", kw, ValueError, r"w\.pt: cannot read AHN weights"
    if case == "missing_keys":
        d = _write_dir(tmp_path, "missing", {k: v for k, v in sd.items() if not k.endswith("dt_bias")}, root / "good")
        return d, {}, KeyError, r"missing keys \(3\): model\.layers\.0\.ahn\.fn\.dt_bias"
    if case == "unexpected_keys":
        extra = dict(sd, **{"model.layers.1.ahn.fn.q_proj.weight": torch.zeros(4, 64)})
        return _write_dir(tmp_path, "extra", extra, root / "good"), {}, KeyError, r"unexpected keys \(1\).*q_proj"
    if case == "int_dtype":
        ints = {k: (v * 100).to(torch.int32) if "proj" in k else v for k, v in sd.items()}
        d = _write_dir(tmp_path, "ints", ints, root / "good")
        return d, {}, ValueError, r"a_proj\.weight has dtype torch\.int32, expected a floating-point dtype"
    if case == "not_a_tensor":
        return dict(sd, **{key: [[0.0]]}), kw, ValueError, r"o_proj\.weight is a list, expected a tensor"
    if case == "no_such_path":
        p = tmp_path / "a" / "path" / "that" / "does" / "not" / "exist"
        return p, {}, FileNotFoundError, r"a/path/that/does/not/exist.*does not exist"
    raise AssertionError(case)


CASES = ["wrong_shape", "other_hidden_dir", "other_layers_dir", "other_heads_dir", "other_hidden_no_config",
         "more_layers_no_config", "fewer_layers_no_config", "corrupt_file", "truncated_file", "corrupt_pt",
         "missing_keys", "unexpected_keys", "int_dtype", "not_a_tensor", "no_such_path"]


@pytest.mark.parametrize("case", CASES)
def test_bad_weights_leave_the_model_unchanged(good, tmp_path, case):
    root, sd, want = good
    weights, kw, exc, match = _bad_weights(case, root, sd, tmp_path)
    model = tiny_model(0)
    snap = _snapshot(model)
    with pytest.raises(exc, match=match):
        patch_qwen(model, weights=weights, backend="reference", **kw)
    _assert_unchanged(model, snap)
    # not "already patched": a retry with good weights works and equals patching with them directly
    patch_qwen(model, weights=root / "good", backend="reference")
    assert torch.equal(_logits(model), want)


@pytest.mark.parametrize("case", ["wrong_shape", "other_hidden_no_config", "int_dtype", "missing_keys"])
def test_load_ahn_weights_changes_nothing_on_error(good, tmp_path, case):
    root, sd, want = good
    weights, _, exc, match = _bad_weights(case, root, sd, tmp_path)
    model = patch_qwen(tiny_model(0), "gdn", window=W, sinks=S, backend="reference")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        load_ahn_weights(model, weights)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    load_ahn_weights(model, root / "good")
    assert torch.equal(_logits(model), want)


def test_failure_while_patching_is_undone(good, monkeypatch):
    # a failure after the checks (e.g. out of memory while copying) takes every change back
    root, _, want = good
    model = tiny_model(0)
    snap = _snapshot(model)

    def boom(*a, **k):
        raise RuntimeError("simulated failure while copying")

    monkeypatch.setattr(qwen2_mod, "_copy_into", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        patch_qwen(model, weights=root / "good", backend="reference", prefill_chunk_size=16)
    _assert_unchanged(model, snap)
    assert model.generation_config.prefill_chunk_size is None
    monkeypatch.undo()
    patch_qwen(model, weights=root / "good", backend="reference")
    assert torch.equal(_logits(model), want)


def test_nonexistent_path_is_named_before_window(tmp_path):
    p = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{p}.*does not exist"):
        patch_qwen(tiny_model(0), weights=str(p))


# ------------------------------------------------------------------ fa_layer_ids keys of official checkpoints
@pytest.fixture()
def official_fa(tmp_path):
    """A checkpoint with fa_layer_ids=1 in its config that also carries layer 1's AHN tensors."""
    model = patched("gdn", window=W, sinks=S, fa_layer_ids=[1])
    save_ahn_weights(model, tmp_path / "fa")
    sd = ahn_state_dict(model)
    sd.update({k.replace("layers.0.", "layers.1."): torch.randn(v.shape) for k, v in sd.items() if ".layers.0." in k})
    save_file(sd, str(tmp_path / "fa" / "model.safetensors"))
    assert json.loads((tmp_path / "fa" / "config.json").read_text())["fa_layer_ids"] == "1"
    return tmp_path / "fa", model, sd


def test_full_attention_layer_keys_are_ignored_with_a_warning(official_fa):
    path, model, sd = official_fa
    with pytest.warns(UserWarning, match=r"ignored 8 AHN tensors of the full-attention layers \[1\]"):
        fresh = patch_qwen(tiny_model(0), weights=path, backend="reference")
    assert fresh._ahn_info["fa_layer_ids"] == [1] and not hasattr(fresh.model.layers[1], "ahn")
    assert torch.equal(_logits(fresh), _logits(model))
    # the same through load_ahn_weights and a state dict
    again = patch_qwen(tiny_model(0), "gdn", window=W, sinks=S, fa_layer_ids=[1], backend="reference")
    with pytest.warns(UserWarning, match=r"ignored 8 AHN tensors"):
        load_ahn_weights(again, sd)
    assert torch.equal(_logits(again), _logits(model))


def test_other_keys_stay_strict_with_fa_layers(official_fa):
    _, _, sd = official_fa
    extra = dict(sd, **{"model.layers.0.ahn.fn.q_proj.weight": torch.zeros(4, 64)})
    model = tiny_model(0)
    snap = _snapshot(model)
    with pytest.warns(UserWarning, match="ignored 8"), pytest.raises(KeyError, match=r"unexpected keys \(1\)"):
        patch_qwen(model, "gdn", window=W, sinks=S, fa_layer_ids=[1], weights=extra, backend="reference")
    _assert_unchanged(model, snap)
    missing = {k: v for k, v in sd.items() if k != "model.layers.2.ahn.fn.A_log"}
    with pytest.warns(UserWarning, match="ignored 8"), pytest.raises(KeyError, match=r"missing keys \(1\)"):
        patch_qwen(model, "gdn", window=W, sinks=S, fa_layer_ids=[1], weights=missing, backend="reference")
    _assert_unchanged(model, snap)


def test_grad_mode_without_cache_takes_the_differentiable_path():
    """A patched model called with gradients live and no cache (eval or train mode, config use_cache=True)
    runs the differentiable full-sequence path: no AHN cache is made, and the AHN parameters get gradients."""
    import ahn_ops

    model = tiny_model()
    ahn_ops.patch_qwen(model, "gdn", window=4, sinks=1)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if ".ahn." in n]
    for p in params:
        p.requires_grad_(True)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    for train in (False, True):
        model.train(train)
        for p in params:
            p.grad = None
        out = model(ids)
        out.logits.float().pow(2).mean().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), train
    with torch.no_grad():
        model.eval()
        out = model(ids)
    assert isinstance(out.past_key_values, ahn_ops.models.AHNModelCache)
