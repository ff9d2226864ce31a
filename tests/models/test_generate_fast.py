"""ahn_ops.generate (static decode step, CUDA-graph replay) == the plain model.generate() path.

CPU: the static step runs eagerly and must give the very tokens of ``model.generate(do_sample=False)``
for every kind, with sinks, with and without a full-attention layer, batch 2, left padding,
chunked prefill, EOS handling. GPU (skipped without CUDA): graph replay == eager static step, and in
fp32 each token is an argmax of a full forward over the generated text.
"""

from __future__ import annotations

import pytest
import torch

import ahn_ops
from ahn_ops.fast_decode import DecodePlan
from tests.models.helpers import VOCAB, assert_greedy_of_full_forward, patched

KINDS = ("gdn", "dn", "mamba2")
NEW = 14


def ids(B, T, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def plain(model, x, n=NEW, **kw):
    kw.setdefault("pad_token_id", 0)
    return model.generate(x, max_new_tokens=n, do_sample=False, **kw)


# ------------------------------------------------------------------ CPU: eager static step
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fa", [pytest.param(None, id="all-ahn"), pytest.param([1], id="fa1")])
def test_greedy_equals_generate(kind, fa):
    # W=5, S=2, prompt 12 + 14 new tokens: the memory absorbs tokens during prefill and decode
    model = patched(kind, window=5, sinks=2, fa_layer_ids=fa)
    x = ids(2, 12, seed=3)
    got = ahn_ops.generate(model, x, NEW, use_cuda_graph=False)
    assert torch.equal(got, plain(model, x))


@pytest.mark.parametrize("kind", KINDS)
def test_fused_cpu_kernel_equals_generate(kind):
    # backend="auto": decode runs torch.ops.ahn.decode_step (C++) in both paths, called directly here
    model = patched(kind, window=6, sinks=3, fa_layer_ids=[0] if kind == "gdn" else None)
    for attn in (l.self_attn for l in model.model.layers if hasattr(l, "ahn")):
        attn._ahn_cfg["backend"] = "auto"
    x = ids(2, 10, seed=5)
    got = ahn_ops.generate(model, x, NEW)
    assert torch.equal(got, plain(model, x))


@pytest.mark.parametrize("fa", [pytest.param(None, id="all-ahn"), pytest.param([2], id="fa2")])
def test_left_padded_and_chunked(fa):
    model = patched("gdn", window=6, sinks=2, fa_layer_ids=fa)
    x = ids(2, 17, seed=6)
    mask = torch.ones_like(x)
    mask[1, :6] = 0
    x[1, :6] = 0
    want = plain(model, x, attention_mask=mask)
    assert torch.equal(ahn_ops.generate(model, x, NEW, attention_mask=mask), want)
    assert torch.equal(ahn_ops.generate(model, x, NEW, attention_mask=mask, prefill_chunk_size=5), want)


def test_right_padding_is_rejected():
    model = patched("dn", window=6, sinks=2)
    x = ids(2, 8)
    mask = torch.ones_like(x)
    mask[0, -2:] = 0
    with pytest.raises(ValueError, match="left padding"):
        ahn_ops.generate(model, x, 4, attention_mask=mask)


@pytest.mark.parametrize("plan", [None, DecodePlan(fuse_glue=True)], ids=["default", "glue"])
def test_eos_stops_and_pads_like_generate(plan):
    # fuse_glue: the fused step, whose greedy choice does the end-of-sequence rule in its kernel
    # (model_glue.greedy_next; on the CPU in the Triton interpreter)
    if plan is not None and torch.cuda.is_available():
        pytest.skip("the fused step of this CPU model needs the Triton interpreter (CPU-only runs); on the GPU "
                    "the eos rule is tests/ops/test_model_glue.py::test_greedy_next_end_of_sequence")
    model = patched("mamba2", window=5, sinks=1, fa_layer_ids=[1])
    x = ids(2, 9, seed=8)
    free = plain(model, x, 20)[:, 9:]
    # an EOS that one sequence emits early: it must be padded after, the other one run on
    eos = int(free[0, 3])
    want = plain(model, x, 20, eos_token_id=eos, pad_token_id=7)
    got = ahn_ops.generate(model, x, 20, eos_token_id=eos, pad_token_id=7, eos_check_every=3, plan=plan)
    assert torch.equal(got, want)
    # every sequence finishes: the output stops where the last one did, as generate() does
    eos_all = [int(free[0, 2]), int(free[1, 4])]
    want = plain(model, x, 20, eos_token_id=eos_all, pad_token_id=7)
    got = ahn_ops.generate(model, x, 20, eos_token_id=eos_all, pad_token_id=7, eos_check_every=4,
                           plan=plan)
    assert torch.equal(got, want) and got.shape[1] < 9 + 20


def test_sampling_is_seeded_and_respects_top_k():
    model = patched("gdn", window=5, sinks=2)
    x = ids(2, 8, seed=9)

    def run(seed, **kw):
        return ahn_ops.generate(model, x, 10, do_sample=True, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(run(1, temperature=0.8, top_p=0.9), run(1, temperature=0.8, top_p=0.9))
    assert not torch.equal(run(1, temperature=5.0), run(2, temperature=5.0))
    # top_k=1 and a tiny top_p are greedy
    greedy = ahn_ops.generate(model, x, 10)
    assert torch.equal(run(3, top_k=1), greedy)
    assert torch.equal(run(4, top_p=1e-6), greedy)


def test_ahn_ops_generate_is_public():
    from ahn_ops.fast_decode import generate

    model = patched("dn", window=5, sinks=0)
    x = ids(1, 6)
    a = ahn_ops.generate(model, x, 3)
    assert ahn_ops.generate is generate and "generate" in ahn_ops.__all__
    assert torch.equal(generate(model, x, 3), a)
    with pytest.raises(ValueError, match="CUDA"):
        ahn_ops.generate(model, x, 3, use_cuda_graph=True)


# ------------------------------------------------------------------ the decode plan
def test_default_plan_by_batch_dtype_and_gpu(monkeypatch):
    # what DecodePlan.default fuses, per batch, dtype and GPU generation, without a GPU: the device is named,
    # its compute capability stubbed, the interpreter switch off so that sm_90 counts as able to launch early
    from ahn_ops.ops import decode_linear as dl

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    want = {  # (dtype, sm major): batches -> (fuse_glue, fuse_linear, fuse_gate_up, overlap)
        (torch.bfloat16, 9): {(1, 2): (1, 1, 1, 0), range(3, 17): (1, 1, 0, 1), (17, 64): (1, 0, 0, 0)},
        (torch.float32, 9): {(1, 2): (1, 1, 1, 0), (3, 4, 5, 16): (1, 0, 0, 0)},
        (torch.bfloat16, 8): {(1, 2, 3, 16): (1, 0, 0, 0)},
        (torch.bfloat16, 10): {(1, 2, 3, 16): (1, 0, 0, 0)},
    }
    cuda = torch.device("cuda", 0)
    for (dtype, major), rows in want.items():
        model = patched("gdn", window=5, sinks=2).to(dtype)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, m=major: (m, 0))
        for batches, flags in rows.items():
            for B in batches:
                got = DecodePlan.default(model, B, cuda)
                assert got == DecodePlan(*map(bool, flags)), (dtype, major, B, got)
                assert got.overlap == (got.fuse_linear and dl.can_trigger(cuda) and B >= 3)
        # off the GPU: the plain step
        assert DecodePlan.default(model, 1) == DecodePlan() == DecodePlan.default(model, 1, "cpu")


def test_plan_is_checked():
    model = patched("gdn", window=5, sinks=2)
    x = ids(2, 8)
    with pytest.raises(TypeError, match="DecodePlan.overlap must be a bool, got 1"):
        DecodePlan(overlap=1)
    with pytest.raises(TypeError, match="plan must be an ahn_ops.DecodePlan"):
        ahn_ops.generate(model, x, 3, plan={"fuse_glue": True})
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        DecodePlan.default(model, 0)
    with pytest.raises(ValueError, match="plan.fuse_gate_up=True needs fuse_linear"):
        ahn_ops.generate(model, x, 3, plan=DecodePlan(fuse_gate_up=True))
    with pytest.raises(ValueError, match="plan.fuse_linear=True needs fuse_glue"):
        ahn_ops.generate(model, x, 3, plan=DecodePlan(fuse_linear=True))
    with pytest.raises(ValueError, match="plan.overlap=True needs fuse_linear on an sm_90"):
        ahn_ops.generate(model, x, 3, plan=DecodePlan(overlap=True))
    stats = {}
    plain = ahn_ops.generate(model, x, 3, plan=DecodePlan(), stats=stats)
    assert stats["plan"] == DecodePlan() and torch.equal(plain, ahn_ops.generate(model, x, 3))
    assert ahn_ops.DecodePlan is DecodePlan and "DecodePlan" in ahn_ops.__all__


def test_plan_docstring_example_runs():
    import doctest

    from ahn_ops.fast_decode import plan

    res = doctest.testmod(plan, verbose=False)
    assert res.attempted > 0 and res.failed == 0


# ------------------------------------------------------------------ GPU: graph replay
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fa", [pytest.param(None, id="all-ahn"), pytest.param([1], id="fa1")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_equals_eager_and_generate(kind, fa, dtype):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("ahn::decode_step", "CUDA")
    # head_dim 64 (the CUDA decode kernel covers D = 64 and 128)
    model = patched(kind, window=9, sinks=4, fa_layer_ids=fa, hidden=256, heads=4, kv_heads=2)
    for attn in (l.self_attn for l in model.model.layers if hasattr(l, "ahn")):
        attn._ahn_cfg["backend"] = "auto"
    model = model.to("cuda", dtype)
    x = ids(2, 21, seed=11).cuda()
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    for m in (None, mask):
        graph = ahn_ops.generate(model, x, 40, attention_mask=m, use_cuda_graph=True)
        eager = ahn_ops.generate(model, x, 40, attention_mask=m, use_cuda_graph=False)
        assert torch.equal(graph, eager)
        if dtype == torch.float32:
            # plain generate runs other kernels (prefill path, HF cache): 40 greedy steps of a random
            # model meet near-ties (seen on the H100), so the check is teacher-forced: the graph's tokens
            # are argmaxes of a full forward over them (bf16: rounding differs between paths)
            assert_greedy_of_full_forward(model, x, graph, attention_mask=m)
    # sampling with a CUDA generator replays the same draws as eager
    g = [torch.Generator("cuda").manual_seed(5) for _ in range(2)]
    s_graph = ahn_ops.generate(model, x, 30, do_sample=True, top_p=0.9, generator=g[0], use_cuda_graph=True)
    s_eager = ahn_ops.generate(model, x, 30, do_sample=True, top_p=0.9, generator=g[1], use_cuda_graph=False)
    assert torch.equal(s_graph, s_eager)
