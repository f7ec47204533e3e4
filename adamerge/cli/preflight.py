"""Fail early, fail clean: every user error that can be seen before learning, checked before it starts.

Two passes. :func:`check_settings` and :func:`check_run_dir` read only the configuration and the file system
(milliseconds, before any checkpoint is read). :func:`check_pool_and_data` runs once the pretrained backbone,
the heads and the datasets are loaded, before any fine-tuned checkpoint is read or any step runs: task
names, split sizes, label columns, head sizes against the backbone's features and the data's classes, and
NaN/Inf in the pretrained weights. Each raises an :class:`adamerge.errors.AdamergeError` subclass whose
message names the file, parameter or value to change.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from adamerge import task_batching
from adamerge.checkpoints import CheckpointError, check_finite, describe_source, looks_like_path
from adamerge.data import TaskDataError
from adamerge.errors import AdamergeError, ConfigError, PoolDataMismatchError, RunDirectoryError
from adamerge.methods.checks import is_count
from adamerge.methods.registry import get_method
from adamerge.resume import check_no_unfinished_learning, check_resume
from adamerge.selection import get_criterion

# Not merges but reference rows of a comparison: each fine-tuned model on its own task.
EVALUATION_ONLY = ("individual",)
NONFINITE_POLICIES = ("stop", "skip")


def check_methods(cfg: DictConfig, names: Sequence[str], method_config: Callable[[DictConfig, str], dict]) -> None:
    """Every method's name and hyperparameters, and the step budget of learned ones."""
    num_tasks = len(cfg.modelpool.finetuned)
    for name in names:
        if name in EVALUATION_ONLY:
            continue
        spec = get_method(name)
        hparams = spec.resolve_hparams(method_config(cfg, name))
        if spec.validate is not None:
            spec.validate(num_tasks, hparams)
        max_steps = cfg.trainer.get("max_steps", -1)
        if spec.kind == "learned" and not is_count(max_steps, minimum=1):
            raise ConfigError(f"trainer.max_steps={max_steps!r} is invalid for learned method {name!r}: "
                              "it must be an integer >= 1 (the number of learning steps)")


def check_run_options(cfg: DictConfig) -> None:
    """The run-level switches: resume, checkpoint frequency, what a non-finite step does, the seed, the label-free
    selection criterion."""
    if not isinstance(cfg.get("resume", False), bool):
        raise ConfigError(f"resume={cfg.resume!r} is invalid: it must be true or false")
    every = (cfg.get("checkpoint") or {}).get("every_n_steps", 0)
    if not is_count(every, minimum=0):
        raise ConfigError(f"checkpoint.every_n_steps={every!r} is invalid: it must be an integer >= 0 (0: no "
                          "checkpoints, so no resume)")
    policy = cfg.get("on_nonfinite", "stop")
    if policy not in NONFINITE_POLICIES:
        raise ConfigError(f"on_nonfinite={policy!r} is invalid: it must be one of {', '.join(NONFINITE_POLICIES)}")
    task_batching.check_mode_name(cfg.get("task_batching", "sequential"))
    backend = cfg.get("compile")
    if backend is not None and backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(f"compile={backend!r} is invalid: use null (eager) or a torch.compile backend: "
                          f"{', '.join(torch._dynamo.list_backends())}")
    if not is_count(cfg.get("seed", 0), minimum=0):
        raise ConfigError(f"seed={cfg.get('seed')!r} is invalid: it must be an integer >= 0")
    threads = cfg.get("num_threads")
    if threads is not None and not is_count(threads, minimum=1):
        raise ConfigError(f"num_threads={threads!r} is invalid: it must be an integer >= 1, or null")
    get_criterion(str((cfg.get("selection") or {}).get("name", "objective")))


def check_data_settings(cfg: DictConfig) -> None:
    """Batch sizes and the task names shared by the data and the model pool."""
    data = cfg.get("data") or {}
    for key in ("batch_size", "eval_batch_size"):
        if key in data and not is_count(data[key], minimum=1):
            raise ConfigError(f"data.{key}={data[key]!r} is invalid: it must be an integer >= 1")
    pool = cfg.get("modelpool") or {}
    data_tasks, pool_tasks = data.get("tasks"), pool.get("finetuned")
    if isinstance(data_tasks, Mapping) and isinstance(pool_tasks, Mapping):
        only_data, only_pool = sorted(set(data_tasks) - set(pool_tasks)), sorted(set(pool_tasks) - set(data_tasks))
        if only_data or only_pool:
            raise PoolDataMismatchError(
                "the data and the model pool name different tasks: "
                + "; ".join(part for part in (
                    f"data.tasks has {only_data} without a fine-tuned checkpoint" if only_data else "",
                    f"modelpool.finetuned has {only_pool} without data" if only_pool else "",
                ) if part)
            )
        for task, settings in data_tasks.items():
            limit = (settings or {}).get("max_eval_samples")
            if limit is not None and not is_count(limit, minimum=1):
                raise ConfigError(f"data.tasks.{task}.max_eval_samples={limit!r} is invalid: it must be an integer "
                                  ">= 1, or null for the whole split")


