"""Self-distillation of AHN weights (issue 8), on one GPU, on several through torch.distributed, or on CPU.

The recipe of the original AHN training: the frozen base model with full causal attention is the
teacher; the same model with a sliding window + sinks + AHN memory is the student; only the AHN
parameters (``model.layers.{i}.ahn.fn.*``) train. The loss sits on the tokens the window has
lost context for (positions ``t >= W + S``, whose memory is not empty): ``kl_weight * KL(teacher ||
student) + ce_weight * CE(student, next token)``. Every step draws its own window ``W`` (``min_window ..
max_window``, ``T/8 < W < T``) and sink count ``S`` (``0 .. W/2``, ``W + S < T``); both are run-time
ints of ``ahn_attention``, so changing them recompiles nothing.

One copy of the weights: the teacher pass is the same patched module run inside
:func:`ahn_ops.models.full_attention` under ``torch.no_grad`` (the AHN layers call SDPA with
``is_causal=True`` on their own q/k/v), the student pass runs inside
:func:`ahn_ops.models.ahn_window` with autograd through ``ahn_attention`` (Triton kernels on GPU,
the chunkwise PyTorch path of ``chunked.py`` on CPU).

Multi-process (``torchrun``; gloo on CPU, NCCL on GPU): the model is wrapped in DDP with every frozen
tensor excluded from synchronisation, so only the AHN gradients are all-reduced; or, with
``shard="fsdp"`` (``--shard fsdp``), sharded by FSDP2 (``fully_shard`` per decoder layer), so that a rank
holds 1/N of the frozen base: for models whose copy does not fit one GPU. Checkpoints keep the published
AHN-only format either way (FSDP gathers the AHN weights whole; each rank saves its optimizer shard). Sample ``j`` of step
``s`` is dataset index ``s * global_batch + j`` whatever the split, and the loss of a micro-batch is
normalised by the token count of the *global* batch, so ``N`` ranks give the loss curve of one rank
with the same global batch (``micro_batch * world_size * grad_accum``).

Checkpoints (``out_dir/checkpoint-{step}/``): ``config.json`` + ``model.safetensors`` in the published
AHN-only format (``ahn_ops.models.save_ahn_weights``; loadable by ``patch_qwen(weights=dir)`` and
``ahn-merge``) and ``training_state.pt`` (optimizer, scheduler, RNG states of every rank, data
position, step) for an exact resume.

Command line: ``python -m ahn_ops.distill --help`` (:func:`main`; ``python/distill.py`` is the same CLI).

Example (CPU, tiny random model)::

    from ahn_ops.distill import DistillConfig, Distiller
    from ahn_ops.data import SyntheticRetrieval
    cfg = DistillConfig(kind="gdn", window=32, sinks=4, seq_len=128, min_window=16, max_window=64,
                        micro_batch=2, grad_accum=2, steps=20, lr=3e-3, out_dir="runs/x", save_every=10)
    hist = Distiller(model, SyntheticRetrieval(128, "passkey"), cfg).train()
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.utils.checkpoint
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .models.qwen2 import (_base_model, ahn_window, full_attention, load_ahn_weights, patch_qwen,
                           save_ahn_weights)

__all__ = ["DistillConfig", "Distiller", "prepare_student", "sample_window_sinks", "distill_loss",
           "official_init_", "TRAINING_STATE", "main"]

TRAINING_STATE = "training_state.pt"
TRAINING_SHARD = "optimizer-rank{rank}.pt"  # FSDP: each rank's optimizer state (its own shards)


@dataclasses.dataclass
class DistillConfig:
    """Hyper-parameters of :class:`Distiller` (defaults: the original recipe where it is known).

    Attributes:
        kind: ``"gdn"`` / ``"dn"`` / ``"mamba2"`` (used when the model is not patched yet).
        window, sinks: the nominal ``W``, ``S`` written to the checkpoint's ``config.json``
            (inference defaults); also the training values when ``random_window`` is False.
        fa_layer_ids: layers that keep full attention (no AHN).
        seq_len: tokens per sample ``T`` (informational: the trainer uses the dataset's length).
        random_window: draw ``W``, ``S`` per step. min_window, max_window: range of ``W`` (then clipped
            to ``T/8 < W < T``). max_sinks: cap on ``S`` (None: ``W // 2``).
        recipe: ``"ahn_ops"`` (the draws above) or ``"official"``, the original release's draws: a total
            window ``W + S`` from {32, 64, ..., 8192} with ``T/8 < W + S < T``, ``S`` from
            {0, 32, 64, 128, 512, 2048, 4096} capped at ``(W + S) / 2`` (its window counts the sinks);
            min/max_window and max_sinks do not apply.
        micro_batch, grad_accum: per-rank samples per forward, forwards per optimizer step.
        steps: optimizer steps in total (the schedule's length).
        lr, min_lr_ratio, warmup_steps: AdamW learning rate, cosine decay to ``lr * min_lr_ratio``
            after a linear warmup. weight_decay (matrices only), betas, grad_clip (global L2, 0: off).
        kl_weight, ce_weight, temperature: the loss.
        grad_ckpt: activation checkpointing per decoder layer (HF gradient checkpointing, non-reentrant).
        dtype: ``"auto"`` (bf16 on CUDA, fp32 on CPU), ``"bf16"`` or ``"fp32"``: frozen weights and
            activations; AHN parameters are fp32 master weights (autocast on CUDA).
        seed: window/sink draws and the RNG states. save_every: steps between checkpoints (0: only the
            final one, when ``out_dir`` is set). out_dir: where checkpoints go. backend: ``ahn_attention``'s.
        progress: tqdm bar on rank 0.
    """

    kind: str = "gdn"
    window: int = 1024
    sinks: int = 0
    fa_layer_ids: Optional[str] = None
    seq_len: int = 2048
    random_window: bool = True
    recipe: str = "ahn_ops"
    min_window: int = 32
    max_window: int = 8192
    max_sinks: Optional[int] = None
    micro_batch: int = 1
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.01
    betas: Tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    temperature: float = 1.0
    grad_ckpt: bool = False
    dtype: str = "auto"
    seed: int = 0
    save_every: int = 0
    out_dir: Optional[str] = None
    backend: str = "auto"
    progress: bool = True
    # multi-process only: "ddp" (every rank holds the whole model) or "fsdp" (FSDP2 ``fully_shard`` per
    # decoder layer: the frozen base and the AHN parameters sharded across ranks)
    shard: str = "ddp"

    def to_dict(self) -> Dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


# --------------------------------------------------------------------------------------
# model preparation, window draws, the loss
# --------------------------------------------------------------------------------------
def _is_ahn_param(name: str) -> bool:
    return ".ahn.fn." in name


def prepare_student(model: nn.Module, cfg: DistillConfig, device=None) -> List[Tuple[str, nn.Parameter]]:
    """Patch (if needed) and freeze: only the AHN parameters train, as fp32 master weights.

    The base weights are cast to the compute dtype and get ``requires_grad=False``; GDN's ``D``
    (present in the checkpoints, unused by the model) is frozen too, so that every trainable
    parameter receives a gradient (DDP needs no ``find_unused_parameters``).

    Returns:
        ``[(name, parameter)]`` of the trainable parameters, in a fixed order.
    """
    base = _base_model(model)
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    dtype = _compute_dtype(cfg, dev)
    if getattr(base, "_ahn_info", None) is None:
        patch_qwen(model, cfg.kind, window=cfg.window, sinks=cfg.sinks, fa_layer_ids=cfg.fa_layer_ids,
                   backend=cfg.backend)
    for n, p in model.named_parameters():
        if not _is_ahn_param(n):
            p.data = p.data.to(dtype)
    for b_name, buf in model.named_buffers():
        if buf.is_floating_point() and "inv_freq" not in b_name:
            buf.data = buf.data.to(dtype)
    trainable = []
    for n, p in model.named_parameters():
        train = _is_ahn_param(n) and not (base._ahn_info["kind"] == "gdn" and n.endswith(".ahn.fn.D"))
        if _is_ahn_param(n):
            p.data = p.data.float()
        p.requires_grad_(train)
        if train:
            trainable.append((n, p))
    if not trainable:
        raise ValueError("no AHN parameters to train (all layers in fa_layer_ids?)")
    return trainable


def _compute_dtype(cfg: DistillConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
            "float32": torch.float32}[cfg.dtype]


# the original release's training draws (recipe="official"): total windows (its W counts the sinks) and sinks
OFFICIAL_TOTAL_WINDOWS = tuple(2 ** i for i in range(5, 14))  # 32 .. 8192
OFFICIAL_SINKS = (0, 32, 64, 128, 512, 2048, 4096)


def official_init_(model: nn.Module) -> None:
    """The original release's initialisation of fresh AHN weights where it differs from ``patch_qwen``'s:
    Mamba2 ``dt_bias = 1`` and ``A_log = log(1 .. H)`` (GDN's ``A ~ U(0, 16)`` is ``patch_qwen``'s already)."""
    from .models.qwen2 import _ahn_params

    with torch.no_grad():
        for name, p in _ahn_params(model).items():
            if _base_model(model)._ahn_info["kind"] != "mamba2":
                return
            if name.endswith(".ahn.fn.dt_bias"):
                p.fill_(1.0)
            elif name.endswith(".ahn.fn.A_log"):
                p.copy_(torch.log(torch.arange(1, p.numel() + 1, dtype=torch.float32)).to(p))


def sample_window_sinks(cfg: DistillConfig, step: int, seq_len: int) -> Tuple[int, int]:
    """``(W, S)`` of optimizer step ``step``: a function of (seed, step) only, the same on every rank
    and after a resume. ``T/8 < W < T`` within ``[min_window, max_window]``; ``0 <= S <= W/2`` with
    ``W + S < T`` so that at least one token carries loss."""
    T = int(seq_len)
    if not cfg.random_window:
        W, S = int(cfg.window), int(cfg.sinks)
        if W + S >= T:
            raise ValueError(f"window + sinks = {W + S} must be < seq_len = {T} (no token beyond the window)")
        return W, S
    if cfg.recipe == "official":
        rng = random.Random(int(cfg.seed) * 1_000_003 + int(step) * 7 + 12345)
        totals = [w for w in OFFICIAL_TOTAL_WINDOWS if T / 8 < w < T]
        if not totals:
            raise ValueError(f"recipe='official': no total window in {OFFICIAL_TOTAL_WINDOWS} with T/8 < W+S < T "
                             f"for T={T}")
        total = rng.choice(totals)
        S = rng.choice([x for x in OFFICIAL_SINKS if x <= total // 2])
        return total - S, S
    if cfg.recipe != "ahn_ops":
        raise ValueError(f'DistillConfig.recipe must be "ahn_ops" or "official", got {cfg.recipe!r}')
    lo = max(int(cfg.min_window), T // 8 + 1, 1)
    hi = min(int(cfg.max_window), T - 1)
    if lo > hi:
        raise ValueError(f"no window in [{cfg.min_window}, {cfg.max_window}] with T/8 < W < T for T={T}")
    rng = random.Random(int(cfg.seed) * 1_000_003 + int(step) * 7 + 12345)
    W = rng.randint(lo, hi)
    s_hi = min(W // 2, T - W - 1, cfg.max_sinks if cfg.max_sinks is not None else W)
    S = rng.randint(0, max(s_hi, 0))
    return W, S


def distill_loss(model: nn.Module, input_ids: torch.Tensor, window: int, sinks: int, *,
                 student: Optional[nn.Module] = None, temperature: float = 1.0, with_ce: bool = True,
                 autocast_dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """Teacher (full attention, no grad) and student (``W``, ``S``, AHN, autograd) on one micro-batch.

    Only the positions ``t >= W + S`` get logits (``logits_to_keep``): the teacher and the student
    agree on the rest by construction, and a 150k vocabulary times T positions is the largest
    tensor of the step.

    Args:
        model: the patched model (the teacher pass calls it directly).
        input_ids: ``[B, T]`` long, on the model's device.
        window, sinks: this step's ``W``, ``S`` (``W + S < T``).
        student: the module to call for the student pass (the DDP wrapper), default ``model``.
    With activation checkpointing, call ``backward`` inside ``ahn_window(model, window, sinks)`` (the
    recomputation must see the same ``W``, ``S``); :class:`Distiller` does.
    Returns:
        dict of sums over the batch: ``kl_sum`` (differentiable), ``ce_sum`` (differentiable, or 0),
        ``n_kl`` = ``B * (T - W - S)``, ``n_ce`` = ``B * (T - W - S - 1)``.
    """
    B, T = input_ids.shape
    keep = T - window - sinks
    if keep < 1:
        raise ValueError(f"W + S = {window + sinks} leaves no token of T = {T} beyond the window")
    student = model if student is None else student
    ac = (torch.autocast(input_ids.device.type, dtype=autocast_dtype) if autocast_dtype is not None
          else contextlib.nullcontext())
    with torch.no_grad(), full_attention(model), ac:
        t_logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=keep).logits
    with ahn_window(model, window, sinks), ac:
        s_logits = student(input_ids=input_ids, use_cache=False, logits_to_keep=keep).logits
    tau = float(temperature)
    # labels of the kept positions: position p predicts token T - keep + p + 1 (none for the last)
    labels = F.pad(input_ids[:, T - keep + 1:], (0, 1), value=-100) if with_ce else None
    kl_sum, ce_sum = _kl_ce_sums(t_logits, s_logits, labels, tau)
    return dict(kl_sum=kl_sum, ce_sum=ce_sum, n_kl=B * keep, n_ce=B * (keep - 1))


def _kl_ce_piece(t_logits, s_logits, labels, tau: float):
    logp_t = F.log_softmax(t_logits.float() / tau, dim=-1)
    logp_s = F.log_softmax(s_logits.float() / tau, dim=-1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum() * (tau * tau)
    if labels is None:
        return kl, kl.new_zeros(())
    ce = F.cross_entropy(s_logits.float().reshape(-1, s_logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                         reduction="sum")
    return kl, ce


def _kl_ce_sums(t_logits, s_logits, labels, tau: float, chunk: int = 1024):
    """KL(teacher || student) and CE sums over ``[B, keep, V]`` logits, ``chunk`` positions at a time.

    Each piece runs under activation checkpointing, so its fp32 log-softmax copies live only while
    that piece is computed (forward and backward): with a 152k vocabulary at keep = 16k positions,
    the unchunked form held about 10 GB per fp32 copy; now only the bf16 logits stay saved.
    """
    keep = s_logits.shape[1]
    if keep <= chunk:
        return _kl_ce_piece(t_logits, s_logits, labels, tau)
    kl = ce = None
    for i in range(0, keep, chunk):
        sl = slice(i, i + chunk)
        k_i, c_i = torch.utils.checkpoint.checkpoint(
            _kl_ce_piece, t_logits[:, sl], s_logits[:, sl], None if labels is None else labels[:, sl], tau,
            use_reentrant=False)
        kl = k_i if kl is None else kl + k_i
        ce = c_i if ce is None else ce + c_i
    return kl, ce


def _cosine_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        prog = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))

    return f


def _rng_state() -> Dict:
    st = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: Dict) -> None:
    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# --------------------------------------------------------------------------------------
# FSDP2 (DistillConfig.shard = "fsdp")
# --------------------------------------------------------------------------------------
def _fully_shard(model: nn.Module, names: List[str]) -> List[Tuple[str, nn.Parameter]]:
    """FSDP2 over the default process group: one unit per decoder layer (the frozen base weights and the
    layer's AHN parameters sharded together), the root holds the embeddings, the final norm and the head.
    Returns the trainable parameters again (now DTensors), in the order of ``names``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # the mesh on the model's own device type: FSDP2's default mesh is the machine's accelerator, which would
    # move a CPU model (gloo ranks) onto a GPU that happens to be there
    mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    for layer in _base_model(model).layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    by_name = dict(model.named_parameters())
    return [(n, by_name[n]) for n in names]


def _ahn_local_params(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The AHN parameters under their checkpoint names, as they are (DTensors under FSDP)."""
    from .models.qwen2 import _ahn_params

    return _ahn_params(model)


def _load_sharded_ahn(model: nn.Module, path: Path) -> None:
    """AHN weights of an AHN-only checkpoint into FSDP-sharded parameters (every rank reads the file and
    keeps its own shard)."""
    from safetensors.torch import load_file
    from torch.distributed.tensor import distribute_tensor

    tensors = load_file(str(Path(path) / "model.safetensors"))
    params = _ahn_local_params(model)
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise KeyError(f"{path}: AHN weights missing: {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    with torch.no_grad():
        for k, p in params.items():
            full = tensors[k].to(dtype=p.dtype)
            p.copy_(distribute_tensor(full.to(p.device_mesh.device_type), p.device_mesh, p.placements))


def _grad_sq_sum(params: List[nn.Parameter]) -> torch.Tensor:
    """Sum of the squared gradients over every rank's shards (plain tensors: this rank's whole grads)."""
    tot = torch.zeros((), dtype=torch.float64)
    sharded = False
    for p in params:
        if p.grad is None:
            continue
        g = p.grad
        if hasattr(g, "to_local"):
            g, sharded = g.to_local(), True
        tot += (g.double() ** 2).sum().cpu()
    if sharded:
        dist.all_reduce(tot)
    return tot


# --------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------
class Distiller:
    """Self-distillation of a patched (or patchable) Qwen2 model's AHN parameters.

    Args:
        model: ``Qwen2ForCausalLM``, patched or not (then patched with ``cfg.kind/window/sinks``),
            already on its device. Inside ``torch.distributed`` (``dist.is_initialized()``), every rank
            builds the same model; rank 0's AHN weights are broadcast by DDP.
        dataset: indexable, ``dataset[i] -> LongTensor [seq_len]`` deterministic in ``i``
            (``ahn_ops.data``).
        cfg: :class:`DistillConfig`.

    ``train()`` runs up to ``cfg.steps`` and returns the history (one dict per step: ``step, loss, kl,
    ce, window, sinks, lr, grad_norm, tokens, seconds, tokens_per_s``, the loss and tokens global
    over ranks). ``save(path)`` / ``load(path)`` write and read a checkpoint.
    """

    def __init__(self, model: nn.Module, dataset, cfg: DistillConfig):
        self.model, self.dataset, self.cfg = model, dataset, cfg
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if cfg.shard not in ("ddp", "fsdp"):
            raise ValueError(f'DistillConfig.shard must be "ddp" or "fsdp", got {cfg.shard!r}')
        self.fsdp = self.distributed and cfg.shard == "fsdp"
        self.params = prepare_student(model, cfg)
        if self.fsdp:
            self.params = _fully_shard(model, [n for n, _ in self.params])
        self.device = next(model.parameters()).device
        self.compute_dtype = _compute_dtype(cfg, self.device)
        self.autocast_dtype = self.compute_dtype if (self.device.type == "cuda"
                                                     and self.compute_dtype != torch.float32) else None
        if cfg.grad_ckpt:  # per decoder layer, non-reentrant (frozen inputs need no requires_grad trick)
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        decay = [p for n, p in self.params if p.dim() >= 2]
        no_decay = [p for n, p in self.params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=tuple(cfg.betas), foreach=False)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _cosine_lambda(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        self.step = 0
        self.sample_pos = 0  # the next global dataset index
        self.global_batch = cfg.micro_batch * self.world * cfg.grad_accum
        self.student = model
        if self.distributed and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # frozen tensors stay out of DDP: no broadcast of the base weights at wrap time, no buckets
            ignore = [n for n, p in model.named_parameters() if not p.requires_grad]
            ignore += [n for n, _ in model.named_buffers()]
            DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
            # (all buffers are ignored above, so DDP has none to broadcast in forward either)
            self.student = DDP(model, device_ids=[self.device] if self.device.type == "cuda" else None)

    # ---------------------------------------------------------------- data
    def _micro_batch(self, micro: int) -> torch.Tensor:
        """Rank r's micro-batch m of this step: global indices ``pos + (m * world + r) * mb + i``."""
        mb = self.cfg.micro_batch
        start = self.sample_pos + (micro * self.world + self.rank) * mb
        return torch.stack([self.dataset[start + i] for i in range(mb)]).to(self.device)

    # ---------------------------------------------------------------- one step
    def train_step(self) -> Dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        batches = [self._micro_batch(m) for m in range(cfg.grad_accum)]
        T = int(batches[0].shape[1])
        W, S = sample_window_sinks(cfg, self.step, T)
        keep = T - W - S
        # global normalisers, known without communication (every sample has T tokens)
        n_kl = self.global_batch * keep
        n_ce = self.global_batch * max(keep - 1, 1)
        with_ce = cfg.ce_weight != 0
        sums = torch.zeros(2, dtype=torch.float64)
        self.optimizer.zero_grad(set_to_none=True)
        for m in range(cfg.grad_accum):
            ids = batches[m]
            if ids.shape[1] != T:
                raise ValueError(f"samples of {ids.shape[1]} and {T} tokens in one step")
            sync = (not self.distributed) or m == cfg.grad_accum - 1
            if self.fsdp:  # reduce-scatter the gradients on the last micro-batch only
                self.student.set_requires_gradient_sync(sync)
                ctx = contextlib.nullcontext()
            else:
                ctx = contextlib.nullcontext() if sync else self.student.no_sync()
            # backward inside ahn_window too: activation checkpointing re-runs the student's layers
            # during backward, and they must see this step's W/S, not the nominal ones
            with ctx, ahn_window(self.model, W, S):
                out = distill_loss(self.model, ids, W, S, student=self.student, temperature=cfg.temperature,
                                   with_ce=with_ce, autocast_dtype=self.autocast_dtype)
                loss = cfg.kl_weight * out["kl_sum"] / n_kl
                if with_ce:
                    loss = loss + cfg.ce_weight * out["ce_sum"] / n_ce
                # DDP / FSDP average gradients over ranks; the global normalisation wants their sum
                (loss * self.world).backward()
            sums += torch.stack([out["kl_sum"].detach().double().cpu(), out["ce_sum"].detach().double().cpu()])
        if self.distributed:
            dist.all_reduce(sums)
        params = [p for _, p in self.params]
        if cfg.grad_clip and cfg.grad_clip > 0:
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=False)
            gnorm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        else:
            gnorm = float(torch.sqrt(_grad_sq_sum(params)))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.sample_pos += self.global_batch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        kl, ce = float(sums[0]) / n_kl, float(sums[1]) / n_ce
        tokens = self.global_batch * T
        return dict(step=self.step, loss=cfg.kl_weight * kl + cfg.ce_weight * ce, kl=kl, ce=ce, window=W, sinks=S,
                    lr=lr, grad_norm=gnorm, tokens=tokens, seconds=dt, tokens_per_s=tokens / dt)

    def train(self, steps: Optional[int] = None, callback: Optional[Callable[[Dict], None]] = None) -> List[Dict]:
        """Run until ``self.step == steps`` (default ``cfg.steps``); checkpoints every ``cfg.save_every``
        steps and at the end into ``cfg.out_dir``. Returns this call's history."""
        cfg = self.cfg
        end = cfg.steps if steps is None else int(steps)
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=end, initial=self.step, desc="distill", dynamic_ncols=True)
        hist: List[Dict] = []
        while self.step < end:
            rec = self.train_step()
            hist.append(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", W=rec["window"], S=rec["sinks"],
                                tok_s=f"{rec['tokens_per_s']:.0f}")
            if callback is not None:
                callback(rec)
            if cfg.out_dir and ((cfg.save_every and self.step % cfg.save_every == 0) or self.step == end):
                self.save(Path(cfg.out_dir) / f"checkpoint-{self.step}")
        if bar is not None:
            bar.close()
        return hist

    # ---------------------------------------------------------------- checkpoints
    def save(self, path) -> Path:
        """AHN-only checkpoint (published format) + ``training_state.pt``; collective under torch.distributed
        (RNG states of every rank are gathered), written by rank 0."""
        path = Path(path)
        rng = _rng_state()
        if self.distributed:
            all_rng: List = [None] * self.world
            dist.all_gather_object(all_rng, rng)
        else:
            all_rng = [rng]
        # FSDP: the AHN weights gathered whole on every rank (a collective), written by rank 0; each rank's
        # optimizer state covers its own shards, so each rank writes its own file
        full = {k: v.full_tensor() for k, v in _ahn_local_params(self.model).items()} if self.fsdp else None
        if self.fsdp:
            path.mkdir(parents=True, exist_ok=True)
            shard_file = path / TRAINING_SHARD.format(rank=self.rank)
            torch.save(self.optimizer.state_dict(), str(shard_file) + ".tmp")
            os.replace(str(shard_file) + ".tmp", shard_file)
        if self.rank == 0:
            # the nominal W/S go to config.json (ahn_window restored them after the last step)
            save_ahn_weights(self.model, path, tensors=full)
            state = dict(step=self.step, sample_pos=self.sample_pos, global_batch=self.global_batch,
                         world_size=self.world, optimizer=None if self.fsdp else self.optimizer.state_dict(),
                         scheduler=self.scheduler.state_dict(), rng=all_rng, config=self.cfg.to_dict(),
                         shard=self.cfg.shard if self.distributed else "none")
            tmp = path / (TRAINING_STATE + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, path / TRAINING_STATE)
            with open(path / "trainer_state.json", "w") as f:
                json.dump(dict(step=self.step, sample_pos=self.sample_pos, world_size=self.world), f)
        if self.distributed:
            dist.barrier()
        return path

    def load(self, path) -> None:
        """Resume from a checkpoint directory: AHN weights, optimizer, scheduler, step, data position, RNG."""
        path = Path(path)
        state = torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=False)
        if self.fsdp:
            if state.get("shard") != "fsdp" or int(state["world_size"]) != self.world:
                raise ValueError(f"{path}: an FSDP resume needs a checkpoint written by FSDP on {self.world} ranks, "
                                 f"found shard={state.get('shard')!r} on {state['world_size']} ranks")
            _load_sharded_ahn(self.model, path)
            opt = torch.load(path / TRAINING_SHARD.format(rank=self.rank), map_location="cpu", weights_only=False)
            self.optimizer.load_state_dict(opt)
        else:
            if state["optimizer"] is None:
                raise ValueError(f"{path}: written by FSDP (per-rank optimizer shards); resume it with shard='fsdp'")
            load_ahn_weights(self.model, path)  # fp32 master weights, cast to the parameters' dtype
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.sample_pos = int(state["step"]), int(state["sample_pos"])
        rngs = state["rng"]
        _set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])
        if int(state.get("global_batch", self.global_batch)) != self.global_batch and self.rank == 0:
            import warnings

            warnings.warn(f"resuming with global batch {self.global_batch} (checkpoint: {state['global_batch']}): "
                          "the data position is kept, the loss curve will differ")


