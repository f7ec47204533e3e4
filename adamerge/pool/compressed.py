"""Task vectors compressed to low rank, per matrix and task, and kept as factors (``modelpool.compression``).

Each 2-D task-vector slice ``τ_{k,l} = U S Vᵀ`` (thin SVD) is truncated to its leading ``r`` singular triplets and
stored as ``(U_r S_r, V_rᵀ)``, as TSV's compression (TSV-C, Gargiulo et al. 2025) keeps each task's top singular
vectors per layer. ``r`` per matrix is one of

* ``rank``: a fixed number (at most ``min(m, n)``);
* ``rank_fraction``: ``⌈f · min(m, n)⌉`` (at least 1) -- TSV-C keeps ``1/K``;
* ``energy``: the fewest triplets whose squared singular values hold a fraction ``e`` of ``‖τ_{k,l}‖²_F``.

Tensors that are not matrices (biases, norms, conv kernels) are kept dense: they are a small share of a model. A slice
whose factors would not be smaller than it (``r (m + n) ≥ m n``) is kept as its truncated dense matrix, so compression
never stores more than the dense vectors.
Compression is applied as the task vectors are formed, one tensor at a time (over a streamed pool, nothing else of
the model is read meanwhile), so the dense vectors never exist whole. What it kept -- the setting, stored/dense
elements and the share of ``Σ‖τ‖²_F`` kept -- is :meth:`LowRankTaskVectors.compression_report`, recorded under
``task_vectors.compression`` in the export's ``merge_config.json``.

Merges use the factors: a data-free method runs block by block on the reconstructed block (see
:mod:`adamerge.methods.data_free.streamed`), and learning merges ``Σ_k λ_k U_k S_k V_kᵀ`` as one product of the
concatenated factors (:class:`adamerge.methods.learned.merged_streamed.LowRankMergedModel`, as its
:class:`~adamerge.methods.learned.merged_streamed.LoRAMergedModel` does for adapters), which is also all autograd
keeps. SVDs run in float64 for float64 storage, else in float32 (float64 if LAPACK fails to converge), with ``torch.linalg``:
the pool sits below the data-free methods and their spectral helpers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from adamerge.errors import ConfigError
from adamerge.pool.lora import LoRATaskVectors
from adamerge.pool.streamed import StreamedVectorsBase

__all__ = ["LowRankTaskVectors", "compress", "check_compression", "kept_rank", "COMPRESSION_KEYS"]

COMPRESSION_KEYS = ("rank", "rank_fraction", "energy")
Factors = tuple[Tensor, Tensor]  # (U_r S_r [m, r], V_rᵀ [r, n])
Entry = Factors | Tensor  # one task's slice: factors of a matrix, or a dense tensor


def check_compression(setting: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``modelpool.compression`` checked: null, or exactly one of ``rank`` (int ≥ 1), ``rank_fraction`` (0, 1] or
    ``energy`` (0, 1]."""
    if setting is None:
        return None
    if not isinstance(setting, Mapping):
        raise ConfigError(f"modelpool.compression={setting!r} is invalid: null or one of {{rank: 64}}, "
                          "{rank_fraction: 0.125}, {energy: 0.95}")
    given = {k: v for k, v in setting.items() if v is not None}
    unknown = sorted(set(given) - set(COMPRESSION_KEYS))
    if unknown or len(given) != 1:
        raise ConfigError(f"modelpool.compression={dict(setting)!r} is invalid: give exactly one of "
                          f"{', '.join(COMPRESSION_KEYS)}" + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    key, value = next(iter(given.items()))
    if key == "rank":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"modelpool.compression.rank={value!r} is invalid: a whole number >= 1")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"modelpool.compression.{key}={value!r} is invalid: a fraction in (0, 1]")
    return {key: value}


