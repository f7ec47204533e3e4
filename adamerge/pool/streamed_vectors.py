"""Task vectors streamed from lazily read checkpoints: :class:`StreamedTaskVectors` (``modelpool.streaming``).

``vectors[name]`` is formed on access from :mod:`adamerge.pool.lazy_checkpoints` views of the fine-tuned checkpoints
(memory-mapped safetensors), validated from their headers before any tensor is read; residencies and the shared
interface are in :mod:`adamerge.pool.streamed`. :func:`pool_streamed_vectors` is what
:meth:`adamerge.pool.modelpool.ModelPool.vectors_of` returns with streaming on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from adamerge.pool.checkpoints import describe_source
from adamerge.pool.inventory import DTYPE_BYTES, TensorSpec
from adamerge.pool.key_filters import drop_excluded, select_tensors
from adamerge.pool.lazy_checkpoints import LazyStateDict, lazy_state_dict, meta_state, specs_of
from adamerge.pool.streamed import RESIDENCIES, StreamedVectorsBase, pinned, streaming_mode
from adamerge.pool.task_vectors import is_batchnorm_statistic, resolve_dtype, tied_aliases
from adamerge.pool.validation import validate_finetuned

__all__ = ["StreamedTaskVectors", "pool_streamed_vectors"]


@dataclass(frozen=True)
class _Column:
    """One task's values: a checkpoint ``θ_k`` (τ formed on read) or a delta already in hand (``with_task``)."""

    task: str
    state: Mapping[str, Tensor]
    is_delta: bool = False
    source: str = ""


