"""Shared pieces of the AHN benchmarks (bench_prefill/backward/decode/model, run_all).

- ``import_ahn_ops()``: import the package, stubbing the C++ extension when it is not built
  (the Triton ops do not need it);
- ``Cfg``: one run's settings (device, mode, sweep sizes, repetitions);
- ``measure_ceilings()``: the two device ceilings, measured in the same run: a large
  device-to-device copy (bytes read + written per second) and a large bf16 matmul (FLOP/s);
- ``bench_ms()``: median milliseconds (``triton.testing.do_bench`` on CUDA, a host clock over a
  few calls on the CPU), NaN when the callable raises;
- FLOP and byte formulas of every benchmark (each documented where it is defined);
- ``sliding_window_block_mask()``: the FlexAttention block mask of AHN's window + sinks;
- ``peer_status()``: which peers this machine has (FlexAttention, SDPA, fla, flash-attn);
- ``make_row()``: one result row with its FLOP/byte count and fraction of the device ceiling;
- ``configured()``: a benchmark setting applied to the library's ``CONFIG`` dicts for a block, then undone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
import statistics
import sys
import time
import types
from typing import Callable, Dict, List, Optional

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# Qwen2.5 attention shapes (H, HKV), D = 128
HEADS = {"3b": (16, 2), "7b": (28, 4), "14b": (40, 8)}
KINDS = ("gdn", "dn", "mamba2")
NAN = float("nan")


def import_ahn_ops(root: str = ROOT):
    """``import ahn_ops`` from the source tree ``root`` (default: this checkout); when the extension is missing,
    stub ``ahn_ops._ext`` (Triton ops still work). An ``ahn_ops`` from elsewhere is an error."""
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        import ahn_ops  # noqa: F401
    except ImportError as e:
        print(f"[bench] ahn_ops extension unavailable ({str(e).splitlines()[0][:80]}...), stubbing ahn_ops._ext")
        for m in [m for m in sys.modules if m.startswith("ahn_ops")]:
            del sys.modules[m]
        stub = types.ModuleType("ahn_ops._ext")
        stub.load_extension = lambda name=None: None
        stub.has_cuda_kernels = lambda: False
        stub.has_sm90_kernels = lambda: False
        sys.modules["ahn_ops._ext"] = stub
        import ahn_ops  # noqa: F401
    mod = sys.modules["ahn_ops"]
    if not os.path.realpath(mod.__file__).startswith(os.path.realpath(root) + os.sep):
        raise ImportError(f"ahn_ops came from {mod.__file__}, not from the tree {root}")
    return mod


# --------------------------------------------------------------------------------------
# settings of one run
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Cfg:
    device: str = "cuda"
    mode: str = "full"                 # "full" | "quick" | "cpu"
    dtype: torch.dtype = torch.bfloat16
    warmup_ms: float = 25.0            # do_bench arguments (milliseconds)
    rep_ms: float = 100.0
    cpu_reps: int = 1                  # host-clock calls per median on the CPU (after one warm-up)
    ceilings: Optional[Dict[str, float]] = None
    device_name: str = ""
    date: str = ""
    seed: int = 0

    @property
    def cpu(self) -> bool:
        return self.device == "cpu"

    @property
    def quick(self) -> bool:
        return self.mode == "quick"


def device_str(device: str = "cuda") -> str:
    if device == "cpu" or not torch.cuda.is_available():
        import platform

        return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    p = torch.cuda.get_device_properties(0)
    return f"{p.name}, {p.multi_processor_count} SMs"


def date_str() -> str:
    return datetime.date.today().isoformat()


def versions() -> str:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "absent"
    return f"torch {torch.__version__}, triton {tv}"


@contextlib.contextmanager
def configured(setting: dict, *configs: dict):
    """Within the block, each key of ``setting`` set in the first of ``configs`` that has it (e.g. the backward's
    ``CONFIG``, then prefill's); every dict restored afterwards, raised or not. A key none of them has is an error
    (a misspelt setting would otherwise time the defaults under its name)."""
    saved = [dict(c) for c in configs]
    try:
        for key, val in setting.items():
            home = next((c for c in configs if key in c), None)
            if home is None:
                raise KeyError(f"setting {key!r}: not a key of the CONFIG it is meant for")
            home[key] = val
        yield
    finally:
        for c, s in zip(configs, saved):
            c.clear()
            c.update(s)


def sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------
def bench_ms(fn: Callable, cfg: Cfg, warmup_ms: Optional[float] = None, rep_ms: Optional[float] = None,
             grad_to_none=None, errors: Optional[List[str]] = None) -> float:
    """Median milliseconds of ``fn()``; NaN (and the error appended to ``errors``) if it raises.

    CUDA: ``triton.testing.do_bench`` (device events, L2 flushed before each call, ``warmup``
    and ``rep`` in milliseconds, median). CPU: one warm-up call, then the median of
    ``cfg.cpu_reps`` host-clock timed calls (harness check only; nothing is asserted on it).
    """
    try:
        if cfg.cpu:
            fn()
            ts = []
            for _ in range(max(1, cfg.cpu_reps)):
                if grad_to_none:
                    for x in grad_to_none:
                        x.grad = None
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return 1e3 * statistics.median(ts)
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup_ms or cfg.warmup_ms, rep=rep_ms or cfg.rep_ms,
                                       grad_to_none=grad_to_none, return_mode="median")
    except Exception as e:  # noqa: BLE001  (a failing peer must not cost the whole run)
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if errors is not None:
            errors.append(msg)
        if not cfg.cpu:
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001
                pass
        return NAN


def measure_ceilings(cfg: Cfg) -> Dict[str, float]:
    """The device's two ceilings, measured now: copy GB/s (read + write) and bf16 matmul TFLOP/s.

    CUDA: a 2 GiB device-to-device copy and an 8192^3 bf16 matmul (random data, not zeros).
    CPU: 64 MiB and 512^3 fp32 (only so the harness has numbers to divide by).
    """
    dev = cfg.device
    if cfg.cpu:
        n, m, dt = 1 << 25, 512, torch.float32
    else:
        n, m, dt = 1 << 30, 8192, torch.bfloat16
    x = torch.empty(n, dtype=torch.int16, device=dev).random_()
    y = torch.empty_like(x)
    t = bench_ms(lambda: y.copy_(x), cfg, 20, 200)
    copy = 2 * 2 * n / (t * 1e-3) / 1e9
    del x, y
    a = torch.randn(m, m, device=dev, dtype=dt)
    b = torch.randn(m, m, device=dev, dtype=dt)
    t = bench_ms(lambda: a @ b, cfg, 20, 200)
    mm = 2 * m ** 3 / (t * 1e-3) / 1e12
    del a, b
    return {"copy_GBps": copy, "matmul_TFLOPs": mm}


# --------------------------------------------------------------------------------------
# FLOP and byte formulas
# --------------------------------------------------------------------------------------
def visible_keys(T: int, W: int, S: int) -> float:
    """sum_t |K(t)|, |K(t)| = min(t+1, W) + min(S, max(0, t-W+1)): keys each query of a prefill sees."""
    t = torch.arange(T, dtype=torch.float64)
    nk = torch.clamp(t + 1, max=W) + torch.clamp(t - W + 1, min=0).clamp(max=S)
    return nk.sum().item()


def window_flops(T: int, W: int, S: int, H: int, D: int) -> float:
    """Window attention forward: QK^T and PV, 4 D H per visible (query, key) pair."""
    return 4 * D * H * visible_keys(T, W, S)


def memory_flops(T: int, W: int, S: int, H: int, D: int, BT: int = 64, kind: str = "gdn") -> float:
    """Chunked memory forward per head and stream element in a chunk with a memory token.

    GDN/DN: 8 D^2 (v_new = u - w h, h update, q h, o_weight projection) + 10 BT D (K K^T, w, u,
    intra-chunk q k^T and its product with v_new); Mamba2: 6 D^2 + 4 BT D (no WY inverse, no w).
    The triangular solve is not counted.
    """
    first = (S + W) // BT * BT
    n = max(0, T - first)
    if kind == "mamba2":
        return H * n * (6 * D * D + 4 * BT * D)
    return H * n * (8 * D * D + 10 * BT * D)


def full_attn_flops(T: int, H: int, D: int) -> float:
    """Causal full attention forward (SDPA peer): 4 D H T (T+1) / 2."""
    return 4 * D * H * T * (T + 1) / 2


def prefill_bytes(B: int, T: int, H: int, HKV: int, D: int, elt: int = 2, kind: str = "gdn") -> float:
    """Floor of a prefill forward: q, k, v, out, a/b/z once each (bf16)."""
    gates = {"gdn": 3, "dn": 2, "mamba2": 2}[kind]
    return elt * B * T * (2 * H * D + 2 * HKV * D + gates * H)


def backward_flops(T: int, W: int, S: int, H: int, D: int, kind: str = "gdn") -> float:
    """Forward + backward: window 4 D H n forward + 14 D H n backward (dq 6, dk/dv 8; the forward
    stores lse, so no attention re-run); the memory branch about 3.75x its forward (30 D^2 + 20 BT D
    per element vs 8 D^2 + ...)."""
    n = visible_keys(T, W, S)
    return 18 * D * H * n + 4.75 * memory_flops(T, W, S, H, D, kind=kind)


def backward_bytes(B: int, T: int, H: int, HKV: int, D: int, elt: int = 2, kind: str = "gdn") -> float:
    """Forward + backward floor: the forward's bytes, then dout read, q/k/v/a/b/z read again,
    dq/dk/dv/da/db/dz written: about 3x the forward's."""
    return 3 * prefill_bytes(B, T, H, HKV, D, elt, kind)


def decode_bytes(B: int, W: int, S: int, H: int, HKV: int, D: int, T: Optional[int] = None, elt: int = 2) -> float:
    """One AHN decode layer-step: the cached window K/V (min(T, S+W) tokens) read once, the fp32
    state read and written; the new token, gates and output are < 0.1 MB and not counted."""
    n = S + W if T is None else min(T, S + W)
    return B * (n * HKV * D * 2 * elt + H * D * D * 4 * 2)


def decode_flops(B: int, W: int, S: int, H: int, D: int, T: Optional[int] = None) -> float:
    """4 n H D (QK and PV over the window) + ~6 H D^2 (state decay, update, readout)."""
    n = S + W if T is None else min(T, S + W)
    return B * (4.0 * n * H * D + 6.0 * H * D * D)


def full_decode_bytes(B: int, T: int, HKV: int, D: int, elt: int = 2) -> float:
    """Full-attention decode: the whole K/V cache of T tokens read once."""
    return B * T * HKV * D * 2 * elt


def ahn_cache_bytes(B: int, W: int, S: int, H: int, HKV: int, D: int, elt: int = 2) -> float:
    """AHN cache per layer: sinks + ring K/V, gate-input ring (W x 2 x H, K/V dtype), fp32 state (as AHNCache)."""
    return B * ((S + W) * HKV * D * 2 * elt + W * 2 * H * elt + H * D * D * 4)


def full_cache_bytes(B: int, T: int, HKV: int, D: int, elt: int = 2) -> float:
    """Full-attention KV cache per layer: K and V of T tokens."""
    return B * T * HKV * D * 2 * elt


# --------------------------------------------------------------------------------------
# FlexAttention block mask of the window + sinks
# --------------------------------------------------------------------------------------
def window_sink_mask_mod(W: int, S: int):
    def mask_mod(b, h, qi, ki):
        return (ki <= qi) & ((qi - ki < W) | (ki < S))

    return mask_mod


def compiled_flex(device: str = "cuda") -> Callable:
    """FlexAttention compiled for one static shape per call signature (the peer every benchmark times).

    ``dynamic=False``: after a second sequence length, dynamo's automatic dynamic shapes would otherwise
    recompile with a symbolic length, and the generated kernels of every later shape in the process run
    slower than the peer does on its own (a run of several shapes must not handicap it); the recompile
    limit is raised so that the shapes of a full sweep all stay compiled. The CPU gets the eager function.
    """
    from torch.nn.attention.flex_attention import flex_attention

    if device == "cpu":
        return flex_attention
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))
    return torch.compile(flex_attention, dynamic=False)


