"""The sm_90a kernels. The forward (``torch.ops.ahn.prefill_fwd_sm90``, ``prefill.CONFIG["band"] = "sm90"``): window
+ sinks attention with the memory readout and epilogue after the Triton memory passes, against the fp32 reference
(2x PyTorch's own low-precision error, as test_prefill.py) and the default engine; the backward through it; its
argument checks. The band backward (``torch.ops.ahn.band_bwd_sm90``, ``backward.CONFIG["band"] = "sm90"``): the op
against its math in torch, every gradient against the fp32 reference. GPU tests need an H100 / H200 and a build
with the CUTLASS headers; the CPU tests check the build switch, the engines' refusal off such a GPU and the
library's paths around both kernels with their math in torch standing in for them."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import warnings

import pytest
import torch

from ahn_ops import _ext
from ahn_ops.ops.ahn_attention import reference as ref

import ahn_ops

from ..utils import (GRAD_NAMES, batch_slice, check_bf16_grad_rule, check_within_2x, empty_layer_cache, grad_err,
                     kernel_grads, make_inputs, poison_unwritten, ref_grads, rel_err)


def _why_not() -> str:
    if not torch.cuda.is_available():
        return "needs CUDA"
    if torch.cuda.get_device_capability() != (9, 0):
        return "needs a compute capability 9.0 GPU"
    if not _ext.has_sm90_kernels():
        return "ahn_ops built without its sm_90a kernels"
    return ""


needs_sm90 = pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "ok")
# the Triton kernels around the sm_90a one (the stand-in tests): a GPU, or the CPU interpreter
needs_triton = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="needs CUDA or TRITON_INTERPRET=1")


def _prefill():
    from ahn_ops.ops.ahn_attention import prefill

    return prefill


@pytest.fixture
def engine(monkeypatch):
    def set_(name, variant=1):
        monkeypatch.setitem(_prefill().CONFIG, "band", name)
        monkeypatch.setitem(_prefill().CONFIG, "sm90_variant", variant)
    return set_


CASES = [
    # kind, B, T, W, S, G, dtype, variant
    pytest.param("gdn", 1, 1000, 300, 5, 8, torch.bfloat16, 1, id="gdn-T1000-W300-S5-G8"),
    pytest.param("dn", 2, 517, 1, 3, 4, torch.float16, 1, id="dn-B2-T517-W1-S3-fp16"),
    pytest.param("gdn", 1, 333, 4096, 7, 1, torch.bfloat16, 0, id="gdn-T333-W4096-S7-G1-v0"),
    pytest.param("gdn", 3, 700, 129, 0, 2, torch.bfloat16, 0, id="gdn-B3-T700-W129-S0-v0"),
    pytest.param("dn", 1, 4099, 1024, 128, 8, torch.float16, 1, id="dn-T4099-W1024-S128-fp16"),
    pytest.param("gdn", 1, 2053, 200, 300, 4, torch.bfloat16, 1, id="gdn-T2053-W200-S300"),
    pytest.param("gdn", 1, 64, 63, 0, 1, torch.bfloat16, 1, id="gdn-T64-W63-S0"),
    pytest.param("mamba2", 1, 1500, 256, 4, 4, torch.bfloat16, 1, id="mamba2-T1500-W256-S4"),
    pytest.param("mamba2", 2, 333, 64, 0, 8, torch.float16, 0, id="mamba2-B2-T333-W64-S0-fp16-v0"),
    pytest.param("gdn", 1, 2053, 200, 300, 4, torch.bfloat16, 2, id="gdn-T2053-W200-S300-v2"),
    pytest.param("dn", 2, 517, 1, 3, 4, torch.float16, 2, id="dn-B2-T517-W1-S3-fp16-v2"),
]
# varlen: packed sequences (lengths), kind, W, S, G, dtype, variant
VARLEN = [
    pytest.param([700, 1, 0, 333, 129], "gdn", 200, 4, 2, torch.bfloat16, 1, id="gdn-varlen5-W200-S4"),
    pytest.param([64, 2000, 65], "dn", 64, 0, 8, torch.float16, 0, id="dn-varlen3-W64-S0-v0"),
    pytest.param([900, 17, 400], "mamba2", 128, 3, 2, torch.bfloat16, 1, id="mamba2-varlen3-W128-S3"),
    pytest.param([700, 1, 0, 333, 129], "mamba2", 200, 4, 2, torch.float16, 2, id="mamba2-varlen5-W200-S4-v2"),
]


@needs_sm90
@pytest.mark.parametrize("kind,B,T,W,S,G,dtype,variant", CASES)
def test_sm90_matches_reference_and_default(kind, B, T, W, S, G, dtype, variant, engine):
    _check_sm90(kind, B, T, None, W, S, G, dtype, variant, engine)


@needs_sm90
@pytest.mark.parametrize("lens,kind,W,S,G,dtype,variant", VARLEN)
def test_sm90_varlen_matches_reference_and_default(lens, kind, W, S, G, dtype, variant, engine):
    _check_sm90(kind, 1, sum(lens), lens, W, S, G, dtype, variant, engine)


def _cu(lens, device):
    """int32 cu_seqlens of packed sequences of ``lens`` (None: no packing)."""
    return None if lens is None else torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)


def _check_sm90(kind, B, T, lens, W, S, G, dtype, variant, engine):
    P = _prefill()
    HKV = 2 if G < 8 else 1
    H, D = HKV * G, 128
    args = make_inputs(kind, B, T, H, HKV, D, dtype, device="cuda", seed=T + W + S)
    cu = _cu(lens, "cuda")
    engine("sm90", variant)
    out, ht, lse = P.prefill_fwd(*args, W, S, kind, cu_seqlens=cu, output_final_state=True)
    engine("no_sm90")
    out_a, ht_a, lse_a = P.prefill_fwd(*args, W, S, kind, cu_seqlens=cu, output_final_state=True)
    r = ref.ahn_attention_ref(*args, W, S, kind, cu_seqlens=cu)
    lp = ref.ahn_attention_ref(*args, W, S, kind, cu_seqlens=cu, dtype=dtype)
    check_within_2x(f"{kind} sm90", out, r, lp)
    check_within_2x(f"{kind} no_sm90", out_a, r, lp)
    # the backward's normaliser and the final state do not depend on the engine
    torch.testing.assert_close(lse, lse_a, rtol=0, atol=2e-3)
    torch.testing.assert_close(ht, ht_a, rtol=0, atol=0)


@needs_sm90
def test_sm90_gradients(engine):
    """The backward (its own kernels) reads the forward's saved lse: every gradient within the bf16 rule."""
    kind, T, W, S, H, HKV, D = "gdn", 777, 200, 6, 8, 2, 128
    args = make_inputs(kind, 1, T, H, HKV, D, torch.bfloat16, device="cuda", seed=3)
    dout = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)
    engine("sm90")
    gk = kernel_grads(args, dout, W, S, kind, None)
    gr = ref_grads([None if x is None else x.float() for x in args], dout, W, S, kind, None, torch.float32)
    gt = ref_grads(args, dout, W, S, kind, None, torch.bfloat16)
    check_bf16_grad_rule(gk, gr, gt)


