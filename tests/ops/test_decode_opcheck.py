"""torch.library.opcheck and torch.compile on torch.ops.ahn.decode_step (CPU kernel)."""

from __future__ import annotations

import pytest
import torch

import ahn_ops

from ..utils import empty_layer_cache, make_inputs


def _args(kind, B=3, H=4, HKV=2, D=16, W=5, S=2, steps=9):
    inp = make_inputs(kind, B, steps + 1, H, HKV, D, seed=4)
    q, k, v, a, b, z, A_log, dt_bias, nw, ow = inp
    cache = empty_layer_cache(kind, B, H, HKV, D, W, S)
    for t in range(steps):  # fill the ring past W + S so the absorb path runs
        ahn_ops.ahn_decode(*(None if x is None else x[:, t] for x in (q, k, v, a, b, z)), A_log, dt_bias, nw, ow,
                           cache)
    cur = [None if x is None else x[:, steps] for x in (q, k, v, a, b, z)]
    return (*cur, A_log, dt_bias, nw, ow, *cache.tensors(), W, S, kind)


@pytest.mark.parametrize("kind", ["gdn", "dn", "mamba2"])
def test_decode_step_opcheck(kind):
    torch.library.opcheck(torch.ops.ahn.decode_step.default, _args(kind))


def test_decode_step_compiles_fullgraph():
    args = _args("gdn")
    eager_cache = [t.clone() if isinstance(t, torch.Tensor) else t for t in args]
    want = torch.ops.ahn.decode_step(*eager_cache)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(*xs):
        return torch.ops.ahn.decode_step(*xs)

    got = step(*args)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for t0, t1 in zip(eager_cache[10:17], args[10:17]):
        assert torch.equal(t0, t1), "the compiled op must update the cache in place like eager"
