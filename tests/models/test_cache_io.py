"""Read once, ask many: AHNModelCache.save / load, clone / select / expand, generate(cache=...), python/ask.py.

CPU, tiny models, greedy. The reference is always an uninterrupted run: generating from a saved, loaded or
forked cache must give, token for token, what generating on the whole sequence gives. Every refusal must raise
the documented error and leave files and caches as they were.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ahn_ops
from ahn_ops.fast_decode import DecodePlan, prefill
from ahn_ops.models import AHNModelCache, cache_kwargs
from tests.models.helpers import VOCAB, patched, randomize_ahn

KINDS = ("gdn", "dn", "mamba2")
ROOT = Path(__file__).resolve().parents[2]
W, S, NEW = 5, 2, 5


def ids(B, T, seed=0):
    return torch.randint(1, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def snapshot(cache: AHNModelCache):
    """Every tensor and counter of a cache, copied."""
    out = [t.clone() for t in cache.ahn._fields()] if cache.ahn is not None else []
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            out += [layer.keys.clone(), layer.values.clone()]
        out.append(layer.get_seq_length())
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def doc_cache(model, doc, chunk=None):
    _, cache = prefill(model, doc, chunk_size=chunk)
    return cache


def tmp_files(d: Path):
    return sorted(p.name for p in d.iterdir())


# ------------------------------------------------------------------ save -> load -> generate == uninterrupted
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fa", [pytest.param(None, id="all-ahn"), pytest.param([1], id="fa1")])
def test_generate_after_save_load_equals_uninterrupted(kind, fa, tmp_path):
    # doc 11 tokens > S + W: the memory has absorbed tokens before the cache is saved
    model = patched(kind, window=W, sinks=S, fa_layer_ids=fa)
    doc, q = ids(1, 11, seed=1), ids(1, 3, seed=2)
    want = ahn_ops.generate(model, torch.cat([doc, q], 1), NEW)[:, 11:]
    cache = doc_cache(model, doc, chunk=4 if kind == "dn" else None)
    path = tmp_path / "doc.safetensors"
    cache.save(path)
    loaded = AHNModelCache.load(path, model)
    assert_same(snapshot(loaded), snapshot(cache))                  # bit for bit, FA K/V included
    # the continuation's logits, not only its argmax: positions continue from the cache's (a shift by one
    # moves these logits by ~0.5 yet can leave a few greedy tokens as they were)
    with torch.no_grad():
        one = model(torch.cat([doc, q], 1)).logits[:, -1].float()
    assert (prefill(model, q, cache=loaded.clone())[0] - one).abs().max() < 1e-4
    before = snapshot(cache)
    assert torch.equal(ahn_ops.generate(model, q, NEW, cache=cache), want)
    assert torch.equal(ahn_ops.generate(model, q, NEW, cache=loaded), want)
    assert_same(snapshot(cache), before)                            # generate(cache=) works on a fork
    assert tmp_files(tmp_path) == ["doc.safetensors"]               # no temporary file left behind


def test_hf_generate_continues_from_loaded_cache(tmp_path):
    # transformers' contract for a given cache: input_ids = cached prefix + new tokens (or new tokens with an
    # attention_mask over prefix + new); the cache advances in place
    model = patched("gdn", window=W, sinks=S, fa_layer_ids=[1])
    doc, q = ids(1, 11, seed=1), ids(1, 3, seed=2)
    full = torch.cat([doc, q], 1)
    want = model.generate(full, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    path = tmp_path / "doc.safetensors"
    doc_cache(model, doc).save(path)
    cache = AHNModelCache.load(path, model)
    got = model.generate(full, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **cache_kwargs(cache))
    assert torch.equal(got, want)
    assert cache.get_seq_length() > 11                              # advanced in place, as transformers does
    cache = AHNModelCache.load(path, model)
    got = model.generate(q, attention_mask=torch.ones_like(full), max_new_tokens=NEW, do_sample=False,
                         pad_token_id=0, **cache_kwargs(cache))
    assert torch.equal(got[:, 3:], want[:, 14:])
    # the new tokens alone (no mask over the prefix) cannot be told apart from a short full sequence: refused
    cache = AHNModelCache.load(path, model)
    before = snapshot(cache)
    with pytest.raises(ValueError, match="full sequence"):
        model.generate(q, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **cache_kwargs(cache))
    with pytest.raises(ValueError, match="holds 1 sequence"):
        model.generate(full.repeat(2, 1), max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                       **cache_kwargs(cache))
    assert_same(snapshot(cache), before)


def test_left_padded_documents_continue_like_one_run(tmp_path):
    # a padded batch of documents, saved and loaded: each continues at its own position (the full-attention
    # layer must mask the padding columns it holds)
    model = patched("mamba2", window=W, sinks=S, fa_layer_ids=[2])
    doc, q = ids(2, 12, seed=3), ids(2, 3, seed=4)
    mask = torch.ones_like(doc)
    doc[1, :4], mask[1, :4] = 0, 0
    full, full_mask = torch.cat([doc, q], 1), torch.cat([mask, torch.ones_like(q)], 1)
    want = ahn_ops.generate(model, full, NEW, attention_mask=full_mask)[:, 15:]
    _, cache = prefill(model, doc, mask)
    cache.save(tmp_path / "c.safetensors")
    loaded = AHNModelCache.load(tmp_path / "c.safetensors", model)
    assert loaded.seq_lens().tolist() == [12, 8]
    assert torch.equal(ahn_ops.generate(model, q, NEW, cache=loaded)[:, 3:], want)


# ------------------------------------------------------------------ forks == separate runs
@pytest.mark.parametrize("kind", KINDS)
def test_expand_equals_separate_runs(kind):
    model = patched(kind, window=W, sinks=S, fa_layer_ids=[0] if kind == "gdn" else None)
    doc, qs = ids(1, 10, seed=5), ids(3, 3, seed=6)
    cache = doc_cache(model, doc)
    before = snapshot(cache)
    got = ahn_ops.generate(model, qs, NEW, cache=cache.expand(3))
    assert_same(snapshot(cache), before)
    for i in range(3):
        want = ahn_ops.generate(model, torch.cat([doc, qs[i:i + 1]], 1), NEW)
        assert torch.equal(got[i, 3:], want[0, 13:])


def test_expand_with_left_padded_questions_equals_one_by_one():
    # questions of different lengths in one batch: padding between the document and a question is skipped
    model = patched("gdn", window=W, sinks=S, fa_layer_ids=[1])
    doc = ids(1, 10, seed=7)
    q0, q1 = ids(1, 4, seed=8), ids(1, 2, seed=9)
    batch = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.zeros_like(batch)
    batch[0], mask[0] = q0[0], 1
    batch[1, 2:], mask[1, 2:] = q1[0], 1
    cache = doc_cache(model, doc)
    got = ahn_ops.generate(model, batch, NEW, attention_mask=mask, cache=cache.expand(2))
    assert torch.equal(got[0, 4:], ahn_ops.generate(model, q0, NEW, cache=cache)[0, 4:])
    assert torch.equal(got[1, 4:], ahn_ops.generate(model, q1, NEW, cache=cache)[0, 2:])
    if not torch.cuda.is_available():  # the fused step (RoPE table indexed by position) in the Triton interpreter
        fused = ahn_ops.generate(model, batch, NEW, attention_mask=mask, cache=cache.expand(2),
                                plan=DecodePlan(fuse_glue=True))
        assert torch.equal(fused, got)


def test_select_and_clone_equal_separate_runs():
    model = patched("dn", window=W, sinks=S, fa_layer_ids=[1])
    docs, q = ids(2, 9, seed=10), ids(1, 2, seed=11)
    cache = doc_cache(model, docs)
    before = snapshot(cache)
    picked = cache.select([1, 0, 1])
    mask_pick = cache.select(torch.tensor([False, True]))
    assert picked.ahn.batch_size == 3 and mask_pick.ahn.batch_size == 1
    got = ahn_ops.generate(model, q.repeat(3, 1), NEW, cache=picked)
    want = [ahn_ops.generate(model, torch.cat([docs[i:i + 1], q], 1), NEW)[0, 11:] for i in range(2)]
    for row, src in enumerate([1, 0, 1]):
        assert torch.equal(got[row, 2:], want[src])
    assert torch.equal(ahn_ops.generate(model, q, NEW, cache=mask_pick)[0, 2:], want[1])
    # a clone is independent: feeding it more tokens leaves the original (and forks of it) untouched
    twin = cache.clone()
    with torch.no_grad():
        model(ids(2, 4, seed=12), **cache_kwargs(twin))
    assert twin.get_seq_length() == 13 and twin.seq_lens().tolist() == [13, 13]
    assert_same(snapshot(cache), before)
    assert torch.equal(ahn_ops.generate(model, q.repeat(3, 1), NEW, cache=picked), got)


# ------------------------------------------------------------------ refusals
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A model, its prefilled cache and the file it was saved to."""
    model = patched("gdn", window=W, sinks=S, fa_layer_ids=[1])
    cache = doc_cache(model, ids(2, 9, seed=13))
    path = tmp_path_factory.mktemp("saved") / "doc.safetensors"
    cache.save(path)
    return model, cache, path


