#!/usr/bin/env python
"""End-to-end AHN model vs the unpatched Qwen2 (SDPA + DynamicCache): prefill and decode.

Qwen2.5-3B shape by default (hidden 2048, 36 layers, H=16, Hkv=2, D=128), random bf16
weights (no download; --layers lowers the depth for a quick run). For each context T:

    prefill: wall time of one forward over T tokens (cache on) after one untimed forward of the same shape,
             peak GPU memory
    decode:  median per-token latency of --decode-steps steps after the prefill
    cache:   bytes held by the cache after the prefill (DynamicCache keys+values vs AHNModelCache.nbytes)

    python benchmarks/bench_model.py --contexts 8192 32768 131072 --kind gdn --window 32640 --sinks 128
    python benchmarks/bench_model.py --skip-base --contexts 131072     # base OOMs / too slow at 128k

The AHN prefill runs through the cache path (``ahn_attention(..., cache=...)``); with
``--prefill-chunk-size`` both models prefill in chunks. Results: a markdown table on stdout.

A second table times AHN decode per token at ``--batches`` (default 1 and 8) after a prompt of
``--decode-contexts`` tokens: the plain path (``model(next_ids, past_key_values=cache)``, HF
modules, one sync per token) next to the fast path of ``ahn_ops.generate`` (the static decode
step replayed as a CUDA graph; eager on CPU), and the floor

    floor = (weight bytes + cache bytes) read per token / copy bandwidth

    weight bytes = every parameter except the embedding table (B rows of it are gathered; with tied
                   embeddings the lm_head reads it whole), in the model dtype
    cache bytes  = per AHN layer and sequence: K+V of the min(T, S+W) cached tokens, the gate-input ring
                   (min(T, W) x 2 x H in the model dtype), the fp32 state read and written (2 x H x D x D x 4);
                   per full-attention layer: K+V of T tokens
    copy bandwidth = 2 x bytes / time of ``dst.copy_(src)`` on 1 GiB (read + write), same run.

With ``--base-decode`` the unpatched model (SDPA + DynamicCache, HF forward per token: how it runs in
``model.generate``) is timed at the same contexts and batches first, and the table adds its ms/token,
its own floor (weights + K/V of all T tokens in every layer) and the fast path's tokens/s over it.
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
cache_kwargs = ahn_ops.models.cache_kwargs

SHAPES = {  # hidden, layers, H, Hkv, intermediate
    "3b": (2048, 36, 16, 2, 11008),
    "7b": (3584, 28, 28, 4, 18944),
    "14b": (5120, 48, 40, 8, 13824),
    "tiny": (128, 2, 2, 1, 256),  # D = 64: the --cpu harness check of run_all (vocab 1024)
}


def build(shape, layers, dtype, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, L, H, HKV, inter = SHAPES[shape]
    cfg = Qwen2Config(hidden_size=hidden, num_hidden_layers=layers or L, num_attention_heads=H,
                      num_key_value_heads=HKV, intermediate_size=inter, vocab_size=1024 if shape == "tiny" else 151936,
                      max_position_embeddings=1 << 20, tie_word_embeddings=shape == "3b")
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype).eval()
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def cache_bytes(cache):
    if hasattr(cache, "nbytes"):
        return cache.nbytes
    return sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers if getattr(l, "keys", None) is not None)


@torch.no_grad()
def run(model, T, steps, chunk, device, make_cache, batch=1):
    ids = torch.randint(0, model.config.vocab_size, (batch, T), device=device)

    def prefill(cache):
        for s in range(0, T, chunk or T):
            out = model(ids[:, s:s + (chunk or T)], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
            cache = out["cache"] if "cache" in out else out.past_key_values  # transformers >= 5.24: cache
        return out, cache

    # one untimed prefill of the same shape first: the first call of a shape compiles kernels and builds
    # cuDNN graphs (seconds), which a running server pays once, not per request
    prefill(make_cache())
    cache = make_cache()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    out, cache = prefill(cache)
    sync(device)
    t_pre = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    nbytes = cache_bytes(cache)
    nxt = out.logits[:, -1:].argmax(-1)
    times = []
    for i in range(steps + 2):
        sync(device)
        t0 = time.perf_counter()
        nxt = model(nxt, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
        sync(device)
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    return t_pre, peak, statistics.median(times), nbytes


# --------------------------------------------------------------------------------------
# decode: plain vs fast path vs the bandwidth floor
# --------------------------------------------------------------------------------------
def copy_bandwidth(device, nbytes=None) -> float:
    """Bytes per second of ``dst.copy_(src)`` counting read + write (median of 5)."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 27)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    times = []
    for i in range(7):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def weight_bytes(model) -> int:
    emb = model.get_input_embeddings().weight
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or p is emb:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    if model.get_output_embeddings().weight is emb:  # tied: the lm_head reads the whole table
        total += emb.numel() * emb.element_size()
    return total