def sliding_window_block_mask(T: int, W: int, S: int, device: str, compile: bool = True, Tk: Optional[int] = None):
    """BlockMask of AHN attention (query t sees j <= t with t - j < W or j < S), built without a
    T x T mask in memory (create_block_mask compiled on CUDA)."""
    from torch.nn.attention.flex_attention import create_block_mask

    fn = torch.compile(create_block_mask) if (compile and device != "cpu") else create_block_mask
    kw = {} if device != "cpu" else {"BLOCK_SIZE": 32}
    return fn(window_sink_mask_mod(W, S), None, None, T, Tk or T, device=device, **kw)


# --------------------------------------------------------------------------------------
# peers
# --------------------------------------------------------------------------------------
_PEERS: Optional[Dict[str, str]] = None


def peer_status(device: str) -> Dict[str, str]:
    """{peer: ""} when usable on ``device``, else {peer: why not} (the note in the tables)."""
    global _PEERS
    if _PEERS is not None and _PEERS.get("_device") == device:
        return _PEERS
    st = {"_device": device, "sdpa": ""}
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        st["flex"] = ""
    except ImportError as e:
        st["flex"] = f"FlexAttention unavailable ({e})"
    try:
        import fla  # noqa: F401
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule  # noqa: F401
        from fla.ops.simple_gla import chunk_simple_gla  # noqa: F401

        st["fla"] = "" if device != "cpu" else "fla needs CUDA (skipped on the CPU)"
    except Exception as e:  # noqa: BLE001
        st["fla"] = f"fla not importable ({type(e).__name__}: {str(e)[:60]})"
    try:
        import flash_attn  # noqa: F401

        st["flash_attn"] = "" if device != "cpu" else "flash-attn needs CUDA (skipped on the CPU)"
    except Exception:  # noqa: BLE001
        st["flash_attn"] = "flash-attn not installed"
    _PEERS = st
    return st