@needs_sm90
def test_sm90_falls_back_where_it_does_not_apply(engine):
    """D = 64 takes the default engine under "sm90": same results."""
    P = _prefill()
    H, HKV, W, S = 4, 2, 100, 4
    cases = [("mamba2", 1, 300, None, None, 64), ("gdn", 1, 600, [250, 350], None, 64),
             ("dn", 2, 300, None, torch.randn(2, H, 64, 64, device="cuda") * 0.1, 64)]
    for kind, B, T, lens, h0, D in cases:
        args = make_inputs(kind, B, T, H, HKV, D, torch.bfloat16, device="cuda", seed=T)
        cu = None if lens is None else torch.tensor([0, lens[0], T], dtype=torch.int32, device="cuda")
        outs = []
        for name in ("sm90", "no_sm90"):
            engine(name)
            outs.append(P.prefill_fwd(*args, W, S, kind, cu_seqlens=cu, initial_state=h0)[0])
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@needs_sm90
def test_sm90_op_argument_errors():
    q = torch.randn(1, 200, 4, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 200, 2, 128, device="cuda", dtype=torch.bfloat16)
    op = torch.ops.ahn.prefill_fwd_sm90
    with pytest.raises(RuntimeError, match="head_dim must be 128"):
        op(q[..., :64].contiguous(), k[..., :64].contiguous(), k[..., :64].contiguous(), None, None, None, None,
           None, None, 10, 0, 1.0, 1)
    with pytest.raises(RuntimeError, match="window must be >= 1"):
        op(q, k, k, None, None, None, None, None, None, 0, 0, 1.0, 1)
    with pytest.raises(RuntimeError, match="v must be"):
        op(q, k, k[:, :100].contiguous(), None, None, None, None, None, None, 10, 0, 1.0, 1)
    with pytest.raises(RuntimeError, match="all together or not at all"):
        op(q, k, k, q, None, None, None, None, None, 10, 0, 1.0, 1)
    with pytest.raises(RuntimeError, match="k must be contiguous"):
        op(q, k.transpose(1, 2).contiguous().transpose(1, 2), k, None, None, None, None, None, None, 10, 0, 1.0, 1)
    # the attention alone against the fp32 reference of the window + sinks softmax
    o, lse = op(q, k, k, None, None, None, None, None, None, 50, 3, 1.0, 1)
    ro, rlse = ref.window_attention_ref(q, k, k, 50, 3, return_lse=True)
    torch.testing.assert_close(o.float(), ro, rtol=0, atol=2e-2)
    torch.testing.assert_close(lse, rlse, rtol=0, atol=1e-3)
    # varlen: its arguments, then each packed sequence against the reference on its own rows
    none6 = (None,) * 6
    cu = torch.tensor([0, 77, 77, 200], dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="cu_seqlens must be a contiguous int32"):
        op(q, k, k, *none6, 50, 3, 1.0, 1, cu.long(), 123)
    with pytest.raises(RuntimeError, match="max_seqlen must be in"):
        op(q, k, k, *none6, 50, 3, 1.0, 1, cu, 0)
    with pytest.raises(RuntimeError, match="with cu_seqlens, q must be"):
        op(q.expand(2, -1, -1, -1).contiguous(), k.expand(2, -1, -1, -1).contiguous(),
           k.expand(2, -1, -1, -1).contiguous(), *none6, 50, 3, 1.0, 1, cu, 123)
    with pytest.raises(RuntimeError, match="chunk_start comes with, and only with"):  # (the memory's table)
        op(q, k, k, *none6, 50, 3, 1.0, 1, cu, 123, chunk_start=torch.zeros(3, dtype=torch.int32, device="cuda"))
    o, lse = op(q, k, k, *none6, 50, 3, 1.0, 1, cu, 123)
    for s0, s1 in ((0, 77), (77, 200)):
        ro, rlse = ref.window_attention_ref(q[:, s0:s1], k[:, s0:s1], k[:, s0:s1], 50, 3, return_lse=True)
        torch.testing.assert_close(o[:, s0:s1].float(), ro, rtol=0, atol=2e-2)
        torch.testing.assert_close(lse[..., s0:s1], rlse, rtol=0, atol=1e-3)


def test_sm90_build_switch_reported():
    # the extension says whether it carries the sm_90a kernels (the op's schema is declared either way): with
    # the CUDA kernels built for sm_90a and the CUTLASS headers installed (make setup installs them) it must
    import importlib.util

    try:
        has = _ext.has_sm90_kernels()
    except ImportError:
        pytest.skip("ahn_ops._C not built")
    assert hasattr(torch.ops.ahn, "prefill_fwd_sm90") and hasattr(torch.ops.ahn, "band_bwd_sm90")
    archs = _ext.load_extension().CUDA_ARCHS.split(",")
    if has:
        assert _ext.has_cuda_kernels() and "90a" in archs
    elif _ext.has_cuda_kernels() and "90a" in archs and importlib.util.find_spec("cutlass_library") is not None:
        pytest.fail("the CUTLASS headers are installed and sm_90a is a target, but the sm_90a kernels were not "
                    "built (setup.py: 'ahn_ops: sm_90a kernels ...' says why)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal off a CUDA device")
def test_sm90_engine_refuses_off_a_hopper_gpu(monkeypatch):
    P = _prefill()
    monkeypatch.setitem(P.CONFIG, "band", "sm90")
    args = make_inputs("gdn", 1, 40, 2, 1, 128, torch.bfloat16, device="cpu", seed=1)
    with pytest.raises(RuntimeError, match='CONFIG\\["band"\\] = "sm90" needs a compute capability 9.0 GPU'):
        P.prefill_fwd(*args, 8, 2, "gdn")  # refused before any kernel runs