def kept_rank(singular_values: Tensor, setting: Mapping[str, Any]) -> int:
    """How many leading triplets a matrix with these (descending) singular values keeps under ``setting``."""
    full = singular_values.numel()
    if "rank" in setting:
        return min(int(setting["rank"]), full)
    if "rank_fraction" in setting:
        # ⌈f · r⌉, at least 1, with f read exactly as the data-free steps read fractions (steps.count_to_keep).
        fraction = Fraction(float(setting["rank_fraction"])).limit_denominator(10**9)
        return min(full, max(1, math.ceil(fraction * full))) if full else 0
    energy = singular_values.double().square()
    total = float(energy.sum())
    if total == 0:
        return 0
    cumulative = energy.cumsum(0) / total
    # The fewest leading triplets with cumulative energy ≥ e (a hair of slack for float rounding at e = 1).
    return min(full, int(torch.searchsorted(cumulative, float(setting["energy"]) - 1e-12)) + 1)


def _svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD in the matrix's dtype (float64, or float32); float32 retried in float64 if LAPACK does not converge."""
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        if matrix.dtype == torch.float64:
            raise
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        return u.float(), s.float(), vh.float()


class LowRankTaskVectors(StreamedVectorsBase):
    """Task vectors as per-task factors of every matrix (dense for the rest); ``vectors[name]`` reconstructs one
    tensor's ``[K, *shape]`` on access."""

    def __init__(self, task_names: Sequence[str], pretrained: Mapping[str, Tensor], entries: Mapping[str, list[Entry]],
                 shapes: Mapping[str, tuple[int, ...]], *, dtype: torch.dtype, aliases: Mapping[str, str] | None = None,
                 unscored_tasks: Sequence[str] = (), setting: Mapping[str, Any] | None = None,
                 report: Mapping[str, Any] | None = None, streaming: str | None = None) -> None:
        self.task_names = list(task_names)
        self.pretrained = pretrained
        self.entries = {name: list(e) for name, e in entries.items()}
        self.names = list(self.entries)
        self.shapes = {name: tuple(s) for name, s in shapes.items()}
        self.dtype = dtype
        self.aliases = dict(aliases or {})
        self.unscored_tasks = tuple(unscored_tasks)
        self.setting = dict(setting or {})
        self.report = dict(report or {})
        self.streaming = streaming

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def _dense(self, entry: Entry, name: str) -> Tensor:
        if isinstance(entry, tuple):
            compute = torch.float64 if self.dtype == torch.float64 else torch.float32
            us, vh = entry
            return (us.to(compute) @ vh.to(compute)).reshape(self.shapes[name]).to(self.dtype)
        return entry

    def stacked(self, name: str) -> Tensor:
        return torch.stack([self._dense(entry, name) for entry in self.entries[name]])

    def task_vector(self, task: str | int) -> dict[str, Tensor]:
        index = self.task_names.index(task) if isinstance(task, str) else task
        return {name: self._dense(entries[index], name).float() for name, entries in self.entries.items()}

    def _replace(self, task_names: Sequence[str], entries: Mapping[str, list[Entry]],
                 unscored: Sequence[str]) -> LowRankTaskVectors:
        return LowRankTaskVectors(task_names, self.pretrained, entries, self.shapes, dtype=self.dtype,
                                  aliases=self.aliases, unscored_tasks=unscored, setting=self.setting,
                                  report=self.report, streaming=self.streaming)

    def select(self, tasks: Sequence[str]) -> LowRankTaskVectors:
        index = [self.task_names.index(t) for t in tasks]
        return self._replace(tasks, {n: [e[i] for i in index] for n, e in self.entries.items()},
                             [t for t in self.unscored_tasks if t in tasks])

    def with_task(self, task: str, vectors: Mapping[str, Tensor], *, scored: bool = True) -> LowRankTaskVectors:
        """One more task, appended dense and uncompressed (a residual base merge or an alignment vector is exact)."""
        self._check_new_task(task, vectors)
        unscored = self.unscored_tasks if scored else (*self.unscored_tasks, task)
        entries = {n: [*e, vectors[n].to(self.dtype).reshape(self.shapes[n])] for n, e in self.entries.items()}
        return self._replace([*self.task_names, task], entries, unscored)

    def memory_bytes(self) -> int:
        def size(entry: Entry) -> int:
            parts = entry if isinstance(entry, tuple) else (entry,)
            return sum(t.numel() * t.element_size() for t in parts)

        return sum(size(entry) for entries in self.entries.values() for entry in entries)

    def memory_report(self) -> dict[str, Any]:
        return {"tasks": self.num_tasks, "tensors": len(self.names), "parameters_per_task": self.parameters_per_task(),
                "storage_dtype": str(self.dtype).removeprefix("torch."), "task_vectors_mb": self.memory_bytes() / 2**20,
                "compression": self.compression_report()}

    def compression_report(self) -> dict[str, Any]:
        return {"setting": dict(self.setting), **self.report}

    def export_record(self) -> dict[str, Any]:
        return {"streaming": self.streaming or False, "compression": self.compression_report()}


