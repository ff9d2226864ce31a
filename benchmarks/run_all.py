#!/usr/bin/env python
"""Every AHN benchmark in one run: prefill forward, forward + backward, decode, whole model.

    python benchmarks/run_all.py --quick      # one GPU, a few sizes, under 5 minutes
    python benchmarks/run_all.py              # the full sweep (kinds x Qwen2.5 heads x T/W/S/B)
    python benchmarks/run_all.py --cpu        # harness check on tiny shapes (CI; nothing timed is asserted)
    python benchmarks/run_all.py --only prefill decode --out /tmp/ahn_bench

Each case runs ours and every installed peer on the same inputs in the same process
(FlexAttention compiled with the window + sinks block mask, SDPA, fla, flash-attn, the unfused
AHN pipeline of benchmarks/peers.py); absent peers get a row with the reason. The device's two
ceilings (D2D copy GB/s, bf16 matmul TFLOP/s) are measured first, and every row carries its FLOP
and byte counts (formulas in benchmarks/common.py) and ``frac_of_ceiling`` = max(FLOP / matmul
peak, bytes / copy bandwidth) / time.

Writes under ``--out`` (default: benchmarks/): ``RESULTS_run_all.md`` (markdown tables),
``results_run_all.json`` (every row), ``plots/*.png``. ``--update-results`` also replaces the
section between ``<!-- run_all:begin -->`` and ``<!-- run_all:end -->`` in benchmarks/RESULTS.md, the
headline table between ``<!-- perf:begin -->`` and ``<!-- perf:end -->`` in README.md, and
appends this run's measurements to benchmarks/history.jsonl (the record of every published run: one
line per measurement with date, commit, device, shape, ours and the peer; ``plots/history.png`` draws
the standard shapes from it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHES = ("prefill", "backward", "decode", "model")
BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"
HISTORY = os.path.join(HERE, "history.jsonl")
HISTORY_KEYS = ("date", "commit", "device", "mode", "bench", "kind", "shape", "ms", "peer", "peer_ms")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="a few sizes per benchmark (one GPU, < 5 minutes)")
    g.add_argument("--cpu", action="store_true", help="check the harness on tiny CPU shapes (Triton interpreter)")
    ap.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES))
    ap.add_argument("--out", default=HERE, help="output folder (RESULTS_run_all.md, results_run_all.json, plots/)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip the remaining cases (noted in the table) past this many seconds "
                         "(default 240 with --quick, none otherwise)")
    ap.add_argument("--update-results", action="store_true",
                    help="also write the tables between the run_all markers of benchmarks/RESULTS.md and "
                         "append the measurements to benchmarks/history.jsonl")
    ap.add_argument("--commit", default=None,
                    help="the commit the history records (default: git's HEAD, +dirty with local changes; give it "
                         "where the checkout has no .git, e.g. a copied tree on a GPU machine)")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------
TITLES = {
    "prefill_fwd": "Prefill forward (ours: fused Triton prefill, window + memory + epilogue)",
    "prefill_fwd_bwd": "Prefill forward + backward (ours: prefill_fwd + its registered backward)",
    "decode": "Decode, one layer-step (ours: torch.ops.ahn.decode_step, eager)",
    "model_prefill": "Whole model prefill (random-weight Qwen2.5 shape; ours: AHN-patched)",
    "model_decode": "Whole model decode per token (ours: ahn_ops.generate static step)",
}


def markdown(rows, meta) -> str:
    from common import fmt

    L = [f"# run_all results ({meta['mode']})", "",
         f"Device {meta['device']}; {meta['versions']}; {meta['date']}. Command: `{meta['command']}`.",
         f"Ceilings measured in this run: copy {meta['ceilings']['copy_GBps']:.1f} GB/s (D2D, read + write), "
         f"matmul {meta['ceilings']['matmul_TFLOPs']:.2f} TFLOP/s.",
         "Times are medians (`triton.testing.do_bench` on CUDA; a host clock on the CPU). speedup = peer ms / "
         "ours ms. % ceiling = max(FLOP / matmul peak, bytes / copy bandwidth) / ours time. "
         "Peers not run are listed with the reason.", ""]
    if meta.get("peers"):
        L += ["Peers on this machine: " + ", ".join(f"{k}: {v or 'yes'}" for k, v in meta["peers"].items()), ""]
    if meta.get("skipped"):
        L += [f"Skipped (budget reached or failed): {len(meta['skipped'])} case(s): " + "; ".join(meta["skipped"]), ""]
    for bench in TITLES:
        rs = [r for r in rows if r["bench"] == bench]
        if not rs:
            continue
        L += [f"## {TITLES[bench]}", ""] + table(rs) + [""]
    return "\n".join(L) + "\n"


def table(rs):
    """One line per case: ours (time, work, rates, fraction of the ceiling), then each peer's time and
    our speedup over it; a peer's usual note goes under the table, a case's own notes in its line."""
    from collections import Counter, OrderedDict

    from common import fmt

    peers = list(OrderedDict.fromkeys(r["peer"] for r in rs if r["peer"]))
    usual = {p: Counter(r["note"] for r in rs if r["peer"] == p).most_common(1)[0][0] for p in peers}
    cases = OrderedDict()
    for r in rs:
        cases.setdefault((r["kind"], r["shape"]), []).append(r)
    hdr = ["kind", "shape", "ours ms", "GFLOP", "MB", "TFLOP/s", "GB/s", "% ceiling"] + \
          [f"{p} ms (speedup)" for p in peers] + ["note"]
    out = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for (kind, shape), group in cases.items():
        r0 = group[0]
        cells = [kind, shape, fmt(r0["ms"]), fmt(r0["flops"] / 1e9), fmt(r0["bytes"] / 1e6),
                 fmt(r0["tflops"]), fmt(r0["gbps"]), fmt(100 * r0["frac_of_ceiling"], 3)]
        notes = [r0.get("ours_note", "")]
        by = {r["peer"]: r for r in group}
        for p in peers:
            r = by.get(p)
            if r is None or not math.isfinite(r["peer_ms"]):
                cells.append("-")
            else:
                cells.append(f"{fmt(r['peer_ms'])} ({fmt(r['speedup'], 3)}x)")
            if r is not None and r["note"] != usual[p]:
                notes.append(f"{p}: {r['note']}")
            if r is not None and r.get("peer_rel_err") is not None:
                notes.append(f"{p} rel err vs ours {r['peer_rel_err']:.1e}")
        cells.append("; ".join(n for n in notes if n).replace("|", "/"))
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Peers: " + "; ".join(f"**{p}**: {usual[p] or '-'}" for p in peers) + "." if peers else ""]
    return out


def update_results_md(path, text, begin=BEGIN, end=END):
    """Replace (or append) the section between the markers; the rest of the file is kept."""
    old = open(path).read() if os.path.exists(path) else ""
    block = f"{begin}\n{text.replace('# run_all results', '## run_all results', 1)}{end}\n"
    if begin in old and end in old:
        rest = old[old.index(end) + len(end):].lstrip("\n")
        new = old[:old.index(begin)] + block + ("\n" + rest if rest else "")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    with open(path, "w") as f:
        f.write(new)


# README.md's headline table: these cases of a run, ours against the peers named (same run)
README_BEGIN, README_END = "<!-- perf:begin -->", "<!-- perf:end -->"
README_CASES = (
    ("prefill forward", "prefill_fwd", ("gdn", "dn", "mamba2"), "B1 T32768 W4096 S128 H16/2 D128", ("flex", "sdpa_full")),
    ("prefill forward", "prefill_fwd", ("gdn",), "B1 T8192 W4096 S128 H16/2 D128", ("flex", "sdpa_full")),
    ("prefill forward + backward", "prefill_fwd_bwd", ("gdn", "dn", "mamba2"), "B1 T32768 W4096 S128 H16/2 D128",
     ("flex", "sdpa_full")),
    ("decode layer-step (eager)", "decode", ("gdn",), "B1 T32768 W32640 S128 H16/2 D128",
     ("ahn_graph", "sdpa_full")),
    ("decode layer-step (eager)", "decode", ("gdn",), "B1 T131072 W32640 S128 H16/2 D128",
     ("ahn_graph", "sdpa_full")),
    ("decode layer-step (eager)", "decode", ("gdn",), "B16 T32768 W32640 S128 H16/2 D128",
     ("ahn_graph", "sdpa_full")),
    ("model decode per token, 4 layers", "model_decode", ("gdn",), "3b L4 B1 T32768 W4096 S128", ("hf_sdpa",)),
)
PEER_NAMES = {"flex": "FlexAttention window+sinks", "sdpa_full": "SDPA full causal", "ahn_graph": "ours in a CUDA graph",
              "hf_sdpa": "unpatched model (HF, SDPA)"}


def readme_table(rows, meta, commit) -> str:
    """The headline table README.md shows (between its perf markers), from one run's rows."""
    from common import fmt

    L = [f"From one run of `python benchmarks/run_all.py --quick --update-results`: {meta['device']}, {meta['date']}, "
         f"commit {commit}; {meta['versions']}. Medians; peers in the same run; speedup = peer / ours.", "",
         "| what | kind | shape | ours ms | peers: ms (speedup of ours), and ours in a CUDA graph |", "|---|---|---|---|---|"]
    for what, bench, kinds, shape, peers in README_CASES:
        for kind in kinds:
            rs = {r["peer"]: r for r in rows if (r["bench"], r["kind"], r["shape"]) == (bench, kind, shape)}
            if not rs or not _finite(next(iter(rs.values()))["ms"]):
                continue
            ours = next(iter(rs.values()))["ms"]
            cells = [f"{PEER_NAMES.get(p, p)} {fmt(rs[p]['peer_ms'])}"
                     + ("" if p.startswith("ahn_") else f" ({fmt(rs[p]['speedup'], 3)}x)")
                     for p in peers if p in rs and _finite(rs[p]["peer_ms"])]
            L.append(f"| {what} | {kind} | {shape} | **{fmt(ours)}** | {'; '.join(cells) or '-'} |")
    return "\n".join(L) + "\n"


