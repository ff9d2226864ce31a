#!/usr/bin/env python
"""AHN vs the unpatched model as the context grows: cache memory, prefill time, decode latency.

A small Qwen2.5-architecture model (random weights, built locally: no download) is run
twice on the same prompt: unpatched (SDPA, growing DynamicCache) and patched by
``ahn_ops.patch_qwen`` (constant-size AHN cache: S sinks + W window tokens + fp32 state).

    python python/demo_model.py                      # CPU: 256, 1k, 4k tokens (< 2 min on 2 cores)
    python python/demo_model.py --contexts 4096 32768 131072 --window 2048   # GPU

On CPU the AHN side runs the C++ decode op and the chunkwise PyTorch prefill (the fused Triton
kernels are GPU-only), so it is not a kernel speed comparison there: the table shows the cache
memory only (CPU_NOTE). ``--budget`` seconds caps the run: larger contexts are skipped when they
would not fit.
"""

from __future__ import annotations

import argparse
import time

import torch

import ahn_ops
from ahn_ops.models import cache_kwargs

# The unpatched model runs PyTorch's optimised SDPA; on the CPU the patched one runs the chunked PyTorch
# prefill, not the fused kernels, and the CPU is often shared: times there say nothing about the kernels
# (and move between runs), so a CPU run prints none.
CPU_NOTE = ("CPU run: cache memory only; the speed comparison needs a GPU. Here AHN runs its chunked PyTorch "
            "prefill and\nthe C++ decode op (the fused Triton kernels are GPU-only) against PyTorch's optimised "
            "SDPA: timing the two\nsays nothing about the kernels. GPU figures: README.md, Performance.")


def build(args, device, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=1 << 20, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    ahn = Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    ahn.load_state_dict(base.state_dict())
    ahn_ops.patch_qwen(ahn, args.kind, window=args.window, sinks=args.sinks)
    with torch.no_grad():
        for n, p in ahn.named_parameters():
            if n.endswith("ahn.fn.o_proj.weight"):
                p.normal_(0, p.shape[-1] ** -0.5)
    return base, ahn


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def kv_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes
    return sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers if l.keys is not None)


@torch.no_grad()
def measure(model, ids, steps, device):
    sync(device)
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    sync(device)
    t_pre = time.perf_counter() - t0
    cache = out["cache"] if "cache" in out else out.past_key_values  # transformers >= 5.24: cache
    nxt = out.logits[:, -1:].argmax(-1)
    model(nxt, **cache_kwargs(cache))  # warm-up step
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = model(nxt, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
    sync(device)
    return t_pre, (time.perf_counter() - t0) / steps, kv_bytes(cache)


def main(argv=None):
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768] if gpu else [256, 1024, 4096])
    p.add_argument("--kind", default="gdn")
    p.add_argument("--window", type=int, default=1024 if gpu else 128)
    p.add_argument("--sinks", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024 if gpu else 256)
    p.add_argument("--layers", type=int, default=8 if gpu else 2)
    p.add_argument("--heads", type=int, default=8 if gpu else 4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--decode-steps", type=int, default=16 if gpu else 4)
    p.add_argument("--budget", type=float, default=600 if gpu else 105, help="seconds for the whole table")
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--dtype", default="bfloat16" if gpu else "float32")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    base, ahn = build(args, device, dtype)
    D = args.hidden // args.heads
    print(f"Qwen2-architecture model: hidden={args.hidden} layers={args.layers} H={args.heads} "
          f"Hkv={args.kv_heads} D={D}, {dtype}, {device}; AHN {args.kind} W={args.window} S={args.sinks}")
    timed = device.type != "cpu"
    if timed:
        hdr = (f"{'context':>8} | {'KV MiB base':>11} {'AHN MiB':>8} | {'prefill s base':>14} {'AHN':>8} | "
               f"{'decode ms base':>14} {'AHN':>8}")
    else:
        print(CPU_NOTE)
        hdr = f"{'context':>8} | {'KV MiB base':>11} {'AHN MiB':>8} | {'base / AHN':>10}"
    print(hdr)
    print("-" * len(hdr))
    gen = torch.Generator().manual_seed(0)
    warm = torch.randint(0, args.vocab, (1, 32), generator=gen).to(device)
    measure(base, warm, 1, device)  # first-call costs (lazy imports, allocator) out of the table
    measure(ahn, warm, 1, device)
    last = None
    for T in sorted(args.contexts):
        left = args.budget - (time.perf_counter() - start)
        if last is not None:  # time grows about linearly (AHN) to quadratically (base prefill): be careful
            t_prev, T_prev = last
            if t_prev * (T / T_prev) * 1.3 > left:
                print(f"{T:>8} | skipped: would exceed --budget {args.budget:.0f}s")
                continue
        ids = torch.randint(0, args.vocab, (1, T), generator=gen).to(device)
        t0 = time.perf_counter()
        b = measure(base, ids, args.decode_steps, device)
        a = measure(ahn, ids, args.decode_steps, device)
        last = (time.perf_counter() - t0, T)
        if timed:
            print(f"{T:>8} | {b[2] / 2**20:>11.2f} {a[2] / 2**20:>8.2f} | {b[0]:>14.3f} {a[0]:>8.3f} | "
                  f"{1e3 * b[1]:>14.2f} {1e3 * a[1]:>8.2f}")
        else:
            print(f"{T:>8} | {b[2] / 2**20:>11.2f} {a[2] / 2**20:>8.2f} | {b[2] / a[2]:>9.1f}x")
        del ids
    print(f"total {time.perf_counter() - start:.1f}s. The AHN cache stays constant: S + W tokens of K/V per layer, "
          "a W-entry gate ring and an H x D x D fp32 state; the base KV cache grows with the context.")


if __name__ == "__main__":
    main()