@needs_triton
def test_auto_takes_the_sm90_kernel_where_it_runs(monkeypatch):
    # "auto" asks _sm90_available (device and build, once per device) and then screens the call as "sm90" does;
    # "no_sm90" never takes it; off a compute capability 9.0 GPU (or without the kernels) "auto" runs the other
    # engines quietly where "sm90" raises
    P = _prefill()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    calls = _stand_in(monkeypatch, dev)
    args = make_inputs("gdn", 1, 150, 4, 2, 128, torch.bfloat16, device=dev, seed=2)
    monkeypatch.setitem(P.CONFIG, "band", "no_sm90")
    want = P.prefill_fwd(*args, 40, 3, "gdn")[0]
    assert not calls
    monkeypatch.setitem(P.CONFIG, "band", "auto")
    key = str(args[0].device)
    monkeypatch.setattr(P, "_SM90_AVAILABLE", {key: True})
    P.prefill_fwd(*args, 40, 3, "gdn")
    assert len(calls) == 1
    monkeypatch.setattr(P, "_SM90_AVAILABLE", {})
    monkeypatch.setattr(P, "_sm90_missing", lambda device: "device")
    out = P.prefill_fwd(*args, 40, 3, "gdn")[0]
    assert len(calls) == 1 and not P._sm90_available(args[0].device)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    monkeypatch.setitem(P.CONFIG, "band", "bogus")
    with pytest.raises(ValueError, match='AHN_PREFILL_ENGINE or prefill.CONFIG\\["band"\\]\\) must be one of'):
        P.prefill_fwd(*args, 40, 3, "gdn")


def test_auto_warns_once_on_a_hopper_gpu_without_the_kernels(monkeypatch):
    # the capability and the build faked: compute capability 9.0, the extension without its sm_90a kernels
    P = _prefill()
    monkeypatch.setattr(P, "_SM90_AVAILABLE", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(_ext, "has_sm90_kernels", lambda: False)
    dev = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match="built without its sm_90a kernels"):
        assert not P._sm90_available(dev)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not P._sm90_available(dev)  # cached: no second warning
    # another GPU (not 9.0) takes the other engines without a word
    monkeypatch.setattr(P, "_SM90_AVAILABLE", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not P._sm90_available(dev)


@needs_triton
def test_overlap_setting_is_checked(monkeypatch):
    # prefill.CONFIG["sm90_overlap"] takes "prefill", "all" or "off"; anything else is refused by name
    P = _prefill()
    monkeypatch.setitem(P.CONFIG, "sm90_overlap", True)
    args = make_inputs("gdn", 1, 8, 2, 1, 64, torch.float32, device="cpu", seed=0)
    with pytest.raises(ValueError, match='CONFIG\\["sm90_overlap"\\] must be "prefill", "all" or "off", got True'):
        P.prefill_fwd(*args, 4, 1, "gdn")


def test_prefill_engine_environment_switch():
    # AHN_PREFILL_ENGINE sets prefill.CONFIG["band"] at import; a name it does not know is refused on the first
    # prefill, naming the variable and the engines
    # on a GPU machine the prefill runs there (its triton's interpreter may not be the CPU suite's)
    dev, dt = ("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32")
    code = ("import torch; from ahn_ops.ops.ahn_attention import prefill as P; print(P.CONFIG['band']); "
            "from tests.utils import make_inputs; "
            f"P.prefill_fwd(*make_inputs('gdn', 1, 8, 2, 1, 64, torch.{dt}, device='{dev}', seed=0), 4, 1, 'gdn')")
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    for value, ok in (("no_sm90", True), ("fastest", False)):
        env = dict(os.environ, AHN_PREFILL_ENGINE=value)
        if dev == "cpu":
            env["TRITON_INTERPRET"] = "1"
        p = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                           timeout=300)
        assert p.stdout.splitlines()[:1] == [value], p.stdout + p.stderr[-2000:]
        assert (p.returncode == 0) == ok, p.stderr[-2000:]
        if not ok:
            assert "AHN_PREFILL_ENGINE or prefill.CONFIG" in p.stderr and "'no_sm90'" in p.stderr, p.stderr[-2000:]


def _torch_sm90(q, k, v, v_new, hs, o_weight, gc, z, nw, window, sinks, mem_scale, variant, cu_seqlens=None,
                max_seqlen=0, pos=None, sink_k=None, sink_v=None, initial_state=False, yp=None, ss=None):
    """The math of the sm_90a kernel in fp32 torch, with its arguments and outputs: window + sinks softmax
    (out, natural-log lse [B, H, T]); per chunk of 64 rows the memory readout from the memory passes' buffers
    (hs[c] before the chunk, v_new, the in-chunk cumulative log-decays gc), the keys of tokens t - W l2-normed,
    then RMSNorm, swish(z), norm weight and the head's projection. Sequences: the batch rows, or (cu_seqlens)
    packed along the one batch row, each one's chunks after the earlier ones' in hs; or (pos) the cache path:
    queries at positions pos[b] + t, keys from each sequence's stream (W ring-tail rows, then the new tokens)
    and the sink buffer. Mamba2 (yp, ss given): o the window's output alone, yp and ss written."""
    B, T, H, D = q.shape
    W, S = window, sinks
    if cu_seqlens is not None:
        cs = cu_seqlens.tolist()
        seqs = [(0, s, e - s) for s, e in zip(cs[:-1], cs[1:])]  # (batch row, first row, length)
        assert max_seqlen == max(n for _, _, n in seqs)
    else:
        seqs = [(b, 0, T) for b in range(B)]
    out = torch.zeros(B, T, H, D)
    lse = torch.zeros(B, H, T)
    chunk0 = 0
    for n_i, (b, s0, n) in enumerate(seqs):
        r = slice(s0, s0 + n)
        t = torch.arange(n)
        if pos is None:  # keys: the sequence's own rows; the memory key of query t is key t - W
            P, kk, vv, kpos = 0, k[b, r], v[b, r], t
            km = torch.zeros_like(kk)
            km[W:] = kk[:max(n - W, 0)]
        else:  # keys: the sinks, then the stream (positions P - W ..); the memory key of query t: stream row t
            P = int(pos[b])
            st = slice(b * (W + n), (b + 1) * (W + n))
            kk, vv = torch.cat([sink_k[b], k[0, st]]), torch.cat([sink_v[b], v[0, st]])
            kpos = torch.cat([torch.arange(S), P - W + torch.arange(W + n)])
            km = k[0, st][:n]
        qp = P + t
        in_win = (kpos[None] <= qp[:, None]) & (kpos[None] > qp[:, None] - W) & (kpos[None] >= 0)
        sink = (kpos[None] < S) & (kpos[None] <= qp[:, None] - W)
        if pos is not None:  # the sink buffer's rows: the sinks outside the window; the stream's: the window
            from_buf = (torch.arange(len(kpos)) < S)[None]
            sink, in_win = sink & from_buf, in_win & ~from_buf
        o1, l1 = _softmax_rows(q[b, r], kk, vv, in_win | sink)
        if v_new is not None and n:
            active = (qp - W) >= S
            y, x2 = _memory_rows(q[b, r], km, active, v_new[b, r], hs[chunk0:], o_weight, gc[b, r], z[b, r], nw,
                                 mem_scale, initial_state, yp is not None)
            if yp is None:
                o1 = o1 + y
            else:
                yp[b, r], ss[b, r] = y.to(yp.dtype), x2
        out[b, r], lse[b, :, r] = o1, l1
        chunk0 += (n + 63) // 64
    return out.to(q.dtype).contiguous(), lse.contiguous()