def git_commit() -> str:
    """Short hash of the checkout's HEAD, ``+dirty`` when tracked files differ from it; ``unknown`` outside git."""
    import subprocess

    def git(*a):
        return subprocess.run(["git", "-C", HERE, *a], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def history_rows(rows, meta, commit):
    """The record's lines of one run: every row with a finite time of ours, keyed as HISTORY_KEYS."""
    out = []
    for r in rows:
        if not _finite(r.get("ms")):
            continue
        out.append(dict(date=meta["date"], commit=commit, device=meta["device"], mode=meta["mode"],
                        bench=r["bench"], kind=r["kind"], shape=r["shape"], ms=r["ms"], peer=r["peer"] or "",
                        peer_ms=r["peer_ms"] if _finite(r.get("peer_ms")) else None))
    return out


def append_history(path, rows):
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in HISTORY_KEYS}) + "\n")


def read_history(path):
    """The record's lines (dicts); a line that does not parse or lacks a key is an error naming it."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e})") from None
            missing = [k for k in HISTORY_KEYS if k not in r]
            if missing:
                raise ValueError(f"{path}:{i}: missing {missing}")
            out.append(r)
    return out


# --------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------
def _finite(x):
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _sweep(rows, bench):
    """Rows of ``bench`` on the T axis: B = 1 and the first case's heads and sinks; one per (kind, T)."""
    rs = [r for r in rows if r["bench"] == bench and r.get("B") == 1]
    if not rs:
        return []
    H0, S0 = rs[0].get("H"), rs[0].get("S")
    seen, out = {}, []
    for r in rs:
        if r.get("H") != H0 or r.get("S") != S0:
            continue
        key = (r["kind"], r["T"])
        if seen.setdefault(key, r["shape"]) != r["shape"]:
            continue  # another W at the same T (the W sweep)
        out.append(r)
    return out


