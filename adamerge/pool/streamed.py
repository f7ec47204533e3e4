"""Streamed task vectors, what they share: ``τ_k = θ_k − θ_0`` formed one tensor at a time, on access.

:class:`StreamedVectorsBase` is the :class:`~adamerge.pool.task_vectors.TaskVectors` interface over one method,
``stacked(name)`` (``[K, *shape]`` in the storage dtype, computed when read and dropped by the caller when done):
:class:`~adamerge.pool.streamed_vectors.StreamedTaskVectors` forms it from lazily read checkpoints
(:mod:`adamerge.pool.lazy_checkpoints`), :class:`~adamerge.pool.compressed.LowRankTaskVectors` from low-rank
factors. Two residencies (``modelpool.streaming``, :func:`streaming_mode`):

* ``disk`` (``true``): nothing is kept; every access reads the K slices from the memory-mapped files again.
* ``host``: each tensor's K slices are formed once, on first access, and kept on the host (page-locked when CUDA is
  available, so that the copies to the device overlap); the loading peak is one tensor's slices, not the K whole
  checkpoints the in-memory pool reads before stacking.

A streamed pool is never held whole: its tensors are visited block by block (:func:`block_runs`: contiguous runs of
tensors of one ``layers.<i>`` / ``h.<i>`` / ``blocks.<i>`` block, :data:`~adamerge.pool.key_filters.BLOCK_PATTERN`,
every other tensor alone). Data-free methods run over it in :mod:`adamerge.methods.data_free.streamed`; learning
fetches each tensor's slices in the forward and the backward pass
(:mod:`adamerge.methods.learned.merged_streamed`). Steps that transform every task vector at once refuse it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from adamerge.errors import ConfigError
from adamerge.pool.key_filters import BLOCK_PATTERN
from adamerge.pool.lazy_checkpoints import LazyStateDict
from adamerge.pool.task_vectors import TaskVectors

__all__ = ["StreamedVectorsBase", "block_runs", "streaming_mode", "pinned", "RESIDENCIES"]

RESIDENCIES = ("disk", "host")


def streaming_mode(setting: Any) -> str | None:
    """``modelpool.streaming`` as None (off), ``"disk"`` or ``"host"``; ``true`` means ``disk``."""
    if setting is None or setting is False or setting == "false":
        return None
    if setting is True or setting == "true":
        return "disk"
    if setting in RESIDENCIES:
        return str(setting)
    raise ConfigError(f"modelpool.streaming={setting!r} is invalid: false (task vectors in memory), true or 'disk' "
                      "(read from the memory-mapped checkpoints at every use) or 'host' (formed one tensor at a time, "
                      "kept on the host)")


def block_runs(names: Sequence[str], pattern: str = BLOCK_PATTERN) -> list[list[str]]:
    """``names`` cut into contiguous runs of one block each (the first group of ``pattern`` is the block index); a
    tensor outside the blocks is a run of its own. Order is kept, so a pass over the runs visits the tensors as a pass
    over ``names`` does (DARE's draws depend on it)."""
    regex = re.compile(pattern)
    runs: list[list[str]] = []
    previous: str | None = None
    for name in names:
        match = regex.search(name)
        key = f"block {match.group(1)}" if match else None
        if key is not None and key == previous:
            runs[-1].append(name)
        else:
            runs.append([name])
        previous = key
    return runs


def pinned(tensor: Tensor) -> Tensor:
    """Page-locked when CUDA is available (asynchronous host → device copies), else as it is."""
    if torch.cuda.is_available() and tensor.device.type == "cpu" and not tensor.is_pinned():
        return tensor.pin_memory()
    return tensor


class _LazyVectors(Mapping[str, Tensor]):
    """``vectors`` of a streamed pool: ``[K, *shape]`` formed on each access (kept only with host residency)."""

    def __init__(self, owner: StreamedVectorsBase) -> None:
        self._owner = owner

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._owner.name_set:
            raise KeyError(name)
        return self._owner.stacked(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner.names)

    def __len__(self) -> int:
        return len(self._owner.names)

    def __contains__(self, name: object) -> bool:
        return name in self._owner.name_set


class StreamedVectorsBase:
    """What streamed and compressed task vectors share: the TaskVectors interface over ``stacked(name)``."""

    streamed = True  # read by static_method, MergedModel and apply_base (they refuse or stream; never materialise)
    task_names: list[str]
    pretrained: Mapping[str, Tensor]
    names: list[str]
    aliases: dict[str, str]
    unscored_tasks: tuple[str, ...]
    dtype: torch.dtype

    def stacked(self, name: str) -> Tensor:
        raise NotImplementedError

    @property
    def name_set(self) -> frozenset[str]:
        return frozenset(self.names)

    @property
    def vectors(self) -> Mapping[str, Tensor]:
        return _LazyVectors(self)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.dtype

    def shape(self, name: str) -> tuple[int, ...]:
        if isinstance(self.pretrained, LazyStateDict):
            return self.pretrained.shape(name)
        return tuple(self.pretrained[name].shape)

    def blocks(self, pattern: str = BLOCK_PATTERN) -> list[list[str]]:
        return block_runs(self.names, pattern)

    def materialize(self, names: Iterable[str]) -> TaskVectors:
        """An in-memory :class:`TaskVectors` of ``names`` only (one block): what a block-local method runs on."""
        vectors = {name: self.stacked(name) for name in names}
        return TaskVectors(list(self.task_names), {}, vectors, {}, tuple(self.unscored_tasks))

    def _check_new_task(self, task: str, vectors: Mapping[str, Tensor]) -> None:
        if task in self.task_names:
            raise ValueError(f"a task vector named {task!r} is already merged ({self.task_names})")
        missing, extra = sorted(set(self.names) - set(vectors)), sorted(set(vectors) - set(self.names))
        if missing or extra:
            raise ValueError(f"vector {task!r} does not cover the merged tensors: missing {missing[:5]}, extra {extra[:5]}")

    # TaskVectors.state_dict_from_deltas reads names, pretrained and aliases only: the same code serves both.
    state_dict_from_deltas = TaskVectors.state_dict_from_deltas

    def map(self, transform: Callable[[str, Tensor], Tensor]) -> Any:
        raise ConfigError("this step transforms every task vector of the model at once, which a streamed or "
                          "compressed pool never holds: set modelpool.streaming=false (and modelpool.compression=null)")

    def to(self, device: torch.device | str) -> Any:
        raise ConfigError("streamed task vectors stay on the host or on disk: move a merged model, not the pool")

    def parameters_per_task(self) -> int:
        return sum(math.prod(self.shape(name)) for name in self.names)
