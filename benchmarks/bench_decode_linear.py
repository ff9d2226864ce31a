"""The decode step's projections at batch 1-16: ahn_ops/ops/decode_linear.py against cuBLAS + the glue kernels.

    python benchmarks/bench_decode_linear.py [--batch 1 2 4 8 16] [--sweep [--persist] [--ops down_proj ...]]
        [--layers 36]

Per layer of the Qwen2.5-3B shape (hidden 2048, intermediate 11008, H=16, HKV=2, D=128, AHN-GDN
gates a, b, z: the stacked k/v/gates weight has 560 rows), bf16. Weight bytes per layer (each read
once per token, the activations are noise): q 8.39 MB + k/v/gates 2.29 MB + o 8.39 MB + gate/up
90.2 MB + down 45.1 MB = 154.4 MB; the bound is that / copy bandwidth (measured in the same run).

- plain: what ``StaticDecoder(plan=DecodePlan(fuse_glue=True))`` runs per layer around the decode
  op: add_rms_norm, stacked k/v/gates F.linear, q_proj F.linear, rope_qk, o_proj F.linear,
  add_rms_norm(residual), gate F.linear, up F.linear, silu_mul, down F.linear (the next layer's
  add_rms_norm adds the residual): 10 launches.
- fused: norm_qkvg, linear_residual (o_proj), norm_gate_up, linear_residual (down_proj): 4 launches.
Both are captured for ``--layers`` layers with distinct weights in one CUDA graph (no L2 reuse,
launch gaps as in the real step); the time is per layer (do_bench median of graph replays / layers;
the figures in RESULTS.md of an earlier run came from a first version that took the median of 20
event-timed replays).
``--sweep`` times every tile config of each fused op alone (36 distinct weights per graph) and
prints the best per (op, batch) as a ``CONFIGS`` table (tile rows x K x warps, then the pipelining depth of
the three best; at B > 2 the tensor-core tiles: 2 x BN2 weight rows x BK per product, the batch padded to 16
rows), which the layer comparison after it then uses.
``--persist`` (B <= 2): the persistent kernel's configs instead (rows per tile half x K tile x warps x
register buffers x programs per SM), next to the table's current entry.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

ahn_ops = C.import_ahn_ops()
from bench_decode import _graph_time  # noqa: E402
from bench_model import copy_bandwidth  # noqa: E402

HID, INTER, H, HKV, D, NG = 2048, 11008, 16, 2, 128, 3


def make_layer(dt, dev, g):
    def w(n, k):
        return (torch.randn(n, k, device=dev, generator=g) * k ** -0.5).to(dt)

    nkvg = 2 * HKV * D + NG * H
    return dict(ln1=(1 + 0.1 * torch.randn(HID, device=dev, generator=g)).to(dt),
                ln2=(1 + 0.1 * torch.randn(HID, device=dev, generator=g)).to(dt),
                wq=w(H * D, HID), bq=(0.1 * torch.randn(H * D, device=dev, generator=g)).to(dt),
                wkvg=w(nkvg, HID), bkvg=(0.1 * torch.randn(nkvg, device=dev, generator=g)).to(dt),
                wo=w(HID, H * D), wg=w(INTER, HID), wu=w(INTER, HID), wd=w(HID, INTER))


def layer_bytes(p):
    return sum(p[k].numel() * p[k].element_size() for k in ("wq", "wkvg", "wo", "wg", "wu", "wd"))


def plain_layer(p, h, o, cos, sin):
    from ahn_ops.ops import model_glue as glue

    x, _ = glue.add_rms_norm(h, p["ln1"], 1e-6)
    y = F.linear(x, p["wkvg"], p["bkvg"])
    q, k = glue.rope_qk(F.linear(x, p["wq"], p["bq"]), y[:, :HKV * D], cos, sin, D)
    x, h = glue.add_rms_norm(F.linear(o, p["wo"]), p["ln2"], 1e-6, residual=h)
    m = F.linear(glue.silu_mul(F.linear(x, p["wg"]), F.linear(x, p["wu"])), p["wd"])
    return h + m, q, torch.cat([k.reshape(k.shape[0], -1), y[:, HKV * D:]], 1)


def fused_layer(p, h, o, cos, sin, cfg=None):
    from ahn_ops.ops import decode_linear as dl

    cfg = cfg or {}
    q, y = dl.norm_qkvg(h, p["ln1"], 1e-6, p["wq"], p["bq"], p["wkvg"], p["bkvg"], HKV * D, cos, sin, D,
                        config=cfg.get("qkvg"))
    h = dl.linear_residual(o, p["wo"], None, h, config=cfg.get("o_proj"))
    act = dl.norm_gate_up(h, p["ln2"], 1e-6, p["wg"], p["wu"], config=cfg.get("gate_up"))
    return dl.linear_residual(act, p["wd"], None, h, role="down_proj", config=cfg.get("down_proj")), q, y


def graph_us(fn, n_inner):
    """us of one call of fn() captured in a CUDA graph (do_bench median of replays), divided by n_inner."""
    return _graph_time([fn], 1) / n_inner  # _graph_time: us per replay


def check(layers, B, dt, dev, g):
    """Worst error of the fused layer vs the plain one, in units of the output row's bf16 ulp scale."""
    p = layers[0]
    h = torch.randn(B, HID, device=dev, generator=g).to(dt)
    o = torch.randn(B, H * D, device=dev, generator=g).to(dt)
    ang = torch.rand(B, D // 2, device=dev, generator=g) * 1000
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().to(dt), emb.sin().to(dt)
    ref = plain_layer(p, h, o, cos, sin)
    got = fused_layer(p, h, o, cos, sin)
    out = []
    for r, t in zip(ref, got):
        r, t = r.double().reshape(B, -1), t.double().reshape(B, -1)
        scale = r.abs().amax(-1, keepdim=True) * 2 ** -8
        out.append(((t - r).abs() / scale).max().item())
    return out  # h, q, [k | v | gates] in ulps of the row max


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--persist", action="store_true",
                    help="with --sweep at B <= 2: only the persistent kernel's configs (tile rows x warps x "
                         "register buffers x programs per SM), next to the table's current entry")
    ap.add_argument("--ops", nargs="+", default=None, choices=("qkvg", "o_proj", "gate_up", "down_proj"),
                    help="with --sweep: only these projections")
    a = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    layers = [make_layer(dt, dev, g) for _ in range(a.layers)]
    per_layer = layer_bytes(layers[0])
    bw = copy_bandwidth(dev)
    print(f"# {C.device_str()} | {C.versions()} | {C.date_str()} | copy bw {bw / 1e9:.0f} GB/s | "
          f"{per_layer / 1e6:.1f} MB of weights per layer, bound {per_layer / bw * 1e6:.2f} us")
    from ahn_ops.ops import decode_linear as dl

    if a.sweep:
        sweep(layers, a.batch, dt, dev, g, bw, a.persist, a.ops)
    rows = []
    for B in a.batch:
        errs = check(layers, B, dt, dev, g)
        h = torch.randn(B, HID, device=dev, generator=g).to(dt)
        o = torch.randn(B, H * D, device=dev, generator=g).to(dt)
        cos = torch.randn(B, D, device=dev, generator=g).to(dt)
        sin = torch.randn(B, D, device=dev, generator=g).to(dt)

        def run(step):
            x = h
            for p in layers:
                x = step(p, x, o, cos, sin)[0]
            return x

        t_plain = graph_us(lambda: run(plain_layer), len(layers))
        t_fused = graph_us(lambda: run(fused_layer), len(layers))
        rows.append((B, t_plain, t_fused, errs))
    print("\n| B | plain us/layer (% bw) | fused us/layer (% bw) | speed-up | fused vs plain err "
          "(ulps of row max: h, q, k/v/gates) |")
    print("|---|---|---|---|---|")
    bound = per_layer / bw * 1e6
    for B, tp, tf, e in rows:
        print(f"| {B} | {tp:.2f} ({100 * bound / tp:.0f}%) | {tf:.2f} ({100 * bound / tf:.0f}%) | {tp / tf:.2f}x | "
              f"{e[0]:.2f}, {e[1]:.2f}, {e[2]:.2f} |")
    print(f"configs: {dl.CONFIGS}")


