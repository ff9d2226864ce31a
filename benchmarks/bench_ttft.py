#!/usr/bin/env python
"""Read once, ask many: time to first token for a question over a long document, from scratch vs from the
document's saved AHN cache; the cache's save / load time and its bytes on disk against the K/V an
unpatched model keeps for the same context.

Qwen2.5-3B shape (``bench_model.build``), random bf16 weights, AHN patched at ``--window`` / ``--sinks``;
random token ids (the timings do not depend on the values). For a document of ``--doc`` tokens and a
question of ``--question`` tokens:

    from scratch    ``ahn_ops.generate(model, doc + question, 1)``: the whole prefill, then the first token;
                    first call at this length (cuDNN graphs and launch tables built) and a repeat
    cache save      ``AHNModelCache.save`` of the document's cache (after its prefill), bytes on disk
    cache load      ``AHNModelCache.load`` of that file (from the OS page cache: the file was just written)
    from the cache  ``ahn_ops.generate(model, question, 1, cache=cache)``: the question's prefill on the
                    loaded cache and the first token (the cache itself is not modified); a repeat, and
                    the first question of another length

    python benchmarks/bench_ttft.py [--doc 131072] [--question 64] [--kind gdn] [--window 32640] [--sinks 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

ahn_ops = C.import_ahn_ops()

from bench_model import build  # noqa: E402

from ahn_ops.fast_decode import prefill  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def full_kv_bytes(model, tokens: int) -> int:
    cfg = model.config
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * D * tokens * 2  # K and V, bf16


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="3b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--doc", type=int, default=131072)
    ap.add_argument("--question", type=int, default=64)
    ap.add_argument("--kind", default="gdn")
    ap.add_argument("--window", type=int, default=32640)
    ap.add_argument("--sinks", type=int, default=128)
    ap.add_argument("--dir", default=None, help="where the cache file goes (default: a temporary directory)")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    model = build(args.shape, args.layers, torch.bfloat16, device)
    ahn_ops.patch_qwen(model, args.kind, window=args.window, sinks=args.sinks)
    print(f"[env] {torch.cuda.get_device_name()} torch {torch.__version__}; {args.shape} x{model.config.num_hidden_layers}"
          f" layers, {args.kind} W={args.window} S={args.sinks}, document {args.doc} + question {args.question} tokens")
    g = torch.Generator(device="cuda").manual_seed(0)
    V = model.config.vocab_size
    doc = torch.randint(0, V, (1, args.doc), device=device, generator=g)
    question = torch.randint(0, V, (1, args.question), device=device, generator=g)
    both = torch.cat([doc, question], 1)

    # kernels compiled on a short prompt first, so the first call at full length shows only what a
    # new length costs (cuDNN graphs, launch tables)
    ahn_ops.generate(model, both[:, :4096], 1)
    rows = []
    first, t_first = _timed(lambda: ahn_ops.generate(model, both, 1), device)
    _, t_again = _timed(lambda: ahn_ops.generate(model, both, 1), device)
    rows += [("TTFT from scratch, first call at this length", t_first),
             ("TTFT from scratch, repeat", t_again)]

    (_, cache), t_doc = _timed(lambda: prefill(model, doc), device)
    rows.append(("document prefill alone (for the cache)", t_doc))
    tmp = tempfile.TemporaryDirectory(dir=args.dir)
    path = os.path.join(tmp.name, "doc.safetensors")
    _, t_save = _timed(lambda: cache.save(path), device)
    disk = os.path.getsize(path)
    del cache
    torch.cuda.empty_cache()
    loaded, t_load = _timed(lambda: ahn_ops.AHNModelCache.load(path, model), device)
    rows += [("cache save", t_save), ("cache load (page cache)", t_load)]
    ahn_ops.generate(model, question, 1, cache=loaded)  # the cache-path kernels at this question length
    from_cache, t_cache = _timed(lambda: ahn_ops.generate(model, question, 1, cache=loaded), device)
    rows.append(("TTFT from the loaded cache", t_cache))
    other = torch.randint(0, V, (1, args.question + 7), device=device, generator=g)
    _, t_new = _timed(lambda: ahn_ops.generate(model, other, 1, cache=loaded), device)
    rows.append((f"TTFT from the loaded cache, first question of {args.question + 7} tokens", t_new))
    same = torch.equal(from_cache[0, -1], first[0, -1])
    tmp.cleanup()

    kv = full_kv_bytes(model, args.doc)
    print("\n| what | seconds |\n|---|---|")
    for what, t in rows:
        print(f"| {what} | {t:.4f} |")
    print(f"\n| bytes | MiB |\n|---|---|\n| AHN cache file | {disk / 2**20:.1f} |\n"
          f"| unpatched model's K/V for {args.doc} tokens | {kv / 2**20:.1f} |\n"
          f"| ratio | {disk / kv:.3f} |")
    print(f"\nfirst token from the cache equals the one from scratch: {same}; TTFT speed-up "
          f"{t_again / t_cache:.0f}x (repeat from scratch over from the loaded cache)")


if __name__ == "__main__":
    main()
