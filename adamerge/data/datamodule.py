"""Multi-task data for test-time adaptation (AdaMerging): the LightningDataModule over every task's two splits.

Every optimisation step sees one *unlabeled* batch from each task's test split; validation
measures per-task accuracy on the labelled split. Preprocessing is lazy (``with_transform``),
so nothing is materialised beyond what a batch needs. Where a task's data comes from and how it is loaded and
checked: :mod:`adamerge.data.tasks`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import fields
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data import Dataset as TorchDataset

from adamerge.data.batches import ADAPTATION, EVALUATION
from adamerge.data.input_cache import LazySplit, Transformed, cacheable, check_split, encode_split
from adamerge.data.preprocessing import BadExampleError
from adamerge.data.tasks import TaskData, TaskDataError, check_not_empty, check_text_column, load_task_splits, seeded_subset

__all__ = ["ADAPTATION", "EVALUATION", "MultiTaskDataModule", "TaskData", "TaskDataError"]


class _AdaptationStream(IterableDataset):
    """Yields ``{task: batch}`` forever. Each task walks seeded permutations back to back, so every
    example appears once per pass and every batch is full. Worker ``w`` of ``W`` yields steps
    ``w, w+W, ...``; the DataLoader's round-robin then restores the single-process order exactly."""

    def __init__(self, datasets: Mapping[str, Any], batch_size: int, seed: int):
        if empty := [name for name, dataset in datasets.items() if len(dataset) == 0]:
            raise TaskDataError(f"no unlabeled examples to draw batches from for tasks {empty}")
        self.datasets, self.batch_size, self.seed = dict(datasets), batch_size, seed
        self.start_step = 0  # a resumed run continues the same sequence after the steps already taken

    def _indices(self, t: int, n: int) -> Iterator[int]:
        epoch = 0
        while True:
            yield from np.random.default_rng([self.seed, t, epoch]).permutation(n).tolist()
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        streams = {k: self._indices(t, len(d)) for t, (k, d) in enumerate(self.datasets.items())}
        step = 0
        while True:
            idx = {k: [next(s) for _ in range(self.batch_size)] for k, s in streams.items()}
            if step >= self.start_step and step % nw == wid:
                # Row indices travel with the batch: expert outputs cached per row (expert_targets) are looked up by them.
                yield {k: _with_index(self.datasets[k][i], i) for k, i in idx.items()}
            step += 1


def _with_index(rows: Any, index: list[int]) -> Any:
    """A batch (a mapping) with its row indices added; a split that gives no mapping is passed on as it is."""
    if isinstance(rows, Mapping):
        return {**rows, "index": torch.as_tensor(index, dtype=torch.long)}
    return rows


class _AdaptationLoader(DataLoader):
    """The stream's loader, resumable the Lightning way (``state_dict`` / ``load_state_dict``).

    Its state is the number of learning steps taken, read from the trainer rather than counted here: the
    trainer fetches a batch ahead, so batches drawn from the stream run one past the steps that used them.
    """

    def __init__(self, stream: _AdaptationStream, steps_taken: Callable[[], int], **kwargs: Any):
        super().__init__(stream, batch_size=None, **kwargs)
        self.steps_taken = steps_taken

    def state_dict(self) -> dict[str, int]:
        return {"steps_taken": int(self.steps_taken())}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.dataset.start_step = int(state["steps_taken"])


