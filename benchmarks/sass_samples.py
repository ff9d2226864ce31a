"""Nsight Compute's warp-state samples per SASS instruction, summed by region of a kernel.

    ncu ... --section SourceCounters -o rep <target>            # (device_check.sh fwdprof, prep)
    ncu -i rep.ncu-rep --page source --csv --print-source sass > k.csv
    python benchmarks/sass_samples.py k.csv                     # regions between synchronising instructions
    python benchmarks/sass_samples.py k.csv --top 20            # and the most sampled instructions

A region ends at each instruction that waits or synchronises (wgmma waits, barriers, mbarrier waits, TMA, exit):
the samples of the instructions before it, with their operations and stall reasons, say which part of the kernel
(a loop's softmax, its product waits, the epilogue) holds the time. Without ``-lineinfo`` there is no source line to
sum by; these boundaries need none.
"""

from __future__ import annotations

import argparse
import collections
import csv
import re

BOUNDARY = re.compile(r"WARPGROUP\.DEPBAR|BAR\.SYNC|SYNCS\.PHASECHK|USETMAXREG|EXIT|UTMA")


def load(path):
    """(header, rows) of the first kernel in a ``--page source --csv --print-source sass`` export."""
    rows = list(csv.reader(open(path, newline="")))
    start = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    body = []
    for r in rows[start + 1:]:
        if not r or r[0] == "Kernel Name":
            break
        body.append(r)
    return rows[start], body


def opcode(src: str) -> str:
    words = src.split()
    word = words[1] if words and words[0].startswith("@") and len(words) > 1 else (words[0] if words else "")
    return word.split(".")[0]


def summarise(header, body, min_share=0.01, top=0):
    col = header.index("Warp Stall Sampling (All Samples)")
    stalls = [i for i, h in enumerate(header) if h.startswith("stall_") and "Not Issued" not in h]
    count = lambda r, i: int(r[i]) if r[i].isdigit() else 0  # noqa: E731
    total = sum(count(r, col) for r in body) or 1
    print(f"{total} samples, {len(body)} instructions")
    print("| instructions | samples | share | top operations | top stall reasons |\n|---|---|---|---|---|")
    first = 0
    for i, r in enumerate(body + [["", "EXIT"] + ["0"] * (len(header) - 2)]):
        if i < len(body) and not BOUNDARY.search(r[1]):
            continue
        part = body[first:i + 1]
        n = sum(count(x, col) for x in part)
        if n / total >= min_share:
            ops, why = collections.Counter(), collections.Counter()
            for x in part:
                ops[opcode(x[1])] += count(x, col)
                for j in stalls:
                    why[header[j][6:]] += count(x, j)
            fmt = lambda c: ", ".join(f"{k} {v / n:.0%}" for k, v in c.most_common(3) if v)  # noqa: E731
            print(f"| {first}-{min(i, len(body) - 1)} | {n} | {n / total:.1%} | {fmt(ops)} | {fmt(why)} |")
        first = i + 1
    if top:
        print(f"\nthe {top} most sampled instructions:")
        for i, r in sorted(enumerate(body), key=lambda x: -count(x[1], col))[:top]:
            print(f"  {i:6d} {count(r, col):7d} {r[1].strip()[:80]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    ap.add_argument("--min-share", type=float, default=0.01, help="regions below this share of samples are left out")
    ap.add_argument("--top", type=int, default=0, help="also list the N most sampled instructions")
    a = ap.parse_args()
    summarise(*load(a.csv), a.min_share, a.top)


if __name__ == "__main__":
    main()