def _series(rs, kind, peer=None):
    """{T: ms} of ours (peer None) or of one peer."""
    d = {}
    for r in rs:
        if r["kind"] != kind:
            continue
        if peer is None and _finite(r["ms"]):
            d[r["T"]] = r["ms"]
        elif peer is not None and r["peer"] == peer and _finite(r["peer_ms"]):
            d[r["T"]] = r["peer_ms"]
    return sorted(d.items())


def plots(rows, meta, outdir, history=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import common as C

    os.makedirs(outdir, exist_ok=True)
    written = []
    sub = f"{meta['device']}, {meta['date']}"

    def save(fig, name):
        p = os.path.join(outdir, name)
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    for bench, name, title, peers in (
            ("prefill_fwd", "prefill_vs_context.png", "Prefill forward vs context length",
             ("sdpa_full", "flex", "unfused_ahn")),
            ("decode", "decode_vs_context.png", "Decode layer-step vs context length",
             ("sdpa_full", "unfused_torch", "unfused_fla"))):
        rs = _sweep(rows, bench)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        kinds = sorted({r["kind"] for r in rs})
        for kind in kinds:
            s = _series(rs, kind)
            if s:
                ax.plot(*zip(*s), "o-", label=f"AHN-{kind} (ours)")
        for peer in peers:
            s = _series(rs, "gdn" if "gdn" in kinds else (kinds[0] if kinds else ""), peer)
            if s:
                lab = {"sdpa_full": "full attention (SDPA)", "flex": "FlexAttention window+sinks",
                       "unfused_ahn": "unfused AHN (flex + fla)", "unfused_torch": "unfused AHN (torch)",
                       "unfused_fla": "unfused AHN (fla step)"}[peer]
                ax.plot(*zip(*s), "s--", label=lab)
        if rs:
            r0 = rs[0]
            ax.set_title(f"{title}\nB=1 H={r0['H']}/{r0['HKV']} D={r0['D']} S={r0['S']}; {sub}", fontsize=9)
        else:
            ax.set_title(f"{title} (no data)", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length T (tokens)")
        ax.set_ylabel("ms (median)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        save(fig, name)

    # cache memory: whole-model cache per sequence, AHN (constant: AHNModelCache allocates its sinks, ring,
    # gate-input ring and state once) vs full KV (linear), Qwen2.5 shapes at the release window; the model
    # bench's measured caches get a line of their own shape (its layer count, W and S), so each point sits on
    # the formula it checks
    fig, ax = plt.subplots(figsize=(7, 4.5))
    W, S = meta["cache_W"], meta["cache_S"]
    meas = [r for r in rows if r["bench"] == "model_prefill" and _finite(r.get("ahn_cache_bytes"))]
    lo = int(math.log2(min([1024] + [r["T"] for r in meas])))
    Ts = [2 ** i for i in range(lo, 21)]
    layers = {"3b": 36, "7b": 28, "14b": 48}
    MiB = 2 ** 20

    def ahn_model_bytes(L, W_, S_, H, HKV, D=128):  # = AHNModelCache.nbytes (the int64 positions included)
        return L * (C.ahn_cache_bytes(1, W_, S_, H, HKV, D) + 8)

    for i, (name, (H, HKV)) in enumerate(C.HEADS.items()):
        L = layers[name]
        col = f"C{i}"
        ax.plot(Ts, [L * C.full_cache_bytes(1, T, HKV, 128) / MiB for T in Ts], "--", color=col,
                label=f"full KV, Qwen2.5-{name.upper()}")
        ax.plot(Ts, [ahn_model_bytes(L, W, S, H, HKV) / MiB] * len(Ts), "-", color=col,
                label=f"AHN W={W} S={S}, Qwen2.5-{name.upper()}")
    for shp in sorted({tuple(r[k] for k in ("model", "layers", "W", "S", "H", "HKV", "D")) for r in meas
                       if "HKV" in r}):
        name, L, W_, S_, H, HKV, D = shp
        ax.plot(Ts, [ahn_model_bytes(L, W_, S_, H, HKV, D) / MiB] * len(Ts), ":", color="k", lw=0.8,
                label=f"AHN W={W_} S={S_}, {name.upper()} heads, {L} layers (model bench)")
        ax.plot(Ts, [L * C.full_cache_bytes(1, T, HKV, D) / MiB for T in Ts], "-.", color="k", lw=0.8,
                label=f"full KV, {name.upper()} heads, {L} layers (model bench)")
    for r in meas:
        ax.plot([r["T"]], [r["ahn_cache_bytes"] / MiB], "k^")
        if _finite(r.get("full_cache_bytes")):
            ax.plot([r["T"]], [r["full_cache_bytes"] / MiB], "kv")
    if meas:
        ax.plot([], [], "k^", label="measured AHNModelCache.nbytes (model bench)")
        ax.plot([], [], "kv", label="measured DynamicCache (model bench)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length T (tokens)")
    ax.set_ylabel("cache MiB per sequence (all layers, bf16 K/V)")
    ax.set_title(f"Cache memory vs context length; {sub}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    save(fig, "cache_memory_vs_context.png")

    # speedup over each peer: geometric mean over the shapes measured, per benchmark
    groups = {}
    for r in rows:
        if r["peer"] and not r["peer"].startswith("ahn_graph") and _finite(r["speedup"]) and r["speedup"] > 0:
            groups.setdefault((r["bench"], r["peer"]), []).append(r["speedup"])
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(groups) + 2), 4.5))
    if groups:
        keys = sorted(groups)
        vals = [math.exp(sum(map(math.log, groups[k])) / len(groups[k])) for k in keys]
        cols = {b: f"C{i}" for i, b in enumerate(TITLES)}
        ax.bar(range(len(keys)), vals, color=[cols.get(k[0], "C9") for k in keys])
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{b}\n{p} (n={len(groups[(b, p)])})" for b, p in keys], rotation=60, ha="right",
                           fontsize=7)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}x", ha="center", va="bottom", fontsize=7)
        ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("speedup of ours (peer ms / ours ms, geomean)")
    ax.set_title(f"Speedup over each peer; {sub}", fontsize=9)
    save(fig, "speedup_over_peers.png")

    if history:
        fig = history_figure(plt, history)
        save(fig, "history.png")
    return written


