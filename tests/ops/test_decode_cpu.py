"""torch.ops.ahn.decode_step on CPU (csrc/cpu/ahn_decode.cpp) against the fp32/fp64 reference.

Each case decodes a batch of sequences that start at different positions (0, just before the
window fills, several ring wraps in) for 2 W + S + 3 steps, so every sequence crosses
W, W + S and ring wraps; every step's output and the final cache are compared. Cache rows that
hold no token yet are NaN: reading one fails the test.
"""

import pytest
import torch

import ahn_ops  # noqa: F401  (loads the extension)
from ahn_ops.ops.ahn_attention.reference import ahn_decode_ref

from ..utils import poison_unwritten

KINDS = ("gdn", "dn", "mamba2")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_params(kind, H, D, seed, pdtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    A_log = None if kind == "dn" else torch.log(torch.rand(H, generator=g) * 15 + 1)
    dt_bias = None if kind == "dn" else torch.randn(H, generator=g) * 0.5
    norm_weight = 1 + 0.1 * torch.randn(H * D if kind == "mamba2" else D, generator=g)
    o_weight = torch.randn(H, D, D, generator=g) * D ** -0.5
    return tuple(None if x is None else x.to(pdtype) for x in (A_log, dt_bias, norm_weight, o_weight))


def make_token(kind, B, H, HKV, D, dtype, g):
    def r(*s):
        return torch.randn(*s, generator=g)

    q, k, v = r(B, H, D).to(dtype), r(B, HKV, D).to(dtype), r(B, HKV, D).to(dtype)
    a = None if kind == "dn" else r(B, H)
    b = None if kind == "mamba2" else r(B, H)
    return q, k, v, a, b, r(B, H)


def make_cache(B, H, HKV, D, W, S, dtype, pos, seed):
    """A cache as left by earlier steps (random contents); rows without a token yet are NaN."""
    g = torch.Generator().manual_seed(seed)
    sink_k, sink_v = (torch.randn(B, S, HKV, D, generator=g).to(dtype) for _ in range(2))
    ring_k, ring_v = (torch.randn(B, W, HKV, D, generator=g).to(dtype) for _ in range(2))
    gates = torch.randn(B, W, 2, H, generator=g).to(dtype)  # the ring tokens' raw gate inputs a, b
    state = torch.randn(B, H, D, D, generator=g) * 0.1
    poison_unwritten(sink_k, sink_v, ring_k, ring_v, gates, pos, W, S)
    return [sink_k, sink_v, ring_k, ring_v, gates, state, torch.tensor(pos, dtype=torch.int64)]


def clone(cache):
    return [t.clone() for t in cache]


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


CASES = [  # D, G, S, W
    (16, 1, 0, 5),
    (16, 4, 3, 5),
    (64, 4, 2, 3),
    (64, 1, 1, 1),
]


def _params():
    for kind in KINDS:
        for dname in ("fp32", "bf16"):
            for D, G, S, W in CASES:
                yield pytest.param(kind, dname, D, G, S, W, id=f"{kind}-{dname}-D{D}-G{G}-S{S}-W{W}")
    yield pytest.param("gdn", "fp16", 16, 4, 3, 5, id="gdn-fp16-D16-G4-S3-W5")


@pytest.mark.parametrize("kind,dname,D,G,S,W", list(_params()))
def test_decode_matches_reference(kind, dname, D, G, S, W):
    dtype = DTYPES[dname]
    HKV, B = 2, 3
    H = HKV * G
    pos = [0, S + W - 2, S + 3 * W + 1]
    steps = 2 * W + S + 3
    params = make_params(kind, H, D, seed=1)
    cache = make_cache(B, H, HKV, D, W, S, dtype, pos, seed=2)
    c_op, c64, c32 = clone(cache), clone(cache), clone(cache)
    g = torch.Generator().manual_seed(3)
    worst = (0.0, 0.0)
    for step in range(steps):
        q, k, v, a, b, z = make_token(kind, B, H, HKV, D, dtype, g)
        args = (q, k, v, a, b, z, *params)
        out = torch.ops.ahn.decode_step(*args, *c_op, W, S, kind)
        ref = ahn_decode_ref(*args, *c64, W, S, kind, dtype=torch.float64)
        base = ahn_decode_ref(*args, *c32, W, S, kind, dtype=torch.float32).to(dtype)
        assert out.shape == (B, H, D) and out.dtype == dtype
        # flash-attention rule: at most 2x the error of the same math in fp32 rounded to the
        # output dtype, plus a small floor; both numbers are logged
        err, err_base = max_err(out, ref), max_err(base, ref)
        worst = max(worst, (err, err_base))
        assert err <= 2 * err_base + 1e-5, f"step {step}: op err {err:.3g} vs fp32 reference err {err_base:.3g}"
        # and within about one unit in the last place of the fp32 reference, rounded alike
        torch.testing.assert_close(out.float(), base.float(), rtol=1e-2 if dtype != torch.float32 else 1e-5,
                                   atol=1e-5, msg=lambda m: f"step {step}: {m}")
    print(f"{kind} {dname} D{D} G{G} S{S} W{W}: max err {worst[0]:.3g}, fp32-math err {worst[1]:.3g}")

    names = ["sink_k", "sink_v", "ring_k", "ring_v", "gates", "state", "pos"]
    for name, got, want in zip(names, c_op, c64):
        if name == "state":
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, equal_nan=True, msg=name)
        else:  # copies of k, v, the gate inputs and the position counter: exact
            assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0)), name
    assert c_op[-1].tolist() == [p + steps for p in pos]


