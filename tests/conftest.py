"""Test-wide settings.

* ``AHN_OPS_POISON=1``: the library's launchers fill every output they allocate with NaN
  (``ahn_ops/ops/common/alloc.py``), so an element a kernel forgets to write fails a test.
* Without a GPU, Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``); this must
  be set before triton is first imported, hence here and not in a test module. With a GPU,
  ``TRITON_F32_DEFAULT=ieee`` (below).
* ``AHN_TESTS_EAGER=1``: failures are printed as they happen.
* ``AHN_PREFILL_ENGINE`` (the library's own switch, README.md) / ``AHN_TESTS_BWD_BAND``: the whole suite with
  that prefill forward engine (``prefill.CONFIG["band"]``: auto, no_sm90, sm90, cudnn, triton) or backward band
  (``backward.CONFIG["band"]``: auto, sm90), the GPU check of an engine before it becomes a default. Tests that
  pick an engine themselves still do.
* ``AHN_TESTS_SHARD=i/n``: only the i-th of n disjoint shares of the collected tests (by a hash of each test's
  id, so the shares do not depend on the collection order): the GPU suite is longer than one 10-minute call
  of the device tool, and the n shares of n calls cover it (benchmarks/device_check.sh, "tests").
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
else:
    # fp32 operands of tl.dot default to TF32 on a GPU (10-bit mantissa): the fp32 tests compare the
    # kernels' algebra with the fp32 reference at 1e-5, so they ask for full-precision products (the
    # library never sends fp32 to the Triton kernels itself: ``backend="auto"`` takes the chunked path).
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")


def pytest_configure(config):
    import importlib

    if os.environ.get("AHN_PREFILL_ENGINE"):  # (the library reads it at import)
        mod = importlib.import_module("ahn_ops.ops.ahn_attention.prefill")
        print(f"AHN_PREFILL_ENGINE: prefill.CONFIG['band'] = {mod.CONFIG['band']!r}")
    if os.environ.get("AHN_TESTS_BWD_BAND"):
        mod = importlib.import_module("ahn_ops.ops.ahn_attention.backward")
        mod.CONFIG["band"] = os.environ["AHN_TESTS_BWD_BAND"]
        print(f"AHN_TESTS_BWD_BAND: backward.CONFIG['band'] = {mod.CONFIG['band']!r}")


def _shard():
    """``(i, n)`` from ``AHN_TESTS_SHARD=i/n`` (1 <= i <= n), or None."""
    spec = os.environ.get("AHN_TESTS_SHARD", "")
    if not spec:
        return None
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        i = n = 0
    if not 1 <= i <= n:
        raise ValueError(f"AHN_TESTS_SHARD must be i/n with 1 <= i <= n, got {spec!r}")
    return i, n


def pytest_collection_modifyitems(config, items):
    shard = _shard()
    if shard is None:
        return
    import zlib

    i, n = shard
    mine = [zlib.crc32(it.nodeid.encode()) % n == i - 1 for it in items]
    config.hook.pytest_deselected(items=[it for it, m in zip(items, mine) if not m])
    items[:] = [it for it, m in zip(items, mine) if m]


def pytest_runtest_logreport(report):
    """``AHN_TESTS_EAGER=1``: print a failure's traceback as soon as it happens (device runs end at a
    hard time limit, before pytest's own summary)."""
    if os.environ.get("AHN_TESTS_EAGER") == "1" and report.failed:
        print(f"\n=== FAILED {report.nodeid} ({report.when})\n{report.longreprtext[-3000:]}\n", flush=True)
