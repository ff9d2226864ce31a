"""Self-distillation of AHN weights (ahn_ops.distill), on CPU with tiny random Qwen2 models.

The 2-process test runs DDP over gloo (torch.multiprocessing.spawn) and checks that the per-step
losses equal a single-process run with the same global batch.
"""

from __future__ import annotations

import json

import pytest
import torch

from ahn_ops.data import BYTE_VOCAB, SyntheticRetrieval, TokenChunks
from ahn_ops.distill import DistillConfig, Distiller, distill_loss, sample_window_sinks
from ahn_ops.models import full_attention, patch_qwen
from tests.models.helpers import spec_logits, tiny_model

T = 64


def _model(seed=0):
    return tiny_model(seed, layers=2, hidden=64, heads=4, kv_heads=2, vocab=BYTE_VOCAB)


def _cfg(**kw):
    base = dict(kind="gdn", window=16, sinks=2, seq_len=T, min_window=12, max_window=40, micro_batch=2,
                grad_accum=1, steps=4, lr=1e-2, warmup_steps=1, progress=False, seed=3)
    base.update(kw)
    return DistillConfig(**base)


def _ds():
    return SyntheticRetrieval(T, "passkey", distractor_numbers=0.1, seed=7)


def test_teacher_is_the_unpatched_model():
    model = _model()
    ids = torch.randint(0, 256, (2, 40))
    want = spec_logits(model, ids, "gdn", None, 0)  # full causal attention, float64
    with torch.no_grad():
        plain = model(ids, use_cache=False).logits
    patch_qwen(model, "gdn", window=8, sinks=2, backend="reference")
    with torch.no_grad(), full_attention(model):
        got = model(ids, use_cache=False).logits
    with torch.no_grad():
        student = model(ids, use_cache=False).logits  # the flag is restored on exit
    assert torch.equal(got, plain)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(student, plain, atol=1e-3)


@pytest.mark.parametrize("T_", [64, 300, 20000])
def test_window_sinks_draws(T_):
    cfg = _cfg(min_window=32, max_window=8192)
    draws = [sample_window_sinks(cfg, s, T_) for s in range(200)]
    assert draws == [sample_window_sinks(cfg, s, T_) for s in range(200)]  # a function of (seed, step)
    for W, S in draws:
        assert T_ // 8 < W < T_ and W <= 8192 and 0 <= S <= W // 2 and W + S < T_
    assert len(set(draws)) > 20


def test_training_reduces_loss_and_freezes_base():
    model = _model()
    ds = _ds()
    cfg = _cfg(random_window=False, window=16, sinks=2, steps=16, micro_batch=4, lr=2e-2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = Distiller(model, ds, cfg)
    ahn0 = {n: p.detach().clone() for n, p in tr.params}
    held_out = torch.stack([ds[10_000 + i] for i in range(8)])

    def eval_kl():
        with torch.no_grad():
            out = distill_loss(model, held_out, 16, 2, with_ce=False)
        return float(out["kl_sum"]) / out["n_kl"]

    before = eval_kl()
    hist = tr.train()
    after = eval_kl()
    print(f"held-out KL {before:.4f} -> {after:.4f}; train loss {hist[0]['loss']:.4f} -> {hist[-1]['loss']:.4f}")
    assert after < 0.8 * before
    assert hist[-1]["loss"] < hist[0]["loss"]
    for n, p in model.named_parameters():
        if ".ahn.fn." not in n:
            assert torch.equal(p, frozen[n]), n  # bit-identical base weights
            assert not p.requires_grad
    assert any(not torch.equal(p, ahn0[n]) for n, p in tr.params)


def test_checkpoint_resume_is_exact_and_loads_with_patch_qwen(tmp_path):
    ds = _ds()
    out = tmp_path / "run"
    cfg = _cfg(steps=4, save_every=2, out_dir=str(out), ce_weight=0.5)
    tr = Distiller(_model(), ds, cfg)
    full = tr.train()

    tr2 = Distiller(_model(), ds, cfg)
    tr2.load(out / "checkpoint-2")
    assert tr2.step == 2
    resumed = tr2.train()
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        assert (a["window"], a["sinks"]) == (b["window"], b["sinks"])
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a["loss"], b["loss"])
    for (n, p), (_, p2) in zip(tr.params, tr2.params):
        torch.testing.assert_close(p, p2, atol=1e-6, rtol=0)

    # the published format: config.json with the AHN fields, model.layers.{i}.ahn.fn.* tensors
    ck = out / "checkpoint-4"
    conf = json.loads((ck / "config.json").read_text())
    assert conf["_ahn_implementation"] == "GatedDeltaNet" and conf["sliding_window"] == 16
    assert conf["num_attn_sinks"] == 2
    fresh = patch_qwen(_model(), weights=str(ck), backend="reference")  # kind / W / S from config.json
    trained = dict(tr.model.named_parameters())
    for n, p in fresh.named_parameters():
        assert torch.equal(p, trained[n]), n
    ids = torch.randint(0, 256, (1, 50))
    tr.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, use_cache=False).logits, tr.model(ids, use_cache=False).logits)