# the standard shapes the record is drawn for: (bench, kind, shape, peer drawn beside ours or None)
HISTORY_SERIES = (
    ("prefill_fwd", "gdn", "B1 T32768 W4096 S128 H16/2 D128", "flex"),
    ("prefill_fwd_bwd", "gdn", "B1 T32768 W4096 S128 H16/2 D128", "flex"),
    ("decode", "gdn", "B1 T32768 W32640 S128 H16/2 D128", None),
)


def history_figure(plt, history):
    """Ours (and one peer) at the standard shapes over the recorded runs, one line per device."""
    runs = []  # (date, commit, device) in the record's order: the x axis
    for r in history:
        key = (r["date"], r["commit"], r["device"])
        if key not in runs:
            runs.append(key)
    fig, axes = plt.subplots(1, len(HISTORY_SERIES), figsize=(4.2 * len(HISTORY_SERIES), 4.2), squeeze=False)
    for ax, (bench, kind, shape, peer) in zip(axes[0], HISTORY_SERIES):
        devices = sorted({r["device"] for r in history if r["bench"] == bench and r["shape"] == shape})
        for j, dev in enumerate(devices):
            ours, theirs = {}, {}
            for r in history:
                if (r["bench"], r["kind"], r["shape"], r["device"]) != (bench, kind, shape, dev):
                    continue
                x = runs.index((r["date"], r["commit"], r["device"]))
                ours[x] = r["ms"]
                if peer and r["peer"] == peer and _finite(r["peer_ms"]):
                    theirs[x] = r["peer_ms"]
            name = dev.split(",")[0].replace("NVIDIA ", "")
            if ours:
                ax.plot(*zip(*sorted(ours.items())), "o-", color=f"C{j}", label=f"ours, {name}")
            if theirs:
                ax.plot(*zip(*sorted(theirs.items())), "s--", color=f"C{j}", alpha=0.6, label=f"{peer}, {name}")
        ax.set_title(f"{bench} {kind}\n{shape}", fontsize=8)
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels([f"{d}\n{c}" for d, c, _ in runs], rotation=60, ha="right", fontsize=6)
        ax.set_ylabel("ms (median)")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("Recorded runs (benchmarks/history.jsonl): date and commit of each", fontsize=9)
    return fig


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def main(argv=None):
    args = parse(argv)
    if args.cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton / ahn_ops are imported
    sys.path.insert(0, HERE)
    import torch

    import common as C

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("run_all: no CUDA device; use --cpu for the harness check", file=sys.stderr)
        return 2
    mode = "cpu" if args.cpu else ("quick" if args.quick else "full")
    budget = args.budget_s if args.budget_s is not None else (240.0 if args.quick else None)
    C.import_ahn_ops()
    import bench_backward
    import bench_decode
    import bench_model
    import bench_prefill

    mods = {"prefill": bench_prefill, "backward": bench_backward, "decode": bench_decode, "model": bench_model}
    cfg = C.Cfg(device=device, mode=mode, cpu_reps=1 if args.cpu else 3)
    if args.quick:
        cfg.warmup_ms, cfg.rep_ms = 10.0, 50.0
    cfg.device_name, cfg.date = C.device_str(device), C.date_str()
    t0 = time.time()
    cfg.ceilings = C.measure_ceilings(cfg)
    peers = {k: v for k, v in C.peer_status(device).items() if not k.startswith("_")}
    print(f"[run_all] {cfg.device_name}; {C.versions()}; mode {mode}; copy {cfg.ceilings['copy_GBps']:.1f} GB/s, "
          f"matmul {cfg.ceilings['matmul_TFLOPs']:.2f} TFLOP/s; peers: {peers}", flush=True)
    per = {name: mods[name].cases(cfg) for name in args.only}
    # round robin over the benchmarks: a --budget-s cut drops the last sizes of each, not whole benchmarks
    tasks = [(name, mods[name], per[name][i]) for i in range(max(map(len, per.values()), default=0))
             for name in args.only if i < len(per[name])]
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is optional
        def tqdm(x, **_):
            return x
    rows, skipped = [], []
    bar = tqdm(tasks, desc="run_all", unit="case", disable=args.no_progress)
    for name, mod, c in bar:
        label = f"{name} {c.get('kind', '')} " + " ".join(f"{k}{v}" for k, v in c.items() if k not in ("kind",))
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(label[:60])
        if budget is not None and time.time() - t0 > budget:
            skipped.append(f"{label} (budget {budget:.0f} s reached)")
            continue
        try:
            rows += mod.run_case(cfg, c)
        except Exception as e:  # noqa: BLE001  (one failing case must not lose the others)
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
            skipped.append(f"{label} ({msg})")
            print(f"\n[run_all] {label} failed: {msg}", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    elapsed = time.time() - t0
    W_cache, S_cache = (32, 4) if args.cpu else (bench_decode.W, bench_decode.S)
    meta = dict(mode=mode, device=cfg.device_name, date=cfg.date, versions=C.versions(), ceilings=cfg.ceilings,
                peers=peers, skipped=skipped, elapsed_s=elapsed, cache_W=W_cache, cache_S=S_cache,
                command="python benchmarks/run_all.py " + " ".join(sys.argv[1:] if argv is None else argv))
    os.makedirs(args.out, exist_ok=True)
    md = markdown(rows, meta)
    with open(os.path.join(args.out, "RESULTS_run_all.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "results_run_all.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    history = read_history(HISTORY)
    if args.update_results:
        commit = args.commit or git_commit()
        update_results_md(os.path.join(HERE, "RESULTS.md"), md)
        update_results_md(os.path.join(HERE, "..", "README.md"), readme_table(rows, meta, commit), README_BEGIN,
                          README_END)
        new = history_rows(rows, meta, commit)
        append_history(HISTORY, new)
        history += new
    pngs = plots(rows, meta, os.path.join(args.out, "plots"), history)
    print(f"\n[run_all] {len(rows)} rows, {len(skipped)} skipped, {elapsed:.0f} s; wrote "
          f"{os.path.join(args.out, 'RESULTS_run_all.md')}, results_run_all.json, {len(pngs)} plots")
    # a short table last: ours and the speedup over each peer, per benchmark (geomean)
    agg = {}
    for r in rows:
        if r["peer"] and math.isfinite(r["speedup"]):
            agg.setdefault((r["bench"], r["peer"]), []).append(r["speedup"])
    for (b, p), v in sorted(agg.items()):
        print(f"  {b:16s} vs {p:14s} geomean speedup {math.exp(sum(map(math.log, v)) / len(v)):7.2f}x (n={len(v)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
