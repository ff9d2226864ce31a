"""Argument checks of the cache API: AHNCache.reset/reorder indices, AHNCache dtype, the ``cache=``
argument of ahn_attention/ahn_decode, and the refusal of the (non-differentiable) cache paths under
autograd. Every refused call must leave the cache bit-for-bit unchanged."""

from __future__ import annotations

import pytest
import torch

import ahn_ops
from tests.utils import make_inputs

B, L, H, HKV, D, W, S = 3, 2, 4, 2, 8, 4, 1


def _filled_cache(dtype=torch.float32) -> ahn_ops.AHNCache:
    """Every field of sequence ``i`` (all layers) holds values distinct from the other sequences."""
    c = ahn_ops.AHNCache(B, L, H, HKV, D, window=W, sinks=S, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    for t in c._fields():
        if t.dtype == torch.int64:
            t.copy_(torch.arange(1, B + 1).expand_as(t) * 10)
        else:
            t.copy_(torch.rand(t.shape, generator=g).to(t.dtype) + 1)
    return c


def _snapshot(c: ahn_ops.AHNCache):
    return [t.clone() for t in c._fields()]


def _assert_unchanged(c: ahn_ops.AHNCache, snap) -> None:
    for t0, t1 in zip(snap, c._fields()):
        assert torch.equal(t0, t1)  # bit for bit (no NaNs in these caches)


def _reset_rows(c, snap):
    """Which sequences are all-zero (in every field and layer) and which are untouched."""
    zero = [all(int(t[:, i].count_nonzero()) == 0 for t in c._fields()) for i in range(B)]
    same = [all(torch.equal(t[:, i], t0[:, i]) for t, t0 in zip(c._fields(), snap)) for i in range(B)]
    return zero, same


# ---------------------------------------------------------------------------------------------
# A. reset / reorder
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arg, want", [
    (torch.tensor([True, False, True]), [0, 2]),
    ([True, False, True], [0, 2]),
    (torch.tensor([False, False, False]), []),
    (torch.tensor([True, True, True]), [0, 1, 2]),
    (torch.tensor([0, 2]), [0, 2]),
    (torch.tensor([2], dtype=torch.int32), [2]),
    ([1], [1]),
    ((2, 2), [2]),
    (range(3), [0, 1, 2]),
    ([], []),
    (1, [1]),
    (torch.tensor(0), [0]),
])
def test_reset_resets_exactly_the_given_sequences(arg, want):
    c = _filled_cache()
    snap = _snapshot(c)
    c.reset(arg)
    zero, same = _reset_rows(c, snap)
    assert [i for i in range(B) if zero[i]] == want
    assert [i for i in range(B) if same[i]] == [i for i in range(B) if i not in want]


def test_reset_none_resets_everything():
    c = _filled_cache()
    c.reset()
    assert all(int(t.count_nonzero()) == 0 for t in c._fields())


@pytest.mark.parametrize("arg, match", [
    (torch.tensor([0.0, 2.0]), "float32"),
    ([0.5], "non-integer"),
    ([1.0], "non-integer"),
    (torch.tensor([True, False]), r"shape \[3\]"),
    (torch.tensor([True, False, True, False]), r"shape \[3\]"),
    ([True, False], r"shape \[3\]"),
    (torch.tensor([[True, False, True]]), r"shape \[3\]"),
    (torch.tensor(True), r"shape \[3\]"),
    (True, "bool mask"),
    ([True, 1], "mixing bools"),
    (torch.tensor([0, 3]), "out-of-range"),
    ([3], "out-of-range"),
    ([-1], "negative indices are not supported"),
    (torch.tensor([[0, 1]]), "1-D"),
    (torch.tensor([1], dtype=torch.uint8), "uint8"),
    ("0", "int indices"),
    (1.0, "int indices"),
])
def test_reset_refuses_bad_indices_and_leaves_cache_unchanged(arg, match):
    c = _filled_cache()
    snap = _snapshot(c)
    with pytest.raises(ValueError, match=match) as e:
        c.reset(arg)
    assert "batch_indices" in str(e.value)
    _assert_unchanged(c, snap)


