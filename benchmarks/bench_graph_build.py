"""What a new shape costs on the Hopper engine: cuDNN's band graphs are built per (length, window).

For each (T, W): the first ``band_cudnn.band_fwd`` / ``band_bwd`` call at that shape (graph built, or
taken from the cache of a padded length, see ``band_cudnn.PAD``) against a repeat; then fused
forward + backward steps at T=16384 with a new window each (what a distillation step with a random window
pays: ``band_cudnn.band_window`` gives a shape's first ``EXACT_WINDOWS`` windows their exact graphs and later
ones the graph of the window rounded down to ``WINDOW_STEP``), three calls each. Wall-clock milliseconds
around a device sync; B=1 H=16 HKV=2 D=128 bf16.

    python benchmarks/bench_graph_build.py
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import import_ahn_ops  # noqa: E402

import_ahn_ops()
from ahn_ops.ops.ahn_attention import band_cudnn as BC  # noqa: E402
from ahn_ops.ops.ahn_attention import prefill  # noqa: E402,F401  (registers the ops + autograd)

H, HKV, D = 16, 2, 128


def ms(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def rand(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def main():
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "PAD", BC.PAD)
    rows = []
    # the first row pays cuDNN's one-time set-up as well
    for T, W in [(8192, 1024), (8192, 1025), (8200, 1024), (8250, 1024), (16384, 4096), (16384, 4097),
                 (32768, 4096)]:
        q, k, v = rand(1, T, H, D), rand(1, T, HKV, D), rand(1, T, HKV, D)
        first = ms(lambda: BC.band_fwd(q, k, v, W))
        again = ms(lambda: BC.band_fwd(q, k, v, W))
        o, lse = BC.band_fwd(q, k, v, W)
        do = torch.randn_like(q)
        bfirst = ms(lambda: BC.band_bwd(q, k, v, o, do, lse, W))
        bagain = ms(lambda: BC.band_bwd(q, k, v, o, do, lse, W))
        rows.append((f"band T={T} W={W}", first, again, bfirst, bagain, None))
        print(rows[-1], flush=True)
    T = 16384
    g = torch.Generator(device="cuda").manual_seed(0)
    leaves = [rand(1, T, H, D), rand(1, T, HKV, D), rand(1, T, HKV, D), rand(1, T, H), rand(1, T, H), rand(1, T, H),
              torch.log(torch.rand(H, device="cuda", generator=g) * 15 + 1), torch.rand(H, device="cuda") * 0.5,
              1 + 0.1 * torch.randn(D, device="cuda"), torch.randn(H, D, D, device="cuda") * D ** -0.5]
    leaves = [x.requires_grad_(True) for x in leaves]
    dout = rand(1, T, H, D)

    def step(W, S):
        torch.ops.ahn.prefill_fwd(*leaves, W, S, "gdn", None, None, False)[0].backward(dout)

    step(2048, 64)
    step(2048, 100)  # Triton's variants for a sink count that is not a multiple of 16
    for W, S in [(3000, 100), (3001, 100), (5000, 7)]:
        rows.append((f"fwd+bwd T={T} W={W} S={S}", ms(lambda: step(W, S)), ms(lambda: step(W, S)),
                     ms(lambda: step(W, S)), None, None))
        print(rows[-1], flush=True)
    print("\n| shape | fwd first (ms) | fwd repeat | bwd first | bwd repeat |\n|---|---|---|---|---|")
    for name, a, b, c, d, _ in rows[:-3]:
        cells = " | ".join(f"{x:.1f}" if x >= 10 else f"{x:.2f}" for x in (a, b, c, d))
        print(f"| {name} | {cells} |")
    print("\n| fused step | first call (ms) | second | third |\n|---|---|---|---|")
    for name, a, b, c, _, _ in rows[-3:]:
        print(f"| {name} | {a:.1f} | {b:.1f} | {c:.1f} |")


if __name__ == "__main__":
    main()
