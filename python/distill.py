#!/usr/bin/env python
"""Self-distil the AHN weights of a Qwen2.5 model (teacher: the same frozen model with full attention).

One GPU / CPU:
    python python/distill.py --model Qwen/Qwen2.5-3B-Instruct --kind gdn --window 1024 --sinks 128 \\
        --data corpus/ --tokenizer Qwen/Qwen2.5-3B-Instruct --seq-len 16384 --steps 2000 \\
        --micro-batch 1 --grad-accum 8 --lr 1e-3 --warmup 100 --grad-ckpt --out runs/ahn-gdn-3b
Several GPUs (DDP over NCCL; gloo on CPU), same global batch = micro x ranks x accumulation:
    torchrun --nproc-per-node 4 python/distill.py ... --grad-accum 2
Resume exactly (optimizer, scheduler, RNG, data position, step):
    python python/distill.py ... --resume runs/ahn-gdn-3b/checkpoint-500
Tiny random model on a synthetic passkey task (CPU smoke test):
    python python/distill.py --tiny --synthetic passkey --seq-len 128 --window 32 --steps 20 --out /tmp/ahn

Checkpoints land in ``--out/checkpoint-{step}``: ``config.json`` + ``model.safetensors`` (AHN-only,
published key names; ``ahn_ops.patch_qwen(model, weights=dir)`` and ``ahn-merge`` read them) and
``training_state.pt``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", help="Hugging Face Qwen2 directory or hub id (frozen base = teacher)")
    g.add_argument("--tiny", action="store_true", help="a tiny random byte-level Qwen2 instead of --model")
    g.add_argument("--tiny-size", default="64x2", metavar="HIDDENxLAYERS",
                   help="--tiny model size (4 heads, 2 KV heads): 64x2 = head dim 16 (chunked path); "
                        "256x4 = head dim 64 (the fused kernels on a GPU)")
    g.add_argument("--kind", default="gdn", choices=["gdn", "dn", "mamba2"])
    g.add_argument("--window", type=int, default=1024, help="nominal W (written to config.json)")
    g.add_argument("--sinks", type=int, default=0, help="nominal S (written to config.json)")
    g.add_argument("--fa-layer-ids", default=None, help="layers that keep full attention, e.g. '0,5'")
    g.add_argument("--init-ahn", default=None, help="start from these AHN weights (dir or file)")
    g.add_argument("--backend", default="auto", choices=["auto", "reference", "kernel"])
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="*", default=None, help=".txt / .jsonl files or directories")
    g.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the model's; 'bytes' for byte-level)")
    g.add_argument("--synthetic", choices=["passkey", "kv"], default=None, help="in-repo synthetic retrieval data")
    g.add_argument("--seq-len", type=int, default=2048)
    g = p.add_argument_group("windows")
    g.add_argument("--fixed-window", action="store_true", help="train at --window/--sinks only")
    g.add_argument("--min-window", type=int, default=32)
    g.add_argument("--max-window", type=int, default=8192)
    g.add_argument("--max-sinks", type=int, default=None, help="cap on the random S (default W/2)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--micro-batch", type=int, default=1)
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr-ratio", type=float, default=0.1)
    g.add_argument("--warmup", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--kl-weight", type=float, default=1.0)
    g.add_argument("--ce-weight", type=float, default=0.0)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing per decoder layer")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="checkpoint directory")
    g.add_argument("--save-every", type=int, default=0)
    g.add_argument("--resume", default=None, help="a checkpoint-{step} directory")
    g.add_argument("--log-file", default=None, help="jsonl file of per-step records (rank 0)")
    g.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if not a.tiny and not a.model:
        p.error("give --model or --tiny")
    if not a.synthetic and not a.data:
        p.error("give --data files or --synthetic passkey|kv")
    if not re.fullmatch(r"\d+x\d+", a.tiny_size.lower()) or int(a.tiny_size.lower().split("x")[0]) % 4:
        p.error(f"--tiny-size must be HIDDENxLAYERS with HIDDEN a multiple of 4 (4 heads), got {a.tiny_size!r}")
    return a


def init_distributed():
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on GPU, gloo on CPU. Returns the device."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def tiny_byte_qwen(vocab: int, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1 << 16,
                      tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg)


def main(argv=None):
    a = parse_args(argv)
    import ahn_ops
    from ahn_ops.data import build_dataset, BYTE_VOCAB
    from ahn_ops.distill import DistillConfig, Distiller

    device = init_distributed()
    torch.manual_seed(a.seed)
    if a.tiny:
        hidden, layers = (int(x) for x in a.tiny_size.lower().split("x"))
        model = tiny_byte_qwen(BYTE_VOCAB, a.seed, layers=layers, hidden=hidden)
        tok = "bytes"
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32 if device.type == "cpu"
                                                     else torch.bfloat16)
        tok = a.tokenizer or a.model
    model.to(device)
    ahn_ops.patch_qwen(model, a.kind, window=a.window, sinks=a.sinks, fa_layer_ids=a.fa_layer_ids,
                       weights=a.init_ahn, backend=a.backend)
    ds = build_dataset(a.data, a.seq_len, synthetic=a.synthetic, tokenizer=None if tok == "bytes" else tok,
                       seed=a.seed)
    if getattr(ds, "vocab_size", 0) > model.config.vocab_size:
        raise SystemExit(f"dataset vocabulary {ds.vocab_size} > model vocabulary {model.config.vocab_size}")
    cfg = DistillConfig(kind=a.kind, window=a.window, sinks=a.sinks, fa_layer_ids=a.fa_layer_ids, seq_len=a.seq_len,
                        random_window=not a.fixed_window, min_window=a.min_window, max_window=a.max_window,
                        max_sinks=a.max_sinks, micro_batch=a.micro_batch, grad_accum=a.grad_accum, steps=a.steps,
                        lr=a.lr, min_lr_ratio=a.min_lr_ratio, warmup_steps=a.warmup, weight_decay=a.weight_decay,
                        grad_clip=a.grad_clip, kl_weight=a.kl_weight, ce_weight=a.ce_weight,
                        temperature=a.temperature, grad_ckpt=a.grad_ckpt, dtype=a.dtype, seed=a.seed,
                        save_every=a.save_every, out_dir=a.out, backend=a.backend, progress=not a.no_progress)
    tr = Distiller(model, ds, cfg)
    if a.resume:
        tr.load(a.resume)
    log = open(a.log_file, "a") if (a.log_file and tr.rank == 0) else None

    def on_step(rec):
        if log is not None:
            log.write(json.dumps(rec) + "\n")
            log.flush()

    hist = tr.train(callback=on_step)
    if tr.rank == 0 and hist:
        last = hist[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f} (kl {last['kl']:.4f}, ce {last['ce']:.4f}), "
              f"{sum(r['tokens'] for r in hist) / sum(r['seconds'] for r in hist):.0f} tokens/s over "
              f"{tr.world} rank(s)" + (f"; checkpoints in {a.out}" if a.out else ""))
    if log is not None:
        log.close()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