def test_activation_checkpointing_gives_the_same_curve():
    # the recomputation in backward must run at the step's random W/S (not the nominal ones)
    runs = [Distiller(_model(), _ds(), _cfg(steps=3, grad_ckpt=gc, ce_weight=0.3)).train() for gc in (False, True)]
    for a, b in zip(*runs):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"]


def test_token_chunks_from_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 50)
    with open(tmp_path / "b.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps({"text": f"record {i} " * 5}) + "\n")
    ds = TokenChunks([str(tmp_path)], seq_len=32, seed=1)
    assert len(ds) > 10 and ds[0].shape == (32,) and int(ds[0].max()) < BYTE_VOCAB
    assert torch.equal(ds[5], TokenChunks([str(tmp_path)], seq_len=32, seed=1)[5])
    seen = {tuple(ds[i].tolist()) for i in range(len(ds))}
    assert len(seen) == len({tuple(r.tolist()) for r in ds.tokens})  # one epoch visits every chunk


def test_synthetic_answer_position():
    ds = SyntheticRetrieval(128, "passkey", seed=2)
    ex = ds.example(4, length=200, needle_at=20)
    ids = ex["input_ids"]
    ans = ids[ex["answer_start"]:ex["answer_start"] + ex["answer_len"]]
    assert ids.shape == (200,) and ex["needle_pos"] == 20
    needle = bytes(ids[20:60].tolist()).decode(errors="replace")
    assert bytes(ans.tolist()).decode() in needle


def test_synthetic_cue_ending_in_punctuation_has_no_space():
    # "pk=" -> "pk=48213": the byte before the answer occurs only after the cue (needle and query)
    ds = SyntheticRetrieval(256, "passkey", seed=5, cue="pk=")
    ex = ds.example(3, length=256, needle_at=40)
    ids = ex["input_ids"].tolist()
    a0, n = ex["answer_start"], ex["answer_len"]
    assert ids[a0 - 1] == ord("=") and ids.count(ord("=")) == 2
    assert bytes(ids[40:44 + n]).decode() == " pk=" + bytes(ids[a0:a0 + n]).decode()
    spaced = SyntheticRetrieval(256, "passkey", seed=5, cue="pk")
    e2 = spaced.example(3, length=256, needle_at=40)
    assert e2["input_ids"][e2["answer_start"] - 1] == ord(" ")


def test_synthetic_phrase_pool_repeats_phrases():
    # phrase_pool=n: the filler is n phrases repeated; 0 keeps the independent words (same samples as before)
    plain, plain2 = SyntheticRetrieval(512, "passkey", seed=3), SyntheticRetrieval(512, "passkey", seed=3)
    assert torch.equal(plain[7], plain2[7])
    def distinct_trigrams(ds):
        words = bytes(t for t in ds.example(7)["input_ids"].tolist() if t < 256).decode().split()
        tri = [" ".join(words[i:i + 3]) for i in range(len(words) - 2)]
        return len(set(tri)) / len(tri)

    ds = SyntheticRetrieval(512, "passkey", seed=3, phrase_pool=4)
    assert distinct_trigrams(plain) > 0.9 and distinct_trigrams(ds) < 0.5  # a few phrases, each many times
    ex = ds.example(7)
    text = bytes(t for t in ex["input_ids"].tolist() if t < 256).decode()
    ans = ex["input_ids"][ex["answer_start"]:ex["answer_start"] + ex["answer_len"]]
    assert text.count(bytes(ans.tolist()).decode()) == 2  # the needle and the answer, still one value
    with pytest.raises(ValueError, match="phrase_pool"):
        SyntheticRetrieval(64, phrase_pool=-1)


# --------------------------------------------------------------------------------------
# two processes (gloo) == one process with the same global batch
# --------------------------------------------------------------------------------------
def _run(world: int, rank: int, cfg_kw: dict):
    torch.set_num_threads(1)
    cfg = _cfg(**cfg_kw)
    tr = Distiller(_model(), _ds(), cfg)
    return tr.train(), tr


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str, cfg_kw: dict):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        hist, tr = _run(world, rank, cfg_kw)
        sd = {n: p.detach().clone() for n, p in tr.params}
        if rank == 0:
            torch.save({"hist": hist, "params": sd}, out_file)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_rank(tmp_path):
    import torch.multiprocessing as mp

    steps = 3
    # global batch 4 = 1 rank x 2 micro x 2 accumulation = 2 ranks x 1 micro x 2 accumulation
    threads = torch.get_num_threads()
    try:
        single, tr1 = _run(1, 0, dict(steps=steps, micro_batch=2, grad_accum=2, ce_weight=0.3))
    finally:
        torch.set_num_threads(threads)
    out_file = str(tmp_path / "rank0.pt")
    init_file = str(tmp_path / "init")
    mp.spawn(_ddp_worker, args=(2, init_file, out_file, dict(steps=steps, micro_batch=1, grad_accum=2, ce_weight=0.3)),
             nprocs=2, join=True)
    multi = torch.load(out_file, weights_only=False)
    for a, b in zip(single, multi["hist"]):
        print(f"step {a['step']}: W={a['window']} S={a['sinks']} loss 1 rank {a['loss']:.7f} 2 ranks {b['loss']:.7f}"
              f" | tokens/s 1 rank {a['tokens_per_s']:.0f}, 2 ranks {b['tokens_per_s']:.0f}")
        assert (a["window"], a["sinks"]) == (b["window"], b["sinks"])
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"]))
    assert len(multi["hist"]) == steps
    for n, p in tr1.params:
        torch.testing.assert_close(p.detach(), multi["params"][n], atol=1e-5, rtol=1e-4)