# --------------------------------------------------------------------------------------
# result rows
# --------------------------------------------------------------------------------------
FIELDS = ("bench", "kind", "shape", "ms", "peer", "peer_ms", "speedup", "flops", "bytes", "tflops", "gbps",
          "frac_of_ceiling", "device", "date", "note", "ours_note")


def make_row(cfg: Cfg, bench: str, kind: str, shape: str, ms: float, flops: float, nbytes: float,
             peer: str = "", peer_ms: float = NAN, note: str = "", **extra) -> dict:
    """One row: our time ``ms`` (and a peer's, same shapes, same run), the work counted, the rates
    and ``frac_of_ceiling`` = floor / ms with floor = max(flops / matmul peak, bytes / copy bandwidth)."""
    c = cfg.ceilings or {}
    s = ms * 1e-3
    tflops = flops / s / 1e12 if flops and s > 0 else NAN
    gbps = nbytes / s / 1e9 if nbytes and s > 0 else NAN
    floor = max((flops or 0) / (c.get("matmul_TFLOPs", NAN) * 1e12), (nbytes or 0) / (c.get("copy_GBps", NAN) * 1e9))
    frac = floor / s if s > 0 else NAN
    r = dict(bench=bench, kind=kind, shape=shape, ms=ms, peer=peer, peer_ms=peer_ms,
             speedup=peer_ms / ms if ms and ms > 0 else NAN, flops=flops, bytes=nbytes, tflops=tflops, gbps=gbps,
             frac_of_ceiling=frac, device=cfg.device_name or device_str(cfg.device), date=cfg.date or date_str(),
             note=note, ours_note="")
    r.update(extra)
    return r


def peer_rows(cfg: Cfg, bench: str, kind: str, shape: str, ms: float, flops: float, nbytes: float,
              peers: Dict[str, float], notes: Dict[str, str], **extra) -> List[dict]:
    """One row per peer (measured, failed or skipped) plus ours alone when no peer was tried."""
    rows = []
    for name, t in peers.items():
        rows.append(make_row(cfg, bench, kind, shape, ms, flops, nbytes, name, t, notes.get(name, ""), **extra))
    for name, why in notes.items():
        if name not in peers:
            rows.append(make_row(cfg, bench, kind, shape, ms, flops, nbytes, name, NAN, why, **extra))
    if not rows:
        rows.append(make_row(cfg, bench, kind, shape, ms, flops, nbytes, **extra))
    return rows


def fmt(x, nd=4) -> str:
    """A table cell: ``nd`` significant digits, "-" for None/NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}g}"
    return str(x)
