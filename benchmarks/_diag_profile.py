# TEMPORARY diagnostic (to be deleted): per-kernel device time of decode_step at the bench shape.
import sys, torch
sys.path.insert(0, "benchmarks")
import bench_decode as bd
import ahn_ops  # noqa
from torch.profiler import profile, ProfilerActivity
gen = torch.Generator(device="cuda").manual_seed(0)
for B in (1, 16):
    NL = 5 if B == 1 else 2
    layers = [bd.make_layer(B, gen, bd.S + bd.W + 100) for _ in range(NL)]
    x = bd.make_inputs(B, gen)
    for i in range(10):
        c, p = layers[i % NL]; bd.ahn_call(x, c, p)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(40):
            c, p = layers[i % NL]; bd.ahn_call(x, c, p)
        torch.cuda.synchronize()
    print(f"B={B}")
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA or "kernel" in e.key.lower():
            dt = getattr(e, "device_time", None) or getattr(e, "cuda_time", 0)
            print(f"  {e.key[:70]:70} n={e.count:4d} avg={dt:8.2f} us")
    del layers; torch.cuda.empty_cache()