def test_chunked_kl_equals_one_piece():
    from ahn_ops.distill import _kl_ce_sums

    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 37, 50, generator=g)
    s = torch.randn(2, 37, 50, generator=g).requires_grad_()
    labels = torch.randint(0, 50, (2, 37), generator=g)
    labels[:, -1] = -100
    kl1, ce1 = _kl_ce_sums(t, s, labels, 2.0, chunk=1000)
    (kl1 + ce1).backward()
    g1 = s.grad.clone()
    s.grad = None
    kl2, ce2 = _kl_ce_sums(t, s, labels, 2.0, chunk=8)
    (kl2 + ce2).backward()
    torch.testing.assert_close(kl2, kl1)
    torch.testing.assert_close(ce2, ce1)
    torch.testing.assert_close(s.grad, g1)


# --------------------------------------------------------------------------------------
# FSDP2 (shard="fsdp") on two gloo ranks == DDP on two ranks == one rank, same global batch
# --------------------------------------------------------------------------------------
def _fsdp_worker(rank: int, world: int, init_file: str, out_dir: str, cfg_kw: dict):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        hist, tr = _run(world, rank, dict(cfg_kw, shard="fsdp"))
        tr.save(f"{out_dir}/ckpt")
        # resume on a fresh sharded trainer: weights and optimizer state as saved
        tr2 = Distiller(_model(), _ds(), _cfg(**dict(cfg_kw, shard="fsdp")))
        tr2.load(f"{out_dir}/ckpt")
        same = all(torch.equal(a.full_tensor(), b.full_tensor()) for (_, a), (_, b) in zip(tr.params, tr2.params))
        more = tr2.train(steps=cfg_kw["steps"] + 1)
        if rank == 0:
            torch.save({"hist": hist, "resumed_equal": same, "next": more}, f"{out_dir}/rank0.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp_two_gloo_ranks_match_one_rank(tmp_path):
    import torch.multiprocessing as mp

    from ahn_ops.models import load_ahn_weights

    steps = 3
    kw = dict(steps=steps, micro_batch=1, grad_accum=2, ce_weight=0.3)
    threads = torch.get_num_threads()
    try:
        single, tr1 = _run(1, 0, dict(kw, micro_batch=2))
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), kw), nprocs=2, join=True)
    multi = torch.load(tmp_path / "rank0.pt", weights_only=False)
    for a, b in zip(single, multi["hist"]):
        print(f"step {a['step']}: loss 1 rank {a['loss']:.7f}, FSDP 2 ranks {b['loss']:.7f}")
        assert (a["window"], a["sinks"]) == (b["window"], b["sinks"])
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"]))
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * max(1.0, a["grad_norm"])
    assert multi["resumed_equal"] and len(multi["next"]) == 1
    # the checkpoint is the published AHN-only format, with the one-rank run's weights
    m = _model()
    prepare = __import__("ahn_ops.distill", fromlist=["prepare_student"]).prepare_student
    prepare(m, _cfg(**kw))
    load_ahn_weights(m, tmp_path / "ckpt")
    got = dict(m.named_parameters())
    for n, p in tr1.params:
        torch.testing.assert_close(got[n].detach(), p.detach(), atol=1e-5, rtol=1e-4)


def test_official_recipe_draws_and_init():
    from ahn_ops.distill import OFFICIAL_SINKS, OFFICIAL_TOTAL_WINDOWS, official_init_, sample_window_sinks

    cfg = _cfg(recipe="official")
    seen = set()
    for step in range(200):
        W, S = sample_window_sinks(cfg, step, 4096)
        assert W + S in OFFICIAL_TOTAL_WINDOWS and 4096 / 8 < W + S < 4096
        assert S in OFFICIAL_SINKS and S <= (W + S) // 2 and W >= 1
        seen.add((W + S, S))
    assert {t for t, _ in seen} == {1024, 2048} and len({s for _, s in seen}) >= 5  # 512 is not > T/8
    with pytest.raises(ValueError, match="recipe"):
        sample_window_sinks(_cfg(recipe="other"), 0, 4096)
    import ahn_ops

    m = _model()
    ahn_ops.patch_qwen(m, "mamba2", window=16, sinks=2)
    official_init_(m)
    for n, p in m.named_parameters():
        if n.endswith(".ahn.fn.dt_bias"):
            assert torch.all(p == 1)
        if n.endswith(".ahn.fn.A_log"):
            torch.testing.assert_close(p.exp(), torch.arange(1, p.numel() + 1, dtype=p.dtype))
