#!/usr/bin/env python
"""Prompt in, text out, on an AHN model; prints prefill/decode speed and cache memory.

    # base model + AHN-only weights (kind, window, sinks from the AHN config.json)
    python python/generate.py --model Qwen2.5-3B-Instruct --ahn AHN-GDN-for-Qwen-2.5-Instruct-3B --prompt "..."
    # merged checkpoint (ahn-merge output)
    python python/generate.py --model Qwen2.5-3B-AHN-GDN --prompt-file long.txt --max-new-tokens 128
    # offline smoke run: tiny random Qwen2 model, byte-level tokenizer
    python python/generate.py --tiny --prompt "hello" --repeat 50
    # fast path: ahn_ops.generate (static decode step, replayed as a CUDA graph on GPU)
    python python/generate.py --tiny --prompt "hello" --repeat 50 --fast

Uses only the public API: ahn_ops.patch_qwen / ahn_ops.from_pretrained / ahn_ops.AHNModelCache /
ahn_ops.generate.
"""

from __future__ import annotations

import argparse
import json
import time
import types
from pathlib import Path

import torch

import ahn_ops
from ahn_ops.models import cache_kwargs


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (for --tiny and checkpoints without tokenizer files)."""

    eos_token_id = None

    def encode(self, text: str):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def _tokenizer(path):
    if path is not None and any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    return ByteTokenizer()


def _tiny_model(kind, window, sinks, dtype, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 20)
    model = Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    ahn_ops.patch_qwen(model, kind, window=window or 64, sinks=4 if sinks is None else sinks)
    with torch.no_grad():  # an untrained AHN has o_proj = 0; give it weights so the memory is exercised
        for n, p in model.named_parameters():
            if n.endswith("ahn.fn.o_proj.weight"):
                p.normal_(0, p.shape[-1] ** -0.5)
    return model


def _load(args, dtype, device):
    if args.tiny:
        return _tiny_model(args.kind or "gdn", args.window, args.sinks, dtype, device), ByteTokenizer()
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    if cfg.get("_ahn_implementation"):  # merged checkpoint
        model = ahn_ops.from_pretrained(args.model, kind=args.kind, window=args.window, sinks=args.sinks,
                                        dtype=dtype).to(device)
    else:
        if args.ahn is None:
            raise SystemExit(f"{args.model} is not a merged AHN checkpoint: pass --ahn AHN_DIR")
        from transformers import Qwen2ForCausalLM

        model = Qwen2ForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
        ahn_ops.patch_qwen(model, kind=args.kind, window=args.window, sinks=args.sinks, weights=args.ahn)
    return model, _tokenizer(args.model)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def run(model, ids, max_new_tokens, chunk, eos, temperature, device):
    cache = ahn_ops.AHNModelCache.from_model(model)
    T = ids.shape[1]
    _sync(device)
    t0 = time.perf_counter()
    for s in range(0, T, chunk or T):  # chunked prefill: constant activation memory for long prompts
        logits = model(ids[:, s:s + (chunk or T)], **cache_kwargs(cache), logits_to_keep=1).logits
    _sync(device)
    t_prefill = time.perf_counter() - t0
    out = []
    t0 = time.perf_counter()
    for _ in range(max_new_tokens):
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits[:, -1].float() / temperature, -1), 1)
        else:
            nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(nxt))
        if eos is not None and out[-1] == eos:
            break
        logits = model(nxt, **cache_kwargs(cache)).logits
    _sync(device)
    t_decode = time.perf_counter() - t0
    return out, t_prefill, t_decode, cache


@torch.no_grad()
def run_fast(model, ids, max_new_tokens, chunk, eos, temperature, device):
    """The same job through ahn_ops.generate: one static decode step, a CUDA graph on GPU."""
    stats = {}
    out = ahn_ops.generate(model, ids, max_new_tokens, eos_token_id=eos if eos is not None else [],
                           do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                           prefill_chunk_size=chunk, stats=stats)
    new = out[0, ids.shape[1]:].tolist()
    if eos is not None and eos in new:
        new = new[:new.index(eos) + 1]
    print(f"fast path: cuda_graph={stats['cuda_graph']}")
    return new, stats["prefill_s"], stats["decode_s"], types.SimpleNamespace(nbytes=stats["cache_nbytes"])


def add_model_args(p: argparse.ArgumentParser, tiny_help: str = "tiny random model, no files needed") -> None:
    """The model options this script and python/ask.py share (read by :func:`model_device_dtype`, ``_load``)."""
    p.add_argument("--model", help="base Qwen2.5 dir (with --ahn) or merged AHN dir")
    p.add_argument("--ahn", help="AHN-only weights dir (config.json + model.safetensors)")
    p.add_argument("--tiny", action="store_true", help=tiny_help)
    p.add_argument("--kind", default=None, help="override: gdn | dn | mamba2")
    p.add_argument("--window", type=int, default=None, help="override the sliding window W")
    p.add_argument("--sinks", type=int, default=None, help="override the sink count S")
    p.add_argument("--prefill-chunk-size", type=int, default=None)
    p.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def model_device_dtype(p: argparse.ArgumentParser, args):
    """``(device, dtype)`` from :func:`add_model_args`' options; an error unless --model or --tiny is given."""
    if not args.tiny and not args.model:
        p.error("--model is required (or --tiny)")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt", default="The hippocampus turns short-term memories into long-term ones. ")
    p.add_argument("--prompt-file", help="read the prompt from a file")
    p.add_argument("--repeat", type=int, default=1, help="repeat the prompt N times (long-context smoke test)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--fast", action="store_true",
                   help="decode with ahn_ops.generate (static step; CUDA graph replay on GPU)")
    args = p.parse_args(argv)
    device, dtype = model_device_dtype(p, args)

    t0 = time.perf_counter()
    model, tok = _load(args, dtype, device)
    print(f"loaded in {time.perf_counter() - t0:.1f}s: {model._ahn_info['kind']} W={model._ahn_info['window']} "
          f"S={model._ahn_info['sinks']} fa_layer_ids={model._ahn_info['fa_layer_ids']} on {device} {dtype}")
    prompt = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    prompt = prompt * args.repeat
    if hasattr(tok, "apply_chat_template") and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) else ids
    else:
        ids = tok.encode(prompt)
    ids = torch.tensor([list(ids)], device=device)
    out, t_pre, t_dec, cache = (run_fast if args.fast else run)(model, ids, args.max_new_tokens, args.prefill_chunk_size,
                                   getattr(tok, "eos_token_id", None), args.temperature, device)
    print("-" * 60)
    print(tok.decode(out))
    print("-" * 60)
    T = ids.shape[1]
    cfg = model.config
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    full_kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * D * (T + len(out)) * ids.new_zeros(
        (), dtype=dtype).element_size()
    print(f"prefill: {T} tokens in {t_pre:.3f}s = {T / max(t_pre, 1e-9):.1f} tok/s")
    print(f"decode:  {len(out)} tokens in {t_dec:.3f}s = {len(out) / max(t_dec, 1e-9):.1f} tok/s "
          f"({1e3 * t_dec / max(len(out), 1):.2f} ms/token)")
    print(f"cache:   {cache.nbytes / 2**20:.2f} MiB (AHN, constant in the context) vs "
          f"{full_kv / 2**20:.2f} MiB full KV cache at {T + len(out)} tokens")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
