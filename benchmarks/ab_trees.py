"""Before / after of a kernel change: the prefill's parts timed on two source trees, on one GPU, alternating.

    git archive REV ahn_ops | tar -x -C .ab/REV         # the older tree (.ab/ is git-ignored; carry it)
    python benchmarks/ab_trees.py . .ab/REV             # T=32768 W=4096 S=128, H=16/2, D=128, bf16
    python benchmarks/ab_trees.py . .ab/REV --rounds 3 --cases fwd prep
    python benchmarks/ab_trees.py . .ab/REV --shape 8192 4096 128   # another T, W, S (H=16/2, D=128)
    python benchmarks/ab_trees.py . . --cpu             # harness check in the interpreter (no timing claim)

Each tree runs in its own process (``ahn_ops`` imported from that tree), the trees alternate for ``--rounds``
rounds, and every case is the median of ``triton.testing.do_bench`` medians over the rounds: a drift of the
machine between the two trees' runs lands in both. The forward's default engine on an H100 / H200 is the sm_90a
kernel of the compiled extension, which ``git archive`` does not hold: a tree without ``ahn_ops/_C*.so`` gets a
copy of the first tree's (so compare trees whose ``csrc/`` is the same, or build each), and each tree reports
the forward engine it ran (``engine``); trees on different engines time different kernels, so the run stops.
Cases (``--cases``): ``fwd`` the fused forward of each kind (and of gdn with ``deterministic=True``: the memory
passes before the kernel); ``prep`` the memory's parallel prep pass alone and
``state`` prep + state chain (gdn, mamba2); ``fwdbwd`` forward + backward of gdn. The table, last, gives each
case's time on every tree and the ratio to the first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

CASES = ("fwd", "prep", "state", "fwdbwd")


def worker(tree, cases, cpu, shape):
    """One tree's timings as a JSON line on stdout: {case name: ms}."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import import_ahn_ops

    ahn_ops = import_ahn_ops(tree)
    import torch
    from ahn_ops.ops.ahn_attention import prefill as P

    dev = "cpu" if cpu else "cuda"
    T, W, S = shape
    H, HKV, D = (4, 2, 64) if cpu else (16, 2, 128)
    dt = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def r(*s):
        return torch.randn(*s, device=dev, dtype=dt, generator=g)

    q, k, v, a, b, z = r(1, T, H, D), r(1, T, HKV, D), r(1, T, HKV, D), r(1, T, H), r(1, T, H), r(1, T, H)
    A_log, dt_bias = torch.rand(H, device=dev) * 0.5, torch.rand(H, device=dev) * 0.1
    nw, ow = torch.rand(D, device=dev) + 0.5, (torch.randn(H, D, D, device=dev) * D ** -0.5).to(dt)

    def args(kind):
        return (q, k, v, None if kind == "dn" else a, None if kind == "mamba2" else b, z, A_log, dt_bias,
                nw.repeat(H) if kind == "mamba2" else nw, ow)

    def timer(fn):
        if cpu:
            fn()
            return 1.0
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=150, return_mode="median")

    sm90 = getattr(P, "_sm90_available", None)  # trees from before the sm_90a kernel have no such rule
    out = {"engine": float(bool(sm90 and sm90(q.device)))}
    if "fwd" in cases:
        for kind in ("gdn", "dn", "mamba2"):
            out[f"fwd {kind}"] = timer(lambda: P.prefill_fwd(*args(kind), W, S, kind))
        # the memory passes before the kernel (deterministic=True): the kernel's own time plus the passes'
        out["fwd gdn det"] = timer(lambda: P.prefill_fwd(*args("gdn"), W, S, "gdn", deterministic=True))
    for stage in ("prep", "state"):
        if stage in cases:
            for kind in ("gdn", "mamba2"):
                out[f"{stage} {kind}"] = timer(lambda: P.prefill_fwd(*args(kind), W, S, kind, stage=stage))
    if "fwdbwd" in cases:
        xs = [None if x is None else x.detach().clone().requires_grad_(x.is_floating_point()) for x in args("gdn")]
        dout = torch.randn(1, T, H, D, device=dev, dtype=dt)

        def fb():
            for x in xs:
                if x is not None:
                    x.grad = None
            ahn_ops.ahn_attention(*xs, window=W, sinks=S, kind="gdn").backward(dout)

        out["fwd+bwd gdn"] = timer(fb)
    print("AB " + json.dumps(out), flush=True)