def test_param_dtypes_are_read_as_fp32():
    """a, b, z and the parameters may come in any float dtype; the op reads them as fp32."""
    kind, B, H, HKV, D, W, S = "mamba2", 2, 4, 2, 16, 3, 1
    g = torch.Generator().manual_seed(0)
    params16 = make_params(kind, H, D, seed=1, pdtype=torch.bfloat16)
    q, k, v, a, b, z = make_token(kind, B, H, HKV, D, torch.float32, g)
    a16, z16 = a.to(torch.float16), z.to(torch.bfloat16)
    cache = make_cache(B, H, HKV, D, W, S, torch.float32, [5, 9], seed=2)
    c1, c2 = clone(cache), clone(cache)
    out1 = torch.ops.ahn.decode_step(q, k, v, a16, b, z16, *params16, *c1, W, S, kind)
    params32 = tuple(x.float() for x in params16)
    out2 = torch.ops.ahn.decode_step(q, k, v, a16.float(), b, z16.float(), *params32, *c2, W, S, kind)
    assert torch.equal(out1, out2)
    for t1, t2 in zip(c1, c2):
        assert torch.equal(t1.nan_to_num(7.0), t2.nan_to_num(7.0))


def test_strided_inputs_and_batch_of_one():
    kind, B, H, HKV, D, W, S = "gdn", 1, 2, 1, 16, 4, 2
    g = torch.Generator().manual_seed(0)
    params = make_params(kind, H, D, seed=1)
    q, k, v, a, b, z = make_token(kind, B, H, HKV, D, torch.float32, g)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    cache = make_cache(B, H, HKV, D, W, S, torch.float32, [7], seed=2)
    c1, c2 = clone(cache), clone(cache)
    out1 = torch.ops.ahn.decode_step(qt, k, v, a, b, z, *params, *c1, W, S, kind)
    out2 = torch.ops.ahn.decode_step(q, k, v, a, b, z, *params, *c2, W, S, kind)
    assert torch.equal(out1, out2)


