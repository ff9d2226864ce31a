"""ahn-merge on bad inputs: one clear line naming the file and the problem, and nothing written to --out.

Also: every written file gets the same, umask-respecting mode, and the AHN tensors of full-attention
layers that official checkpoints carry are left out with a warning.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from ahn_ops.merge import MergeError, main, merge
from ahn_ops.models import from_pretrained, save_ahn_weights
from tests.models.helpers import VOCAB, patched, tiny_model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """base dir (single file), sharded base dir, AHN-only dir (mamba2, fa_layer_ids=[2]) and its model."""
    root = tmp_path_factory.mktemp("merge_err")
    model = patched("mamba2", window=6, sinks=2, fa_layer_ids=[2])
    tiny_model(0).save_pretrained(root / "base")
    (root / "base" / "tokenizer.json").write_text("{}")
    tiny_model(0).save_pretrained(root / "base_sharded", max_shard_size="100KB")
    save_ahn_weights(model, root / "ahn")
    return root, model


def _copy(root, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(root / name, dst)
    return dst


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _refused(base, ahn, tmp_path, capsys, match, **kw):
    """The merge is refused as a function (MergeError) and as the CLI (exit 2, one line, no traceback), and
    writes nothing: --out not created, no temporary directory left beside it."""
    out = tmp_path / "out"
    with pytest.raises(MergeError, match=match):
        merge(base, ahn, out, progress=False, **kw)
    flags = [x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    capsys.readouterr()
    assert main(["--base", str(base), "--ahn", str(ahn), "--out", str(out), "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and "Warning" not in ln]
    assert len(lines) == 1 and lines[0].startswith("ahn-merge: error: "), err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    return lines[0]


# ------------------------------------------------------------------ unreadable files
@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_base_shard_is_named(ckpts, tmp_path, capsys, how):
    root, _ = ckpts
    base = _copy(root, "base", tmp_path)
    f = base / "model.safetensors"
    f.write_bytes(b"\x00" * 3) if how == "garbage" else _truncate(f)
    line = _refused(base, root / "ahn", tmp_path, capsys, r"--base: .*base/model\.safetensors is not a readable "
                                                             r"safetensors file, corrupt or truncated\?")
    assert str(f) in line


def test_truncated_shard_of_an_indexed_base_is_named(ckpts, tmp_path, capsys):
    root, _ = ckpts
    base = _copy(root, "base_sharded", tmp_path)
    shard = sorted(base.glob("*.safetensors"))[-1]
    _truncate(shard)
    _refused(base, root / "ahn", tmp_path, capsys, f"{shard.name} is not a readable safetensors file")


def test_index_pointing_at_the_wrong_shard_is_refused(ckpts, tmp_path, capsys):
    root, _ = ckpts
    base = _copy(root, "base_sharded", tmp_path)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"]["model.norm.weight"] = next(s for s in shards if s != index["weight_map"]["model.norm.weight"])
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(base, root / "ahn", tmp_path, capsys, r"places model\.norm\.weight in .* which does not hold it")


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_ahn_file_is_named(ckpts, tmp_path, capsys, how):
    root, _ = ckpts
    ahn = _copy(root, "ahn", tmp_path)
    f = ahn / "model.safetensors"
    f.write_bytes(b"not a safetensors file") if how == "garbage" else _truncate(f)
    _refused(root / "base", ahn, tmp_path, capsys, r"ahn/model\.safetensors: cannot read AHN weights, corrupt or "
                                                   r"truncated\?")


def test_cli_subprocess_prints_one_line(ckpts, tmp_path):
    root, _ = ckpts
    ahn = _copy(root, "ahn", tmp_path)
    _truncate(ahn / "model.safetensors")
    r = subprocess.run([sys.executable, "-m", "ahn_ops.merge", "--base", str(root / "base"), "--ahn", str(ahn),
                        "--out", str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and str(ahn / "model.safetensors") in r.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ configs
@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "num_attention_heads"])
def test_base_config_without_a_size_field(ckpts, tmp_path, capsys, field):
    root, _ = ckpts
    base = _copy(root, "base", tmp_path)
    cfg = json.loads((base / "config.json").read_text())
    del cfg[field]
    (base / "config.json").write_text(json.dumps(cfg))
    _refused(base, root / "ahn", tmp_path, capsys, rf"--base config: .*base/config\.json has no {field}")


def test_base_config_not_json(ckpts, tmp_path, capsys):
    root, _ = ckpts
    base = _copy(root, "base", tmp_path)
    (base / "config.json").write_text('{"hidden_size": 64,')
    _refused(base, root / "ahn", tmp_path, capsys, r"--base config: .*base/config\.json is not valid JSON")


def test_missing_ahn_config(ckpts, tmp_path, capsys):
    root, model = ckpts
    ahn = _copy(root, "ahn", tmp_path)
    (ahn / "config.json").unlink()
    line = _refused(root / "base", ahn, tmp_path, capsys, r"--ahn config: .*ahn/config\.json not found")
    assert "_ahn_implementation" not in line
    # the weights file alone, with kind and window given: merges
    out = merge(root / "base", ahn / "model.safetensors", tmp_path / "out", kind="mamba2", window=6, sinks=2,
                fa_layer_ids="2", progress=False)
    x = torch.randint(0, VOCAB, (1, 15), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(from_pretrained(out, backend="reference")(x, use_cache=False).logits,
                           model(x, use_cache=False).logits)


# ------------------------------------------------------------------ tensors
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_integer_ahn_tensors_are_refused(ckpts, tmp_path, capsys, dtype):
    root, _ = ckpts
    ahn = _copy(root, "ahn", tmp_path)
    sd = load_file(str(ahn / "model.safetensors"))
    sd["model.layers.1.ahn.fn.g_proj.weight"] = (sd["model.layers.1.ahn.fn.g_proj.weight"] * 10).to(dtype)
    save_file(sd, str(ahn / "model.safetensors"))
    _refused(root / "base", ahn, tmp_path, capsys,
             rf"model\.layers\.1\.ahn\.fn\.g_proj\.weight has dtype {dtype}, expected a floating-point dtype")


def test_full_attention_layer_tensors_are_left_out(ckpts, tmp_path):
    # official checkpoints with fa_layer_ids carry AHN tensors for those layers too
    root, model = ckpts
    ahn = _copy(root, "ahn", tmp_path)
    sd = load_file(str(ahn / "model.safetensors"))
    sd.update({k.replace("layers.0.", "layers.2."): torch.randn(v.shape) for k, v in sd.items() if ".layers.0." in k})
    save_file(sd, str(ahn / "model.safetensors"))
    with pytest.warns(UserWarning, match=r"ignored 8 AHN tensors of the full-attention layers \[2\]"):
        out = merge(root / "base", ahn, tmp_path / "out", progress=False)
    assert not [k for k in load_file(str(out / "model-ahn.safetensors")) if ".layers.2." in k]
    x = torch.randint(0, VOCAB, (1, 15), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(from_pretrained(out, backend="reference")(x, use_cache=False).logits,
                           model(x, use_cache=False).logits)


# ------------------------------------------------------------------ written files
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_share_the_umask_mode(ckpts, tmp_path, umask):
    root, _ = ckpts
    old = os.umask(umask)
    try:
        out = merge(root / "base", root / "ahn", tmp_path / "out", progress=False)
        save_ahn_weights(patched("dn", window=4, sinks=0), tmp_path / "ahn_only")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model-ahn.safetensors" in modes and "tokenizer.json" in modes
    assert set(modes.values()) == {want}, {k: oct(v) for k, v in modes.items()}
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ahn_only").iterdir()} == {want}


def test_failed_write_leaves_no_partial_output(ckpts, tmp_path, monkeypatch):
    root, _ = ckpts

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", disk_full)  # the tokenizer, the last file written
    with pytest.raises(OSError, match="No space left"):
        merge(root / "base", root / "ahn", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    # --force into an earlier output: the earlier files stay as they were
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "config.json").write_text("{}")
    assert main(["--base", str(root / "base"), "--ahn", str(root / "ahn"), "--out", str(busy), "--quiet",
                 "--force"]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["busy"] and [p.name for p in busy.iterdir()] == ["config.json"]
    assert (busy / "config.json").read_text() == "{}"