def compress(vectors: Any, setting: Mapping[str, Any]) -> LowRankTaskVectors:
    """``vectors`` (in memory or streamed) compressed under ``setting`` (see :func:`check_compression`), one tensor at
    a time: each tensor's K slices are formed (read), factored and dropped before the next."""
    setting = check_compression(setting)
    if setting is None:
        raise ValueError("compress() needs a setting")
    if isinstance(vectors, LoRATaskVectors):
        raise ConfigError("modelpool.compression applies to full task vectors; a pool of LoRA adapters is already low "
                          "rank: set modelpool.compression=null")
    if isinstance(vectors, LowRankTaskVectors):
        raise ConfigError("these task vectors are already compressed")
    entries: dict[str, list[Entry]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    stored = dense = matrices = 0
    kept_energy = total_energy = 0.0
    ranks: list[int] = []
    for name, stacked in vectors.vectors.items():
        shapes[name] = tuple(stacked.shape[1:])
        dense += stacked[0].numel() * stacked.shape[0]
        if stacked.dim() != 3 or 0 in stacked.shape[1:]:
            entries[name] = [slice_.clone() for slice_ in stacked]
            stored += stacked.numel()
            continue
        matrices += 1
        compute = torch.float64 if stacked.dtype == torch.float64 else torch.float32
        per_task: list[Entry] = []
        for slice_ in stacked:
            u, s, vh = _svd(slice_.to(compute))
            rank = kept_rank(s, setting)
            us, vh = (u[:, :rank] * s[:rank]).to(stacked.dtype).contiguous(), vh[:rank].to(stacked.dtype).contiguous()
            rows, cols = slice_.shape
            if rank * (rows + cols) >= rows * cols:  # factors no smaller than the slice: keep the truncation dense
                per_task.append((us.to(compute) @ vh.to(compute)).to(stacked.dtype))
                stored += rows * cols
            else:
                per_task.append((us, vh))
                stored += rank * (rows + cols)
            kept_energy += float(s[:rank].double().square().sum())
            total_energy += float(s.double().square().sum())
            ranks.append(rank)
            del u, s, vh
        entries[name] = per_task
        del stacked
    report = {
        "matrices": matrices,
        "dense_elements": dense,
        "stored_elements": stored,
        "ratio": stored / dense if dense else 1.0,  # stored / dense elements over every merged tensor
        "kept_energy": kept_energy / total_energy if total_energy else 1.0,  # Σ kept σ² / Σ σ² over the matrices
        "rank_min": min(ranks, default=0),
        "rank_mean": sum(ranks) / len(ranks) if ranks else 0.0,
        "rank_max": max(ranks, default=0),
    }
    return LowRankTaskVectors(vectors.task_names, vectors.pretrained, entries, shapes, dtype=vectors.storage_dtype,
                              aliases=vectors.aliases, unscored_tasks=vectors.unscored_tasks, setting=setting,
                              report=report, streaming=getattr(vectors, "residency", None))
