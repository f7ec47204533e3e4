"""A task's data: where it lives (:class:`TaskData`), loading its two splits from any supported format, and the checks
that name the task, path, split and row of what is wrong.

Formats: a ``save_to_disk`` directory, an image folder, parquet, JSON lines or a Hugging Face hub id (``format:
auto`` detects the local ones). Nothing here imports Lightning or preprocesses: :mod:`.datamodule` does that.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adamerge.errors import AdamergeError

log = logging.getLogger(__name__)

FORMATS = ("auto", "disk", "hub", "imagefolder", "parquet", "json")
_JSON_SUFFIXES = {".json", ".jsonl"}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class TaskDataError(AdamergeError, RuntimeError):
    """A task's data cannot be loaded or used; the message names the task and its path."""


@dataclass
class TaskData:
    name: str
    path: str
    format: str = "auto"
    subset: str | None = None
    split: str = "test"  # AdaMerging adapts on the very split it evaluates on (labels unused)
    eval_split: str | None = None
    label_column: str = "label"
    max_eval_samples: int | None = None
    preprocessor: Callable | None = None
    revision: str | None = None
    data_files: Any = None
    trust_remote_code: bool = False
    # Lets one shared preprocessor serve datasets with different column names (CIFAR's "img").
    rename_columns: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise TaskDataError(f"task {self.name!r}: format must be one of {FORMATS}, got {self.format!r}")


def _detect_format(path: str) -> str:
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix.lower() in _JSON_SUFFIXES:  # JSON lines, e.g. a safety set of {"prompt", "response"} rows
            return "json"
        return "parquet" if p.suffix == ".parquet" else "unknown"
    if p.is_dir():
        if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            return "disk"
        for f in p.rglob("*"):  # first recognisable file decides: image dirs can be huge
            if f.suffix.lower() == ".parquet":
                return "parquet"
            if f.suffix.lower() in _IMAGE_SUFFIXES:
                return "imagefolder"
        return "unknown"
    return "hub"


def check_not_empty(task: TaskData, adaptation: Any, evaluation: Any) -> None:
    """An empty adaptation split would make the endless stream spin forever; an empty evaluation split would
    score the task 0 % and average that in."""
    for role, split, name in (("unlabeled adaptation", adaptation, task.split),
                              ("evaluation", evaluation, task.eval_split or task.split)):
        if len(split) == 0:
            limited = role == "evaluation" and task.max_eval_samples is not None
            limit = f" after max_eval_samples={task.max_eval_samples}" if limited else ""
            raise TaskDataError(f"task {task.name!r} ({task.path!r}): the {role} split {name!r} is empty "
                                f"(0 examples{limit})")


def check_text_column(where: str, split: Any, column: str) -> None:
    """A text column holds strings in every row: a tokenizer given a number or a null fails far from the cause."""
    dtype = getattr(split.features.get(column), "dtype", None)
    if dtype not in ("string", "large_string"):
        raise TaskDataError(f"{where}: column {column!r} holds {split.features.get(column)}, not text")
    row = next((i for i, value in enumerate(split[column]) if not isinstance(value, str)), None)
    if row is not None:
        raise TaskDataError(f"{where}, row {row}: column {column!r} is empty (null), not text")


def seeded_subset(split: Any, limit: int | None, seed: int) -> Any:
    """At most ``limit`` rows of ``split``, drawn by ``seed`` and kept in their order (all of them without a limit)."""
    if limit is None or limit >= len(split):
        return split
    rows = np.random.default_rng(seed).permutation(len(split))[:limit]
    return split.select(np.sort(rows).tolist())


def load_split(task: TaskData, fmt: str, split: str) -> Any:
    """One split of a task's dataset in format ``fmt`` (datasets' loaders; an only split stands in for a missing one)."""
    import datasets

    where = f"task {task.name!r} ({fmt} dataset at {task.path!r})"
    if fmt == "hub":
        # datasets>=4 dropped loading scripts and logs an error when remote code is trusted: pass the flag only if the task asks
        extra = {"trust_remote_code": True} if task.trust_remote_code else {}
        return datasets.load_dataset(task.path, task.subset, split=split, revision=task.revision,
                                     data_files=task.data_files, **extra)
    if fmt == "disk":
        ds = datasets.load_from_disk(task.path)
    elif fmt == "imagefolder":
        ds = datasets.load_dataset("imagefolder", data_dir=task.path, data_files=task.data_files)
    else:  # parquet or json: datasets' packaged builder of that name
        is_file = Path(task.path).is_file()
        ds = datasets.load_dataset(fmt, data_files=task.data_files or (task.path if is_file else None),
                                   data_dir=None if is_file else task.path)
    if isinstance(ds, datasets.Dataset):  # a single saved split: nothing to choose
        return ds
    if split in ds:
        return ds[split]
    if fmt != "disk" and list(ds) == ["train"]:  # imagefolder/parquet/json without split structure
        log.warning("%s has no split %r; using its only split", where, split)
        return ds["train"]
    raise TaskDataError(f"{where}: no split {split!r}; available splits: {list(ds)}")

def load_task_splits(task: TaskData) -> tuple[Any, Any]:
    """(adaptation split, evaluation split) of a task, raw; a TaskDataError names the task, path and what failed."""
    fmt = task.format if task.format != "auto" else _detect_format(task.path)
    exists = os.path.exists(os.path.expanduser(task.path))
    # An absolute/relative-looking path that is missing is a typo, not a hub id: say so.
    if (fmt != "hub" or task.format == "auto" and task.path.startswith(("/", "./", "../", "~"))) and not exists:
        raise TaskDataError(f"task {task.name!r}: path {task.path!r} does not exist")
    if fmt == "unknown":
        raise TaskDataError(f"task {task.name!r}: path {task.path!r} is not a save_to_disk dir, "
                            "an image folder, a parquet file/dir or a .json/.jsonl file (set `format` explicitly)")
    try:
        train = load_split(task, fmt, task.split)
        ev = train if task.eval_split in (None, task.split) else load_split(task, fmt, task.eval_split)
    except TaskDataError:
        raise
    except Exception as e:  # re-raised naming the task: a bare datasets error doesn't say which one
        hint = (" If offline, load it where the Hub is reachable, save_to_disk, and pass that local "
                "path instead." if fmt == "hub" else "")
        what = f"hub dataset {task.path!r} (subset={task.subset!r})" if fmt == "hub" else f"{fmt} dataset at {task.path!r}"
        raise TaskDataError(f"task {task.name!r}: could not load {what}: {type(e).__name__}: {e}.{hint}") from e
    if task.rename_columns:
        train, ev = (d.rename_columns(dict(task.rename_columns)) for d in (train, ev))
    return train, ev
