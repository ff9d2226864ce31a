"""Fixtures shared by the op tests."""

from __future__ import annotations

import pytest


@pytest.fixture(params=[64, 128], ids=["rows64", "rows128"])
def fwd_rows(request, monkeypatch):
    """Query rows per ``_fwd_kernel`` program (``prefill.CONFIG["fwd_rows"]``): 128 rows cover two
    memory chunks (two states, in-chunk mask on a [128, 128] product, a first chunk without state)."""
    from ahn_ops.ops.ahn_attention import prefill

    monkeypatch.setitem(prefill.CONFIG, "fwd_rows", request.param)
    return request.param