def sweep(layers, batches, dt, dev, g, bw, persist=False, only=None):
    from ahn_ops.ops import decode_linear as dl

    best = {}
    for B in batches:
        BM, mma = dl._plan("sweep", B, dt, D // 2)  # B > 2 in bf16: tensor cores, BM = 16
        h = torch.randn(B, HID, device=dev, generator=g).to(dt)
        o = torch.randn(B, H * D, device=dev, generator=g).to(dt)
        act = torch.randn(B, INTER, device=dev, generator=g).to(dt)
        cos = torch.randn(B, D, device=dev, generator=g).to(dt)
        sin = torch.randn(B, D, device=dev, generator=g).to(dt)
        ops = {
            "qkvg": (lambda p, c: dl.norm_qkvg(h, p["ln1"], 1e-6, p["wq"], p["bq"], p["wkvg"], p["bkvg"], HKV * D,
                                               cos, sin, D, config=c), ("wq", "wkvg")),
            "o_proj": (lambda p, c: dl.linear_residual(o, p["wo"], None, h, config=c), ("wo",)),
            "gate_up": (lambda p, c: dl.norm_gate_up(h, p["ln2"], 1e-6, p["wg"], p["wu"], config=c), ("wg", "wu")),
            "down_proj": (lambda p, c: dl.linear_residual(act, p["wd"], None, h, role="down_proj", config=c),
                          ("wd",)),
        }
        for name, (op, keys) in ops.items():
            if only and name not in only:
                continue
            nbytes = sum(layers[0][k].numel() * 2 for k in keys)

            def timed(c):
                try:
                    return graph_us(lambda: [op(p, c) for p in layers], len(layers))
                except Exception as e:  # noqa: BLE001 (a config the compiler rejects: skip it)
                    print(f"  {name} B={B} {c}: {type(e).__name__}")
                    return float("inf")

            res = []
            if persist and not mma:
                # the persistent kernel: one K tile (BK >= K, 16384 covers the MLP's 11008) or 2048..8192-wide K
                # tiles, `stages` register buffers of 2 BN2 x BK weights, `pps` programs per SM; at most 256 bf16
                # weight elements per thread in flight; the table's entry is timed in the same run
                cur = dl._config(name, BM, None)
                res.append((timed(cur), cur))
                K = INTER if name == "down_proj" else HID
                seen = set()
                for BN2, BK, warps, st, pps in itertools.product((1, 2, 4), (2048, 4096, 8192, 16384), (4, 8), (2, 3),
                                                                 (2, 3, 4, 6)):
                    bk = min(BK, triton.next_power_of_2(K))
                    if 2 * BN2 * bk * st > 256 * 32 * warps or (name == "qkvg" and BN2 > D // 2) \
                            or (BN2, bk, warps, st, pps) in seen:
                        continue  # registers, RoPE pairs, K tiles clipped to the same size
                    seen.add((BN2, bk, warps, st, pps))
                    c = (BN2, bk, warps, st, pps)
                    res.append((timed(c), c))
                res.sort()
                t, c = res[0]
                print(f"sweep {name} B={B}: best {c} {t:.2f} us ({nbytes / t / 1e3:.0f} GB/s, "
                      f"{100 * nbytes / t / 1e3 / (bw / 1e9):.0f}% of copy); table's {cur} "
                      f"{[round(x, 2) for x, y in res if y == cur][0]} us; next "
                      f"{[(round(x, 2), y) for x, y in res[1:8]]}; plain cuBLAS: {_cublas(name, layers, h, o, act)}",
                      flush=True)
                best[(name, BM)] = c
                dl.CONFIGS[(name, BM)] = c
                continue
            if mma:  # 2 BN2 weight rows x BK per tensor-core product
                for BN2, BK, warps in itertools.product((8, 16), (128, 256, 512), (4,)):
                    res.append((timed((BN2, BK, warps, 3)), (BN2, BK, warps, 3)))
            for BN2, BK, warps in itertools.product((1, 2, 4, 8, 16), (512, 1024, 2048, 4096), (4, 8)):
                if mma or BM * BN2 * BK > 2048 * 32 * warps or (name == "qkvg" and BN2 > D // 2):
                    continue
                res.append((timed((BN2, BK, warps, 3)), (BN2, BK, warps, 3)))
            res.sort()
            for _, c in res[:2 if mma else 3]:  # pipelining depth of the best
                for st in ((2, 4) if mma else (1, 2, 4)):
                    res.append((timed(c[:3] + (st,) + c[4:]), c[:3] + (st,) + c[4:]))
            res.sort()
            t, c = res[0]
            cub = "plain cuBLAS: " + _cublas(name, layers, h, o, act)
            print(f"sweep {name} B={B}: best {c} {t:.2f} us ({nbytes / t / 1e3:.0f} GB/s, "
                  f"{100 * nbytes / t / 1e3 / (bw / 1e9):.0f}% of copy); next {[(round(x, 2), y) for x, y in res[1:4]]}"
                  f"; {cub}")
            best[(name, BM)] = c
            dl.CONFIGS[(name, BM)] = c
    print("\nbest CONFIGS:", best)


def _cublas(name, layers, h, o, act):
    x = h
    fns = {"qkvg": lambda p: (F.linear(x, p["wq"], p["bq"]), F.linear(x, p["wkvg"], p["bkvg"])),
           "o_proj": lambda p: F.linear(o, p["wo"]),
           "gate_up": lambda p: (F.linear(x, p["wg"]), F.linear(x, p["wu"])),
           "down_proj": lambda p: F.linear(act, p["wd"])}
    t = graph_us(lambda: [fns[name](p) for p in layers], len(layers))
    return f"{t:.2f} us"


if __name__ == "__main__":
    main()