def cache_read_bytes(model, B, T) -> int:
    info = model._ahn_info
    cfg = model.config
    H, HKV, D, W, S = info["num_heads"], info["num_kv_heads"], info["head_dim"], info["window"], info["sinks"]
    elt = next(model.parameters()).element_size()
    per_ahn = B * (2 * min(T, S + W) * HKV * D * elt + min(T, W) * 2 * H * elt + 2 * H * D * D * 4)
    per_fa = B * 2 * T * HKV * D * elt
    n_fa = len(info["fa_layer_ids"])
    return per_ahn * (cfg.num_hidden_layers - n_fa) + per_fa * n_fa


@torch.no_grad()
def time_fast(model, T, B, steps, device, chunk=None) -> float:
    """Median per-token latency of the ahn_ops.generate decode step (CUDA graph on GPU)."""
    from ahn_ops import fast_decode as gen  # prefill + StaticDecoder are its building blocks

    ids = torch.randint(0, model.config.vocab_size, (B, T), device=device)
    logits, cache = gen.prefill(model, ids, chunk_size=chunk)
    dec = gen.StaticDecoder(model, cache, None, T, 4 * steps + 8)
    dec.start(logits)
    if device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            dec.eager_step()
        torch.cuda.current_stream().wait_stream(side)
        dec.capture()
    else:
        dec.eager_step()
    dec.step()
    per_token = []
    for _ in range(3):  # tokens back to back, no sync in between: how generate() runs them
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            dec.step()
        sync(device)
        per_token.append((time.perf_counter() - t0) / steps)
    return statistics.median(per_token)


def _decode_chunk(args, B, T):
    # the decode tables time decoding: a large batch x context is prefilled in chunks (one forward over
    # B=8 x 128k tokens ran out of memory on the H100: MLP activations + per-chunk states)
    return args.prefill_chunk_size or (32768 if B * T > 262144 else None)


def base_decode(model, args, device):
    """{(T, B): ms/token or None (OOM)} of the unpatched model (HF forward per token, DynamicCache)."""
    from transformers import DynamicCache

    out = {}
    for T in args.decode_contexts:
        for B in args.batches:
            try:
                out[T, B] = 1e3 * run(model, T, args.decode_steps, _decode_chunk(args, B, T), device,
                                      lambda: DynamicCache(config=model.config), batch=B)[2]
            except torch.OutOfMemoryError:
                out[T, B] = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def decode_table(model, args, device, base=None):
    bw = copy_bandwidth(device)
    wb = weight_bytes(model)
    cfg = model.config
    kv_token = 2 * cfg.num_hidden_layers * model._ahn_info["num_kv_heads"] * model._ahn_info["head_dim"] \
        * next(model.parameters()).element_size()               # the unpatched model's K+V bytes per token
    print(f"\n# decode per token (AHN-{args.kind}); copy bandwidth {bw / 1e9:.0f} GB/s, weights {wb / 2**30:.2f} GiB\n")
    extra = " base ms/token | base floor | fast tok/s / base |" if base else ""
    print("| T | B | plain ms/token | fast ms/token | floor ms/token | plain / fast | fast / floor |" + extra)
    print("|---|---|---|---|---|---|---|" + "---|---|---|" * bool(base))
    for T in args.decode_contexts:
        for B in args.batches:
            chunk = _decode_chunk(args, B, T)
            b = base.get((T, B)) if base else None

            def base_cols(fast):  # the base's ms/token, its floor, our tokens/s over it ("" without --base-decode)
                if not base:
                    return ""
                if b is None:
                    return " OOM | | |"
                ratio = f"{b / (1e3 * fast):.2f}x" if fast else ""
                return f" {b:.2f} | {1e3 * (wb + B * T * kv_token) / bw:.2f} | {ratio} |"
            try:
                plain = run(model, T, args.decode_steps, chunk, device,
                            lambda: ahn_ops.AHNModelCache.from_model(model), batch=B)[2]
                fast = time_fast(model, T, B, args.decode_steps, device, chunk)
            except torch.OutOfMemoryError:
                print(f"| {T} | {B} | OOM | | | | |" + base_cols(None))
                continue
            floor = (wb + cache_read_bytes(model, B, T)) / bw
            print(f"| {T} | {B} | {1e3 * plain:.2f} | {1e3 * fast:.2f} | {1e3 * floor:.2f} | {plain / fast:.2f}x | "
                  f"{fast / floor:.2f}x |" + base_cols(fast))


