#!/usr/bin/env python
"""Retrieval beyond the window with the shipped demo weights (part of ``make demo``).

Loads ``assets/retrieval_demo/`` (written by ``python/retrieval_demo.py``: ``base/`` = a small
byte-level Qwen2 pretrained with full attention on the in-repo key-value retrieval task, ``ahn/``
= its AHN-GDN weights from self-distillation, ``results.json`` = window, sinks, task), then
measures exact-match retrieval with the needle entirely *beyond the window* at 2x, 4x and 8x W
for full attention, the window alone (AHN output zeroed) and window + AHN, and prints the cache
bytes of the AHN model (constant) next to a full KV cache at each length.

    python python/retrieval_check.py                      # assets/retrieval_demo, 16 examples per cell
    python python/retrieval_check.py --assets DIR -n 64

Without the assets it prints one line and exits 0. CPU: fp32 (chunked PyTorch path); GPU: bf16.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", default=str(REPO / "assets" / "retrieval_demo"))
    p.add_argument("-n", "--examples", type=int, default=16, help="examples per cell")
    p.add_argument("--mults", type=int, nargs="+", default=[2, 4, 8], help="lengths as multiples of W")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    root = Path(a.assets)
    if not (root / "base").is_dir() or not (root / "ahn").is_dir() or not (root / "results.json").is_file():
        print(f"retrieval_check: no demo weights in {root} (python python/retrieval_demo.py writes them); skipped")
        return 0
    if a.examples < 1:
        p.error(f"--examples must be >= 1, got {a.examples}")
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "python"))
    from transformers import Qwen2ForCausalLM

    import ahn_ops
    from ahn_ops.data import SyntheticRetrieval
    from retrieval_demo import evaluate

    info = json.loads((root / "results.json").read_text())
    prm = info["params"]
    W, S = int(info.get("window", prm["window"])), int(info.get("sinks", prm["sinks"]))
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # a 3M-parameter model loads at once: transformers' progress bar would only clutter the demo's output
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = Qwen2ForCausalLM.from_pretrained(root / "base", dtype=dtype).to(device).eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    ahn_ops.patch_qwen(model, "gdn", window=W, sinks=S, weights=root / "ahn")
    task_kw = dict(task=prm["task"], n_digits=prm["n_digits"], n_pairs=prm["n_pairs"],
                   distractor_numbers=prm["distractor_numbers"], cue=prm["cue"])
    ds = SyntheticRetrieval(max(a.mults) * W, seed=12345, **task_kw)
    cfg = model.config
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) \
        * torch.finfo(dtype).bits // 8
    ahn_bytes = ahn_ops.AHNModelCache.from_model(model, batch_size=1, dtype=dtype, device=device).nbytes
    n_par = sum(x.numel() for x in model.parameters())
    print(f"retrieval_check: {root} | {n_par / 1e6:.2f}M params (base + AHN-GDN), W={W}, S={S}, task "
          f"{prm['task']}, {a.examples} examples per cell, {device}, {dtype}")
    print("| length | full attention | window only | window + AHN | AHN cache | full KV cache |")
    print("|---|---|---|---|---|---|")
    t0 = time.time()
    for m in a.mults:
        L = m * W
        cells = []
        for mode in ("full", "window", "ahn"):
            r = evaluate(model, ds, L, W, S, a.examples, device, mode,
                         autocast=torch.bfloat16 if device.type == "cuda" else None)
            cells.append("n/a" if r is None else f"{r[0]:.2f}")
        print(f"| {m}W = {L} | " + " | ".join(cells) + f" | {ahn_bytes / 1024:.0f} KiB | {kv_per_token * L / 1024:.0f} KiB |",
              flush=True)
    print(f"exact match of every answer digit; needle before position answer - W (only AHN can carry it); "
          f"{time.time() - t0:.0f} s. Training numbers: {root / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
