"""ahn-merge: AHN-only + base -> merged -> ahn_ops.from_pretrained gives the same logits; bad inputs fail clearly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ahn_ops.merge import MergeError, main, merge
from ahn_ops.models import ahn_state_dict, from_pretrained, save_ahn_weights
from tests.models.helpers import VOCAB, patched, tiny_model


def _ids(T=23):
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """base dir (sharded + single-file variants), AHN-only dir, and the patched model they come from."""
    root = tmp_path_factory.mktemp("merge")
    model = patched("mamba2", window=6, sinks=2, fa_layer_ids=[2])
    base = tiny_model(0)  # same base weights as `model`
    base.save_pretrained(root / "base")
    base.save_pretrained(root / "base_sharded", max_shard_size="100KB")
    (root / "base" / "tokenizer.json").write_text("{}")
    save_ahn_weights(model, root / "ahn")
    return root, model


@pytest.mark.parametrize("base_name", ["base", "base_sharded"])
def test_round_trip_logits(ckpts, base_name):
    root, model = ckpts
    out = root / f"merged_{base_name}"
    assert main(["--base", str(root / base_name), "--ahn", str(root / "ahn"), "--out", str(out), "--quiet"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["_ahn_implementation"] == "Mamba2" and cfg["sliding_window"] == 6
    assert cfg["num_attn_sinks"] == 2 and cfg["fa_layer_ids"] == "2"
    assert cfg["_layer_implementation"] == "Qwen2MemDecoderLayer"
    if base_name == "base":
        assert (out / "tokenizer.json").exists()
    merged = from_pretrained(out, backend="reference")
    for k, t in ahn_state_dict(model).items():
        assert torch.equal(ahn_state_dict(merged)[k], t)
    x = _ids()
    with torch.no_grad():
        assert torch.equal(merged(x, use_cache=False).logits, model(x, use_cache=False).logits)
    assert torch.equal(merged.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0),
                       model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0))


@pytest.mark.parametrize("kind,impl", [("gdn", "GatedDeltaNet"), ("dn", "DeltaNet")])
def test_round_trip_other_kinds(tmp_path, kind, impl):
    # the fixture above covers mamba2: the merged checkpoint of gdn and dn loads to the same logits too
    model = patched(kind, window=5, sinks=1, fa_layer_ids=[0])
    tiny_model(0).save_pretrained(tmp_path / "base")
    save_ahn_weights(model, tmp_path / "ahn")
    out = tmp_path / "merged"
    assert main(["--base", str(tmp_path / "base"), "--ahn", str(tmp_path / "ahn"), "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["_ahn_implementation"] == impl
    merged = from_pretrained(out, backend="reference")
    x = _ids()
    with torch.no_grad():
        assert torch.equal(merged(x, use_cache=False).logits, model(x, use_cache=False).logits)


@pytest.mark.parametrize("flags,needle", [(["--window", "0"], "window must be >= 1"),
                                          (["--sinks", "-1"], "sinks >= 0")])
def test_refuses_bad_window_or_sinks(ckpts, tmp_path, flags, needle):
    root, _ = ckpts
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match=needle):
        merge(root / "base", root / "ahn", out, window=int(flags[1]) if flags[0] == "--window" else None,
              sinks=int(flags[1]) if flags[0] == "--sinks" else None, progress=False)
    assert main(["--base", str(root / "base"), "--ahn", str(root / "ahn"), "--out", str(out), "--quiet", *flags]) == 2
    assert not out.exists() or not any(out.iterdir())


def test_refuses_non_empty_out_without_force(ckpts):
    root, _ = ckpts
    out = root / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(MergeError, match="not empty; pass --force"):
        merge(root / "base", root / "ahn", out, progress=False)
    assert main(["--base", str(root / "base"), "--ahn", str(root / "ahn"), "--out", str(out), "--quiet"]) == 2
    merge(root / "base", root / "ahn", out, force=True, progress=False)
    assert (out / "model.safetensors.index.json").exists() and (out / "keep.txt").exists()


def test_refuses_mismatched_hidden_size(ckpts, tmp_path):
    root, _ = ckpts
    other = patched("mamba2", window=6, sinks=2, fa_layer_ids=[2], hidden=32)
    save_ahn_weights(other, tmp_path / "ahn32")
    with pytest.raises(MergeError, match="hidden_size=64 but the AHN weights were trained for hidden_size=32"):
        merge(root / "base", tmp_path / "ahn32", tmp_path / "out", progress=False)
    # same mismatch without the config fields: caught on the tensor shapes
    cfg = json.loads((tmp_path / "ahn32" / "config.json").read_text())
    cfg.pop("hidden_size")
    (tmp_path / "ahn32" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match=r"shape \[4, 32\] in --ahn, expected \[4, 64\]"):
        merge(root / "base", tmp_path / "ahn32", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_missing_and_unexpected_keys(ckpts, tmp_path):
    from safetensors.torch import load_file, save_file

    root, _ = ckpts
    bad = tmp_path / "ahn_bad"
    bad.mkdir()
    (bad / "config.json").write_text((root / "ahn" / "config.json").read_text())
    sd = load_file(str(root / "ahn" / "model.safetensors"))
    sd.pop("model.layers.0.ahn.fn.A_log")
    sd["model.layers.1.ahn.fn.q_proj.weight"] = torch.zeros(4, 64)  # no such AHN parameter
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(MergeError, match=r"missing keys \(1\): model\.layers\.0\.ahn\.fn\.A_log.*"
                                         r"unexpected keys \(1\): model\.layers\.1\.ahn\.fn\.q_proj\.weight"):
        merge(root / "base", bad, tmp_path / "out", progress=False)
    # a layer past the base's last one is unexpected too
    sd["model.layers.0.ahn.fn.A_log"] = torch.zeros(4)
    del sd["model.layers.1.ahn.fn.q_proj.weight"]
    sd["model.layers.3.ahn.fn.A_log"] = torch.zeros(4)
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(MergeError, match=r"unexpected keys \(1\): model\.layers\.3\.ahn\.fn\.A_log"):
        merge(root / "base", bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(MergeError, match="already an AHN checkpoint"):
        merge(root / "ahn", root / "ahn", tmp_path / "out2", progress=False)


def test_from_pretrained_rejects_plain_base(ckpts):
    root, _ = ckpts
    with pytest.raises(ValueError, match="not a merged AHN checkpoint"):
        from_pretrained(root / "base")


def test_cli_entry_point():
    r = subprocess.run([sys.executable, "-m", "ahn_ops.merge", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--base" in r.stdout and "--force" in r.stdout