class _Batches(TorchDataset):
    """Map-style view whose items are whole batches, so the transform runs once per batch."""

    def __init__(self, ds: Any, batch_size: int):
        self.ds, self.batch_size = ds, batch_size

    def __len__(self) -> int:
        return -(-len(self.ds) // self.batch_size)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        start, stop = i * self.batch_size, min((i + 1) * self.batch_size, len(self.ds))
        return {**self.ds[start:stop], "index": torch.arange(start, stop)}


class MultiTaskDataModule(L.LightningDataModule):
    def __init__(self, tasks: Sequence[TaskData] | Mapping[str, TaskData | Mapping], batch_size: int = 16,
                 eval_batch_size: int = 64, num_workers: int = 0, seed: int = 0,
                 preprocessor: Callable | None = None, cache_inputs: bool = True, cache_max_gb: float = 8.0,
                 check_inputs: bool = True):
        super().__init__()
        self.tasks = self._as_tasks(tasks)
        self.task_names: list[str] = list(self.tasks)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.seed, self.preprocessor = num_workers, seed, preprocessor
        self._raw: dict[str, tuple[Any, Any]] = {}  # task → (adaptation split, eval split), untransformed
        # Preprocess each split once and reuse it (uint8 pixels for images), up to cache_max_gb in all.
        self.cache_inputs, self.cache_max_gb = cache_inputs, cache_max_gb
        self._cache: dict[tuple[str, int], Any] = {}
        # A split that stays lazy is read and preprocessed once before learning, so a bad row is refused up front
        # (a cached split is checked as it is encoded); false skips that pass for very large splits.
        self.check_inputs = check_inputs
        self._checked: set[tuple[str, int]] = set()

    @staticmethod
    def _as_tasks(tasks: Any) -> dict[str, TaskData]:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(tasks, (DictConfig, ListConfig)):
            tasks = OmegaConf.to_container(tasks, resolve=True)
        items = tasks.items() if isinstance(tasks, Mapping) else [(None, t) for t in tasks]
        out: dict[str, TaskData] = {}
        for key, t in items:
            if isinstance(t, Mapping):
                known = {f.name for f in fields(TaskData)}
                if unknown := set(t) - known:
                    raise TaskDataError(f"task {key or t.get('name')!r}: unknown fields {sorted(unknown)}")
                t = TaskData(**{"name": key, **t} if key is not None else t)
            if key is not None and t.name != key:
                raise TaskDataError(f"task key {key!r} does not match its name {t.name!r}")
            if t.name in out:
                raise TaskDataError(f"duplicate task name {t.name!r}")
            out[t.name] = t
        if not out:
            raise TaskDataError("no tasks given")
        return out

    def setup(self, stage: str | None = None) -> None:
        for name, task in self.tasks.items():
            if name in self._raw:
                continue  # Lightning calls setup once per stage; load each dataset once
            train, ev = load_task_splits(task)
            pre = self._preprocessor(task)
            for d, split in ((train, task.split), (ev, task.eval_split or task.split)):
                if missing := [c for c in getattr(pre, "required_columns", ()) if c not in d.column_names]:
                    raise TaskDataError(f"task {name!r} ({task.path!r}): missing column(s) {missing}; "
                                        f"available columns: {d.column_names}")
                for column in getattr(pre, "text_columns", ()):
                    check_text_column(f"task {name!r} ({task.path!r}), split {split!r}", d, column)
            ev = seeded_subset(ev, task.max_eval_samples, self.seed)
            check_not_empty(task, train, ev)
            self._raw[name] = (train, ev)

    def encode_all(self, name: str, max_samples: int | None = None) -> dict[str, Any]:
        """A task's adaptation split (at most ``max_samples`` rows, a seeded subset) preprocessed as one batch,
        ``{"inputs": ..., "labels": ...}``: what a small set kept whole in memory needs (protected tasks)."""
        self._ensure_setup(name)
        split = seeded_subset(self._raw[name][0], max_samples, self.seed)
        task = self.tasks[name]
        return Transformed(self._preprocessor(task), task.label_column)(split[:])

    def raw_splits(self, name: str) -> tuple[Any, Any]:
        """(unlabeled adaptation split, evaluation split) of a task, before preprocessing."""
        self._ensure_setup(name)
        return self._raw[name]

    def _preprocessor(self, task: TaskData) -> Callable:
        pre = task.preprocessor or self.preprocessor
        if pre is None:
            raise TaskDataError(f"task {task.name!r}: no preprocessor (set one on the task or the DataModule)")
        return pre

    def _ensure_setup(self, name: str) -> None:
        if name not in self.tasks:
            raise KeyError(f"unknown task {name!r}; tasks: {self.task_names}")
        if name not in self._raw:
            self.setup()

    def _transformed(self, name: str, which: int):
        """The split as model inputs: encoded once and cached (see adamerge.data.input_cache), else lazily."""
        self._ensure_setup(name)
        task, raw = self.tasks[name], self._raw[name][which]
        preprocessor = self._preprocessor(task)
        split = task.split if which == ADAPTATION else task.eval_split or task.split
        where = f"task {name!r} ({task.path!r}), split {split!r}"
        key = (name, id(raw))  # the adaptation and evaluation splits are often the same rows: one cache, one check
        try:
            if self.cache_inputs and cacheable(preprocessor):
                if key not in self._cache:
                    cached = sum(part.nbytes for part in self._cache.values() if part is not None)
                    budget = self.cache_max_gb * 2**30 - cached  # one budget for every split of the run
                    self._cache[key] = encode_split(raw, preprocessor, task.label_column, budget)
                if self._cache[key] is not None:  # every row was read and encoded on the way (None: over budget)
                    return self._cache[key]
            transform = Transformed(preprocessor, task.label_column)
            if self.check_inputs and key not in self._checked:
                check_split(raw, transform)
                self._checked.add(key)
        except BadExampleError as error:
            raise TaskDataError(f"{where}, row {error.index}: {error.problem}") from error
        return LazySplit(raw, transform, where)

    # --- loaders -------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        # Under DDP every rank must draw different unlabeled batches, or the extra ranks add nothing.
        rank = self.trainer.global_rank if self.trainer is not None else 0
        stream = _AdaptationStream(
            {k: self._transformed(k, 0) for k in self.task_names}, self.batch_size, self.seed + 100_003 * rank
        )
        return _AdaptationLoader(stream, self._steps_taken, num_workers=self.num_workers,
                                 persistent_workers=self.num_workers > 0)

    def _steps_taken(self) -> int:
        return self.trainer.global_step if self.trainer is not None else 0

    def has_labels(self, task: str) -> bool:
        self._ensure_setup(task)
        return self.tasks[task].label_column in self._raw[task][1].column_names

    def eval_dataloader(self, task: str, batch_size: int | None = None) -> DataLoader:
        if not self.has_labels(task):
            t = self.tasks[task]
            raise TaskDataError(f"task {task!r} ({t.path!r}): evaluation needs labels but column "
                                f"{t.label_column!r} is missing; available columns: {self._raw[task][1].column_names}")
        return self.split_batches(task, EVALUATION, batch_size)

    def split_batches(self, task: str, split: int, batch_size: int | None = None) -> DataLoader:
        """Every row of a task's ``ADAPTATION`` or ``EVALUATION`` split once, in order, as batches with row ``index``."""
        return DataLoader(_Batches(self._transformed(task, split), batch_size or self.eval_batch_size), batch_size=None,
                          shuffle=False, num_workers=self.num_workers)

    def split_size(self, task: str, split: int) -> int:
        """How many rows the task's ``ADAPTATION`` or ``EVALUATION`` split has."""
        self._ensure_setup(task)
        return len(self._raw[task][split])

    def split_key(self, task: str, split: int) -> tuple[str, int]:
        """Identifies a split's rows: the adaptation and evaluation splits are often one dataset (then equal keys)."""
        self._ensure_setup(task)
        return task, id(self._raw[task][split])

    def val_dataloader(self) -> list[DataLoader]:
        return [self.eval_dataloader(k) for k in self.task_names]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    def num_classes(self, task: str) -> int | None:
        self._ensure_setup(task)
        feat = self._raw[task][1].features.get(self.tasks[task].label_column)
        return getattr(feat, "num_classes", None)

    def class_names(self, task: str) -> list[str] | None:
        """The label column's ``ClassLabel`` names (what an export records as the task's classes), if declared."""
        self._ensure_setup(task)
        names = getattr(self._raw[task][1].features.get(self.tasks[task].label_column), "names", None)
        return [str(name) for name in names] if names else None

    def task_preprocessor(self, task: str) -> Callable:
        """The preprocessor that turns the task's raw examples into model inputs (the task's own, else the shared one)."""
        self._ensure_setup(task)
        return self._preprocessor(self.tasks[task])