class StreamedTaskVectors(StreamedVectorsBase):
    """Task vectors formed on access from (lazy) checkpoints: see the module docstring."""

    def __init__(self, columns: Sequence[_Column], pretrained: Mapping[str, Tensor], names: Sequence[str], *,
                 dtype: torch.dtype = torch.float32, aliases: Mapping[str, str] | None = None,
                 unscored_tasks: Sequence[str] = (), residency: str = "disk") -> None:
        if residency not in RESIDENCIES:
            raise ValueError(f"residency must be one of {RESIDENCIES}, got {residency!r}")
        self.columns = list(columns)
        self.task_names = [c.task for c in self.columns]
        self.pretrained = pretrained
        self.names = list(names)
        self.dtype = dtype
        self.aliases = dict(aliases or {})
        self.unscored_tasks = tuple(unscored_tasks)
        self.residency = residency
        self._cache: dict[str, Tensor] = {}
        self.formed = 0  # stacked tensors formed so far (each is K reads)

    @classmethod
    def from_sources(
        cls,
        pretrained: Any,
        finetuned: Mapping[str, Any],
        *,
        storage_dtype: str | torch.dtype = torch.float32,
        merge_batchnorm_statistics: bool = False,
        include: Sequence[str] | None = None,
        residency: str = "disk",
        sources: Mapping[str, str] | None = None,
        pretrained_source: str | None = None,
    ) -> StreamedTaskVectors:
        """Validate every fine-tuned checkpoint against θ0 from headers (no tensor is read) and stream their
        differences. Sources are anything :func:`~adamerge.pool.lazy_checkpoints.lazy_state_dict` takes."""
        if not finetuned:
            raise ValueError("at least one fine-tuned checkpoint is needed to form task vectors")
        where = pretrained_source or describe_source(pretrained)
        base = lazy_state_dict(pretrained)
        return cls.from_states(base, {task: lazy_state_dict(s) for task, s in finetuned.items()},
                               storage_dtype=storage_dtype, merge_batchnorm_statistics=merge_batchnorm_statistics,
                               include=include, residency=residency,
                               sources={t: (sources or {}).get(t, describe_source(s)) for t, s in finetuned.items()},
                               pretrained_source=where)

    @classmethod
    def from_states(
        cls,
        pretrained: Mapping[str, Tensor],
        finetuned: Mapping[str, Mapping[str, Tensor]],
        *,
        storage_dtype: str | torch.dtype = torch.float32,
        merge_batchnorm_statistics: bool = False,
        include: Sequence[str] | None = None,
        residency: str = "disk",
        sources: Mapping[str, str] | None = None,
        pretrained_source: str = "pretrained",
    ) -> StreamedTaskVectors:
        """As :meth:`TaskVectors.from_state_dicts` (same names, aliases and checks), over lazy or in-memory states."""
        dtype = resolve_dtype(storage_dtype)
        aliases = {} if isinstance(pretrained, LazyStateDict) else tied_aliases(pretrained)
        if isinstance(pretrained, LazyStateDict):
            pretrained = pretrained.subset([n for n in pretrained if n not in aliases])
        else:
            pretrained = {name: t.detach() for name, t in pretrained.items() if name not in aliases}
        pre_specs, pre_meta = specs_of(pretrained), meta_state(pretrained)
        columns = []
        for task, state in finetuned.items():
            if isinstance(state, LazyStateDict):  # safetensors files hold no tied copies
                state = state.subset([n for n in state if n not in aliases])
            else:
                own = tied_aliases(state)
                state = {n: t for n, t in state.items() if n not in aliases and not (n in own and n not in pretrained)}
            source = (sources or {}).get(task, task)
            validate_finetuned(pre_meta, meta_state(state), source=source,
                               pretrained_source=pretrained_source)
            columns.append(_Column(task, state, source=source))
        names = [name for name, spec in pre_specs.items()
                 if spec.is_floating_point and (merge_batchnorm_statistics or not is_batchnorm_statistic(name))]
        if include is not None:
            names = select_tensors(names, include, what="modelpool.include")
        return cls(columns, pretrained, names, dtype=dtype, aliases=aliases, residency=residency)

    def _row(self, column: _Column, name: str, base: Tensor | None, rows: tuple[int, int] | None = None) -> Tensor:
        """τ_k of ``name`` (or of its rows) in the storage dtype: θ_k − θ0 in float32, or a delta as it is."""
        value = column.state[name] if rows is None else _rows_of(column.state, name, rows)
        if column.is_delta:
            return value.to(self.dtype)
        return value.to(torch.float32, copy=True).sub_(base).to(self.dtype)

    def task_slice(self, name: str, task: int, rows: tuple[int, int] | None = None,
                   base: Tensor | None = None) -> Tensor:
        """Task ``task``'s slice of ``name`` (storage dtype): from the host cache when it holds it, else read from
        that task's checkpoint alone -- what a merge that visits the tasks one at a time holds, whatever K is.
        ``rows`` (start, stop): only that band of the first dimension, read alone from the checkpoints; ``base``:
        θ0's values there (float32, on the host) when the caller holds them, so θ0's checkpoint is not read again."""
        cached = self._cache.get(name)
        if cached is not None:
            return cached[task] if rows is None else cached[task][rows[0]:rows[1]]
        column = self.columns[task]
        if column.is_delta:
            return self._row(column, name, None, rows)
        if base is not None and DTYPE_BYTES[self.pretrained_specs()[name].dtype] > 4:
            base = None  # a float64 θ0 is not exactly its float32 copy: read it
        if base is None:
            base = self.pretrained[name] if rows is None else _rows_of(self.pretrained, name, rows)
        return self._row(column, name, base, rows)

    def pretrained_specs(self) -> dict[str, TensorSpec]:
        if getattr(self, "_pretrained_specs", None) is None:
            self._pretrained_specs = specs_of(self.pretrained)
        return self._pretrained_specs

    def stacked(self, name: str) -> Tensor:
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        base = self.pretrained[name].float() if any(not c.is_delta for c in self.columns) else None
        stacked = torch.empty((len(self.columns), *self.shape(name)), dtype=self.dtype)
        for k, column in enumerate(self.columns):  # one task's checkpoint tensor and difference alive at a time
            stacked[k] = self._row(column, name, base)
        del base
        self.formed += 1
        if self.residency == "host":
            stacked = pinned(stacked)
            self._cache[name] = stacked
        return stacked

    def task_vector(self, task: str | int) -> dict[str, Tensor]:
        """One task's ``τ`` per merged tensor (float32, rounded through the storage dtype as the in-memory pool is),
        read from that task's checkpoint only."""
        index = self.task_names.index(task) if isinstance(task, str) else task
        column = self.columns[index]
        out = {}
        for name in self.names:
            if name in self._cache:
                out[name] = self._cache[name][index].float()
            else:
                base = None if column.is_delta else self.pretrained[name].float()
                out[name] = self._row(column, name, base).float()
        return out

    def _replace(self, columns: Sequence[_Column], unscored: Sequence[str]) -> StreamedTaskVectors:
        return StreamedTaskVectors(columns, self.pretrained, self.names, dtype=self.dtype, aliases=self.aliases,
                                   unscored_tasks=unscored, residency=self.residency)

    def select(self, tasks: Sequence[str]) -> StreamedTaskVectors:
        by_task = {c.task: c for c in self.columns}
        return self._replace([by_task[t] for t in tasks], [t for t in self.unscored_tasks if t in tasks])

    def with_task(self, task: str, vectors: Mapping[str, Tensor], *, scored: bool = True) -> StreamedTaskVectors:
        """These task vectors and one more (a delta already in hand, e.g. a residual base merge or an alignment
        vector), appended as the last task: it is held in memory (1× the merged tensors)."""
        self._check_new_task(task, vectors)
        unscored = self.unscored_tasks if scored else (*self.unscored_tasks, task)
        return self._replace([*self.columns, _Column(task, dict(vectors), is_delta=True, source=task)], unscored)

    def memory_bytes(self) -> int:
        """Task-vector bytes held: the host cache (``host``), the deltas added with ``with_task``; 0 on ``disk``."""
        cached = sum(t.numel() * t.element_size() for t in self._cache.values())
        extra = sum(t.numel() * t.element_size() for c in self.columns if c.is_delta for t in c.state.values())
        return cached + extra

    def memory_report(self) -> dict[str, float | int | str]:
        return {
            "tasks": self.num_tasks,
            "tensors": len(self.names),
            "parameters_per_task": self.parameters_per_task(),
            "storage_dtype": str(self.dtype).removeprefix("torch."),
            "streaming": self.residency,
            "task_vectors_mb": self.memory_bytes() / 2**20,
            "largest_block_slices_mb": self.largest_block_bytes() / 2**20,
        }

    def largest_block_bytes(self) -> int:
        """One block's K slices in the storage dtype: what a block-by-block merge holds of the task vectors."""
        size = torch.empty((), dtype=self.dtype).element_size()
        per_block = [sum(math.prod(self.shape(name)) for name in block) for block in self.blocks()]
        return self.num_tasks * max(per_block, default=0) * size

    def export_record(self) -> dict[str, Any]:
        """What merge_config.json says about how the task vectors were held."""
        return {"streaming": self.residency, "compression": None}


