#!/usr/bin/env python
"""Compare two ``python/distill.py --log-file`` runs step by step (e.g. 1 GPU vs 2 GPUs, same global batch).

    python benchmarks/ddp_compare.py runs/one_gpu.jsonl runs/two_gpu.jsonl

Prints a markdown table: the loss of both runs every few steps, the largest absolute and relative
loss difference, and the tokens/s of each run (steps after the first ``--skip`` ones, which pay
for Triton compilation and allocator warm-up). Exits 1 when the runs differ in length or when the
largest relative difference exceeds ``--rtol``.
"""

from __future__ import annotations

import argparse
import json
import sys


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def tokens_per_s(recs, skip):
    tail = recs[skip:] if len(recs) > skip else recs
    sec = sum(r["seconds"] for r in tail)
    return sum(r["tokens"] for r in tail) / sec if sec > 0 else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="jsonl of the first run (reference)")
    p.add_argument("b", help="jsonl of the second run")
    p.add_argument("--names", nargs=2, default=["run A", "run B"])
    p.add_argument("--every", type=int, default=5, help="print every N-th step")
    p.add_argument("--skip", type=int, default=3, help="warm-up steps left out of tokens/s")
    p.add_argument("--rtol", type=float, default=2e-2, help="largest relative loss difference accepted")
    args = p.parse_args(argv)
    ra, rb = load(args.a), load(args.b)
    if len(ra) != len(rb) or not ra:
        print(f"runs differ in length: {len(ra)} vs {len(rb)} steps")
        return 1
    na, nb = args.names
    print(f"| step | loss {na} | loss {nb} | rel. diff |\n|---|---|---|---|")
    worst_abs = worst_rel = 0.0
    for i, (x, y) in enumerate(zip(ra, rb)):
        d = abs(x["loss"] - y["loss"])
        rel = d / max(abs(x["loss"]), 1e-12)
        worst_abs, worst_rel = max(worst_abs, d), max(worst_rel, rel)
        if i % args.every == 0 or i == len(ra) - 1:
            print(f"| {x['step']} | {x['loss']:.5f} | {y['loss']:.5f} | {rel:.2e} |")
    ta, tb = tokens_per_s(ra, args.skip), tokens_per_s(rb, args.skip)
    print(f"\nlargest loss difference over {len(ra)} steps: {worst_abs:.2e} absolute, {worst_rel:.2e} relative")
    print(f"tokens/s (steps after the first {args.skip}): {na} {ta:.0f}, {nb} {tb:.0f} ({tb / ta:.2f}x)")
    return 0 if worst_rel <= args.rtol else 1


if __name__ == "__main__":
    sys.exit(main())
