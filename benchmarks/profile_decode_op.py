"""Where the time of one decode layer-step goes (torch.ops.ahn.decode_step, issue 5). GPU only.

    python benchmarks/profile_decode_op.py [--batch 1] [--layers 8] [--variants default pdl0 st3 ...]
    ncu --clock-control none --launch-skip 4 --launch-count 2 -k regex:decode_ \\
        python benchmarks/profile_decode_op.py --ncu-target      # one step for Nsight Compute

Times the op at the bench_decode shape (Qwen2.5-3B heads, W=32640, S=128, bf16, full window) in a
CUDA graph over ``--layers`` distinct layer caches (so that the L2 holds none of them), once per
variant of the launch knobs that csrc/cuda/ahn_decode.cu reads from the environment (set here with
``ahn_ops._ext.decode_switches``, which has the op read them again): ``pdl0`` (no programmatic dependent
launch), ``stN`` (N cp.async stages per warp), ``kN`` (about N keys per split), ``lazyN`` (headroom of
the lazy reference max; lazy0 = exact max), ``minb2`` / ``minb3`` (registers budgeted for 2 or 3 blocks per
SM; default: 2 while the attention blocks fit 2 per SM), joined with ``+`` (``st3+k512``). Prints us per
layer-step and the fraction of the measured copy bandwidth that the must-move bytes
(bench_decode.bytes_min) would take.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode as BD  # noqa: E402
import common as C  # noqa: E402

C.import_ahn_ops()

KNOBS = {"pdl": "AHN_DECODE_PDL", "st": "AHN_DECODE_STAGES", "k": "AHN_DECODE_SPLIT_KEYS", "lazy": "AHN_DECODE_LAZY",
         "minb": "AHN_DECODE_MINB"}


def env_of(variant: str) -> dict:
    """'st3+k512' -> {'AHN_DECODE_STAGES': '3', 'AHN_DECODE_SPLIT_KEYS': '512'}; 'default' -> {}."""
    env = {}
    for part in variant.split("+"):
        if part == "default":
            continue
        name = part.rstrip("0123456789")
        if name not in KNOBS or name == part:
            raise SystemExit(f"unknown variant {part!r}: expected default, pdl0, stN, kN, lazyN or minbN "
                             "joined with +")
        env[KNOBS[name]] = part[len(name):]
    return env


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--variants", nargs="+", default=["default", "pdl0", "st3", "k256", "k1024"])
    ap.add_argument("--ncu-target", action="store_true", help="run 3 eager steps of one layer and exit")
    a = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    start = BD.S + BD.W + 1000
    if a.ncu_target:
        c, p = BD.make_layer(a.batch, gen, start)
        x = BD.make_inputs(a.batch, gen)
        for _ in range(3):
            BD.ahn_call(x, c, p)
        torch.cuda.synchronize()
        return
    layers = [BD.make_layer(a.batch, gen, start) for _ in range(a.layers)]
    x = BD.make_inputs(a.batch, gen)
    bw = BD.copy_bandwidth()
    need = BD.bytes_min(a.batch)
    print(f"{torch.cuda.get_device_name()}  copy {bw:.0f} GB/s  B={a.batch}  must-move {need / 1e6:.2f} MB "
          f"= {need / bw * 1e-3:.2f} us at copy bandwidth")
    rows = []
    from ahn_ops._ext import decode_switches

    for v in a.variants:
        with decode_switches(**env_of(v)):
            fns = [(lambda c=c, p=p: BD.ahn_call(x, c, p)) for c, p in layers]
            us = BD.graph_time(fns, reps=4)
            eager = BD.do_bench(fns[0]) if v == "default" else float("nan")
        rows.append((v, us, eager, need / (us * 1e-6) / 1e9 / bw * 100))
    print("| variant | graph us/layer-step | eager us | % copy bw |\n|---|---|---|---|")
    for v, us, eager, pct in rows:
        print(f"| {v} | {us:.2f} | {eager:.2f} | {pct:.0f} |")


if __name__ == "__main__":
    main()
