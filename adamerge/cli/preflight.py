"""Fail early, fail clean: every user error that can be seen before learning, checked before it starts.

The configuration alone is checked as it is parsed (:mod:`adamerge.cli.settings`, milliseconds, before any
checkpoint is read). Here: :func:`check_run_dir` reads the file system (before any checkpoint too), and
:func:`check_pool_and_data` runs once the pretrained backbone, the heads and the datasets are loaded, before any
fine-tuned checkpoint is read or any step runs: task names, split sizes, label columns, head sizes against the
backbone's features and the data's classes, and NaN/Inf in the pretrained weights. Each raises an
:class:`adamerge.errors.AdamergeError` subclass whose message names the file, parameter or value to change.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adamerge.cli.settings import Outputs
from adamerge.data.tasks import TaskDataError
from adamerge.errors import ConfigError, PoolDataMismatchError, RunDirectoryError
from adamerge.export.heads import head_kind
from adamerge.methods.learned.merged import run_backbone
from adamerge.methods.registry import get_method
from adamerge.pool.checkpoints import describe_source
from adamerge.pool.validation import check_finite
from adamerge.training.resume import check_no_unfinished_learning, check_resume
from adamerge.training.sharding import HEADS_REFUSAL, STRATEGY_TARGET, method_refusal


def check_export_heads(outputs: Outputs, pool: Any) -> None:
    """``export.per_task_hf`` needs a transformers body and sequence-classification heads (checked once the pool is
    loaded, before any fine-tuned checkpoint is read)."""
    if not outputs.export.per_task_hf or not outputs.exported:
        return
    other = {task: type(head).__name__ for task, head in pool.heads.items() if head_kind(head) != "sequence_classification"}
    if other or not hasattr(pool.backbone, "save_pretrained"):
        what = f"the heads of {other}" if other else f"the backbone {type(pool.backbone).__name__}"
        raise ConfigError(f"export.per_task_hf=true writes AutoModelForSequenceClassification directories, but "
                          f"{what} are not transformers sequence classifiers; set export.per_task_hf=false")


def check_sharding(trainer: Mapping[str, Any], outputs: Outputs, heads_adapt: bool) -> None:
    """``trainer=fsdp`` shards AdaMerging's merge only (:mod:`adamerge.training.sharding`): refuse any other learned
    method, and adapted heads, before anything is loaded (the learning module refuses them too, for Python callers)."""
    strategy = trainer.get("strategy")
    if not isinstance(strategy, Mapping) or strategy.get("_target_") != STRATEGY_TARGET:
        return
    refused = [name for name in outputs.learned if not getattr(get_method(name).build, "shardable", False)]
    if refused:
        raise ConfigError(method_refusal(refused[0]))
    if heads_adapt and outputs.learned:
        raise ConfigError(HEADS_REFUSAL)


def check_run_dir(run_dir: Path, outputs: Outputs, record: Callable[[], Mapping[str, Any]]) -> None:
    """The run directory is writable and this run would overwrite nothing it must keep.

    Without ``resume=true``: no export target may exist (unless ``export.overwrite=true``) and no interrupted
    learning may be there. With it: the directory must hold the record of a run with the same settings (``record``
    makes this run's, :func:`adamerge.cli.settings.run_record`).
    """
    _check_writable(run_dir)
    if outputs.resume:
        check_resume(run_dir, record())
        return
    if not outputs.export.overwrite:
        for name in outputs.exported:
            target = outputs.method_dir(run_dir, name) / "merged_model"
            if target.exists():
                raise RunDirectoryError(
                    f"export target {target} already exists; set export.overwrite=true to replace it, or choose "
                    "another run directory (hydra.run.dir=...)"
                )
    check_no_unfinished_learning([outputs.method_dir(run_dir, name) for name in outputs.learned])


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-check-"):
            pass
    except OSError as error:
        raise RunDirectoryError(f"cannot write to the run directory {run_dir}: {error.strerror or error} "
                                "(set hydra.run.dir to a writable directory)") from error


# -- once the pool and the data are loaded -----------------------------------------------------------------
def check_pool_and_data(pool: Any, datamodule: Any) -> None:
    """Task names, split sizes, labels, heads and the pretrained weights, before any fine-tuned checkpoint."""
    if sorted(datamodule.task_names) != sorted(pool.task_names):
        raise PoolDataMismatchError(
            f"data tasks {datamodule.task_names} differ from modelpool tasks {pool.task_names}")
    source = describe_source(pool.pretrained_source or pool.backbone)
    for key, tensor in pool.backbone.state_dict().items():
        check_finite(key, tensor, f"pretrained checkpoint {source!r}")
    for task in datamodule.task_names:
        _check_labels(datamodule, task)  # split sizes and columns: MultiTaskDataModule.setup
        _check_head(pool, datamodule, task)


def _check_labels(datamodule: Any, task: str) -> None:
    settings, evaluation = datamodule.tasks[task], datamodule.raw_splits(task)[1]
    if not datamodule.has_labels(task):
        raise TaskDataError(f"task {task!r} ({settings.path!r}): evaluation needs labels but column "
                            f"{settings.label_column!r} is missing; available columns: {evaluation.column_names}")
    if settings.label_column in evaluation.column_names:  # else the preprocessor makes them (causal-LM prompts)
        _evaluation_labels(datamodule, task)


def dataset_classes(datamodule: Any, task: str) -> tuple[int, bool]:
    """(number of classes, declared): a ``ClassLabel``'s count, else the largest label + 1 (a lower bound)."""
    declared = datamodule.num_classes(task)
    if declared is not None:
        return int(declared), True
    return int(_evaluation_labels(datamodule, task).max()) + 1, False


@torch.no_grad()
def _check_head(pool: Any, datamodule: Any, task: str) -> None:
    """One evaluation example through the pretrained backbone and the task's head."""
    head = pool.heads[task]
    where = f"modelpool.heads.{task}"
    # Creating a DataLoader iterator draws a seed from torch's global RNG: a check must not shift the random
    # stream that learning (Concrete mask samples) uses after it.
    with torch.random.fork_rng(devices=[]):
        example = next(iter(datamodule.eval_dataloader(task, batch_size=1)))
    features = run_backbone(pool.backbone.eval(), example["inputs"])
    expected = getattr(head, "in_features", None)
    size = features.shape[-1] if isinstance(features, torch.Tensor) else None
    if expected is not None and size is not None and expected != size:
        raise PoolDataMismatchError(f"{where} expects input features of size {expected} but the backbone "
                                    f"{type(pool.backbone).__name__} outputs features of size {size}")
    try:
        logits = head.eval()(features)
    except RuntimeError as error:
        raise PoolDataMismatchError(f"{where} does not accept the backbone's output (features of shape "
                                    f"{tuple(features.shape) if size else type(features).__name__}): {error}") from error
    if logits.ndim != 2:  # per-token logits (causal LMs) predict the vocabulary, not dataset classes
        return
    outputs = logits.shape[-1]
    classes, declared = dataset_classes(datamodule, task)
    if outputs < classes or (declared and outputs != classes):
        kind = "declares" if declared else "has labels up to"
        raise PoolDataMismatchError(f"{where} has {outputs} outputs but task {task!r}'s dataset {kind} {classes} "
                                    f"classes ({datamodule.tasks[task].path!r})")
    labels = _evaluation_labels(datamodule, task)
    outside = np.flatnonzero((labels < 0) | (labels >= outputs))
    if outside.size:  # e.g. -1, the "no label" marker of benchmark test splits
        row = int(outside[0])
        raise TaskDataError(f"{_split_name(datamodule, task)}, row {row}: label {labels[row]} is outside 0..{outputs - 1} "
                            f"({where} has {outputs} outputs){f'; {outside.size} rows in all' if outside.size > 1 else ''}")


def _split_name(datamodule: Any, task: str) -> str:
    settings = datamodule.tasks[task]
    return f"task {task!r} ({settings.path!r}), split {settings.eval_split or settings.split!r}"


def _evaluation_labels(datamodule: Any, task: str) -> np.ndarray:
    """The evaluation split's labels: integer class ids, refused naming the column otherwise."""
    column = datamodule.tasks[task].label_column
    labels = np.asarray(datamodule.raw_splits(task)[1][column])
    if labels.dtype.kind not in "iu":
        first = next((i for i, v in enumerate(labels.tolist()) if not isinstance(v, int)), 0)
        raise TaskDataError(f"{_split_name(datamodule, task)}, row {first}: label column {column!r} holds "
                            f"{labels.tolist()[first]!r} ({labels.dtype}), not an integer class id")
    return labels

