"""The trainer's command line: ``python -m ahn_ops.distill`` and its wrapper ``python/distill.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


@pytest.mark.parametrize("argv", [("-m", "ahn_ops.distill"), (str(ROOT / "python" / "distill.py"),)])
def test_help_lists_the_flags(argv):
    r = _run(*argv, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage:")
    for flag in ("--model", "--tiny", "--window", "--sinks", "--synthetic", "--grad-accum", "--resume", "--out"):
        assert flag in r.stdout


def test_module_without_model_is_a_usage_error():
    r = _run("-m", "ahn_ops.distill", "--synthetic", "passkey")
    assert r.returncode == 2 and "give --model or --tiny" in r.stderr


def test_main_trains_a_tiny_model(tmp_path):
    from ahn_ops.distill import main

    rc = main(["--tiny", "--synthetic", "passkey", "--seq-len", "64", "--window", "16", "--min-window", "12",
               "--max-window", "40", "--steps", "1", "--no-progress", "--out", str(tmp_path),
               "--log-file", str(tmp_path / "log.jsonl")])
    assert rc == 0
    assert (tmp_path / "checkpoint-1" / "model.safetensors").exists()
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 1