# --------------------------------------------------------------------------------------
# command line (python -m ahn_ops.distill; python/distill.py is a thin wrapper)
# --------------------------------------------------------------------------------------
CLI_DESCRIPTION = """Self-distil the AHN weights of a Qwen2.5 model (teacher: the same frozen model, full attention).

One GPU / CPU:
    python -m ahn_ops.distill --model Qwen/Qwen2.5-3B-Instruct --kind gdn --window 1024 --sinks 128 \\
        --data corpus/ --tokenizer Qwen/Qwen2.5-3B-Instruct --seq-len 16384 --steps 2000 \\
        --micro-batch 1 --grad-accum 8 --lr 1e-3 --warmup 100 --grad-ckpt --out runs/ahn-gdn-3b
Several GPUs (DDP over NCCL; gloo on CPU), same global batch = micro x ranks x accumulation:
    torchrun --nproc-per-node 4 -m ahn_ops.distill ... --grad-accum 2
Resume exactly (optimizer, scheduler, RNG, data position, step):
    python -m ahn_ops.distill ... --resume runs/ahn-gdn-3b/checkpoint-500
Tiny random model on a synthetic passkey task (CPU smoke test):
    python -m ahn_ops.distill --tiny --synthetic passkey --seq-len 128 --window 32 --steps 20 --out /tmp/ahn

Checkpoints land in ``--out/checkpoint-{step}``: ``config.json`` + ``model.safetensors`` (AHN-only,
published key names; ``ahn_ops.patch_qwen(model, weights=dir)`` and ``ahn-merge`` read them) and
``training_state.pt``. ``python python/distill.py`` takes the same flags.
"""