@pytest.mark.parametrize("arg", [torch.tensor([2, 0, 1]), [2, 0, 1], torch.tensor([1, 1, 0], dtype=torch.int32),
                                 (0, 0, 0)])
def test_reorder_moves_sequences(arg):
    c = _filled_cache()
    snap = _snapshot(c)
    c.reorder(arg)
    src = [int(i) for i in arg]
    for t, t0 in zip(c._fields(), snap):
        for i, j in enumerate(src):
            assert torch.equal(t[:, i], t0[:, j])


@pytest.mark.parametrize("arg, match", [
    (torch.tensor([True, False, True]), "bool"),
    ([True, False, True], "bool"),
    (torch.tensor([0.9, 1.7, 2.2]), "float32"),
    ([0.0, 1.0, 2.0], "non-integer"),
    (torch.tensor([0, 1]), r"shape \[3\]"),
    ([0, 1, 2, 0], r"shape \[3\]"),
    (torch.tensor([[0, 1, 2]]), "1-D"),
    (torch.tensor(0), "1-D"),
    (0, "int indices"),
    (torch.tensor([0, 1, 3]), "out-of-range"),
    ([0, -1, 2], "negative indices are not supported"),
])
def test_reorder_refuses_bad_indices_and_leaves_cache_unchanged(arg, match):
    c = _filled_cache()
    snap = _snapshot(c)
    with pytest.raises(ValueError, match=match) as e:
        c.reorder(arg)
    assert "beam_idx" in str(e.value)
    _assert_unchanged(c, snap)