def _other_ahn():
    return randomize_ahn(patched("gdn", window=W, sinks=S, fa_layer_ids=[1]), seed=7)


@pytest.mark.parametrize("other, match", [
    (lambda: patched("gdn", window=W + 1, sinks=S, fa_layer_ids=[1]), f"window: expected {W + 1}, found {W}"),
    (lambda: patched("gdn", window=W, sinks=S + 1, fa_layer_ids=[1]), f"sinks: expected {S + 1}, found {S}"),
    (lambda: patched("dn", window=W, sinks=S, fa_layer_ids=[1]), "kind: expected dn, found gdn"),
    (lambda: patched("gdn", window=W, sinks=S, fa_layer_ids=[2]), r"fa_layer_ids: expected \[2\], found \[1\]"),
    (_other_ahn, "ahn_weights_sha256: expected"),
    (lambda: patched("gdn", window=W, sinks=S, fa_layer_ids=[1], rms_norm_eps=1e-5),
     "base config rms_norm_eps: expected 1e-05, found 1e-06"),
    (lambda: patched("gdn", window=W, sinks=S, fa_layer_ids=[1], hidden=32), "hidden_size: expected 32, found 64"),
    (lambda: patched("gdn", window=W, sinks=S, fa_layer_ids=[1], seed=5), "base_weights_sample_sha256"),
    (lambda: patched("gdn", window=W, sinks=S, fa_layer_ids=[1]).double(), "dtype: expected float64, found float32"),
], ids=["window", "sinks", "kind", "fa_layer_ids", "ahn-weights", "base-config", "model-size", "base-weights",
        "dtype"])
