"""AHN attention block at growing context lengths: time and cache memory against full attention.

Runs one attention block (prefill of T tokens, then a few decode steps on the constant-size
AHNCache) against full causal attention (SDPA with a growing KV cache) on the same inputs, and
prints a table. With no GPU it runs on the CPU with a small embedded default shape and prints the
cache memory only (CPU_NOTE says why no times); on a GPU it uses Qwen2.5-3B heads and prints the times
as well.

    python python/demo.py                  # embedded default shape, CPU or GPU
    python python/demo.py --contexts 4096 16384 --window 1024 --sinks 64
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import ahn_ops

# On the CPU the fused Triton kernels do not run: AHN takes its chunked fp32 PyTorch path, full attention
# PyTorch's optimised SDPA, and the CPU is often shared, so a timing race there says nothing about the
# kernels (and its numbers move between runs).
CPU_NOTE = ("CPU run: cache memory only; the speed comparison needs a GPU. Here AHN runs its chunked PyTorch "
            "path\n(the fused Triton kernels are GPU-only) against PyTorch's optimised SDPA: timing the two says "
            "nothing\nabout the kernels. GPU figures: README.md, Performance.")


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, dev, reps=1):
    fn()  # warm-up (compilation, allocation)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    _sync(dev)
    return (time.perf_counter() - t0) / reps * 1e3, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kind", default="gdn", choices=["gdn", "dn", "mamba2"])
    p.add_argument("--contexts", type=int, nargs="+", default=None)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--sinks", type=int, default=None)
    p.add_argument("--decode-steps", type=int, default=8)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda":  # Qwen2.5-3B attention heads
        H, HKV, D, dtype = 16, 2, 128, torch.bfloat16
        contexts = args.contexts or [8192, 32768]
        W, S = args.window or 4096, args.sinks if args.sinks is not None else 128
    else:  # small enough for the fp32 reference on 2 CPU cores
        H, HKV, D, dtype = 4, 2, 64, torch.float32
        contexts = args.contexts or [512, 2048, 8192]
        W, S = args.window or 256, args.sinks if args.sinks is not None else 16
    kind = args.kind
    G = H // HKV
    torch.manual_seed(0)
    print(f"AHN-{kind.upper()} attention block on {dev.type}: H={H} HKV={HKV} D={D} window={W} sinks={S} "
          f"dtype={str(dtype).replace('torch.', '')}")
    timed = dev.type != "cpu"
    if timed:
        print(f"{'context':>8} | {'AHN prefill ms':>14} | {'full prefill ms':>15} | {'AHN decode ms':>13} | "
              f"{'full decode ms':>14} | {'AHN cache MiB':>13} | {'full KV MiB':>11}")
    else:
        print(CPU_NOTE)
        print(f"{'context':>8} | {'AHN cache MiB':>13} | {'full KV MiB':>11} | {'full / AHN':>10}")
    A_log = torch.log(torch.linspace(1, 16, H, device=dev))
    dt_bias = torch.randn(H, device=dev) * 0.5
    norm_w = torch.ones(D, device=dev) if kind != "mamba2" else torch.ones(H * D, device=dev)
    o_w = torch.randn(H, D, D, device=dev) * D ** -0.5
    for T in contexts:
        n = T + args.decode_steps
        q = torch.randn(1, n, H, D, device=dev, dtype=dtype)
        k = torch.randn(1, n, HKV, D, device=dev, dtype=dtype)
        v = torch.randn(1, n, HKV, D, device=dev, dtype=dtype)
        a = None if kind == "dn" else torch.randn(1, n, H, device=dev, dtype=dtype)
        b = None if kind == "mamba2" else torch.randn(1, n, H, device=dev, dtype=dtype)
        z = torch.randn(1, n, H, device=dev, dtype=dtype)
        params = (A_log if kind != "dn" else None, dt_bias if kind != "dn" else None, norm_w, o_w)

        def sl(x, s):
            return None if x is None else x[:, s]

        pre = slice(0, T)
        cache = ahn_ops.AHNCache(1, 1, H, HKV, D, window=W, sinks=S, kind=kind, dtype=dtype, device=dev)

        def ahn_prefill():
            cache.reset()
            return ahn_ops.ahn_attention(*(sl(x, pre) for x in (q, k, v, a, b, z)), *params,
                                         window=W, sinks=S, kind=kind, cache=cache[0])

        def full_prefill():  # SDPA repeats K/V for GQA itself (enable_gqa)
            return F.scaled_dot_product_attention(q[:, pre].transpose(1, 2), k[:, pre].transpose(1, 2),
                                                  v[:, pre].transpose(1, 2), is_causal=True, enable_gqa=True)

        if timed:
            t_ahn, _ = _timed(ahn_prefill, dev)
            t_full, _ = _timed(full_prefill, dev)
        # decode: AHN on its ring cache vs full attention over a growing (torch.cat) KV cache
        ahn_prefill()
        _sync(dev)
        t0 = time.perf_counter()
        for i in range(T, n):
            ahn_ops.ahn_attention(*(sl(x, slice(i, i + 1)) for x in (q, k, v, a, b, z)), *params,
                                  window=W, sinks=S, kind=kind, cache=cache[0])
        _sync(dev)
        t_ahn_dec = (time.perf_counter() - t0) / args.decode_steps * 1e3
        kc, vc = k[:, pre].transpose(1, 2).contiguous(), v[:, pre].transpose(1, 2).contiguous()
        _sync(dev)
        t0 = time.perf_counter()
        for i in range(T, n):
            kc = torch.cat([kc, k[:, i:i + 1].transpose(1, 2)], 2)
            vc = torch.cat([vc, v[:, i:i + 1].transpose(1, 2)], 2)
            F.scaled_dot_product_attention(q[:, i:i + 1].transpose(1, 2), kc, vc, enable_gqa=True)
        _sync(dev)
        t_full_dec = (time.perf_counter() - t0) / args.decode_steps * 1e3
        full_bytes = (kc.numel() + vc.numel()) * kc.element_size()
        if timed:
            print(f"{T:>8} | {t_ahn:>14.2f} | {t_full:>15.2f} | {t_ahn_dec:>13.3f} | {t_full_dec:>14.3f} | "
                  f"{cache.nbytes / 2**20:>13.3f} | {full_bytes / 2**20:>11.3f}")
        else:
            print(f"{T:>8} | {cache.nbytes / 2**20:>13.3f} | {full_bytes / 2**20:>11.3f} | "
                  f"{full_bytes / cache.nbytes:>9.1f}x")
    print(f"AHN cache per layer is constant in the context: sinks+ring KV ({S}+{W} tokens), "
          f"gate ring and a [{H}, {D}, {D}] fp32 state per sequence. G = {G}.")


if __name__ == "__main__":
    main()
