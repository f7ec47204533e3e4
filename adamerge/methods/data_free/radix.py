"""Exact order statistics over the whole model without holding it: radix select on float32 bit patterns.

:func:`order_statistics` gives, per task, the values ``torch.kthvalue`` would return on the concatenation of every
tensor's entries, from two reads of a replayable source of ``[K, n]`` chunks (a 65 536-bin histogram per task and
read). TIES and PCB with ``scope=model`` over a streamed pool use it (:mod:`adamerge.methods.data_free.streamed`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["order_statistics"]


_HALF = 1 << 16
_PIECE = 1 << 20


def _sortable_keys(values: Tensor) -> Tensor:
    """float32 values → int64 keys in [0, 2³²) that sort as the values do (sign bit set for ≥ 0, all bits flipped
    for < 0; −0.0 sorts just below +0.0)."""
    bits = values.float().contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, (~bits) & 0xFFFFFFFF, bits | 0x80000000)


def _key_value(key: int) -> float:
    raw = key ^ 0x80000000 if key & 0x80000000 else (~key) & 0xFFFFFFFF
    return struct.unpack("<f", struct.pack("<I", raw))[0]


def _pieces(chunk: Tensor) -> Iterator[tuple[int, Tensor]]:
    """``(task, keys)`` of a ``[K, n]`` chunk in pieces of at most 2²⁰ entries (bounded int64 temporaries)."""
    for k in range(chunk.shape[0]):
        row = chunk[k]
        for start in range(0, row.numel(), _PIECE):
            yield k, _sortable_keys(row[start:start + _PIECE])


def order_statistics(chunks: Callable[[], Iterator[Tensor]], num_tasks: int, positions: Sequence[int]) -> Tensor:
    """Per task, the values at 0-based ``positions`` of the ascending sort of all its entries, exactly (what
    ``torch.kthvalue(position + 1)`` gives on their concatenation), reading ``chunks()`` twice.

    ``chunks()`` yields ``[K, n]`` float32 pieces (one tensor's values per task); the first read histograms the high
    16 bits of every entry's sortable key, the second the low 16 bits of the entries in the bin each position falls in.
    Returns ``[len(positions), K]`` float32.
    """
    high = torch.zeros(num_tasks, _HALF, dtype=torch.int64)
    for chunk in chunks():
        for k, keys in _pieces(chunk):
            high[k] += torch.bincount(keys >> 16, minlength=_HALF)
        del chunk
    cumulative = high.cumsum(dim=1)
    found = [[(0, 0) for _ in range(num_tasks)] for _ in positions]  # (bin, rank within the bin)
    for j, position in enumerate(positions):
        for k in range(num_tasks):
            bin_ = int(torch.searchsorted(cumulative[k], position, right=True))
            below = int(cumulative[k, bin_ - 1]) if bin_ else 0
            found[j][k] = (bin_, position - below)
    low = torch.zeros(len(positions), num_tasks, _HALF, dtype=torch.int64)
    for chunk in chunks():
        for k, keys in _pieces(chunk):
            bins = keys >> 16
            for j in range(len(positions)):
                selected = keys[bins == found[j][k][0]] & 0xFFFF
                if selected.numel():
                    low[j, k] += torch.bincount(selected, minlength=_HALF)
        del chunk
    values = torch.empty(len(positions), num_tasks)
    for j in range(len(positions)):
        for k in range(num_tasks):
            bin_, rank = found[j][k]
            low_bits = int(torch.searchsorted(low[j, k].cumsum(0), rank, right=True))
            values[j, k] = _key_value((bin_ << 16) | low_bits)
    return values
