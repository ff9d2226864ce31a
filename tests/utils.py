"""Shared helpers for the tests: random AHN inputs and error metrics."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ahn_ops.cache import AHNLayerCache

REPO = Path(__file__).resolve().parents[1]


def setup_py():
    """The repository's setup.py as a module: loaded under another name than __main__, it defines its build
    helpers (nvcc, the CUTLASS headers, the pip CUDA folders, the torch requirement) and runs no setup()."""
    spec = importlib.util.spec_from_file_location("ahn_ops_setup_py", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_inputs(kind, B, T, H, HKV, D, dtype=torch.float32, device="cpu", seed=0, gate_scale=1.0):
    """Random inputs of ``ahn_attention`` (q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight).

    Fresh values for every seed; parameters near the published init so the memory is neither
    zero nor exploding (o_weight random, not zero, so the memory branch is visible).
    """
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device)

    q = r(B, T, H, D).to(dtype)
    k = r(B, T, HKV, D).to(dtype)
    v = r(B, T, HKV, D).to(dtype)
    a = None if kind == "dn" else r(B, T, H, scale=gate_scale).to(dtype)
    b = None if kind == "mamba2" else r(B, T, H, scale=gate_scale).to(dtype)
    z = r(B, T, H).to(dtype)
    A_log = None if kind == "dn" else torch.log(torch.rand(H, generator=g) * 15 + 1).to(device)
    dt_bias = None if kind == "dn" else r(H, scale=0.5)
    norm_weight = (1 + 0.1 * r(H * D if kind == "mamba2" else D))
    o_weight = r(H, D, D, scale=D ** -0.5)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32  # parameters stay fp32 otherwise
    A_log, dt_bias = (None if x is None else x.to(pdt) for x in (A_log, dt_bias))
    norm_weight, o_weight = norm_weight.to(pdt), o_weight.to(pdt)
    return q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def empty_layer_cache(kind, B, H, HKV, D, window, sinks, dtype=torch.float32, device="cpu") -> AHNLayerCache:
    z = dict(dtype=dtype, device=device)
    return AHNLayerCache(
        torch.zeros(B, sinks, HKV, D, **z), torch.zeros(B, sinks, HKV, D, **z),
        torch.zeros(B, window, HKV, D, **z), torch.zeros(B, window, HKV, D, **z),
        torch.zeros(B, window, 2, H, **z),
        torch.zeros(B, H, D, D, dtype=torch.float32, device=device),
        torch.zeros(B, dtype=torch.int64, device=device), window, sinks, kind)


def batch_slice(cache: AHNLayerCache, sl: slice) -> AHNLayerCache:
    """A view of some sequences of a layer cache (writes go through to the original)."""
    return AHNLayerCache(*(t[sl] for t in cache.tensors()), cache.window, cache.sinks, cache.kind)


def sel(x, sl):
    return None if x is None else x[:, sl]


def poison_unwritten(sink_k, sink_v, ring_k, ring_v, gates, pos, window, sinks):
    """NaN into the decode-cache rows that hold no token yet at positions ``pos`` (in place): a kernel
    that sums a row it should mask (P = 0 times NaN) then fails its test."""
    W, S = window, sinks
    for bi, P in enumerate(pos):
        sink_k[bi, min(S, P):] = float("nan")
        sink_v[bi, min(S, P):] = float("nan")
        filled = {(t - S) % W for t in range(max(S, P - W), P)}
        empty = [s for s in range(W) if s not in filled]
        for t in (ring_k, ring_v, gates):
            t[bi, empty] = float("nan")


def check_within_2x(name, out, ref32, lp, floor: float = 2e-3) -> None:
    """The flash-attention rule: ``out``'s max-abs error against the fp32 reference ``ref32`` is at most 2x
    that of the same PyTorch math in the low precision (``lp``) plus ``floor``; no NaN (unwritten element)."""
    assert not out.isnan().any(), f"{name}: NaN in output (unwritten element?)"
    e_k = (out.double() - ref32.double()).abs().max().item()
    e_lp = (lp.double() - ref32.double()).abs().max().item()
    print(f"{name}: kernel err {e_k:.3e}  low-precision torch err {e_lp:.3e}")
    assert e_k <= 2 * e_lp + floor, f"{name}: kernel err {e_k:.3e} > 2 x {e_lp:.3e} + {floor}"


# gradients of the fused prefill against the reference (tests/ops: backward, mamba2, deterministic)
GRAD_NAMES = ("q", "k", "v", "a", "b", "z", "A_log", "dt_bias", "norm_weight", "o_weight")


def grads_of(fn, inputs, dout):
    """Gradients of ``fn(leaves)`` for ``dout`` w.r.t. fresh leaf copies of ``inputs`` (None stays None; an
    input the output does not reach gets zeros)."""
    leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(leaves)
    out.backward(dout.to(out.dtype))
    return [None if x is None else (x.grad if x.grad is not None else torch.zeros_like(x)) for x in leaves]


def kernel_grads(inputs, dout, W, S, kind, cu, deterministic=False):
    """Gradients through ``torch.ops.ahn.prefill_fwd`` and its registered backward."""
    from ahn_ops.ops.ahn_attention import prefill  # noqa: F401  (registers ops + autograd)

    return grads_of(lambda x: torch.ops.ahn.prefill_fwd(*x, W, S, kind, cu, None, False, deterministic)[0],
                    inputs, dout)


def ref_grads(inputs, dout, W, S, kind, cu, dtype):
    """Gradients through the reference (``reference.ahn_attention_ref``) run in ``dtype``."""
    from ahn_ops.ops.ahn_attention import reference as ref

    return grads_of(lambda x: ref.ahn_attention_ref(*x, W, S, kind, cu, dtype=dtype), inputs, dout)


def grad_err(x, r) -> float:
    """Relative error, with an absolute floor for gradients that are 0 in exact arithmetic (T=1)."""
    if r.norm() < 1e-6:
        return x.double().abs().max().item()
    return rel_err(x, r)


def check_bf16_grad_rule(gk, gr, gt) -> None:
    """Every kernel gradient finite and within 2x (+1e-3) of the error of the same reference math in
    bf16 (gk, gr, gt: kernel, fp32 reference, bf16 reference gradients in GRAD_NAMES order)."""
    for n, a, r, t in zip(GRAD_NAMES, gk, gr, gt):
        if a is None:
            continue
        ek, et = grad_err(a, r), grad_err(t, r)
        print(f"{n}: kernel {ek:.2e}  torch-bf16 {et:.2e}")
        assert torch.isfinite(a).all() and ek <= 2 * et + 1e-3, n
