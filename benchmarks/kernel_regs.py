"""Registers, spills and shared memory of every Triton kernel a forward + backward launches.

    python benchmarks/kernel_regs.py [--T 4096] [--W 1024] [--kinds gdn mamba2] [--D 128 64]
    python benchmarks/kernel_regs.py --offline [--arch 90] [--what all|prefill|decode]   # no GPU needed

Launch configs are the library's (prefill.CONFIG, backward.CONFIG). A kernel that spills
(ptxas moves registers to local memory) is usually latency-bound far from its roofline: this is the
first thing to read before tuning one (benchmarks/NOTES_backward.md).

The last column checks each kernel's pipelined loops (TTGIR, :func:`pipeline_hazards`): a loop that
keeps asynchronous ``tl.dot`` (wgmma) in flight across its prefetch copies must give every buffer it
copies into the same depth. A shallower buffer means the copy for a later iteration lands in the buffer
an in-flight ``tl.dot`` is still reading: a race on Hopper. `_mem_bwd`'s Mamba2 variant had it at 3
stages (triton 3.6 and 3.8 alike; benchmarks/NOTES_backward.md). The same column flags
ordered atomics (:func:`ordered_atomics`, "ATOMIC"): ``tl.atomic_add`` defaults to ``acq_rel``, which
sm_90a runs as a GPU-wide memory barrier, a round trip and an L1 invalidation per atomic; the
library's atomics only accumulate for later launches and say ``sem="relaxed"`` (the
backward 0.7 ms faster at T=32k), and loops the pipeliner left unpipelined ("UNPIPELINED",
:func:`unpipelined_loops`: a kernel launched with stages whose dot loop copies nothing ahead; a CTA barrier in
the loop does that). ``--offline`` exits 1 on any of them (the CPU CI runs it).

On a GPU it runs the op and reads what the driver reports. ``--offline`` needs no GPU: a stand-in
Triton driver targets ``sm_<arch>`` (90 -> sm_90a), every kernel launch of the library's launchers
(prefill forward and backward, the decode step's skinny projections) is turned into a compile-only
``warmup`` on CPU tensors, and Triton's bundled ``ptxas -v`` reports registers and spills of the PTX.
The figures are those of the installed Triton (the GPU machine may run another version: the H100 and
H200 runs used triton 3.6), so compare offline against offline.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch
import triton
from triton.runtime.jit import JITFunction

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

C.import_ahn_ops()
from bench_backward import make_inputs  # noqa: E402

SEEN: dict = {}
_run = JITFunction.run


def _loops(ttgir: str):
    """(line index, body lines) of every ``scf.for`` in a TTGIR, nested loops' lines included in their parent's."""
    lines = ttgir.splitlines()
    for i, line in enumerate(lines):
        if " scf.for " not in line:
            continue
        ind = len(line) - len(line.lstrip())
        body = []
        for l2 in lines[i + 1:]:
            if l2.strip().startswith("}") and len(l2) - len(l2.lstrip()) == ind:
                break
            body.append(l2)
        yield i, body


def pipeline_hazards(ttgir: str):
    """Pipelined loops of a kernel's TTGIR where an asynchronous ``tl.dot`` may read a buffer under a copy.

    A loop body that waits on wgmma with ``pendings > 0`` (dots left in flight) and later issues
    ``async_copy_global_to_local`` must copy into buffers of one depth (the pipeliner's num_stages);
    a shallower buffer (triton 3.6/3.8 give one to a tile that also feeds register code) is rewritten
    while the in-flight dot reads it. Returns a description per offending loop (empty: none).
    """
    depth = {m.group(1): int(m.group(2)) for m in
             re.finditer(r"(%[\w.#]+) = ttg\.local_alloc : \(\) -> !ttg\.memdesc<(\d+)x", ttgir)}
    found = []
    for i, body in _loops(ttgir):
        pend = [j for j, l2 in enumerate(body) if "warp_group_dot_wait" in l2
                and int(re.search(r"pendings = (\d+)", l2).group(1)) > 0]
        copy = [j for j, l2 in enumerate(body) if "async_copy_global_to_local" in l2]
        if not pend or not copy or max(copy) < min(pend):
            continue
        bufs = {b for l2 in body for b in re.findall(r"ttg\.memdesc_index (%[\w.#]+)\[", l2)}
        depths = sorted({depth[b] for b in bufs if b in depth})
        if len(depths) > 1:
            found.append(f"TTGIR line {i + 1}: dots in flight across copies into buffers of depths {depths}")
    return found


def unpipelined_loops(ttgir: str):
    """Loops of a kernel's TTGIR with a ``tl.dot`` and tensor loads but no asynchronous copy: the pipeliner left
    every tile of the loop a plain load, issued and waited on in the same iteration. A CTA barrier in the loop
    (``tl.debug_barrier``) does that: the state chain with ready counters had one, on triton 3.6 and 3.8 alike
    (benchmarks/NOTES_prefill.md). A kernel launched with num_stages > 1 that has one shows "UNPIPELINED" in the
    table (one stage is a choice, not flagged). Returns a description per such loop (empty: none)."""
    found = []
    for i, body in _loops(ttgir):
        dots = sum(1 for l2 in body if re.search(r"\b(ttng\.warp_group_dot|tt\.dot)\b", l2))
        loads = sum(1 for l2 in body if " tt.load " in l2 and re.search(r":\s*tensor<", l2))
        copies = sum(1 for l2 in body if "async_copy_global_to_local" in l2)
        if dots and loads and not copies:
            found.append(f"TTGIR line {i + 1}: {dots} dots, {loads} tensor loads, no asynchronous copy")
    return found


def ordered_atomics(ptx: str):
    """Global atomics of a kernel's PTX with acquire / release ordering (``tl.atomic_add``'s default
    ``sem="acq_rel"``), each one as written in the PTX (empty: all relaxed)."""
    return [t for t in re.findall(r"\batom(?:\.\w+)+", ptx)
            if {"acq_rel", "acquire", "release"} & set(t.split("."))]


# kernels whose acquire / release atomics carry data between programs running at the same time (ready counters
# of a state chain and the programs that wait for them): ordered by design, not flagged
ORDERED_BY_DESIGN = {"_state_kernel", "_state_epi_kernel"}


FLAGS = ("HAZARD", "ATOMIC", "UNPIPELINED")  # what makes --offline exit 1


def _hazard_cell(k, name=""):
    try:
        if pipeline_hazards(k.asm["ttgir"]):
            return "HAZARD"
        if name not in ORDERED_BY_DESIGN and ordered_atomics(k.asm["ptx"]):
            return "ATOMIC"
        # launched with stages to pipeline (num_stages > 1), yet a dot loop with none: flagged in the table
        staged = getattr(k.metadata, "num_stages", 1) > 1
        return "UNPIPELINED" if staged and unpipelined_loops(k.asm["ttgir"]) else "ok"
    except Exception:  # noqa: BLE001  (no TTGIR in this build)
        return "?"


def _spy(self, *args, **kwargs):
    k = _run(self, *args, **kwargs)
    try:
        if hasattr(k, "_init_handles"):
            k._init_handles()
        md = k.metadata
        key = (self.fn.__name__, getattr(md, "num_warps", None), getattr(md, "num_stages", None))
        SEEN[key] = (getattr(k, "n_regs", None), getattr(k, "n_spills", None), getattr(md, "shared", None),
                     _hazard_cell(k, self.fn.__name__))
    except Exception as e:  # noqa: BLE001
        SEEN[(self.fn.__name__, None, None)] = (None, None, f"{type(e).__name__}: {e}", "?")
    return k


JITFunction.run = _spy


def _ptxas_report(ptx: str, arch: int):
    """(registers, spill bytes stored + loaded, static shared bytes) of a PTX for sm_<arch> (``ptxas -v``)."""
    import subprocess
    import tempfile

    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-v", "--gpu-name", gpu, src, "-o", os.path.join(d, "k.o")],
                           capture_output=True, text=True)
    txt = r.stderr
    regs = re.search(r"Used (\d+) registers", txt)
    st = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", txt)
    smem = re.search(r"(\d+) bytes smem", txt)
    return (int(regs.group(1)) if regs else None,
            (int(st.group(1)) + int(st.group(2))) if st else None,
            int(smem.group(1)) if smem else 0)


def _offline_setup(arch: int):
    """A stand-in driver for ``sm_<arch>`` and compile-only launches (see the module docstring)."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime import driver

    class _Offline(CudaDriver):
        def __init__(self):  # no libcuda: nothing to load
            pass

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(_Offline())

    def _compile_only(self, *args, grid, warmup, **kwargs):
        k = _run(self, *args, grid=grid, warmup=True, **kwargs)
        md = k.metadata
        key = (self.fn.__name__, md.num_warps, md.num_stages)
        pipe = _hazard_cell(k, self.fn.__name__)
        if key not in SEEN:
            regs, spills, _ = _ptxas_report(k.asm["ptx"], arch)
            SEEN[key] = (regs, spills, md.shared, pipe)  # shared memory: dynamic, from the metadata
        elif pipe in FLAGS and SEEN[key][3] not in FLAGS:
            # another constexpr variant under the same (name, warps, stages)
            SEEN[key] = SEEN[key][:3] + (pipe,)
        return k

    JITFunction.run = _compile_only


