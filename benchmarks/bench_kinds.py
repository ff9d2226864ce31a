#!/usr/bin/env python
"""The three AHN kinds side by side at the standard shapes (issue 7: each within 1.15x of GDN).

Same run, same device, per kind (gdn, dn, mamba2), Qwen2.5-3B heads H=16, HKV=2, D=128, bf16:

* prefill forward, ``torch.ops.ahn.prefill_fwd``, B=1, T=32768, W=4096, S=128 (ms);
* forward + backward of the same (ms; every input that has a gradient gets one);
* decode, ``torch.ops.ahn.decode_step``, W=32640, S=128, full window, B=1 and B=16: us per layer-step
  in a CUDA graph that rotates over enough layer caches (>= 150 MB) that L2 holds none of them.

    python benchmarks/bench_kinds.py            # CUDA only; prints a markdown table, ratios to gdn last
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

ahn_ops = C.import_ahn_ops()

import bench_backward as BB  # noqa: E402
import bench_decode as BD  # noqa: E402

KINDS = ("gdn", "dn", "mamba2")


def prefill_times(kind, T, W, S):
    """(fwd ms, fwd+bwd ms) of ``bench_backward.bench`` (its peak memory and backward split are printed)."""
    res = BB.bench(kind, T, W, S, flex=False)
    print(f"  {kind}: bwd {res['bwd']:.3f} ms, peak {res['peak_GB']:.2f} GB, split "
          + ", ".join(f"{k[:24]} {v:.2f}" for k, v in res["split"][:4]), flush=True)
    return res["fwd"], res["fwd+bwd"]


def decode_us(kind, B):
    """us per layer-step of ``bench_decode``'s op call at its standard shape, in a CUDA graph that rotates
    over ceil(150 MB / bytes per layer-step) layer caches."""
    sh = dict(H=BD.H, HKV=BD.HKV, D=BD.D, S=BD.S, W=BD.W, kind=kind)
    gen = torch.Generator(device="cuda").manual_seed(0)
    nl = max(1, -(-150 * 2**20 // BD.bytes_min(B)))
    layers = [BD.make_layer(B, gen, BD.S + BD.W + 5, sh) for _ in range(nl)]
    x = BD.make_inputs(B, gen, sh)
    fns = [lambda c=c, p=p: BD.ahn_call(x, c, p, sh) for c, p in layers]
    return BD.graph_time(fns, reps=max(1, -(-10 // nl)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kinds: needs CUDA")
        return 0
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth "
          f"{BD.copy_bandwidth():.0f} GB/s", flush=True)
    rows = {}
    for kind in a.kinds:
        fwd, fb = prefill_times(kind, a.T, 4096, 128)
        dec = [decode_us(kind, B) for B in a.batches]
        rows[kind] = [fwd, fb] + dec
        print(f"{kind}: prefill fwd {fwd:.3f} ms, fwd+bwd {fb:.3f} ms, decode "
              + ", ".join(f"B={B} {d:.1f} us" for B, d in zip(a.batches, dec)), flush=True)
    cols = [f"prefill fwd ms (T={a.T})", "fwd+bwd ms"] + [f"decode B={B} us/layer-step" for B in a.batches]
    print("\n| kind | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    ref = rows.get("gdn")
    for kind, vals in rows.items():
        cells = [f"{v:.3f}" + (f" ({v / r:.2f}x)" if ref and kind != "gdn" else "") for v, r in
                 zip(vals, ref or vals)]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    if ref:
        worst = max(v / r for kind, vals in rows.items() for v, r in zip(vals, ref))
        print(f"\nworst ratio to gdn: {worst:.2f}x (target <= 1.15x: {'met' if worst <= 1.15 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
