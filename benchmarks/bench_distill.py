"""Self-distillation end to end: ``ahn_ops.distill.Distiller.train_step`` on a random-weight Qwen2.5 shape.

    python benchmarks/bench_distill.py                  # 3B shape, T=16384, micro-batch 1, gdn, one GPU, 2 + 5 steps
    python benchmarks/bench_distill.py --kind mamba2 --seq-len 8192 --engines cudnn
    python benchmarks/bench_distill.py --cpu            # harness check on a tiny model (no timing claim)

One process, the same model and the same window draws for every engine of the window band
(``prefill.CONFIG["band"]``: ``auto``, the default, the sm_90a kernel on an H100 / H200 built with it; ``no_sm90``,
the engine before it; ``cudnn``, its cuDNN band required; ``triton``, the all-Triton one; ``sm90``, the sm_90a
kernel required). Per engine:

- tokens/s: wall clock of ``--steps`` optimizer steps after ``--warmup`` (a step = the teacher's forward with
  full attention, the student's forward + backward with this step's random ``W``, ``S``, AdamW on the AHN
  parameters; activation checkpointing per decoder layer unless ``--no-grad-ckpt``), with a device
  synchronisation per step (``Distiller.train_step`` does it);
- peak device memory over those steps;
- the AHN op's share of the step: one more step under ``torch.profiler``, the device time of the kernels under
  ``ahn::prefill_fwd`` and ``ahn::prefill_bwd`` over the device time of every kernel of the step.

The trainer draws a new window every step. After a shape's first two windows, ``band_cudnn.band_window``
asks cuDNN for the window rounded down to a multiple of 256, so a running job builds one graph per rounded
window and direction, then none: the table counts the graphs built during the timed steps (each ~40-50 ms
on an H100), and a step that built none is what a job sees once its windows' graphs exist.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

ahn_ops = C.import_ahn_ops()

from ahn_ops.distill import DistillConfig, Distiller  # noqa: E402
from ahn_ops.ops.ahn_attention import prefill as pf  # noqa: E402

OPS = ("ahn::prefill_fwd", "ahn::prefill_bwd")


class RandomTokens:
    """``dataset[i]``: ``[seq_len]`` int64 tokens, a function of ``i`` only (what ``Distiller`` indexes)."""

    def __init__(self, seq_len: int, vocab: int, seed: int = 0):
        self.seq_len, self.vocab, self.seed = seq_len, vocab, seed

    def __getitem__(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        return torch.randint(0, self.vocab, (self.seq_len,), generator=g)

    def __len__(self) -> int:
        return 1 << 30


def op_share(distiller: Distiller) -> float:
    """Share of one step's kernel time spent under the AHN op (forward, its recomputation, backward)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if distiller.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        distiller.train_step()
    ev = prof.key_averages()
    attr = "device_time_total" if distiller.device.type == "cuda" else "cpu_time_total"
    self_attr = "self_device_time_total" if distiller.device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, self_attr) for e in ev)
    ours = sum(getattr(e, attr) for e in ev if e.key in OPS)
    # nan where the op did not run (the CPU's fp32 steps take the chunked torch path)
    return ours / total if total > 0 and ours > 0 else float("nan")


class GraphBuilds:
    """Counts the cuDNN band graphs built (``band_cudnn._build_fwd`` / ``_build_bwd``) while installed."""

    def __init__(self):
        from ahn_ops.ops.ahn_attention import band_cudnn

        self.mod, self.n = band_cudnn, 0
        self.orig = {name: getattr(band_cudnn, name) for name in ("_build_fwd", "_build_bwd")}
        for name, fn in self.orig.items():
            setattr(band_cudnn, name, self._counted(fn))

    def _counted(self, fn):
        def wrapped(*a, **kw):
            self.n += 1
            return fn(*a, **kw)
        return wrapped

    def close(self):
        for name, fn in self.orig.items():
            setattr(self.mod, name, fn)


def run_engine(model, data, args, engine: str, device) -> dict:
    pf.CONFIG["band"] = engine
    cfg = DistillConfig(kind=args.kind, seq_len=args.seq_len, random_window=True, micro_batch=1,
                        steps=args.warmup + args.steps + 1, lr=1e-4, grad_ckpt=not args.no_grad_ckpt,
                        progress=False, seed=args.seed)
    d = Distiller(model, data, cfg)
    for _ in range(args.warmup):
        d.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    secs, windows, builds = [], [], []
    counter = GraphBuilds()
    try:
        for _ in range(args.steps):
            n0 = counter.n
            rec = d.train_step()
            secs.append(rec["seconds"])
            windows.append((rec["window"], rec["sinks"]))
            builds.append(counter.n - n0)
    finally:
        counter.close()
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    share = op_share(d)
    tokens = args.seq_len  # micro-batch 1, one rank
    quiet = [t for t, n in zip(secs, builds) if n == 0]
    return dict(engine=engine, step_s=statistics.median(secs), tokens_per_s=tokens / statistics.median(secs),
                peak_GiB=peak, op_share=share, windows=windows, builds=builds,
                quiet_s=statistics.median(quiet) if quiet else float("nan"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="3b", help="bench_model.py's SHAPES key (3b, 7b, 14b)")
    ap.add_argument("--kind", default="gdn", choices=C.KINDS)
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--engines", nargs="+", default=["auto", "no_sm90"],
                    choices=["auto", "no_sm90", "cudnn", "triton", "sm90"])
    ap.add_argument("--no-grad-ckpt", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu", action="store_true", help="tiny model on the CPU (fp32): checks the harness only")
    args = ap.parse_args(argv)

    import bench_model as BM

    if args.cpu:
        args.shape, args.seq_len, args.warmup, args.steps, args.engines = "tiny", 96, 1, 1, ["auto"]
    device = torch.device("cpu" if args.cpu else "cuda")
    dtype = torch.float32 if args.cpu else torch.bfloat16
    model = BM.build(args.shape, None, dtype, device)
    data = RandomTokens(args.seq_len, model.config.vocab_size, seed=args.seed)
    print(f"# bench_distill: {C.device_str(device.type)}; {C.versions()}; {C.date_str()}")
    print(f"# shape {args.shape}, kind {args.kind}, T={args.seq_len}, micro-batch 1, "
          f"grad_ckpt={not args.no_grad_ckpt}, {args.warmup} warm-up + {args.steps} timed steps per engine")
    rows = []
    t0 = time.perf_counter()
    for engine in args.engines:
        rows.append(run_engine(model, data, args, engine, device))
        print(f"# {engine}: windows (W, S) of the timed steps {rows[-1]['windows']}, cuDNN graphs built in "
              f"each {rows[-1]['builds']}", flush=True)
    pf.CONFIG["band"] = "auto"
    print(f"# {time.perf_counter() - t0:.0f} s")
    print("| engine | step (s, median) | tokens/s | step with no graph build (s, median) | graphs built | peak GiB "
          "| AHN op share of kernel time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        share = "-" if r["op_share"] != r["op_share"] else f"{100 * r['op_share']:.1f}%"
        quiet = "-" if r["quiet_s"] != r["quiet_s"] else f"{r['quiet_s']:.3f}"
        print(f"| {r['engine']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {quiet} | {sum(r['builds'])} "
              f"| {r['peak_GiB']:.1f} | {share} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