def _table(title):
    print(f"\n== {title} (triton {triton.__version__})")
    print(f"  {'kernel':28s} {'warps':>5s} {'stages':>6s} {'regs':>5s} {'spills(B)':>9s} {'smem(B)':>8s} pipeline")
    for (name, nw, ns), (regs, spills, smem, pipe) in sorted(SEEN.items(), key=lambda kv: kv[0][0]):
        print(f"  {name:28s} {nw!s:>5s} {ns!s:>6s} {regs!s:>5s} {spills!s:>9s} {smem!s:>8s} {pipe}")
    return [f"{name} ({v[3]})" for (name, _, _), v in SEEN.items() if v[3] in FLAGS]


def offline(a):
    from ahn_ops.ops import decode_linear as dl
    from ahn_ops.ops.ahn_attention import backward as bw
    from ahn_ops.ops.ahn_attention import prefill as pf

    _offline_setup(a.arch)
    bad = []
    for kind in a.kinds if a.what in ("all", "prefill") else ():
        for D in a.D:
            SEEN.clear()
            inp = make_inputs(kind, 1, a.T, 8, 2, D, torch.bfloat16, 0, device="cpu")
            out, _, lse = pf.prefill_fwd(*inp, a.W, 64, kind)
            bw.prefill_bwd(torch.randn_like(out), None, *inp, out, lse, a.W, 64, kind)
            # the variants behind the cuDNN band (forward BAND_IN, backward without BAND): its outputs and
            # gradients stand in as zeros
            from ahn_ops.ops.ahn_attention import band_cudnn

            engine, band, band_bwd = pf._band_engine, pf._cudnn_band, band_cudnn.band_bwd
            pf._band_engine = lambda q, lens: True
            pf._cudnn_band = lambda qf, kf, vf, lens, w: (lambda: (
                qf.new_zeros(len(lens), max(lens), qf.shape[2], qf.shape[3]),
                qf.new_zeros(len(lens), qf.shape[2], max(lens), dtype=torch.float32), w, max(lens)))
            band_cudnn.band_bwd = lambda q, k, v, o, do, lse, w, out=None: tuple(
                torch.zeros_like(x) for x in (q, k, v))
            try:
                out, _, lse = pf.prefill_fwd(*inp, a.W, 64, kind)
                bw.prefill_bwd(torch.randn_like(out), None, *inp, out, lse, a.W, 64, kind)
            finally:
                pf._band_engine, pf._cudnn_band, band_cudnn.band_bwd = engine, band, band_bwd
            # the variants with ready counters: the state chain beside the sm_90a kernel (prefill's memory passes
            # with counters) and the backward's fused state chain + epilogue launch (backward.CONFIG["state_epi"])
            ready = torch.zeros(triton.cdiv(a.T, pf.BT) * inp[0].shape[2], dtype=torch.int32)  # [chunks * H]
            spy, se = pf.state_chain, bw.CONFIG["state_epi"]
            pf.state_chain = lambda *args, **kw: spy(*args[:16], ready, pf.CONFIG["sm90_state_bv"],
                                                     pf.CONFIG["sm90_state_stages"])
            bw.CONFIG["state_epi"] = True
            try:
                out, _, lse = pf.prefill_fwd(*inp, a.W, 64, kind)
                bw.prefill_bwd(torch.randn_like(out), None, *inp, out, lse, a.W, 64, kind)
            finally:
                pf.state_chain, bw.CONFIG["state_epi"] = spy, se
            bad += [f"{kind} D={D} {n}" for n in
                    _table(f"{kind} D={D} (T={a.T}, H=8/2, W={a.W}, S=64, bf16; offline sm_{a.arch})")]
    if a.what not in ("all", "decode"):
        return _verdict(bad)
    SEEN.clear()
    # the decode step's skinny projections at the Qwen2.5-3B shape (hidden 2048, intermediate 11008)
    dt = torch.bfloat16
    for B in (1, 2, 4):
        h, o, act = torch.zeros(B, 2048, dtype=dt), torch.zeros(B, 2048, dtype=dt), torch.zeros(B, 11008, dtype=dt)
        nw, w = torch.ones(2048, dtype=dt), torch.zeros(2048, 2048, dtype=dt)
        wkvg, cs = torch.zeros(560, 2048, dtype=dt), torch.zeros(B, 128, dtype=dt)
        wg, wd = torch.zeros(11008, 2048, dtype=dt), torch.zeros(2048, 11008, dtype=dt)
        dl.norm_qkvg(h, nw, 1e-6, w, None, wkvg, None, 256, cs, cs, 128)
        dl.linear_residual(o, w, None, h)
        dl.norm_gate_up(h, nw, 1e-6, wg, wg)
        dl.linear_residual(act, wd, None, h, role="down_proj")
    bad += _table(f"decode_linear, B = 1, 2, 4 (one row per warps/stages variant; offline sm_{a.arch})")
    return _verdict(bad)


