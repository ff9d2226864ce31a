"""The chunkwise PyTorch path (chunked.py) against the token-by-token reference."""

from __future__ import annotations

import random

import pytest
import torch

import ahn_ops
from ahn_ops.ops.ahn_attention import chunked
from ahn_ops.ops.ahn_attention import reference as ref

from ..utils import empty_layer_cache, make_inputs, sel

F64 = torch.float64


@pytest.mark.parametrize("kind", ["gdn", "dn", "mamba2"])
@pytest.mark.parametrize("T,W,S,G", [
    pytest.param(1, 4, 0, 1, id="T1-W4-S0-G1"),
    pytest.param(63, 7, 3, 2, id="T63-W7-S3-G2"),
    pytest.param(200, 33, 5, 4, id="T200-W33-S5-G4"),
    pytest.param(130, 1, 0, 8, id="T130-W1-S0-G8"),
    pytest.param(70, 90, 2, 1, id="T70-W90-S2-G1"),
])
def test_chunked_matches_reference(kind, T, W, S, G):
    B, HKV, D = 2, 1, 8
    inp = make_inputs(kind, B, T, HKV * G, HKV, D, F64, seed=T + W + G)
    want, _, _, state = ref.ahn_attention_ref(*inp, W, S, kind, dtype=F64, return_parts=True)
    got = chunked.ahn_attention_chunked(*inp, W, S, kind, dtype=F64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_chunked_varlen_and_gradients():
    kind, H, HKV, D, W, S = "gdn", 4, 2, 8, 6, 2
    lens = [9, 1, 70]
    parts = [make_inputs(kind, 1, n, H, HKV, D, F64, seed=i) for i, n in enumerate(lens)]
    packed = [torch.cat([p[i] for p in parts], 1) for i in range(6)] + list(parts[0][6:])
    cu = torch.tensor([0, 9, 10, 80])
    leaves = [x.detach().clone().requires_grad_() for x in packed]
    rleaves = [x.detach().clone().requires_grad_() for x in packed]
    out = chunked.ahn_attention_chunked(*leaves, W, S, kind, cu, dtype=F64)
    want = ref.ahn_attention_ref(*rleaves, W, S, kind, cu, dtype=F64)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10)
    dout = torch.randn_like(out)
    out.backward(dout)
    want.backward(dout)
    for x, r in zip(leaves, rleaves):
        torch.testing.assert_close(x.grad, r.grad, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("kind", ["gdn", "mamba2"])
def test_chunked_cache_path_matches_reference_cache_path(kind):
    B, H, HKV, D, W, S, T = 2, 4, 2, 8, 7, 3, 90
    inp = make_inputs(kind, B, T, H, HKV, D, F64, seed=3)
    q, k, v, a, b, z, A_log, dt_bias, nw, ow = inp
    caches = {be: empty_layer_cache(kind, B, H, HKV, D, W, S, F64) for be in ("chunked", "reference")}
    rng = random.Random(0)
    t0 = 0
    while t0 < T:
        n = min(rng.choice([2, 5, W, W + 2, 40]), T - t0)
        sl = slice(t0, t0 + n)
        outs = {be: ahn_ops.ahn_attention(*(sel(x, sl) for x in (q, k, v, a, b, z)), A_log, dt_bias, nw, ow,
                                          window=W, sinks=S, kind=kind, cache=c, backend=be)
                for be, c in caches.items()}
        torch.testing.assert_close(outs["chunked"], outs["reference"], rtol=1e-9, atol=1e-10)
        t0 += n
    for t0_, t1_ in zip(caches["chunked"].tensors(), caches["reference"].tensors()):
        torch.testing.assert_close(t0_, t1_, rtol=1e-7, atol=1e-9)


def test_auto_backend_uses_chunked_on_cpu_fp32():
    # fp32 on the CPU (no interpreter involved) is served by the chunked path, not the reference
    inp = make_inputs("gdn", 1, 130, 4, 2, 16, seed=9)
    a = ahn_ops.ahn_attention(*inp, window=20, sinks=2, kind="gdn")
    b = chunked.ahn_attention_chunked(*inp, 20, 2, "gdn")
    assert torch.equal(a, b)
