"""The memory's two-level state chain (``prefill.state_chain``: per-segment summaries, a fix-up chain over
segments, per-segment replay) against the fp32 reference and against the one-level chain it replaces on
long sequences, forward and backward (the backward re-runs the chain).

The GPU takes the two-level chain from ``CONFIG["state_seg"][0]`` chunks (thousands of tokens); here the
threshold and the segment length are forced down so that a few hundred tokens make several segments:
a partial last segment, segments made only of chunks before the first memory token, an initial state,
unequal sequences and one of a single token.
"""

from __future__ import annotations

import os

import pytest
import torch

import ahn_ops  # noqa: F401  (registers torch.ops.ahn.*)
from ahn_ops.ops.ahn_attention import reference as ref

from ..utils import check_within_2x, make_inputs, rel_err

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.skipif(not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or TRITON_INTERPRET=1")


def _pf():
    from ahn_ops.ops.ahn_attention import prefill
    return prefill


def _inputs(kind, T, H, dtype, seed):
    q, k, v, a, b, z, A_log, dt_bias, nw, ow = make_inputs(kind, 1, T, H, 1, 64, dtype, device=DEV, seed=seed)
    if A_log is not None:
        # weak decays: the state carries across segments, so the transition products matter
        A_log = torch.full_like(A_log, -4.0)
    return q, k, v, a, b, z, A_log, dt_bias, nw, ow


def _run(monkeypatch, two_level, fn):
    pf = _pf()
    monkeypatch.setitem(pf.CONFIG, "state_seg", (2, 32, 4, 2) if two_level else (None, 32, 4, 2))
    monkeypatch.setattr(pf, "_seg_chunks", lambda max_chunks: 2)
    return fn()


CASES = [
    # kind, lens, W, S, with an initial state
    pytest.param("gdn", [300], 29, 3, False, id="gdn-T300-W29-S3"),
    pytest.param("dn", [37, 1, 300, 130], 29, 3, True, id="dn-varlen-h0"),
    pytest.param("mamba2", [300, 200], 40, 2, True, id="mamba2-varlen-h0"),
    # S + W = 302: the first 4 chunks hold no memory token, so the first 2 segments are identities
    pytest.param("gdn", [700], 300, 2, True, id="gdn-T700-W300-S2-h0"),
]


@pytest.mark.parametrize("kind,lens,W,S,h0", CASES)
def test_two_level_chain_forward(monkeypatch, kind, lens, W, S, h0):
    H = 2
    T = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    cu = cu if len(lens) > 1 else None
    args = _inputs(kind, T, H, torch.float32, seed=T + W)
    init = torch.randn(len(lens), H, 64, 64, generator=torch.Generator().manual_seed(1)).to(DEV) * 0.1 if h0 else None

    def fwd():
        return torch.ops.ahn.prefill_fwd(*args, W, S, kind, cu, init, True)

    one, two = (_run(monkeypatch, t, fwd) for t in (False, True))
    for name, x, y in (("out", one[0], two[0]), ("final state", one[1], two[1])):
        assert torch.isfinite(y).all(), name
        e = rel_err(y, x)
        print(f"{kind} {name}: two-level vs one-level rel err {e:.2e}")
        assert e < 1e-5, name
    if not h0:
        r, _, _, st = ref.ahn_attention_ref(*args, W, S, kind, cu, return_parts=True)
        assert rel_err(two[0], r) < 1e-4 and rel_err(two[1], st) < 1e-4


def test_two_level_chain_bf16_within_rule(monkeypatch):
    kind, T, W, S, H = "gdn", 600, 50, 4, 2
    args = _inputs(kind, T, H, torch.bfloat16, seed=7)
    out, ht, _ = _run(monkeypatch, True, lambda: torch.ops.ahn.prefill_fwd(*args, W, S, kind, None, None, True))
    r, _, _, st = ref.ahn_attention_ref(*args, W, S, kind, return_parts=True)
    lp, _, _, st_lp = ref.ahn_attention_ref(*args, W, S, kind, dtype=torch.bfloat16, return_parts=True)
    check_within_2x("two-level-bf16-out", out, r, lp)
    check_within_2x("two-level-bf16-final-state", ht, st, st_lp)


@pytest.mark.parametrize("kind", ["gdn", "mamba2"])
def test_two_level_chain_backward(monkeypatch, kind):
    # the backward re-runs the chain (prefill.state_chain) for the per-chunk states it differentiates
    lens, W, S, H = [260, 131], 30, 2, 2
    cu = torch.tensor([0, 260, 391], dtype=torch.int32, device=DEV)
    args = _inputs(kind, sum(lens), H, torch.float32, seed=5)
    dout = torch.randn(1, sum(lens), H, 64, generator=torch.Generator().manual_seed(2)).to(DEV)

    def grads():
        leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in args]
        torch.ops.ahn.prefill_fwd(*leaves, W, S, kind, cu, None, False)[0].backward(dout)
        return [None if x is None else x.grad for x in leaves]

    one, two = (_run(monkeypatch, t, grads) for t in (False, True))
    for i, (x, y) in enumerate(zip(one, two)):
        if x is None:
            assert y is None
            continue
        e = rel_err(y, x)
        print(f"{kind} grad {i}: two-level vs one-level rel err {e:.2e}")
        assert torch.isfinite(y).all() and e < 1e-5, i


def test_segment_length_rule():
    pf = _pf()
    got = {n: pf._seg_chunks(n) for n in (1, 128, 129, 512, 2048, 8192, 10 ** 6)}
    assert got == {1: 8, 128: 8, 129: 16, 512: 16, 2048: 32, 8192: 64, 10 ** 6: 64}