def test_opcheck_schema():
    kind, B, H, HKV, D, W, S = "gdn", 2, 4, 2, 16, 3, 1
    g = torch.Generator().manual_seed(0)
    params = make_params(kind, H, D, seed=1)
    token = make_token(kind, B, H, HKV, D, torch.float32, g)
    cache = make_cache(B, H, HKV, D, W, S, torch.float32, [2, 6], seed=2)
    cache = [t.nan_to_num(0.0) for t in cache]
    torch.library.opcheck(torch.ops.ahn.decode_step.default, (*token, *params, *cache, W, S, kind),
                          test_utils=("test_schema", "test_autograd_registration"))
    # overlap_prev (a CUDA launch hint) is accepted and changes nothing on the CPU
    c1, c2 = [t.clone() for t in cache], [t.clone() for t in cache]
    o1 = torch.ops.ahn.decode_step(*token, *params, *c1, W, S, kind)
    o2 = torch.ops.ahn.decode_step(*token, *params, *c2, W, S, kind, True)
    assert torch.equal(o1, o2) and all(torch.equal(x, y) for x, y in zip(c1, c2))
    torch.library.opcheck(torch.ops.ahn.decode_step.default, (*token, *params, *cache, W, S, kind, True),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# rejected calls: the right exception, naming the argument, and the cache left as it was
# ---------------------------------------------------------------------------------------------
def _valid_call(kind="gdn"):
    B, H, HKV, D, W, S = 2, 4, 2, 16, 3, 1
    g = torch.Generator().manual_seed(0)
    q, k, v, a, b, z = make_token(kind, B, H, HKV, D, torch.float32, g)
    A_log, dt_bias, nw, ow = make_params(kind, H, D, seed=1)
    cache = make_cache(B, H, HKV, D, W, S, torch.float32, [3, 8], seed=2)
    args = dict(q=q, k=k, v=v, a=a, b=b, z=z, A_log=A_log, dt_bias=dt_bias, norm_weight=nw, o_weight=ow,
                sink_k=cache[0], sink_v=cache[1], ring_k=cache[2], ring_v=cache[3], gates=cache[4],
                state=cache[5], pos=cache[6], window=W, sinks=S, kind=kind)
    return args


BAD = [  # (id, changes, exception, text in the message)
    ("q-shape", lambda a: {"q": a["q"][:, :, :8]}, ValueError, "k must have shape .* from q"),
    ("q-rank", lambda a: {"q": a["q"][0]}, ValueError, "q must have shape"),
    ("k-shape", lambda a: {"k": a["k"][:1]}, ValueError, "k must have shape"),
    ("v-shape", lambda a: {"v": a["v"][:, :, :8]}, ValueError, "v must have shape"),
    ("heads-not-multiple", lambda a: {"k": torch.zeros(2, 3, 16), "v": torch.zeros(2, 3, 16)}, ValueError, "HKV"),
    ("a-missing", lambda a: {"a": None}, ValueError, "a is required"),
    ("b-shape", lambda a: {"b": a["b"][:, :2]}, ValueError, "b must have shape"),
    ("z-shape", lambda a: {"z": a["z"][None]}, ValueError, "z must have shape"),
    ("A_log-missing", lambda a: {"A_log": None}, ValueError, "A_log is required"),
    ("dt_bias-shape", lambda a: {"dt_bias": torch.zeros(3)}, ValueError, "dt_bias must have shape"),
    ("norm_weight-shape", lambda a: {"norm_weight": torch.ones(64)}, ValueError, "norm_weight must have shape"),
    ("o_weight-shape", lambda a: {"o_weight": a["o_weight"][:2]}, ValueError, "o_weight must have shape"),
    ("sink_k-shape", lambda a: {"sink_k": torch.zeros(2, 2, 2, 16)}, ValueError, "sink_k must have shape"),
    ("ring_v-shape", lambda a: {"ring_v": torch.zeros(2, 4, 2, 16)}, ValueError, "ring_v must have shape"),
    ("gates-shape", lambda a: {"gates": torch.zeros(2, 3, 4, 3)}, ValueError, "gates must have shape"),
    ("state-shape", lambda a: {"state": torch.zeros(2, 4, 16, 8)}, ValueError, "state must have shape"),
    ("pos-shape", lambda a: {"pos": torch.zeros(3, dtype=torch.int64)}, ValueError, "pos must have shape"),
    ("pos-negative", lambda a: {"pos": torch.tensor([3, -1])}, ValueError, "pos must be >= 0"),
    ("ring_k-noncontiguous", lambda a: {"ring_k": a["ring_k"].transpose(2, 3).contiguous().transpose(2, 3)},
     ValueError, "ring_k must be contiguous"),
    ("window-zero", lambda a: {"window": 0, "ring_k": a["ring_k"][:, :0], "ring_v": a["ring_v"][:, :0],
                               "gates": a["gates"][:, :0]}, ValueError, "window must be >= 1"),
    ("sinks-negative", lambda a: {"sinks": -1}, ValueError, "sinks must be >= 0"),
    ("kind", lambda a: {"kind": "gla"}, ValueError, "kind must be"),
    ("q-dtype", lambda a: {"q": a["q"].double()}, TypeError, "q must be"),
    ("q-int", lambda a: {"q": a["q"].long()}, TypeError, "q must be"),
    ("k-dtype", lambda a: {"k": a["k"].half()}, TypeError, "k must be"),
    ("ring_k-dtype", lambda a: {"ring_k": a["ring_k"].bfloat16()}, TypeError, "ring_k must be"),
    ("gates-dtype", lambda a: {"gates": a["gates"].double()}, TypeError, "gates must be"),
    ("state-dtype", lambda a: {"state": a["state"].half()}, TypeError, "state must be"),
    ("pos-dtype", lambda a: {"pos": a["pos"].int()}, TypeError, "pos must be"),
    ("z-int", lambda a: {"z": a["z"].long()}, TypeError, "z must be"),
    ("o_weight-int", lambda a: {"o_weight": a["o_weight"].int()}, TypeError, "o_weight must be"),
]


@pytest.mark.parametrize("change,exc,text", [pytest.param(c, e, t, id=i) for i, c, e, t in BAD])
def test_rejected_call_leaves_cache_unchanged(change, exc, text):
    args = _valid_call()
    args.update(change(args))
    before = {n: args[n].clone() for n in ("sink_k", "sink_v", "ring_k", "ring_v", "gates", "state", "pos")
              if args[n].device.type == "cpu"}
    with pytest.raises(exc, match=text):
        torch.ops.ahn.decode_step(**args)
    for name, old in before.items():
        assert torch.equal(args[name].nan_to_num(7.0), old.nan_to_num(7.0)), name


@pytest.mark.parametrize("kind", KINDS)
def test_unused_optional_inputs_may_be_none(kind):
    args = _valid_call(kind)
    if kind == "dn":
        args.update(a=None, A_log=None, dt_bias=None)
    if kind == "mamba2":
        args.update(b=None)
    out = torch.ops.ahn.decode_step(**args)
    assert torch.isfinite(out).all()