def test_load_refuses_a_cache_of_another_model(saved, other, match):
    model, cache, path = saved
    data, before = path.read_bytes(), snapshot(cache)
    with pytest.raises(ValueError, match=match) as e:
        AHNModelCache.load(path, other())
    assert str(path) in str(e.value)
    assert path.read_bytes() == data and tmp_files(path.parent) == [path.name]
    assert_same(snapshot(cache), before)


def test_load_refuses_torn_files_whole(saved, tmp_path):
    model, cache, path = saved
    data = path.read_bytes()
    cases = {"truncated": data[:-7], "header-only": data[:200], "empty": b"",
             "flipped": data[:-9] + bytes([data[-9] ^ 1]) + data[-8:], "appended": data + b"\0" * 8}
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(ValueError, match="torn or truncated|checksum") as e:
            AHNModelCache.load(bad, model)
        assert str(bad) in str(e.value), name
        assert bad.read_bytes() == blob
    # a safetensors file that is not a cache (AHN weights)
    from ahn_ops.models import save_ahn_weights

    save_ahn_weights(model, tmp_path / "weights")
    with pytest.raises(ValueError, match="not an AHN cache file"):
        AHNModelCache.load(tmp_path / "weights" / "model.safetensors", model)
    with pytest.raises(FileNotFoundError):
        AHNModelCache.load(tmp_path / "missing.safetensors", model)


