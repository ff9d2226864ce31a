"""``AHN_TESTS_SHARD=i/n`` (tests/conftest.py): the shares are disjoint and together the whole suite."""

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FILES = ["tests/ops/test_tri_inverse.py", "tests/test_merge_errors.py"]


def _collect(shard):
    env = dict(os.environ)
    env.pop("AHN_TESTS_SHARD", None)
    if shard:
        env["AHN_TESTS_SHARD"] = shard
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *FILES],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return p.returncode, {ln for ln in p.stdout.splitlines() if "::" in ln}, p.stdout + p.stderr


def test_shards_partition_the_suite():
    rc, every, out = _collect(None)
    assert rc == 0 and len(every) > 10, out[-2000:]
    parts = []
    for shard in ("1/3", "2/3", "3/3"):
        rc, got, out = _collect(shard)
        assert rc == 0 and got, out[-2000:]  # (every share of these files holds tests)
        parts.append(got)
    assert set().union(*parts) == every
    assert sum(len(p) for p in parts) == len(every)


def test_bad_shard_is_refused():
    for bad in ("3/2", "a/b"):
        rc, _, out = _collect(bad)
        assert rc != 0 and "AHN_TESTS_SHARD must be i/n" in out, (bad, out[-1500:])