# ---------------------------------------------------------------------------------------------
# B. AHNCache dtype; the whole AHNCache passed as one layer's cache
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8, torch.complex64, "float32"])
def test_cache_refuses_non_floating_dtype(dtype):
    with pytest.raises(ValueError, match="dtype"):
        ahn_ops.AHNCache(1, 1, H, HKV, D, window=W, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_cache_accepts_floating_dtypes(dtype):
    c = ahn_ops.AHNCache(1, 1, H, HKV, D, window=W, dtype=dtype)
    assert c.ring_k.dtype == dtype and c.state.dtype == torch.float32


def test_float64_cache_runs_prefill_and_decode():
    """float64 is in the accepted list because the cache paths do run on it (reference/chunked)."""
    c = ahn_ops.AHNCache(1, 1, H, HKV, D, window=W, sinks=S, dtype=torch.float64)
    args = make_inputs("gdn", 1, 9, H, HKV, D, dtype=torch.float64, seed=1)
    ref = ahn_ops.ahn_attention(*args, window=W, sinks=S, backend="reference")
    out = ahn_ops.ahn_attention(*[None if x is None else x[:, :8] if x.dim() >= 3 else x for x in args[:6]],
                                *args[6:], window=W, sinks=S, cache=c[0])
    step = ahn_ops.ahn_attention(*[None if x is None else x[:, 8:] if x.dim() >= 3 else x for x in args[:6]],
                                 *args[6:], window=W, sinks=S, cache=c[0])
    assert out.dtype == torch.float64 and int(c.pos[0, 0]) == 9
    # the cached state is fp32 whatever the K/V dtype
    torch.testing.assert_close(torch.cat([out, step], 1), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("T", [1, 5])
def test_whole_cache_instead_of_a_layer_is_a_type_error(T):
    c = _filled_cache()
    snap = _snapshot(c)
    args = make_inputs("gdn", B, T, H, HKV, D, seed=2)
    with pytest.raises(TypeError, match=r"cache\[layer_idx\]"):
        ahn_ops.ahn_attention(*args, window=W, sinks=S, cache=c)
    with pytest.raises(TypeError, match="AHNLayerCache"):
        ahn_ops.ahn_attention(*args, window=W, sinks=S, cache=object())
    dec = [None if x is None else x[:, 0] if x.dim() >= 3 else x for x in args[:6]] + list(args[6:])
    with pytest.raises(TypeError, match=r"cache\[layer_idx\]"):
        ahn_ops.ahn_decode(*dec, c)
    _assert_unchanged(c, snap)


# ---------------------------------------------------------------------------------------------
# C. the cache paths are inference-only
# ---------------------------------------------------------------------------------------------
def _grad_args(T, which, seed=3):
    args = list(make_inputs("gdn", B, T, H, HKV, D, seed=seed))
    names = ["q", "k", "v", "a", "b", "z", "A_log", "dt_bias", "norm_weight", "o_weight"]
    for n in which:
        i = names.index(n)
        args[i] = args[i].detach().requires_grad_(True)
    return args


@pytest.mark.parametrize("backend", ["auto", "reference", "chunked"])
@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("which", [("q", "k", "v"), ("o_weight",), ("a", "b", "z", "A_log")])
def test_cache_path_refuses_inputs_requiring_grad(backend, T, which):
    c = _filled_cache()
    c.pos.zero_()  # a valid cache: empty sequences
    snap = _snapshot(c)
    args = _grad_args(T, which)
    with pytest.raises(RuntimeError, match="inference-only") as e:
        ahn_ops.ahn_attention(*args, window=W, sinks=S, cache=c[0], backend=backend)
    msg = str(e.value)
    assert "torch.no_grad()" in msg and "without cache=" in msg and which[0] in msg
    _assert_unchanged(c, snap)
    # the same call without grad runs, and equals the call on inputs that need no grad
    with torch.no_grad():
        got = ahn_ops.ahn_attention(*args, window=W, sinks=S, cache=c[0], backend=backend)
    c2 = ahn_ops.AHNCache(B, L, H, HKV, D, window=W, sinks=S, dtype=torch.float32)
    for t, t0 in zip(c2._fields(), snap):
        t.copy_(t0)
    want = ahn_ops.ahn_attention(*[None if x is None else x.detach() for x in args], window=W, sinks=S,
                                 cache=c2[0], backend=backend)
    assert torch.equal(got, want) and got.grad_fn is None
    for t, t2 in zip(c._fields(), c2._fields()):
        assert torch.equal(t, t2)


def test_decode_entry_refuses_inputs_requiring_grad_and_inference_mode_works():
    c = ahn_ops.AHNCache(B, 1, H, HKV, D, window=W, sinks=S, dtype=torch.float32)
    args = _grad_args(1, ("q", "norm_weight"))
    dec = [None if x is None else x[:, 0] if x.dim() >= 3 else x for x in args[:6]] + list(args[6:])
    with pytest.raises(RuntimeError, match="inference-only"):
        ahn_ops.ahn_decode(*dec, c[0])
    assert int(c.pos.count_nonzero()) == 0
    with torch.inference_mode():
        out = ahn_ops.ahn_decode(*dec, c[0])
    assert out.shape == (B, H, D) and c.pos[0].tolist() == [1] * B


def test_cache_free_path_stays_differentiable():
    args = _grad_args(6, ("q", "o_weight"))
    out = ahn_ops.ahn_attention(*args, window=W, sinks=S)
    out.sum().backward()
    assert args[0].grad is not None and args[-1].grad is not None


def test_gate_ring_of_another_layout_or_dtype_is_refused():
    # the ring keeps the gate inputs [B, W, 2, H] in the K/V dtype; fp32 gates [B, W, H, 2] (the layout of
    # earlier versions) are refused before anything is written
    c = _filled_cache(torch.bfloat16)
    layer = c[0]
    snap = _snapshot(c)
    args = make_inputs("gdn", B, 3, H, HKV, D, dtype=torch.bfloat16, seed=5)
    f32 = ahn_ops.AHNLayerCache(layer.sink_k, layer.sink_v, layer.ring_k, layer.ring_v, layer.gates.float(),
                                layer.state, layer.pos, W, S, "gdn")
    with pytest.raises(TypeError, match="cache.gates has dtype torch.float32"):
        ahn_ops.ahn_attention(*args, window=W, sinks=S, cache=f32)
    old = ahn_ops.AHNLayerCache(layer.sink_k, layer.sink_v, layer.ring_k, layer.ring_v,
                                torch.zeros(B, W, H, 2, dtype=torch.float32), layer.state, layer.pos, W, S, "gdn")
    with pytest.raises(ValueError, match=r"cache.gates must have shape \[3, 4, 2, 4\]"):
        ahn_ops.ahn_attention(*args, window=W, sinks=S, cache=old)
    _assert_unchanged(c, snap)
