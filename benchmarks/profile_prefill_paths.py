"""Kernel time of the fused prefill through its two entry points, one T (issues 3 and 6). GPU only.

    python benchmarks/profile_prefill_paths.py [--T 131072] [--window 32640] [--sinks 128] [--kind gdn]

The same inputs (Qwen2.5-3B heads: H=16, HKV=2, D=128, bf16, B=1) through
  * ``prefill_fwd``: the op of a training forward / a cache-free prefill (positions from 0);
  * the cache path: ``ahn_attention(..., cache=...)`` on a fresh ``AHNCache`` layer, i.e.
    ``torch.ops.ahn.prefill_cache``, what a model's prefill before generation runs;
  * ``prefill_fwd`` with an initial state and the final state returned (the cache path's
    USE_H0 / STORE_HT variants without its cache bookkeeping).
Then the AHN attention's RoPE at the same T: the torch code against ``model_glue.rope_prefill``.
Each path is profiled over two calls (torch.profiler, CUDA activities) after a warm-up; prints the device
time per call and the top kernels. The two entry points should cost the same kernel time: a
difference points at a kernel variant (constexpr branch) of one path only.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

ahn_ops = C.import_ahn_ops()
import bench_prefill as BP  # noqa: E402


def device_ms(fn, calls=2):
    """(device time per call in ms, [(kernel, ms per call)] top 5) of ``fn`` under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    total = sum((getattr(e, "self_device_time_total", 0) or 0) for e in ev) / 1e3 / calls
    top = sorted(ev, key=lambda e: -(getattr(e, "device_time_total", 0) or 0))[:5]
    return total, [(e.key, (getattr(e, "device_time_total", 0) or 0) / 1e3 / calls) for e in top]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=131072)
    ap.add_argument("--window", type=int, default=32640)
    ap.add_argument("--sinks", type=int, default=128)
    ap.add_argument("--kind", default="gdn", choices=("gdn", "dn", "mamba2"))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_prefill_paths.py needs a GPU")
    T, W, S, H, HKV, D, kind = a.T, a.window, a.sinks, 16, 2, 128, a.kind
    args = BP.make(kind, 1, T, H, HKV, D, device="cuda")
    cache = ahn_ops.AHNCache(batch_size=1, num_layers=1, num_heads=H, num_kv_heads=HKV, head_dim=D, window=W,
                             sinks=S, kind=kind, dtype=torch.bfloat16, device="cuda")
    h0 = torch.zeros(1, H, D, D, device="cuda")

    def plain():
        return torch.ops.ahn.prefill_fwd(*args, W, S, kind, None, None, False)[0]

    def cache_path():
        cache.reset()
        return ahn_ops.ahn_attention(*args, window=W, sinks=S, kind=kind, cache=cache[0])

    def plain_h0():
        return torch.ops.ahn.prefill_fwd(*args, W, S, kind, None, h0, True)[0]

    print(f"{torch.cuda.get_device_name()}  {kind} T={T} W={W} S={S} H={H}/{HKV} D={D} bf16")
    rows = []
    for name, fn in (("prefill_fwd", plain), ("cache path", cache_path), ("prefill_fwd + h0 / final state", plain_h0)):
        total, top = device_ms(fn)
        rows.append((name, total))
        print(f"== {name}: {total:.2f} ms of device time per call")
        for k, ms in top:
            print(f"     {ms:9.2f} ms  {k[:70]}")
    print("\n| path | device ms per call |\n|---|---|")
    for name, total in rows:
        print(f"| {name} | {total:.2f} |")
    rope_table(T, H, HKV, D)


def rope_table(T, H, HKV, D):
    """The AHN attention's RoPE at this T: the torch code (``models.qwen2._rope``) vs ``rope_prefill``."""
    import triton

    from ahn_ops.models.qwen2 import _rope
    from ahn_ops.ops.model_glue import rope_prefill

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, T, H, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(1, T, HKV, D, device="cuda", generator=g).bfloat16()
    ang = torch.rand(1, T, D // 2, device="cuda", generator=g) * 100
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
    t_torch = triton.testing.do_bench(lambda: _rope(q, k, cos, sin), return_mode="median")
    t_fused = triton.testing.do_bench(lambda: rope_prefill(q, k, cos, sin), return_mode="median")
    same = (rope_prefill(q, k, cos, sin)[0] == _rope(q, k, cos, sin)[0]).float().mean().item()
    print(f"\n| RoPE, q [1, {T}, {H}, {D}] + k | torch code | rope_prefill | q values bit-equal |\n|---|---|---|---|")
    print(f"| ms (do_bench median) | {t_torch:.3f} | {t_fused:.3f} | {100 * same:.1f}% |")


if __name__ == "__main__":
    main()
