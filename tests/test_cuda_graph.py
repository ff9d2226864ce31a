"""A multi-layer AHN decode loop captured in one torch.cuda.CUDAGraph replays exactly like eager.

The decode op reads ``pos`` on the device (no host sync) and allocates only its output and a
workspace from the caching allocator, so a whole step over all layers can be captured; each
replay advances the cache by one token. Layer l + 1's query depends on layer l's output, as in
a model. Skips without CUDA.
"""

from __future__ import annotations

import pytest
import torch

import ahn_ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _randomize(cache: ahn_ops.AHNCache, gen: torch.Generator, start_pos) -> None:
    for t in (cache.sink_k, cache.sink_v, cache.ring_k, cache.ring_v):
        t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
    cache.gates.copy_(torch.randn(cache.gates.shape, generator=gen).to(cache.gates.dtype))  # raw a, b
    cache.state.copy_(0.1 * torch.randn(cache.state.shape, generator=gen))
    cache.pos.copy_(torch.tensor(start_pos, dtype=torch.int64).expand_as(cache.pos))


def _clone_cache(cache: ahn_ops.AHNCache) -> ahn_ops.AHNCache:
    other = ahn_ops.AHNCache(cache.batch_size, len(cache), cache.state.shape[2], cache.ring_k.shape[3],
                             cache.ring_k.shape[4], cache.window, cache.sinks, cache.kind, cache.dtype,
                             cache.device)
    for dst, src in zip(other._fields(), cache._fields()):
        dst.copy_(src)
    return other


@pytest.mark.parametrize("kind", ["gdn", "mamba2"])
def test_graph_replay_matches_eager(kind):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("ahn::decode_step", "CUDA")
    L, B, H, HKV, D, W, S, dtype = 3, 2, 8, 2, 128, 64, 4, torch.bfloat16
    gen = torch.Generator().manual_seed(7)
    cache = ahn_ops.AHNCache(B, L, H, HKV, D, W, S, kind, dtype, "cuda")
    # one sequence crosses W + S = 68 during the replays, the other has wrapped many times
    _randomize(cache, gen, [60, 1000])
    eager = _clone_cache(cache)

    def params(h):
        return dict(
            A_log=None if kind == "dn" else torch.log(torch.rand(h, generator=gen) * 15 + 1).cuda(),
            dt_bias=None if kind == "dn" else (0.5 * torch.randn(h, generator=gen)).cuda(),
            norm_weight=(1 + 0.1 * torch.randn(h * D if kind == "mamba2" else D, generator=gen)).cuda(),
            o_weight=(torch.randn(h, D, D, generator=gen) * D ** -0.5).cuda(),
        )

    layer_params = [params(H) for _ in range(L)]
    # static input buffers, refilled before every replay
    q_in = torch.zeros(L, B, H, D, dtype=dtype, device="cuda")
    k_in = torch.zeros(L, B, HKV, D, dtype=dtype, device="cuda")
    v_in = torch.zeros_like(k_in)
    a_in = torch.zeros(L, B, H, dtype=dtype, device="cuda")
    b_in = torch.zeros_like(a_in)
    z_in = torch.zeros_like(a_in)

    def step(c: ahn_ops.AHNCache):
        outs, prev = [], None
        for l in range(L):
            q = q_in[l] if prev is None else q_in[l] + 0.5 * prev
            a = None if kind == "dn" else a_in[l]
            b = None if kind == "mamba2" else b_in[l]
            prev = ahn_ops.ahn_decode(q, k_in[l], v_in[l], a, b, z_in[l], cache=c[l], **layer_params[l])
            outs.append(prev)
        return outs

    def refill():
        for t in (q_in, k_in, v_in, a_in, b_in, z_in):
            t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))

    # warm up on a scratch copy (first calls set kernel attributes), then capture
    scratch = _clone_cache(cache)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(scratch)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_outs = step(cache)
    assert cache.pos.tolist() == [[60, 1000]] * L, "capture must not run the kernels"

    for _ in range(12):
        refill()
        graph.replay()
        eager_outs = step(eager)
        for l in range(L):
            torch.testing.assert_close(graph_outs[l], eager_outs[l], rtol=0, atol=0)
    torch.cuda.synchronize()
    for name, x, y in zip(("sink_k", "sink_v", "ring_k", "ring_v", "gates", "state", "pos"),
                          cache._fields(), eager._fields()):
        assert torch.equal(x, y), f"cache.{name} differs between graph replay and eager"
    assert cache.pos.tolist() == [[72, 1012]] * L
