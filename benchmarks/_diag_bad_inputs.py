# TEMPORARY diagnostic (to be deleted): each bad-input case of test_decode_cuda in its own process.
import subprocess, sys
CASES = ["kind", "k_shape", "a_missing", "gates_dtype", "state_dtype", "q_dtype", "ring_noncontig", "pos_cpu",
         "o_weight_shape", "window", "head_dim_96"]
CODE = r'''
import sys, faulthandler; faulthandler.enable()
sys.path.insert(0, "tests/ops")
import torch, ahn_ops, test_decode_cuda as T
dev = sys.argv[2]
args = T._bad(sys.argv[1])(T._valid_args())
if dev == "cpu":
    args = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
try:
    T._call(args); torch.cuda.synchronize(); print("NO ERROR")
except Exception as e:
    print(type(e).__name__, str(e)[:160])
'''
for dev, cases in (("cuda", CASES), ("cpu", ["k_shape", "a_missing"])):
    for c in cases:
        r = subprocess.run([sys.executable, "-c", CODE, c, dev], capture_output=True, text=True)
        last = (r.stdout.strip().splitlines() or [""])[-1]
        print(f"{dev:4} {c:15} rc={r.returncode} {last[:170]}", flush=True)
        if r.returncode not in (0,):
            print("   ", " | ".join(r.stderr.strip().splitlines()[:3])[:400])