def pool_streamed_vectors(pool: Any, pretrained: Mapping[str, Tensor], sources: Mapping[str, Any]) -> StreamedTaskVectors:
    """``pool.vectors_of(sources)`` with ``modelpool.streaming`` on: each checkpoint opened lazily (its keys aligned
    onto the backbone's as the pool's own loader aligns them, :meth:`~adamerge.pool.modelpool.ModelPool.align_names`;
    its excluded entries dropped), validated from headers."""
    states = {}
    for task, source in sources.items():
        state = lazy_state_dict(source) if isinstance(source, (str, os.PathLike)) else pool.load_checkpoint(source)
        if isinstance(state, LazyStateDict):
            state = state.renamed(pool.align_names(list(state), source))
            state = state.subset(drop_excluded({n: n for n in state}, pool.exclude))
        else:
            state = drop_excluded(state, pool.exclude)
        states[task] = state
    return StreamedTaskVectors.from_states(
        pretrained, states, storage_dtype=pool.storage_dtype,
        merge_batchnorm_statistics=pool.merge_batchnorm_statistics, include=pool.include,
        residency=streaming_mode(pool.streaming) or "disk",
        sources={task: describe_source(source) for task, source in sources.items()},
        pretrained_source=describe_source(pool.pretrained_source or pool.backbone),
    )


def _rows_of(state: Mapping[str, Tensor], name: str, rows: tuple[int, int]) -> Tensor:
    """Rows ``start:stop`` of ``state[name]``: read alone from a lazy checkpoint, sliced from a tensor in memory."""
    if isinstance(state, LazyStateDict):
        return state.rows(name, *rows)
    return state[name][rows[0]:rows[1]]