def check_checkpoint_files(cfg: DictConfig) -> None:
    """Every checkpoint given as a local path exists, before any of them is read."""
    pool = cfg.get("modelpool") or {}
    entries = [("modelpool.pretrained", pool.get("pretrained"))]
    entries += [(f"modelpool.finetuned.{task}", source) for task, source in (pool.get("finetuned") or {}).items()]
    for key, source in entries:
        if isinstance(source, str) and looks_like_path(source) and not os.path.exists(os.path.expanduser(source)):
            raise CheckpointError(f"{key}={source!r}: no such file or directory")


def check_export_options(cfg: DictConfig, names: Sequence[str]) -> None:
    """The export switches, and task names that can name the export's head files."""
    from adamerge.export_heads import check_task_names

    export = cfg.get("export") or {}
    for key in ("enabled", "static", "overwrite", "per_task_hf"):
        if not isinstance(export.get(key, False), bool):
            raise ConfigError(f"export.{key}={export.get(key)!r} is invalid: it must be true or false")
    license_id = export.get("license")
    if license_id is not None and (not isinstance(license_id, str) or not license_id.strip()):
        raise ConfigError(f"export.license={license_id!r} is invalid: give a license id (e.g. apache-2.0) or null")
    sign = export.get("sign")
    if sign is not None and exported_methods(cfg, names):
        from adamerge.signing import check_sign_config

        check_sign_config(OmegaConf.to_container(sign, resolve=True) if isinstance(sign, DictConfig) else sign)
    if exported_methods(cfg, names):
        try:
            check_task_names((cfg.get("modelpool") or {}).get("finetuned") or {}, where="modelpool.finetuned task")
        except AdamergeError as error:
            raise ConfigError(str(error)) from error


def check_export_heads(cfg: DictConfig, names: Sequence[str], pool: Any) -> None:
    """``export.per_task_hf`` needs a transformers body and sequence-classification heads (checked once the pool is
    loaded, before any fine-tuned checkpoint is read)."""
    from adamerge.export_heads import head_kind

    if not (cfg.get("export") or {}).get("per_task_hf", False) or not exported_methods(cfg, names):
        return
    other = {task: type(head).__name__ for task, head in pool.heads.items() if head_kind(head) != "sequence_classification"}
    if other or not hasattr(pool.backbone, "save_pretrained"):
        what = f"the heads of {other}" if other else f"the backbone {type(pool.backbone).__name__}"
        raise ConfigError(f"export.per_task_hf=true writes AutoModelForSequenceClassification directories, but "
                          f"{what} are not transformers sequence classifiers; set export.per_task_hf=false")


def check_settings(cfg: DictConfig, names: Sequence[str], method_config: Callable[[DictConfig, str], dict]) -> None:
    """Everything the configuration alone can tell, in milliseconds."""
    from adamerge.protected_config import check_protected_config

    check_run_options(cfg)
    check_methods(cfg, names, method_config)
    check_data_settings(cfg)
    check_checkpoint_files(cfg)
    check_export_options(cfg, names)
    check_protected_config(cfg)


def exported_methods(cfg: DictConfig, names: Sequence[str]) -> list[str]:
    """The methods whose fused model this run writes."""
    export = cfg.get("export") or {}
    if not export.get("enabled", False):
        return []
    return [name for name in names if name not in EVALUATION_ONLY
            and (get_method(name).kind == "learned" or export.get("static", False))]


def check_run_dir(cfg: DictConfig, run_dir: Path, names: Sequence[str], method_dir: Callable[[str], Path]) -> None:
    """The run directory is writable and this run would overwrite nothing it must keep.

    Without ``resume=true``: no export target may exist (unless ``export.overwrite=true``) and no interrupted
    learning may be there. With it: the directory must hold the record of a run with the same settings.
    """
    _check_writable(run_dir)
    learned = [name for name in names if name not in EVALUATION_ONLY and get_method(name).kind == "learned"]
    if cfg.get("resume", False):
        check_resume(run_dir, cfg)
        return
    if not (cfg.get("export") or {}).get("overwrite", False):
        for name in exported_methods(cfg, names):
            target = method_dir(name) / "merged_model"
            if target.exists():
                raise RunDirectoryError(
                    f"export target {target} already exists; set export.overwrite=true to replace it, or choose "
                    "another run directory (hydra.run.dir=...)"
                )
    check_no_unfinished_learning([method_dir(name) for name in learned])


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
    from adamerge.module import run_backbone

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

