"""Launch tables of the fused AHN prefill (forward ``prefill.py`` and backward ``backward.py``).

The kernels (``prefill_kernels.py``, ``backward_attn.py``, ``backward_mem.py``) take their per-sequence
metadata from an ``[N, 8]`` int32 table and their work items from ``[n, 2]`` (sequence, block) tables:

- :func:`prefill_tables`: a prefill from position 0's sequence lengths and tables, from ``cu_seqlens`` or ``B x T``;
- :func:`seq_tables`: the metadata (row ``n``: ``bos, T, P, kx_bos, kpos0, sink_bos, chunk offset, 0``) and
  the chunk table (blocks of ``BT`` = 64 rows, one memory chunk each);
- :func:`row_blocks`: the ``_fwd_kernel`` grid's table of blocks of ``BM`` query rows;
- :func:`cached_table`: these tables (and the backward's sink work table) cached by their contents
  (``_TABLES``, the ``_TABLES_MAX`` most recent);
- :func:`to_device`: one host -> device copy without a host sync.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Tuple

import torch
import triton

__all__ = ["BT", "cached_table", "to_device", "prefill_tables", "seq_tables", "row_blocks"]

BT = 64  # memory chunk == query block: a query block reads exactly one chunk state


# Launch tables by their contents: a prefill of the same lengths (every step of a training run at a fixed
# sequence length, every layer of one forward) reuses them instead of building them on the host and
# copying them to the device (a synchronous copy from pageable memory: the GPU idled while the host
# went on with the launch). The tensors are read-only: never write into a returned table.
_TABLES: "OrderedDict[tuple, tuple]" = OrderedDict()
_TABLES_MAX = 64


def lru_get(cache: "OrderedDict", key, build, max_size: int):
    """``cache[key]``, else ``build()``'s value stored there; past ``max_size`` entries the least recent goes."""
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        return hit
    val = build()
    cache[key] = val
    while len(cache) > max_size:
        cache.popitem(last=False)
    return val


def cached_table(key: tuple, build):
    """The table cached under ``key``, else ``build()``'s, cached (past ``_TABLES_MAX`` the oldest goes)."""
    return lru_get(_TABLES, key, build, _TABLES_MAX)


def to_device(host: torch.Tensor, device) -> torch.Tensor:
    """One host -> device copy without a host sync where CUDA is involved (pinned staging)."""
    device = torch.device(device)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def seq_tables(lens: List[int], starts: List[int], kx_bos: List[int], kpos0: List[int], sink_bos: List[int],
               device) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Per-sequence metadata ``[N, 8]`` int32 and the chunk table ``[NT, 2]`` (sequence, block).

    Row ``n`` of the metadata: ``bos, T, P, kx_bos, kpos0, sink_bos, chunk offset, 0``. Cached by
    contents (``_TABLES``); built with vectorised tensor ops and one pinned copy on a miss.
    """
    key = (tuple(lens), tuple(starts), tuple(kx_bos), tuple(kpos0), tuple(sink_bos), str(torch.device(device)))

    def build():
        n = len(lens)
        ln = torch.tensor(lens, dtype=torch.int64)
        nt = (ln + BT - 1) // BT
        bos = torch.cumsum(ln, 0) - ln
        coff = torch.cumsum(nt, 0) - nt
        NT = int(nt.sum())
        cols = [bos, ln, torch.tensor(starts, dtype=torch.int64), torch.tensor(kx_bos, dtype=torch.int64),
                torch.tensor(kpos0, dtype=torch.int64), torch.tensor(sink_bos, dtype=torch.int64), coff,
                torch.zeros(n, dtype=torch.int64)]
        rows = torch.stack(cols, 1) if n else torch.zeros(0, 8, dtype=torch.int64)
        if NT:
            seq_id = torch.repeat_interleave(torch.arange(n), nt)
            ch = torch.stack([seq_id, torch.arange(NT) - coff[seq_id]], 1)
        else:
            ch = torch.zeros(1, 2, dtype=torch.int64)
        if rows.numel() and int(rows.max()) >= 2 ** 31:
            raise ValueError(f"prefill: {int(ln.sum())} tokens in one call exceed the int32 launch tables")
        both = to_device(torch.cat([rows.reshape(-1), ch.reshape(-1)]).to(torch.int32), device)
        return both[:rows.numel()].view(n, 8), both[rows.numel():].view(-1, 2), NT

    return cached_table(key, build)


def row_blocks(lens: List[int], BM: int, device) -> Tuple[torch.Tensor, int]:
    """The ``_fwd_kernel`` grid's table ``[NB, 2]`` int32 (sequence, block of BM query rows) and NB."""
    def build():
        nb = torch.tensor([triton.cdiv(T, BM) for T in lens], dtype=torch.int64)
        NB = int(nb.sum())
        if NB == 0:
            return to_device(torch.zeros(1, 2, dtype=torch.int32), device), 0
        seq_id = torch.repeat_interleave(torch.arange(len(lens)), nb)
        first = torch.cumsum(nb, 0) - nb
        rows = torch.stack([seq_id, torch.arange(NB) - first[seq_id]], 1).to(torch.int32)
        return to_device(rows, device), NB

    return cached_table(("rows", tuple(lens), BM, str(torch.device(device))), build)


def prefill_tables(B: int, T: int, cu_seqlens, device):
    """A prefill from position 0 (the forward and the backward of ``prefill_fwd``): the sequence lengths
    (from ``cu_seqlens``, one host read, else ``B`` sequences of ``T``) and :func:`seq_tables`' tables,
    ``(lens, seq, chunks, NT)``."""
    cs = [int(x) for x in cu_seqlens.tolist()] if cu_seqlens is not None else [i * T for i in range(B + 1)]
    lens = [e - s for s, e in zip(cs[:-1], cs[1:])]
    N = len(lens)
    return (lens, *seq_tables(lens, [0] * N, cs[:-1], [0] * N, cs[:-1], device))