def test_cache_file_is_plain_safetensors(saved, tmp_path):
    # the file is read by the safetensors library itself, and a file the library writes from the same tensors
    # and metadata loads back into an equal cache
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model, cache, path = saved
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert set(tensors) == {f"ahn.{n}" for n in cache.ahn.state_dict()} | {"fa.1.keys", "fa.1.values"}
    for n, t in cache.ahn.state_dict().items():
        assert torch.equal(tensors[f"ahn.{n}"], t.cpu()), n
    other = tmp_path / "by_safetensors.safetensors"
    save_file(tensors, other, metadata=meta)
    assert_same(snapshot(AHNModelCache.load(other, model)), snapshot(cache))


def test_load_refuses_an_earlier_format(saved, tmp_path):
    # format 1 kept fp32 gates [L, B, W, H, 2], which cannot be turned back into the gate inputs the cache
    # now keeps: such a file is refused with what to do, the cache untouched
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model, cache, path = saved
    with safe_open(path, "pt") as f:
        meta = dict(f.metadata(), format_version="1")
    old = tmp_path / "format1.safetensors"
    save_file(load_file(path), old, metadata=meta)
    before = snapshot(cache)
    with pytest.raises(ValueError, match="format_version: expected 2, found '1'.*rebuild the cache") as e:
        AHNModelCache.load(old, model)
    assert str(old) in str(e.value)
    assert_same(snapshot(cache), before)


@pytest.mark.parametrize("call, match", [
    (lambda c: c.select([2]), "batch_indices.*out-of-range"),
    (lambda c: c.select([-1]), "batch_indices.*out-of-range"),
    (lambda c: c.select([]), "batch_indices must select at least one"),
    (lambda c: c.select(torch.tensor([False, False])), "batch_indices must select at least one"),
    (lambda c: c.select(torch.tensor([True])), r"batch_indices as a bool mask must have shape \[2\]"),
    (lambda c: c.select([0.5]), "batch_indices.*non-integer"),
    (lambda c: c.expand(0), "n must be an int >= 1"),
    (lambda c: c.expand(True), "n must be an int >= 1"),
    (lambda c: c.expand(1.5), "n must be an int >= 1"),
])
def test_bad_fork_arguments_are_refused(saved, call, match):
    _, cache, _ = saved
    before = snapshot(cache)
    with pytest.raises(ValueError, match=match):
        call(cache)
    assert_same(snapshot(cache), before)


def test_generate_refuses_a_cache_it_cannot_continue(saved):
    model, cache, _ = saved
    before = snapshot(cache)
    q = ids(3, 2)
    with pytest.raises(ValueError, match=r"cache holds 2 sequence\(s\) but input_ids has 3 rows"):
        ahn_ops.generate(model, q, 2, cache=cache)
    with pytest.raises(ValueError, match="window: expected 6, found 5"):
        ahn_ops.generate(patched("gdn", window=W + 1, sinks=S, fa_layer_ids=[1]), q[:2], 2, cache=cache)
    with pytest.raises(ValueError, match="ahn_weights_sha256"):    # same layout, another AHN: fingerprints
        ahn_ops.generate(_other_ahn(), q[:2], 2, cache=cache)
    with pytest.raises(TypeError, match="AHNModelCache"):
        ahn_ops.generate(model, q[:2], 2, cache=cache.ahn)
    assert_same(snapshot(cache), before)
    # a second copy of the same model (another object, same weights) is accepted
    twin = patched("gdn", window=W, sinks=S, fa_layer_ids=[1])
    assert torch.equal(ahn_ops.generate(twin, q[:2], 2, cache=cache), ahn_ops.generate(model, q[:2], 2, cache=cache))


