"""Example: a multi-layer AHN decode loop captured once in a CUDA graph and replayed per token.

Uses only the public API (ahn_ops.AHNCache, ahn_ops.ahn_decode). The decode op reads each
sequence's position from the cache on the device and allocates only from PyTorch's caching
allocator, so one captured step serves every later token: refill the static input buffers,
replay, read the outputs. Here random tensors stand in for the Qwen2.5 projections; in a model
the whole decoder step (projections, RoPE, MLP) would sit inside the same graph.

    python python/cuda_graph_decode.py [--layers 36] [--batch 1] [--window 32640] [--sinks 128]
"""

from __future__ import annotations

import argparse

import torch

import ahn_ops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--window", type=int, default=32640)
    ap.add_argument("--sinks", type=int, default=128)
    ap.add_argument("--kind", default="gdn", choices=["gdn", "dn", "mamba2"])
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this example needs a CUDA GPU")
    L, B, H, HKV, D = args.layers, args.batch, args.heads, args.kv_heads, args.head_dim
    W, S, kind, dtype = args.window, args.sinks, args.kind, torch.bfloat16
    dev = "cuda"

    cache = ahn_ops.AHNCache(B, L, H, HKV, D, window=W, sinks=S, kind=kind, dtype=dtype, device=dev)
    # pretend a long prompt was prefilled: random K/V, gates and memory, every sequence past S + W
    for t in (cache.sink_k, cache.sink_v, cache.ring_k, cache.ring_v):
        t.normal_()
    cache.gates.normal_()  # the ring tokens' raw gate inputs a, b
    cache.state.normal_(std=0.05)
    cache.pos.fill_(S + W + 1000)

    def layer_params():
        return dict(
            A_log=None if kind == "dn" else torch.log(torch.rand(H, device=dev) * 15 + 1),
            dt_bias=None if kind == "dn" else 0.5 * torch.randn(H, device=dev),
            norm_weight=1 + 0.1 * torch.randn(H * D if kind == "mamba2" else D, device=dev),
            o_weight=(torch.randn(H, D, D, device=dev) * D ** -0.5).to(dtype),
        )

    params = [layer_params() for _ in range(L)]
    # static inputs of one decode step (all layers): refilled before each replay
    q = torch.zeros(L, B, H, D, dtype=dtype, device=dev)
    k = torch.zeros(L, B, HKV, D, dtype=dtype, device=dev)
    v = torch.zeros_like(k)
    a = torch.zeros(L, B, H, dtype=dtype, device=dev)
    b = torch.zeros_like(a)
    z = torch.zeros_like(a)

    def step():
        outs, prev = [], None
        for l in range(L):
            ql = q[l] if prev is None else q[l] + 0.1 * prev  # layer l+1 depends on layer l
            prev = ahn_ops.ahn_decode(ql, k[l], v[l], None if kind == "dn" else a[l],
                                      None if kind == "mamba2" else b[l], z[l], cache=cache[l], **params[l])
            outs.append(prev)
        return outs

    # warm up once outside the graph (kernel attributes are set on first use) on a side stream
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()  # nothing runs during capture: the cache is not advanced

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    pos0 = cache.pos[0].clone()
    total_ms = 0.0
    for _ in range(args.tokens):
        for t in (q, k, v, a, b, z):
            t.normal_()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        total_ms += start.elapsed_time(end)
    assert torch.equal(cache.pos[0], pos0 + args.tokens)
    print(f"{args.tokens} tokens x {L} layers (B={B}, H={H}, HKV={HKV}, D={D}, W={W}, S={S}, {kind}): "
          f"{1e3 * total_ms / args.tokens:.1f} us per token, {1e3 * total_ms / args.tokens / L:.2f} us per layer; "
          f"last output finite: {bool(torch.isfinite(outs[-1]).all())}")


if __name__ == "__main__":
    main()
