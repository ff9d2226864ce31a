#!/usr/bin/env python
"""Self-distil the AHN weights of a Qwen2.5 model: the CLI of :mod:`ahn_ops.distill`, same flags.

    python python/distill.py --help        # == python -m ahn_ops.distill --help
    python python/distill.py --tiny --synthetic passkey --seq-len 128 --window 32 --steps 20 --out /tmp/ahn
    torchrun --nproc-per-node 4 python/distill.py ... --grad-accum 2
"""

from __future__ import annotations

import sys

# re-exported: this script used to define them
from ahn_ops.distill import init_distributed, main as _main, parse_args, tiny_byte_qwen  # noqa: F401


def main(argv=None):
    return _main(argv, prog=None)  # prog None: usage shows this script's name


if __name__ == "__main__":
    sys.exit(main())