def _built(tree):
    d = os.path.join(tree, "ahn_ops")
    return sorted(f for f in os.listdir(d) if f.startswith("_C") and f.endswith(".so"))


def share_extension(trees):
    """Copy the first tree's built extension into each later tree that has none (``git archive`` leaves it out);
    returns the trees that got a copy."""
    ext, got = _built(trees[0]), []
    for t in trees[1:]:
        if ext and not _built(t):
            shutil.copy2(os.path.join(trees[0], "ahn_ops", ext[0]), os.path.join(t, "ahn_ops", ext[0]))
            print(f"[ab] {t}: no built extension, using a copy of {trees[0]}'s {ext[0]}", flush=True)
            got.append(t)
    return got


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trees", nargs="+", help="source trees holding ahn_ops/ (the first is the baseline)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--shape", nargs=3, type=int, metavar=("T", "W", "S"), help="default 32768 4096 128 (--cpu: 150 40 5)")
    ap.add_argument("--cpu", action="store_true", help="tiny shapes in the Triton interpreter (harness check)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    shape = a.shape or ([150, 40, 5] if a.cpu else [32768, 4096, 128])
    trees = [os.path.abspath(t) for t in a.trees]
    for t in trees:
        if not os.path.isfile(os.path.join(t, "ahn_ops", "__init__.py")):
            raise SystemExit(f"{t}: no ahn_ops/ there (git archive REV ahn_ops | tar -x -C {t})")
    if a.worker:
        worker(trees[0], a.cases, a.cpu, shape)
        return
    share_extension(trees)
    env = dict(os.environ, **({"TRITON_INTERPRET": "1"} if a.cpu else {}))
    runs = {t: [] for t in trees}
    for rnd in range(a.rounds):
        for t in trees:
            cmd = [sys.executable, os.path.abspath(__file__), t, "--worker", "--cases", *a.cases,
                   "--shape", *map(str, shape)] + (["--cpu"] if a.cpu else [])
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = [x for x in p.stdout.splitlines() if x.startswith("AB ")]
            if p.returncode != 0 or not line:
                raise SystemExit(f"round {rnd}, tree {t} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
            runs[t].append(json.loads(line[-1][3:]))
            print(f"[ab] round {rnd} {t}: {runs[t][-1]}", flush=True)
    engines = {t: {r["engine"] for r in runs[t]} for t in trees}
    if len({frozenset(e) for e in engines.values()}) != 1:
        raise SystemExit(f"the trees ran different forward engines (1: the sm_90a kernel): {engines}")
    names = [n for n in runs[trees[0]][0] if n != "engine"]
    med = {t: {n: statistics.median(r[n] for r in runs[t]) for n in names} for t in trees}
    print(f"\n== ms at T, W, S = {shape}, median over {a.rounds} rounds (ratio to the first tree); forward engine: "
          f"{'the sm_90a kernel' if 1.0 in engines[trees[0]] else 'Triton / cuDNN'} ==")
    print("  " + "case".ljust(14) + "".join(os.path.basename(t.rstrip(os.sep))[:14].rjust(22) for t in trees))
    for n in names:
        base = med[trees[0]][n]
        print("  " + n.ljust(14) + "".join(f"{med[t][n]:10.3f} ({med[t][n] / base:5.3f})".rjust(22) for t in trees))


if __name__ == "__main__":
    sys.exit(main())