def _softmax_rows(q, k, v, allowed):
    # q [T, H, D], k, v [N, HKV, D], allowed [T, N]: fp32 softmax attention, scale D^-0.5; o [T, H, D], lse [H, T]
    G = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(G, 1), v.float().repeat_interleave(G, 1)
    sc = torch.einsum("thd,nhd->htn", q.float(), kf) * q.shape[-1] ** -0.5
    sc = sc.masked_fill(~allowed[None], float("-inf"))
    lse = torch.logsumexp(sc, -1)
    return torch.einsum("htn,nhd->thd", torch.exp(sc - lse[..., None]), vf), lse


def _memory_rows(q, km, active, v_new, hs, o_weight, gc, z, nw, mem_scale, initial_state, mamba2):
    # the memory readout and epilogue of one sequence's rows q [T, H, D] (memory keys km [T, HKV, D], active
    # [T]); chunk c reads hs[c]. (y [T, H, D], Mamba2's sum of squares [T, H]); y is Mamba2's yp
    T, H, D = q.shape
    qf, kf = q.float(), km.float().repeat_interleave(H // km.shape[1], 1)

    def inv_norm(x):
        x2 = (x * x).sum(-1, keepdim=True)
        return 1 / x2.sqrt().clamp_min(1e-12) if mamba2 else torch.rsqrt(x2 + 1e-6)

    qn = qf * inv_norm(qf) * mem_scale
    kn = kf * inv_norm(kf) * active.float()[:, None, None]
    y = torch.zeros(T, H, D)
    x2 = torch.zeros(T, H)
    for c in range((T + 63) // 64):
        r0, r1 = c * 64, min(c * 64 + 64, T)
        if not initial_state and not bool(active[r1 - 1]):
            continue
        g = gc[r0:r1].float().transpose(0, 1)  # [H, n]
        qc, kc = qn[r0:r1].transpose(0, 1), kn[r0:r1].transpose(0, 1)  # [H, n, D]
        pair = torch.tril((qc @ kc.transpose(1, 2)) * torch.exp(g[:, :, None] - g[:, None, :]))
        mo = (qc * torch.exp(g)[:, :, None]) @ hs[c].float() + pair @ v_new[r0:r1].float().transpose(0, 1)
        zc = z[r0:r1].float().transpose(0, 1)[:, :, None]
        if mamba2:
            x = mo * zc * torch.sigmoid(zc)
            x2[r0:r1] = (x * x).sum(-1).transpose(0, 1)
            uo = x * nw.float().view(H, 1, D)
        else:
            uo = mo * torch.rsqrt((mo * mo).mean(-1, keepdim=True) + 1e-5) * zc * torch.sigmoid(zc) * nw.float()
        y[r0:r1] = (uo @ o_weight.float()).transpose(0, 1)
    return y, x2


def _stand_in(monkeypatch, dev):
    """prefill's "sm90" engine with ``_torch_sm90`` standing in for the op (on CPU copies; yp and ss, which
    the op writes, written back); returns the list its calls' arguments go to."""
    P = _prefill()
    monkeypatch.setitem(P.CONFIG, "band", "sm90")
    monkeypatch.setattr(P, "_sm90_check_device", lambda device: None)
    calls = []

    def stand_in(*args, chunk_start=None, rows_outer=None):
        # the CTAs' order follows the memory passes beside the kernel (off here): head by head
        assert rows_outer is False, rows_outer
        # packed sequences: each one's first chunk in hs, the running sum of the earlier ones' ceil(T / 64)
        if args[13] is not None:
            lens = (args[13][1:] - args[13][:-1]).tolist()
            want = [0, *itertools.accumulate(-(-n // 64) for n in lens)][:-1]
            assert chunk_start is not None and chunk_start.tolist() == want, (chunk_start, want)
        else:
            assert chunk_start is None
        calls.append(args)
        cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
        out = _torch_sm90(*cpu)
        for i in (19, 20):  # yp, ss
            if len(args) > i and args[i] is not None:
                args[i].copy_(cpu[i])
        return tuple(x.to(dev) for x in out)

    monkeypatch.setattr(P, "_sm90_fwd", stand_in)
    return calls


@needs_triton
@pytest.mark.parametrize("kind,B,T,W,S,G,lens", [
    pytest.param("gdn", 1, 300, 70, 5, 2, None, id="gdn-T300-W70-S5"),
    pytest.param("dn", 2, 200, 1, 3, 1, None, id="dn-B2-T200-W1-S3"),
    pytest.param("gdn", 1, 150, 40, 0, 4, None, id="gdn-T150-W40-S0"),
    pytest.param("gdn", 1, 330, 30, 2, 2, [130, 0, 1, 199], id="gdn-varlen-130-0-1-199"),
    pytest.param("mamba2", 1, 300, 70, 5, 2, None, id="mamba2-T300-W70-S5"),
    pytest.param("mamba2", 1, 330, 30, 2, 2, [130, 0, 1, 199], id="mamba2-varlen-130-0-1-199"),
])
def test_sm90_path_with_a_torch_stand_in(kind, B, T, W, S, G, lens, monkeypatch):
    # prefill_fwd's "sm90" path (buffers, views, the lse's conversion, the final state) with the kernel's math
    # in torch standing in for it, on the memory passes' real buffers: against the fp32 reference
    P = _prefill()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    calls = _stand_in(monkeypatch, dev)
    HKV = 2 if G < 4 else 1
    H, D = HKV * G, 128
    args = make_inputs(kind, B, T, H, HKV, D, torch.bfloat16, device=dev, seed=T + W)
    cu = _cu(lens, dev)
    out, ht, lse = P.prefill_fwd(*args, W, S, kind, cu_seqlens=cu, output_final_state=True)
    assert len(calls) == 1
    # varlen goes to the kernel packed, with its int32 cu_seqlens and longest length
    assert (calls[0][13] is None) == (lens is None) and calls[0][14] == max(lens or [T])
    r, _, _, st = ref.ahn_attention_ref(*args, W, S, kind, cu_seqlens=cu, return_parts=True)
    lp = ref.ahn_attention_ref(*args, W, S, kind, cu_seqlens=cu, dtype=torch.bfloat16)
    check_within_2x(f"{kind} sm90 stand-in", out, r, lp)
    torch.testing.assert_close(ht.float(), st.float(), rtol=2e-2, atol=2e-2)
    # the saved normaliser is the default engine's: log2 domain, [B, T, H]
    monkeypatch.setitem(P.CONFIG, "band", "no_sm90")
    _, _, lse_a = P.prefill_fwd(*args, W, S, kind, cu_seqlens=cu)
    torch.testing.assert_close(lse, lse_a, rtol=0, atol=2e-3)


@needs_triton
def test_sm90_path_screens_its_inputs(monkeypatch):
    # a read gate z in another dtype than q takes the default engine (the kernel reads z in q's dtype); a
    # window past the longest sequence reaches the kernel as that length (same band, no memory key, no int32
    # overflow in the kernel's rows); more than 65535 sequences for the backward take cuDNN / Triton
    P = _prefill()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    calls = _stand_in(monkeypatch, dev)
    H, HKV, D, T, S = 4, 2, 128, 150, 3
    args = list(make_inputs("gdn", 1, T, H, HKV, D, torch.bfloat16, device=dev, seed=5))
    z32 = args[5].float()
    out, _, _ = P.prefill_fwd(*args[:5], z32, *args[6:], 40, S, "gdn")
    assert not calls
    monkeypatch.setitem(P.CONFIG, "band", "no_sm90")
    torch.testing.assert_close(out, P.prefill_fwd(*args[:5], z32, *args[6:], 40, S, "gdn")[0], rtol=0, atol=0)
    monkeypatch.setitem(P.CONFIG, "band", "sm90")
    W = 2 ** 31 - 1
    out, _, _ = P.prefill_fwd(*args, W, S, "gdn")
    assert len(calls) == 1 and calls[0][9] == T
    r = ref.ahn_attention_ref(*args, W, S, "gdn")
    lp = ref.ahn_attention_ref(*args, W, S, "gdn", dtype=torch.bfloat16)
    check_within_2x("gdn sm90 stand-in, W past T", out, r, lp)
    Bw = _backward()
    monkeypatch.setitem(Bw.CONFIG, "band", "sm90")
    q = args[0]
    assert Bw._sm90_band(q, 65535) and not Bw._sm90_band(q, 65536)


def _cache_call(kind, W, S, T, before, G, dtype, dev):
    """One cache-path call (``ahn_attention(cache=...)``, the kernel backend) on sequences brought to the
    positions ``before`` by the reference path, the cache's unwritten rows NaN-poisoned; against the reference
    path on a copy of the cache and its low-precision twin. Returns (out, reference, low-precision, the new
    state, the reference's)."""
    B, HKV = len(before), 2 if G < 8 else 1
    H, D = HKV * G, 128
    hist = make_inputs(kind, B, max(before), H, HKV, D, dtype, device=dev, seed=21)
    new = make_inputs(kind, B, T, H, HKV, D, dtype, device=dev, seed=22)
    cache = empty_layer_cache(kind, B, H, HKV, D, W, S, dtype=dtype, device=dev)
    for bi, n in enumerate(before):
        if n:
            ahn_ops.ahn_attention(*[None if x is None else x[bi:bi + 1, :n] for x in hist[:6]], *hist[6:],
                                  window=W, sinks=S, kind=kind, cache=batch_slice(cache, slice(bi, bi + 1)),
                                  backend="reference")
    poison_unwritten(*cache.tensors()[:5], before, W, S)
    twin = empty_layer_cache(kind, B, H, HKV, D, W, S, dtype=dtype, device=dev)
    lp_cache = empty_layer_cache(kind, B, H, HKV, D, W, S, dtype=dtype, device=dev)
    for a, b, c in zip(twin.tensors(), lp_cache.tensors(), cache.tensors()):
        a.copy_(c)
        b.copy_(c)
    out = ahn_ops.ahn_attention(*new, window=W, sinks=S, kind=kind, cache=cache, backend="kernel")
    r = ahn_ops.ahn_attention(*new, window=W, sinks=S, kind=kind, cache=twin, backend="reference")
    lp = ref.ahn_prefill_cache_ref(*new, *lp_cache.tensors(), W, S, kind, dtype=dtype)
    return out, r, lp, cache.state, twin.state


CACHE_CASES = [
    # kind, W, S, T, positions before, G: an empty sequence, one inside the first window, a wrapped ring; S > W
    # with sequences short of their sinks (unwritten sink rows in the loaded block)
    pytest.param("gdn", 100, 5, 150, [0, 30, 331], 2, id="gdn-W100-S5-T150-P0+30+331"),
    pytest.param("dn", 16, 70, 30, [0, 3, 20], 1, id="dn-W16-S70-T30-P0+3+20"),
    pytest.param("mamba2", 100, 5, 150, [0, 30, 331], 2, id="mamba2-W100-S5-T150-P0+30+331"),
]


@needs_triton
@pytest.mark.parametrize("kind,W,S,T,before,G", CACHE_CASES)
def test_sm90_cache_path_with_a_torch_stand_in(kind, W, S, T, before, G, monkeypatch):
    # the cache path under "sm90": the key streams, the sink buffer (its unwritten rows zeroed), the positions
    # and the initial state as the kernel takes them, its math in torch standing in for it
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    calls = _stand_in(monkeypatch, dev)
    out, r, lp, st, st_r = _cache_call(kind, W, S, T, before, G, torch.bfloat16, dev)
    assert len(calls) == 1 and calls[0][15] is not None and calls[0][18] is True
    if calls[0][16] is not None:  # no unwritten (NaN) sink row reached the kernel
        assert not calls[0][16].isnan().any() and not calls[0][17].isnan().any()
    check_within_2x(f"{kind} sm90 cache stand-in", out, r, lp)
    torch.testing.assert_close(st.float(), st_r.float(), rtol=2e-2, atol=2e-2)


@needs_sm90
@pytest.mark.parametrize("overlap", ["prefill", "all"])  # the memory passes before the kernel / beside it
@pytest.mark.parametrize("kind,W,S,T,before,G", CACHE_CASES + [
    pytest.param("gdn", 4096, 128, 1000, [0, 5000, 130], 8, id="gdn-W4096-S128-T1000-P0+5000+130")])
def test_sm90_cache_path(kind, W, S, T, before, G, overlap, engine, monkeypatch):
    engine("sm90")
    monkeypatch.setitem(_prefill().CONFIG, "sm90_overlap", overlap)
    monkeypatch.setitem(_prefill().CONFIG, "sm90_overlap_min", (0, 0))  # beside the kernel at these small sizes
    out, r, lp, st, st_r = _cache_call(kind, W, S, T, before, G, torch.bfloat16, "cuda")
    check_within_2x(f"{kind} sm90 cache", out, r, lp)
    torch.testing.assert_close(st.float(), st_r.float(), rtol=2e-2, atol=2e-2)


@needs_sm90
@pytest.mark.parametrize("overlap", ["prefill", "all"])  # the memory passes before the kernel / beside it
def test_sm90_initial_state(overlap, engine, monkeypatch):
    """A prefill from an initial state: every row reads the memory (the chunks before the first memory token
    read the state itself)."""
    P = _prefill()
    monkeypatch.setitem(P.CONFIG, "sm90_overlap", overlap)
    monkeypatch.setitem(P.CONFIG, "sm90_overlap_min", (0, 0))
    kind, T, W, S, H, HKV, D = "gdn", 700, 300, 2, 4, 2, 128
    args = make_inputs(kind, 1, T, H, HKV, D, torch.bfloat16, device="cuda", seed=5)
    h0 = torch.randn(1, H, D, D, device="cuda") * 0.1
    outs = {}
    for name in ("sm90", "no_sm90"):
        engine(name)
        outs[name] = P.prefill_fwd(*args, W, S, kind, initial_state=h0, output_final_state=True)

    def full(dtype):
        q, k, v, a, b, z, A_log, dt_bias, nw, ow = args
        o_win = ref.window_attention_ref(q, k, v, W, S, dtype=dtype)
        g, w = ref.memory_gates_ref(a, b, A_log, dt_bias, kind, dtype)
        m, st = ref.memory_readout_ref(q, k, v, g, w, W, S, kind, initial_state=h0, dtype=dtype)
        return o_win + ref.epilogue_ref(m, z, nw, ow, kind)

    check_within_2x("gdn sm90 h0", outs["sm90"][0], full(torch.float32), full(torch.bfloat16))
    # the final state: the same chain (bits) before the kernel; beside it a chain of wider programs, whose
    # products can round the bf16 copies of the state it multiplies differently
    tol = 0 if overlap == "prefill" else 1e-2
    torch.testing.assert_close(outs["sm90"][1], outs["no_sm90"][1], rtol=tol, atol=tol)


@needs_triton
@pytest.mark.parametrize("use_h0", [False, True])
def test_state_chain_ready_counters(use_h0, monkeypatch):
    # the counters the sm_90a kernel reads beside the state chain: every chunk the chain stores reaches
    # state_ready_target (its programs per head), the zero chunks it skips without an initial state stay 0
    P = _prefill()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    kind, T, W, S, H, HKV, D = "gdn", 300, 100, 5, 2, 1, 128
    args = make_inputs(kind, 1, T, H, HKV, D, torch.bfloat16, device=dev, seed=9)
    h0 = torch.randn(1, H, D, D, device=dev) * 0.1 if use_h0 else None
    orig, seen = P.state_chain, []

    def spy(*a, **kw):
        hs = a[12]
        seen.append(torch.zeros(hs.shape[0] * hs.shape[1], dtype=torch.int32, device=dev))
        return orig(*a[:16], seen[-1], P.CONFIG["sm90_state_bv"])  # the chain beside the kernel

    monkeypatch.setattr(P, "state_chain", spy)
    P.prefill_fwd(*args, W, S, kind, initial_state=h0)
    NT = (T + 63) // 64
    c0 = 0 if use_h0 else (S + W) // 64  # the chain's first stored chunk
    want = torch.zeros(NT, H, dtype=torch.int32)
    want[c0:] = P.state_ready_target(D)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0].view(NT, H).cpu(), want, rtol=0, atol=0)


@needs_sm90
@pytest.mark.parametrize("kind,lens,W,S,cols", [
    pytest.param("gdn", None, 4096, 128, 16, id="gdn-T32768"),
    pytest.param("mamba2", [3000, 1, 5000], 512, 4, 16, id="mamba2-varlen"),
    pytest.param("gdn", [700, 0, 4100], 300, 5, 64, id="gdn-varlen-64cols"),
    pytest.param("dn", None, 1024, 3, 128, id="dn-T4096-128cols"),
])
def test_sm90_memory_passes_beside(kind, lens, W, S, cols, engine, monkeypatch):
    """The memory passes beside the kernel (the default: ready counters, deferred tiles finished after them), at
    both side stream priorities and in both CTA orders, with state chains of 16, 64 (the default) and 128 value
    columns per program (the counters' target is the programs per head): within the rule of the fp32 reference
    and near the serial engine's output; deterministic=True gives the serial engine's bits."""
    P = _prefill()
    T = (32768 if cols == 16 else 4096) if lens is None else sum(lens)
    H, HKV, D = 16, 2, 128
    args = make_inputs(kind, 1, T, H, HKV, D, torch.bfloat16, device="cuda", seed=11)
    cu = _cu(lens, "cuda")
    engine("sm90")
    monkeypatch.setitem(P.CONFIG, "sm90_state_bv", cols)
    monkeypatch.setitem(P.CONFIG, "state_warps", 8 if cols == 128 else 4)
    monkeypatch.setitem(P.CONFIG, "sm90_overlap", "off")
    serial = P.prefill_fwd(*args, W, S, kind, cu_seqlens=cu)[0]
    # the CTAs row block by row block over all heads: each tile's work is the same, so the same bits
    monkeypatch.setitem(P.CONFIG, "sm90_rows_outer", True)
    assert torch.equal(P.prefill_fwd(*args, W, S, kind, cu_seqlens=cu)[0], serial)
    monkeypatch.setitem(P.CONFIG, "sm90_overlap", "prefill")
    monkeypatch.setitem(P.CONFIG, "sm90_overlap_min", (0, 0))
    monkeypatch.setitem(P.CONFIG, "sm90_rows_outer", None)
    # deterministic: the passes before the kernel whatever CONFIG says, so the serial bits
    assert torch.equal(P.prefill_fwd(*args, W, S, kind, cu_seqlens=cu, deterministic=True)[0], serial)
    r = lp = None
    # beside the passes: the CTAs head by head at priority 0, row blocks over all heads (the default) at -1
    for prio, rows_outer in ((0, False), (-1, None)):
        monkeypatch.setitem(P.CONFIG, "sm90_side_priority", prio)
        monkeypatch.setitem(P.CONFIG, "sm90_rows_outer", rows_outer)
        out = P.prefill_fwd(*args, W, S, kind, cu_seqlens=cu)[0]
        # a deferred tile adds the memory to its rounded window output: one more bf16 rounding than the serial
        # one, so up to one ulp of the value (2^-7 relative) apart, plus where window and memory cancel
        torch.testing.assert_close(out.float(), serial.float(), rtol=2**-7, atol=3e-2)
        if r is None and T <= 8192:  # (the fp32 reference at T = 32k is too slow for a test)
            r = ref.ahn_attention_ref(*args, W, S, kind, cu_seqlens=cu)
            lp = ref.ahn_attention_ref(*args, W, S, kind, cu_seqlens=cu, dtype=torch.bfloat16)
        if r is not None:
            check_within_2x(f"{kind} sm90 beside, priority {prio}", out, r, lp)


@needs_sm90
def test_overlap_size_rule(engine, monkeypatch):
    """The passes go beside the kernel only from CONFIG["sm90_overlap_min"] = (keys per row, new tokens) on: below
    either bound (and for deterministic calls) the chain runs before the kernel, without ready counters."""
    P = _prefill()
    engine("sm90")
    seen = []
    real = P._memory_passes
    monkeypatch.setattr(P, "_memory_passes", lambda *a, **kw: (seen.append(kw.get("ready") is not None),
                                                              real(*a, **kw))[1])
    args = make_inputs("gdn", 1, 2000, 4, 2, 128, torch.bfloat16, device="cuda", seed=2)
    for bounds, W, det, want in (((300, 2000), 290, False, True), ((300, 2000), 280, False, False),
                                 ((300, 2001), 290, False, False), ((0, 0), 290, True, False)):
        monkeypatch.setitem(P.CONFIG, "sm90_overlap_min", bounds)
        P.prefill_fwd(*args, W, 10, "gdn", deterministic=det)
        assert seen.pop() is want, (bounds, W, det)


# ---------------------------------------------------------------------------------------------
# the band backward (torch.ops.ahn.band_bwd_sm90, backward.CONFIG["band"] = "sm90")
# ---------------------------------------------------------------------------------------------
def _backward():
    from ahn_ops.ops.ahn_attention import backward

    return backward


def _torch_band_bwd(q, k, v, dout, ld, window, cu_seqlens, max_seqlen, dq, dk, dv):
    """The math of the sm_90a band backward in fp32 torch, with its arguments: per packed sequence the band keys
    t - W < j <= t, P = exp2(s log2(e) / sqrt(D) - lse), dS = P (dO V^T - delta); adds dq = dS K / sqrt(D),
    dk = dS^T Q / sqrt(D) (summed over a kv head's query heads) and dv = P^T dO into dq, dk, dv."""
    Tt, H, D = q.shape
    HKV = k.shape[1]
    G = H // HKV
    c = D ** -0.5
    cs = cu_seqlens.tolist()
    assert max_seqlen == max(e - s for s, e in zip(cs[:-1], cs[1:]))
    for s0, s1 in zip(cs[:-1], cs[1:]):
        n = s1 - s0
        if n == 0:
            continue
        t = torch.arange(n, device=q.device)
        band = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)  # [query, key]
        qf, dof = q[s0:s1].float(), dout[s0:s1].float()
        kf, vf = (x[s0:s1].float().repeat_interleave(G, 1) for x in (k, v))
        s = torch.einsum("thd,jhd->htj", qf, kf) * (c * 1.4426950408889634)
        p = torch.where(band[None], torch.exp2(s - ld[0, :, s0:s1, None]), 0.)
        ds = p * (torch.einsum("thd,jhd->htj", dof, vf) - ld[1, :, s0:s1, None])
        dq[s0:s1] += torch.einsum("htj,jhd->thd", ds, kf) * c
        dk[s0:s1] += (torch.einsum("htj,thd->jhd", ds, qf) * c).reshape(n, HKV, G, D).sum(2)
        dv[s0:s1] += torch.einsum("htj,thd->jhd", p, dof).reshape(n, HKV, G, D).sum(2)


@needs_triton
@pytest.mark.parametrize("kind,B,T,W,S,G,lens", [
    pytest.param("gdn", 1, 200, 50, 5, 2, None, id="gdn-T200-W50-S5"),
    pytest.param("dn", 2, 130, 1, 3, 1, None, id="dn-B2-T130-W1-S3"),
    pytest.param("mamba2", 1, 260, 30, 2, 2, [130, 0, 1, 129], id="mamba2-varlen-130-0-1-129"),
])
def test_sm90_band_bwd_path_with_a_torch_stand_in(kind, B, T, W, S, G, lens, monkeypatch):
    # prefill_bwd's "sm90" band (its lse / delta rows, the fp32 band buffers the dq / dkdv kernels add, the sink
    # work left to the Triton kernels) with the kernel's math in torch standing in for it: every gradient
    # within the bf16 rule of the fp32 reference, or as close to it as the default engine's (the memory's
    # gradients, which the band does not touch, can miss the rule on some bf16 inputs on both engines)
    Bw = _backward()
    monkeypatch.setitem(Bw.CONFIG, "band", "sm90")
    monkeypatch.setattr(_prefill(), "_sm90_check_device", lambda device: None)
    calls = []

    def stand_in(*args):
        calls.append(args)
        _torch_band_bwd(*args)

    monkeypatch.setattr(Bw, "_sm90_band_bwd", stand_in)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float16  # (the interpreter's bf16 backward is not exact)
    HKV = 2 if G < 4 else 1
    H, D = HKV * G, 128
    args = make_inputs(kind, B, T, H, HKV, D, dt, device=dev, seed=T + W)
    dout = torch.randn(B, T, H, D, device=dev, dtype=dt)
    cu = _cu(lens, dev)
    gk = kernel_grads(args, dout, W, S, kind, cu)
    assert len(calls) == 1
    ld, cu_b = calls[0][4], calls[0][6]
    assert ld.shape[2] % 4 == 0 and cu_b.tolist() == ([0, *itertools.accumulate(lens)] if lens else
                                                      [i * T for i in range(B + 1)])
    gr = ref_grads([None if x is None else x.float() for x in args], dout, W, S, kind, cu, torch.float32)
    low = [None if x is None else x.to(torch.bfloat16) if x.dtype == dt else x for x in args]
    gt = ref_grads(low, dout, W, S, kind, cu, torch.bfloat16)
    monkeypatch.setitem(Bw.CONFIG, "band", "auto")
    gd = kernel_grads(args, dout, W, S, kind, cu)
    assert len(calls) == 1
    for n, a, r, t, d in zip(GRAD_NAMES, gk, gr, gt, gd):
        if a is None:
            continue
        ek, et, ed = grad_err(a, r), grad_err(t, r), grad_err(d, r)
        print(f"{n}: sm90 band {ek:.2e}  default band {ed:.2e}  torch-bf16 {et:.2e}")
        assert torch.isfinite(a).all() and (ek <= 2 * et + 1e-3 or ek <= 1.1 * ed + 1e-4), n


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the refusal off a CUDA device (the forward before it on the interpreter)")
def test_sm90_band_bwd_refuses_off_a_hopper_gpu(monkeypatch):
    args = make_inputs("gdn", 1, 70, 2, 1, 128, torch.float16, device="cpu", seed=2)
    dout = torch.randn(1, 70, 2, 128, dtype=torch.float16)
    monkeypatch.setitem(_backward().CONFIG, "band", "sm91")
    with pytest.raises(ValueError, match='backward.CONFIG\\["band"\\] must be "auto" or "sm90"'):
        kernel_grads(args, dout, 8, 2, "gdn", None)
    monkeypatch.setitem(_backward().CONFIG, "band", "sm90")
    with pytest.raises(RuntimeError, match='CONFIG\\["band"\\] = "sm90" needs a compute capability 9.0 GPU'):
        kernel_grads(args, dout, 8, 2, "gdn", None)


def _band_inputs(lens, H, HKV, W, dtype, seed):
    """Random packed q, k, v, dout and the matching ld (the window + sinks softmax's lse, log2 domain; delta =
    rowsum(dout o)) for the band backward op, and its cu_seqlens."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    Tt, D = sum(lens), 128
    q, dout = (torch.randn(Tt, H, D, device="cuda", generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(Tt, HKV, D, device="cuda", generator=g).to(dtype) for _ in range(2))
    Tpad = (Tt + 3) // 4 * 4 + 4  # past the rows: read by the kernel's last block, masked
    ld = torch.full((2, H, Tpad), 1e4, device="cuda")
    s0 = 0
    for n in lens:
        if n:
            o, lse = ref.window_attention_ref(q[None, s0:s0 + n], k[None, s0:s0 + n], v[None, s0:s0 + n], W, 3,
                                              return_lse=True)
            ld[0, :, s0:s0 + n] = lse[0] * 1.4426950408889634
            ld[1, :, s0:s0 + n] = (dout[s0:s0 + n].float() * o[0]).sum(-1).t()
        s0 += n
    return q, k, v, dout, ld, _cu(lens, "cuda")


@needs_sm90
@pytest.mark.parametrize("lens,W,G,dtype", [
    pytest.param([1000], 300, 8, torch.bfloat16, id="T1000-W300-G8"),
    pytest.param([517], 1, 4, torch.float16, id="T517-W1-G4-fp16"),
    pytest.param([333], 2 ** 31 - 1, 1, torch.bfloat16, id="T333-Wmax-G1"),
    pytest.param([700, 1, 0, 333, 129], 200, 2, torch.bfloat16, id="varlen5-W200-G2"),
    pytest.param([63, 2000, 65], 64, 8, torch.float16, id="varlen3-W64-G8-fp16"),
    pytest.param([4099], 1024, 8, torch.bfloat16, id="T4099-W1024-G8"),
])
def test_sm90_band_bwd_op_matches_torch(lens, W, G, dtype):
    """The op against its math in fp32 torch: each gradient added to what the buffers held (random), rows of
    every sequence, within the rounding of P and dS to the input dtype."""
    HKV = 2 if G < 8 else 1
    H = HKV * G
    q, k, v, dout, ld, cu = _band_inputs(lens, H, HKV, W, dtype, seed=sum(lens) + W)
    Tt = q.shape[0]
    base = [torch.randn(Tt, h, 128, device="cuda") for h in (H, HKV, HKV)]
    got = [x.clone() for x in base]
    torch.ops.ahn.band_bwd_sm90(q, k, v, dout, ld, W, cu, max(lens), *got)
    want = [x.clone() for x in base]
    _torch_band_bwd(q, k, v, dout, ld, W, cu, max(lens), *want)
    for name, a, r, b in zip(("dq", "dk", "dv"), got, want, base):
        assert torch.isfinite(a).all(), name
        err = rel_err(a - b, r - b)
        print(f"{name}: rel err {err:.2e}")
        assert err <= (1e-2 if dtype == torch.bfloat16 else 3e-3), name


@needs_sm90
def test_sm90_band_bwd_op_argument_errors():
    q, k, v, dout, ld, cu = _band_inputs([200], 4, 2, 50, torch.bfloat16, seed=1)
    dq, dk, dv = torch.zeros(200, 4, 128, device="cuda"), *(torch.zeros(200, 2, 128, device="cuda") for _ in "kv")
    op = torch.ops.ahn.band_bwd_sm90
    with pytest.raises(RuntimeError, match="window must be >= 1"):
        op(q, k, v, dout, ld, 0, cu, 200, dq, dk, dv)
    with pytest.raises(RuntimeError, match="dq must be"):
        op(q, k, v, dout, ld, 50, cu, 200, dq.bfloat16(), dk, dv)
    with pytest.raises(RuntimeError, match="ld must be"):
        op(q, k, v, dout, ld[:, :, :199], 50, cu, 200, dq, dk, dv)
    with pytest.raises(RuntimeError, match="cu_seqlens must be"):
        op(q, k, v, dout, ld, 50, cu.long(), 200, dq, dk, dv)
    with pytest.raises(RuntimeError, match="max_seqlen must be"):
        op(q, k, v, dout, ld, 50, cu, 201, dq, dk, dv)
    with pytest.raises(RuntimeError, match="head_dim must be 128"):
        op(*(x[..., :64].contiguous() for x in (q, k, v, dout)), ld, 50, cu, 200, dq, dk, dv)
    assert not dq.any() and not dk.any() and not dv.any()  # refused calls write nothing


@needs_sm90
@pytest.mark.parametrize("kind,T,lens,W,S,G,dtype", [
    pytest.param("gdn", 777, None, 200, 6, 4, torch.bfloat16, id="gdn-T777-W200-S6"),
    pytest.param("dn", 300, None, 1, 3, 8, torch.float16, id="dn-T300-W1-S3-fp16"),
    pytest.param("mamba2", 1030, [900, 1, 129], 128, 3, 2, torch.bfloat16, id="mamba2-varlen3-W128-S3"),
])
def test_sm90_band_bwd_gradients(kind, T, lens, W, S, G, dtype, engine, monkeypatch):
    """Forward and backward on the sm_90a kernels: every gradient within the rule of the fp32 reference."""
    monkeypatch.setitem(_backward().CONFIG, "band", "sm90")
    engine("sm90")
    HKV = 2 if G < 8 else 1
    H = HKV * G
    args = make_inputs(kind, 1, T, H, HKV, 128, dtype, device="cuda", seed=T + S)
    dout = torch.randn(1, T, H, 128, device="cuda", dtype=dtype)
    cu = _cu(lens, "cuda")
    gk = kernel_grads(args, dout, W, S, kind, cu)
    gr = ref_grads([None if x is None else x.float() for x in args], dout, W, S, kind, cu, torch.float32)
    # the rule's reference in bf16 for fp16 inputs too (fp16 torch math overflows to NaN here)
    low = [None if x is None else x.to(torch.bfloat16) if x.dtype == dtype else x for x in args]
    gt = ref_grads(low, dout, W, S, kind, cu, torch.bfloat16)
    check_bf16_grad_rule(gk, gr, gt)
    # the band beside the reverse chain (two streams, the default) or after it (one): the same sums up to the
    # order of the fp32 atomics
    monkeypatch.setitem(_backward().CONFIG, "side_stream", False)
    for a, b in zip(kernel_grads(args, dout, W, S, kind, cu), gk):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
