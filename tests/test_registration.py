"""`import ahn_ops` alone registers every fused op as ``torch.ops.ahn.<name>`` (checked in a fresh interpreter,
so that no other test's imports can register one on its behalf)."""

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OPS = {"decode_step", "prefill_fwd", "prefill_cache", "prefill_bwd"}


def test_import_registers_every_op():
    code = ("import ahn_ops, torch\n"
            "names = []\n"
            "for n in " + repr(sorted(OPS)) + ":\n"
            "    try:\n"
            "        getattr(torch.ops.ahn, n).default\n"
            "        names.append(n)\n"
            "    except (AttributeError, RuntimeError):\n"
            "        pass\n"
            "print(','.join(names))\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert set(p.stdout.strip().split(",")) == OPS, p.stdout