def test_save_failures_leave_no_partial_file(saved, tmp_path, monkeypatch):
    model, cache, path = saved
    target = tmp_path / "c.safetensors"
    target.write_bytes(b"previous contents")
    import ahn_ops.models.hf_cache as hf_cache

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(hf_cache.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        cache.save(target)
    monkeypatch.undo()
    assert target.read_bytes() == b"previous contents" and tmp_files(tmp_path) == ["c.safetensors"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cache.save(tmp_path / "no" / "dir.safetensors")
    with pytest.raises(ValueError, match="empty cache"):
        AHNModelCache.from_model(model).save(target)
    with pytest.raises(ValueError, match="window: expected 6, found 5"):
        cache.save(target, patched("gdn", window=W + 1, sinks=S, fa_layer_ids=[1]))
    assert target.read_bytes() == b"previous contents" and tmp_files(tmp_path) == ["c.safetensors"]
    cache.save(target)                                              # and a good save replaces it whole
    assert torch.equal(AHNModelCache.load(target, model).ahn.state, cache.ahn.state)


# ------------------------------------------------------------------ the script
def test_ask_script_runs_tiny(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    path = tmp_path / "doc.safetensors"
    argv = [sys.executable, str(ROOT / "python" / "ask.py"), "--tiny", "--cache", str(path), "--max-new-tokens", "2",
            "--window", "16"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cache saved to" in r.stdout and "on disk" in r.stdout and "full-attention model" in r.stdout
    assert r.stdout.count("Q: ") == 2 and path.exists()
    # the saved cache answers again, without the document (batched this time)
    r = subprocess.run(argv + ["--batch", "--ask", "x?", "--ask", "yy?"], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "read:" not in r.stdout and "loaded:" in r.stdout and r.stdout.count("Q: ") == 2


# ------------------------------------------------------------------ the AHNCache helpers underneath
def test_ahncache_state_dict_round_trip_and_refusals():
    c = ahn_ops.AHNCache(2, 3, 4, 2, 8, window=W, sinks=S, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for t in c._fields():
        t.copy_((torch.rand(t.shape, generator=g) * 9).to(t.dtype))
    sd = {k: v.clone() for k, v in c.state_dict().items()}
    copy = ahn_ops.AHNCache.from_state_dict(sd, W, S, "gdn")
    assert all(torch.equal(a, b) for a, b in zip(copy._fields(), c._fields()))
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(copy._fields(), sd.values()))   # no aliasing
    other = ahn_ops.AHNCache(2, 3, 4, 2, 8, window=W, sinks=S, dtype=torch.bfloat16)
    other.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(other._fields(), c._fields()))
    before = [t.clone() for t in other._fields()]
    bad = dict(sd, state=sd["state"].double())
    with pytest.raises(ValueError, match="state must have dtype torch.float32"):
        other.load_state_dict(bad)
    with pytest.raises(ValueError, match=r"ring_k must have shape \[3, 2, 6, 2, 8\]"):
        ahn_ops.AHNCache.from_state_dict(sd, W + 1, S, "gdn")
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({k: v for k, v in sd.items() if k != "gates"})
    assert all(torch.equal(a, b) for a, b in zip(other._fields(), before))
    fork = c.expand(2).select([3, 0])
    assert fork.batch_size == 2 and torch.equal(fork.state[:, 0], c.state[:, 1]) and torch.equal(fork.pos[:, 1],
                                                                                                 c.pos[:, 0])
