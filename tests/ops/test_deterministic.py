"""``deterministic=True``: the fused backward without order-dependent float atomics.

CPU (interpreter): the deterministic path (per-item sink slots summed in a fixed order, per-head memory
dk / dv summed over the G heads) gives the same gradients as the atomic path, for every input, with
several query heads per kv head, sinks past the window (several query ranges per sink key block) and
unequal sequences; ``torch.use_deterministic_algorithms`` selects it too.
GPU: two deterministic runs give bitwise equal gradients, on whichever band engine the GPU takes and on
the Triton one, at a size where the atomic path's order varies.
"""

from __future__ import annotations

import os

import pytest
import torch

import ahn_ops  # noqa: F401  (registers torch.ops.ahn.*)

from ..utils import GRAD_NAMES, kernel_grads, make_inputs, rel_err

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.skipif(not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or TRITON_INTERPRET=1")
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
NAMES = GRAD_NAMES


@pytest.fixture
def small_sink_ranges(monkeypatch):
    """Query ranges of 64 tokens per sink-kernel program: several items per sink key block at test sizes."""
    from ahn_ops.ops.ahn_attention import backward
    monkeypatch.setitem(backward.CONFIG, "sink_qs", 64)


@pytest.mark.usefixtures("small_sink_ranges")
@pytest.mark.parametrize("kind,lens,W,S,G", [
    pytest.param("gdn", [300], 40, 70, 4, id="gdn-T300-W40-S70-G4"),
    pytest.param("mamba2", [230, 1, 141], 30, 5, 2, id="mamba2-varlen-W30-S5-G2"),
    pytest.param("dn", [200], 20, 3, 1, id="dn-T200-W20-S3-G1"),
])
def test_deterministic_matches_atomic_path(kind, lens, W, S, G):
    HKV, D = 2 if G < 4 else 1, 64
    T = sum(lens)
    inputs = make_inputs(kind, 1, T, HKV * G, HKV, D, torch.float32, device=DEV, seed=T + S)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV) \
        if len(lens) > 1 else None
    dout = torch.randn(1, T, HKV * G, D, generator=torch.Generator().manual_seed(W)).to(DEV)
    atomic = kernel_grads(inputs, dout, W, S, kind, cu, False)
    det = kernel_grads(inputs, dout, W, S, kind, cu, True)
    for n, x, y in zip(NAMES, atomic, det):
        if x is None:
            assert y is None, n
            continue
        e = rel_err(y, x)
        print(f"{n}: deterministic vs atomic rel err {e:.2e}")
        assert torch.isfinite(y).all() and e < 1e-6, n


def test_global_switch_selects_the_deterministic_backward(monkeypatch):
    from ahn_ops.ops.ahn_attention import backward
    seen = []
    real = backward.prefill_bwd

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(backward, "prefill_bwd", spy)
    inputs = make_inputs("gdn", 1, 70, 2, 1, 64, torch.float32, device=DEV, seed=1)
    dout = torch.randn(1, 70, 2, 64).to(DEV)
    kernel_grads(inputs, dout, 20, 2, "gdn", None, False)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        kernel_grads(inputs, dout, 20, 2, "gdn", None, False)
    finally:
        torch.use_deterministic_algorithms(was)
    kernel_grads(inputs, dout, 20, 2, "gdn", None, True)
    assert seen == [False, True, True]


def test_public_argument_reaches_the_backward(monkeypatch):
    from ahn_ops.ops.ahn_attention import backward
    seen = []
    real = backward.prefill_bwd
    monkeypatch.setattr(backward, "prefill_bwd", lambda *args: seen.append(args[-1]) or real(*args))
    dt = torch.bfloat16
    q, k, v, a, b, z, A_log, dt_bias, nw, ow = (
        None if x is None else x.requires_grad_(x.is_floating_point())
        for x in make_inputs("gdn", 1, 70, 2, 1, 64, dt, device=DEV, seed=2))
    out = ahn_ops.ahn_attention(q, k, v, a, b, z, A_log, dt_bias, nw, ow, window=20, sinks=2, kind="gdn",
                                backend="kernel", deterministic=True)
    out.float().sum().backward()
    assert seen == [True]


@gpu
@pytest.mark.parametrize("engine", ["auto", "no_sm90", "triton"])
@pytest.mark.parametrize("kind", ["gdn", "mamba2"])
def test_deterministic_runs_are_bitwise_equal(monkeypatch, engine, kind):
    from ahn_ops.ops.ahn_attention import prefill
    monkeypatch.setitem(prefill.CONFIG, "band", engine)
    T, W, S, H, HKV, D = 8192, 1024, 128, 16, 2, 128
    inputs = make_inputs(kind, 1, T, H, HKV, D, torch.bfloat16, device="cuda", seed=4)
    dout = torch.randn(1, T, H, D, device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    runs = [kernel_grads(inputs, dout, W, S, kind, None, True) for _ in range(3)]
    for n, *gs in zip(NAMES, *runs):
        if gs[0] is None:
            continue
        for g in gs[1:]:
            assert torch.equal(g, gs[0]), n
