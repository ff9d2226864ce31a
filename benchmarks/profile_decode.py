"""Where the time of one fast decode step goes: kernels per token of the CUDA-graph step.

    python benchmarks/profile_decode.py [--shape 3b] [--layers 36] [--context 32768] [--batch 1]

Builds the bench_model shape (random weights), patches it (AHN-gdn, W=32640, S=128 by default),
prefills ``--context`` tokens, captures ``ahn_ops.fast_decode.StaticDecoder`` and profiles
``--steps`` graph replays (torch.profiler, CUDA activities). Prints the per-token time, the number
of kernels per token and per layer, and the kernels grouped by name (us per token, count per token):
a decode step of a small-batch model is a chain of small kernels, each paying launch latency even
inside a graph, so the count matters as much as the bytes. GPU only.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

ahn_ops = C.import_ahn_ops()
from bench_model import build, cache_read_bytes, copy_bandwidth, weight_bytes  # noqa: E402


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="3b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--kind", default="gdn")
    ap.add_argument("--window", type=int, default=32640)
    ap.add_argument("--sinks", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=1,
                    help="time the fused-projection variants this many times, alternated (noise)")
    a = ap.parse_args()
    from ahn_ops import fast_decode as gen

    dev = torch.device("cuda")
    model = build(a.shape, a.layers, torch.bfloat16, dev)
    ahn_ops.patch_qwen(model, a.kind, window=a.window, sinks=a.sinks)
    L = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.context), device=dev)
    logits, cache = gen.prefill(model, ids, chunk_size=32768 if a.batch * a.context > 262144 else None)
    # the modules' own ops, the fused glue, then (batches decode_linear takes) the fused projections too;
    # the last is profiled
    from ahn_ops.ops import decode_linear as dl

    # (fused projections with the fused gate/up, then with the default gate/up without and with the decode
    # op launched early after the q/k/v projection (overlap), without chained launches of the persistent
    # projections (decode_linear.CHAIN, B <= 2), with the step's start and end as the modules' ops (RoPE
    # from inv_freq, fp32 logits, torch argmax: ends=False); the last variant is the default plan on Hopper;
    # later rounds repeat the fused-projection variants)
    Plan = gen.DecodePlan
    variants = [(Plan(), None, True), (Plan(fuse_glue=True), None, True)]
    if dl.supports(a.batch, torch.bfloat16):
        linear = Plan(fuse_glue=True, fuse_linear=True, fuse_gate_up=a.batch <= 2,
                      overlap=dl.can_trigger(dev) and a.batch >= 3)
        variants += [(replace(linear, fuse_gate_up=True, overlap=False), None, True),
                     (replace(linear, overlap=False), None, True),
                     (linear, False, True), (linear, None, False), (linear, None, True)]
    for r in range(a.rounds):
        for plan, chain, ends in variants[2 if r else 0:]:
            dl.CHAIN = chain
            dec, per_token = _timed_decoder(gen, model, cache, logits, a, plan, ends)
            print(f"{plan} chain={dl.chain_on(dev) if chain is None else chain} fused ends={dec.greedy_fused}: "
                  f"{1e3 * per_token:.3f} ms/token")
    floor = (weight_bytes(model) + cache_read_bytes(model, a.batch, a.context)) / copy_bandwidth(dev)
    _profile(dec, per_token, floor, L, a)


def _timed_decoder(gen, model, cache, logits, a, plan, ends=True):
    import copy

    cache = copy.deepcopy(cache)  # each decoder advances its own cache
    dec = gen.StaticDecoder(model, cache, None, a.context, 4 * a.steps + 16, plan=plan)
    if not ends:  # the step's RoPE and token choice as the modules' ops (the earlier path)
        dec.rope_table, dec.greedy_fused = None, False
    dec.start(logits)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dec.eager_step()
    torch.cuda.current_stream().wait_stream(side)
    dec.capture()
    for _ in range(3):
        dec.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        dec.step()
    torch.cuda.synchronize()
    return dec, (time.perf_counter() - t0) / a.steps


def _profile(dec, per_token, floor, L, a):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            dec.step()
        torch.cuda.synchronize()
    agg = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("Memcpy") \
                and not e.name.startswith("Memset"):
            agg[e.name][0] += 1
            agg[e.name][1] += e.time_range.elapsed_us()
    n_k = sum(c for c, _ in agg.values()) / a.steps
    busy = sum(t for _, t in agg.values()) / a.steps
    print(f"\n# decode step ({dec.plan}): {a.shape} L={L} B={a.batch} T={a.context} {a.kind} "
          f"W={a.window} S={a.sinks}, "
          f"{torch.cuda.get_device_name()}")
    print(f"per token {1e3 * per_token:.3f} ms (floor {1e3 * floor:.3f} ms), kernels per token {n_k:.0f} "
          f"({n_k / L:.1f} per layer), kernel busy time {busy / 1e3:.3f} ms/token "
          f"(gaps {1e3 * per_token - busy / 1e3:.3f} ms)")
    print("\n| kernel | per token | us/token | us each |\n|---|---|---|---|")
    for name, (cnt, t) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:a.top]:
        print(f"| {name[:90]} | {cnt / a.steps:.0f} | {t / a.steps:.1f} | {t / cnt:.2f} |")


if __name__ == "__main__":
    main()