# --------------------------------------------------------------------------------------
# run_all interface: cases(cfg) -> [case], run_case(cfg, case) -> [row], collect(cfg) -> [row]
# --------------------------------------------------------------------------------------
def cases(cfg):
    """One case per model shape (all its contexts inside: the base model is patched in place)."""
    if cfg.cpu:
        return [dict(shape="tiny", layers=None, contexts=[48, 96], batch=1, kind="gdn", W=16, S=4, steps=2)]
    if cfg.quick:
        return [dict(shape="3b", layers=4, contexts=[8192, 32768], batch=1, kind="gdn", W=4096, S=128, steps=8)]
    return [dict(shape=sh, layers=None, contexts=[8192, 32768, 131072], batch=1, kind="gdn", W=32640, S=128,
                 steps=32) for sh in ("3b", "7b", "14b")]


def _model_flops(model, T, B):
    """2 x parameters (without the embedding table) per token; attention not counted."""
    emb = model.get_input_embeddings().weight
    n = sum(p.numel() for p in model.parameters() if p is not emb)
    return 2.0 * n * T * B


def run_case(cfg, c):
    """Rows ``model_prefill`` (AHN vs the unpatched model with SDPA + DynamicCache) and ``model_decode``
    (the AHN fast path of ahn_ops.generate vs the unpatched model and the AHN plain HF path)."""
    from transformers import DynamicCache

    device = torch.device(cfg.device)
    model = build(c["shape"], c["layers"], cfg.dtype, device)
    L = model.config.num_hidden_layers
    shape = f"{c['shape']} L{L} B{c['batch']}"
    wb = weight_bytes(model)
    base = {}
    for T in c["contexts"]:
        try:
            base[T] = run(model, T, c["steps"], None, device, lambda: DynamicCache(config=model.config),
                          batch=c["batch"])
        except torch.OutOfMemoryError:
            base[T] = None
            torch.cuda.empty_cache()
    ahn_ops.patch_qwen(model, c["kind"], window=c["W"], sinks=c["S"])
    bw = (cfg.ceilings or {}).get("copy_GBps", float("nan")) * 1e9
    rows = []
    for T in c["contexts"]:
        sh = f"{shape} T{T} W{c['W']} S{c['S']}"
        ext = dict(T=T, B=c["batch"], W=c["W"], S=c["S"], layers=L, model=c["shape"],
                   H=model.config.num_attention_heads, HKV=model.config.num_key_value_heads,
                   D=model.config.hidden_size // model.config.num_attention_heads)
        try:
            r = run(model, T, c["steps"], None, device, lambda: ahn_ops.AHNModelCache.from_model(model),
                    batch=c["batch"])
        except torch.OutOfMemoryError:
            rows.append(C.make_row(cfg, "model_prefill", c["kind"], sh, C.NAN, 0, 0, note="AHN OOM", **ext))
            continue
        b = base[T]
        ext.update(ahn_cache_bytes=r[3], full_cache_bytes=b[3] if b else C.NAN, ahn_peak_GiB=r[1],
                   base_peak_GiB=b[1] if b else C.NAN)
        nb = wb + 2 * T * c["batch"] * model.config.hidden_size * 2 * L  # weights + activations in/out per layer
        rows.append(C.make_row(cfg, "model_prefill", c["kind"], sh, 1e3 * r[0], _model_flops(model, T, c["batch"]), nb,
                               "hf_sdpa", 1e3 * b[0] if b else C.NAN,
                               "wall clock of one forward over T tokens" + ("" if b else "; base OOM"), **ext))
        try:
            fast = time_fast(model, T, c["batch"], c["steps"], device)
            fnote = "ahn_ops.generate static step" + (" (CUDA graph)" if device.type == "cuda" else " (eager)")
        except Exception as ex:  # noqa: BLE001
            fast, fnote = float("nan"), f"fast path failed: {type(ex).__name__}: {str(ex)[:100]}"
        dbytes = wb + cache_read_bytes(model, c["batch"], T)
        dflops = _model_flops(model, 1, c["batch"])
        ext2 = dict(ext, floor_ms=1e3 * dbytes / bw if bw == bw else C.NAN)
        rows.append(C.make_row(cfg, "model_decode", c["kind"], sh, 1e3 * fast, dflops, dbytes, "hf_sdpa",
                               1e3 * b[2] if b else C.NAN, fnote + "; peer: unpatched model, DynamicCache", **ext2))
        rows.append(C.make_row(cfg, "model_decode", c["kind"], sh, 1e3 * fast, dflops, dbytes, "ahn_plain_hf",
                               1e3 * r[2], fnote + "; peer: AHN through the HF forward, one sync per token", **ext2))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def collect(cfg, case_list=None):
    return [r for c in (case_list or cases(cfg)) for r in run_case(cfg, c)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="3b", choices=list(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--kind", default="gdn")
    p.add_argument("--window", type=int, default=8192)
    p.add_argument("--sinks", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--prefill-chunk-size", type=int, default=None)
    p.add_argument("--skip-base", action="store_true")
    p.add_argument("--decode-contexts", type=int, nargs="+", default=[8192],
                   help="prompt lengths of the decode table (plain vs fast path vs floor)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes of the decode table")
    p.add_argument("--no-fast", action="store_true", help="skip the decode table")
    p.add_argument("--base-decode", action="store_true",
                   help="time the unpatched model's decode at the decode table's contexts and batches too")
    p.add_argument("--bands", nargs="+", default=["auto"], choices=("auto", "no_sm90", "sm90", "cudnn", "triton"),
                   help="prefill band engines to time in turn (prefill.CONFIG['band'])")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    from transformers import DynamicCache

    model = build(args.shape, args.layers, dtype, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {args.shape} shape ({model.config.num_hidden_layers} layers), {dtype}, {name}; "
          f"AHN {args.kind} W={args.window} S={args.sinks}, chunk={args.prefill_chunk_size}\n")
    print("| model | T | prefill s | tok/s | peak GiB | decode ms/token | cache MiB |")
    print("|---|---|---|---|---|---|---|")
    rows = []

    def warm_up(make_cache):
        # the first forward compiles / autotunes the Triton kernels (and warms cuBLAS): untimed, at most
        # one prefill chunk long (a chunked run may not fit a whole context in memory)
        n = min(min(args.contexts), args.prefill_chunk_size or min(args.contexts))
        with torch.no_grad():
            model(torch.randint(0, model.config.vocab_size, (1, n), device=device),
                  **cache_kwargs(make_cache()), use_cache=True, logits_to_keep=1)
        sync(device)

    if not args.skip_base:
        warm_up(lambda: DynamicCache(config=model.config))
        for T in args.contexts:
            try:
                r = run(model, T, args.decode_steps, args.prefill_chunk_size, device,
                        lambda: DynamicCache(config=model.config))
            except torch.OutOfMemoryError:
                print(f"| base SDPA | {T} | OOM | | | | |")
                continue
            rows.append(("base SDPA", T, r))
            print(f"| base SDPA | {T} | {r[0]:.3f} | {T / r[0]:.0f} | {r[1]:.2f} | {1e3 * r[2]:.2f} | {r[3] / 2**20:.0f} |")
    base_dec = base_decode(model, args, device) if args.base_decode and not args.no_fast else None
    ahn_ops.patch_qwen(model, args.kind, window=args.window, sinks=args.sinks)
    from ahn_ops.ops.ahn_attention import prefill as pf

    for band in args.bands:
        pf.CONFIG["band"] = band
        warm_up(lambda: ahn_ops.AHNModelCache.from_model(model))
        name = f"AHN-{args.kind}" + ("" if args.bands == ["auto"] else f" [{band} band]")
        for T in args.contexts:
            try:
                r = run(model, T, args.decode_steps, args.prefill_chunk_size, device,
                        lambda: ahn_ops.AHNModelCache.from_model(model))
            except torch.OutOfMemoryError:
                print(f"| {name} | {T} | OOM | | | | |")
                continue
            print(f"| {name} | {T} | {r[0]:.3f} | {T / r[0]:.0f} | {r[1]:.2f} | {1e3 * r[2]:.2f} | "
                  f"{r[3] / 2**20:.0f} |")
    pf.CONFIG["band"] = "auto"
    if not args.no_fast:
        decode_table(model, args, device, base_dec)


if __name__ == "__main__":
    main()