def _verdict(bad):
    if bad:
        print("\nHAZARD: asynchronous tl.dot across a copy into a shallower buffer; ATOMIC: an acq_rel / acquire /"
              " release atomic (say sem=\"relaxed\"); UNPIPELINED: a loop with tl.dot and tile loads but no"
              f" asynchronous copy in a kernel launched with num_stages > 1. Found in: {', '.join(bad)}")
        return 1
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--W", type=int, default=1024, help="window (>= prefill.CONFIG's fwd_long window: 128-row forward)")
    ap.add_argument("--kinds", nargs="+", default=["gdn", "mamba2"])
    ap.add_argument("--D", nargs="+", type=int, default=[128, 64])
    ap.add_argument("--offline", action="store_true", help="no GPU: compile for --arch and read ptxas -v")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--what", choices=("all", "prefill", "decode"), default="all",
                    help="--offline: the prefill forward + backward kernels, the decode projections, or both")
    a = ap.parse_args()
    if a.offline:
        return offline(a)
    for kind in a.kinds:
        for D in a.D:
            SEEN.clear()
            inp = make_inputs(kind, 1, a.T, 8, 2, D, torch.bfloat16, 0)
            leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in inp]
            out = torch.ops.ahn.prefill_fwd(*leaves, a.W, 64, kind, None, None, False)[0]
            out.backward(torch.randn_like(out))
            torch.cuda.synchronize()
            _table(f"{kind} D={D} (T={a.T}, H=8/2, W={a.W}, S=64, bf16)")


if __name__ == "__main__":
    sys.exit(main())
