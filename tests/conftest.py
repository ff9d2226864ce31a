"""Test-wide settings.

* ``AHN_OPS_POISON=1``: the library's launchers fill every output they allocate with NaN
  (``ahn_ops/ops/common/alloc.py``), so an element a kernel forgets to write fails a test.
* Without a GPU, Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``); this must
  be set before triton is first imported, hence here and not in a test module.
"""

import os

os.environ.setdefault("AHN_OPS_POISON", "1")

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
