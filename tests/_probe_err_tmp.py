import sys, torch, ahn_ops
sys.path.insert(0, "tests/ops")
from test_decode_cpu import _valid_call
args = _valid_call()
names = list(args)
which = sys.argv[1]
if which == "kw-valid":
    print(torch.ops.ahn.decode_step(**args).shape)
elif which == "pos-valid":
    print(torch.ops.ahn.decode_step(*args.values()).shape)
elif which == "pos-bad":
    args["q"] = args["q"][:, :, :8]
    try:
        torch.ops.ahn.decode_step(*args.values())
    except ValueError as e:
        print("ValueError", e)
elif which == "kind-bad":
    args["kind"] = "gla"
    try:
        torch.ops.ahn.decode_step(*args.values())
    except ValueError as e:
        print("ValueError", e)
elif which == "window-bad":
    args["sinks"] = -1
    try:
        torch.ops.ahn.decode_step(*args.values())
    except ValueError as e:
        print("ValueError", e)