def parse_args(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    """The trainer's command-line flags (``--help`` lists them)."""
    p = argparse.ArgumentParser(prog=prog, description=CLI_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    g.add_argument("--recipe", default="ahn_ops", choices=["ahn_ops", "official"],
                   help="official: the original release's window/sink draws (W+S from 32..8192, S from "
                        "{0,32,64,128,512,2048,4096}) and its Mamba2 initialisation of fresh AHN weights")
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
    g.add_argument("--shard", default="ddp", choices=["ddp", "fsdp"],
                   help="several processes: ddp (a whole model per rank) or fsdp (FSDP2: the frozen base and the "
                        "AHN weights sharded across ranks, for models whose copy does not fit one GPU)")
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


def init_distributed() -> torch.device:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on GPU, gloo on CPU. Returns the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def tiny_byte_qwen(vocab: int, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2):
    """A tiny random ``Qwen2ForCausalLM`` (the ``--tiny`` model)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1 << 16,
                      tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = "python -m ahn_ops.distill") -> int:
    """The trainer's CLI: parse ``argv`` (default ``sys.argv[1:]``), build model + data, train, checkpoint."""
    a = parse_args(argv, prog=prog)
    from .data import BYTE_VOCAB, build_dataset

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
    patch_qwen(model, a.kind, window=a.window, sinks=a.sinks, fa_layer_ids=a.fa_layer_ids, weights=a.init_ahn,
               backend=a.backend)
    if a.recipe == "official" and a.init_ahn is None:
        official_init_(model)
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
                        save_every=a.save_every, out_dir=a.out, backend=a.backend, progress=not a.no_progress,
                        shard=a.shard, recipe=a.recipe)
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
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
