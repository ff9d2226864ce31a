#!/usr/bin/env python
"""Read once, ask many: prefill a document once, save its constant-size AHN cache, answer prompts from it.

    # offline smoke run: tiny random Qwen2 model, byte-level tokens (the answers are noise)
    python python/ask.py --tiny
    # a real model: prefill the document, write the cache, answer two questions from it
    python python/ask.py --model Qwen2.5-3B-AHN-GDN --doc-file report.txt --cache report.ahncache \\
        --ask "Who wrote it?" --ask "What is the conclusion?"
    # later: answer more questions from the saved cache, without reading the document again
    python python/ask.py --model Qwen2.5-3B-AHN-GDN --cache report.ahncache --ask "When was it written?"
    # all questions in one batch (the cache forked with expand(), questions left-padded)
    python python/ask.py --tiny --ask "a?" --ask "bb?" --batch

The cache file holds the AHN state of every layer (sinks + window of exact K/V, the memory states) and the
K/V of any full-attention layer: its size does not grow with the document (full-attention layers aside).
AHNModelCache.load refuses a file made for another model, another AHN, or other W/S/kind. Each answer
starts from the document's cache: ahn_ops.generate(..., cache=cache) never modifies it.

Uses the public API: ahn_ops.AHNModelCache (save / load / expand), ahn_ops.generate (cache=).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers of python/generate.py

import ahn_ops  # noqa: E402
from ahn_ops.fast_decode import prefill  # noqa: E402
from generate import _load, add_model_args, model_device_dtype  # noqa: E402  (model + tokenizer, --tiny included)

DEFAULT_DOC = ("The hippocampus turns short-term memories into long-term ones. An AHN keeps a window of recent "
               "tokens exactly and folds older ones into a fixed-size memory, so a long document costs a constant "
               "amount of cache. ")
DEFAULT_QUESTIONS = ("What does the hippocampus do?", "How large is the cache?")


def _encode(tok, text: str):
    try:
        return list(tok.encode(text, add_special_tokens=False))
    except TypeError:  # the byte tokenizer of --tiny takes no options
        return list(tok.encode(text))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _full_kv_bytes(model, tokens: int, dtype: torch.dtype) -> int:
    """K/V bytes a plain (full-attention) model would cache for ``tokens`` tokens."""
    cfg = model.config
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * D  # K and V of every layer
    return per_token * tokens * torch.empty((), dtype=dtype).element_size()


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f} MiB"


@torch.no_grad()
def read_document(model, tok, text: str, path: Path, chunk, device, dtype) -> None:
    """Prefill the document once and save its cache to ``path``."""
    ids = torch.tensor([_encode(tok, text)], device=device)
    T = ids.shape[1]
    _sync(device)
    t0 = time.perf_counter()
    _, cache = prefill(model, ids, chunk_size=chunk)
    _sync(device)
    t_pre = time.perf_counter() - t0
    cache.save(path)
    disk = os.path.getsize(path)
    print(f"read:   {T} tokens in {t_pre:.3f}s ({T / max(t_pre, 1e-9):.0f} tok/s), cache saved to {path}")
    print(f"cache:  {_mib(disk)} on disk ({_mib(cache.nbytes)} in memory, constant in the document length for the "
          f"AHN layers) vs {_mib(_full_kv_bytes(model, T, dtype))} of K/V a full-attention model keeps for {T} tokens")


@torch.no_grad()
def answer(model, tok, path: Path, questions, template: str, max_new_tokens: int, batch: bool, device) -> None:
    """Load the saved cache once, then answer every question from it."""
    t0 = time.perf_counter()
    cache = ahn_ops.AHNModelCache.load(path, model)
    print(f"loaded: {path} in {time.perf_counter() - t0:.3f}s, {int(cache.seq_lens()[0])} document tokens, "
          f"batch {cache.ahn.batch_size}")
    eos = getattr(tok, "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    prompts = [_encode(tok, template.format(q=q)) for q in questions]
    if batch:  # one forked cache per question, the prompts left-padded to one length
        n, T = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(n, T, dtype=torch.long, device=device)
        mask = torch.zeros(n, T, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            ids[i, T - len(p):] = torch.tensor(p, device=device)
            mask[i, T - len(p):] = 1
        t0 = time.perf_counter()
        out = ahn_ops.generate(model, ids, max_new_tokens, attention_mask=mask, cache=cache.expand(n),
                               eos_token_id=eos)
        _sync(device)
        dt = time.perf_counter() - t0
        answers = [out[i, T:].tolist() for i in range(n)]
        print(f"asked:  {n} prompts in one batch, {sum(map(len, prompts))} prompt tokens, {dt:.3f}s")
    else:
        answers = []
        t0 = time.perf_counter()
        for p in prompts:
            out = ahn_ops.generate(model, torch.tensor([p], device=device), max_new_tokens, cache=cache,
                                   eos_token_id=eos)
            answers.append(out[0, len(p):].tolist())
        _sync(device)
        dt = time.perf_counter() - t0
        print(f"asked:  {len(prompts)} prompts one by one, {sum(map(len, prompts))} prompt tokens, {dt:.3f}s")
    for q, a in zip(questions, answers):
        stop = [i for i, t in enumerate(a) if t in eos]
        a = a[:stop[0]] if stop else a
        print("-" * 60)
        print(f"Q: {q}")
        print(f"A ({len(a)} tokens): {tok.decode(a)!r}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, "tiny random model, byte-level tokens, no files needed")
    p.add_argument("--doc", help="the document text (default with --tiny: a short built-in text)")
    p.add_argument("--doc-file", help="read the document from a file")
    p.add_argument("--repeat", type=int, default=1, help="repeat the document N times (long-context smoke test)")
    p.add_argument("--cache", default=None,
                   help="cache file: written when a document is given, else read (default: ./ask_cache.safetensors)")
    p.add_argument("--ask", action="append", default=None, help="a question (repeatable)")
    p.add_argument("--template", default="\n\nQuestion: {q}\nAnswer:", help="prompt appended to the document")
    p.add_argument("--batch", action="store_true", help="answer all questions in one batch (cache.expand)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args(argv)
    device, dtype = model_device_dtype(p, args)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    path = Path(args.cache or "ask_cache.safetensors")

    text = Path(args.doc_file).read_text() if args.doc_file else args.doc
    if text is None and args.tiny and not (args.cache and path.exists()):
        text = DEFAULT_DOC
    if text is None and not path.exists():
        p.error(f"no document (--doc / --doc-file) and no cache file {path} to answer from")
    questions = args.ask or list(DEFAULT_QUESTIONS)

    t0 = time.perf_counter()
    model, tok = _load(args, dtype, device)
    info = model._ahn_info
    print(f"model:  {info['kind']} W={info['window']} S={info['sinks']} fa_layer_ids={info['fa_layer_ids']} on "
          f"{device} {dtype}, loaded in {time.perf_counter() - t0:.1f}s")
    if text is not None:
        read_document(model, tok, text * args.repeat, path, args.prefill_chunk_size, device, dtype)
    answer(model, tok, path, questions, args.template, args.max_new_tokens, args.batch, device)


if __name__ == "__main__":
    main()
