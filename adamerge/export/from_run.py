"""What a run exports: the fused backbone with the pool's task heads, each task's class names and input
preprocessing from the data, and the run's results (for ``merge_config.json`` and the model card)."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adamerge.backbones.hf import export_extra_files
from adamerge.export.mergekit_config import (LEARNED_AS_TASK_ARITHMETIC, MERGEKIT_FILE, mergekit_config, mergekit_yaml,
                                             static_recipe)
from adamerge.export.writer import export_merged
from adamerge.methods.learned.adamerging import learned_outcome
from adamerge.methods.registry import get_method
from adamerge.pool.lora import LoRATaskVectors, save_linear_adapter
from adamerge.pool.modelpool import ModelPool
from adamerge.pool.task_vectors import TaskVectors
from adamerge.training.alignment import AlignmentVector
from adamerge.training.heads_config import REPORT_KEY, export_record
from adamerge.training.module import AdaMergingModule

__all__ = ["evaluation_data", "export_learned", "export_merge", "MERGED_ADAPTER"]

MERGED_ADAPTER = "adapter"


def export_learned(module: AdaMergingModule, directory: str | Path, pool: ModelPool, datamodule: Any = None, *,
                   overwrite: bool = False, per_task_hf: bool = False, license: str | None = None,
                   task_vectors: TaskVectors | None = None, sign: Mapping[str, Any] | None = None,
                   fused: nn.Module | None = None) -> Path:
    """Export a fitted learned ``module`` (built by :func:`adamerge.build_learned_module`) to ``directory``: the
    fused backbone with ``pool``'s heads, the method, its hyperparameters and learned coefficients, and, from
    ``datamodule``, each task's class names, input preprocessing and the accuracy of the last validation. Load it
    back with :func:`adamerge.load_merged`. ``license``: the model card's (default: the sources' own cards').
    ``task_vectors`` (the pool's, as the module was built from): with them a merge mergekit can express also writes
    ``mergekit.yaml``, and a linear merge of LoRA adapters the merged ``adapter/``. ``fused``: the module's
    ``merge_and_unload()`` when already formed (a merge sharded over ranks is formed by all of them, then written by
    one)."""
    return export_merge(
        directory, module.method_name, fused if fused is not None else module.merge_and_unload(), pool, datamodule, tasks=module.task_names,
        merged_tensors=module.merged.names, hyperparameters=module.method_hyperparameters,
        outcome=learned_outcome(module), module=module, alignment=module.alignment, overwrite=overwrite,
        per_task_hf=per_task_hf, license=license, task_vectors=task_vectors, sign=sign,
    )


def export_merge(directory: str | Path, method: str, model: nn.Module, pool: ModelPool, datamodule: Any, *,
                 tasks: Sequence[str], merged_tensors: Sequence[str], hyperparameters: Mapping[str, Any],
                 outcome: Mapping[str, Any], module: Any = None, alignment: AlignmentVector | None = None,
                 overwrite: bool = False, per_task_hf: bool = False, license: str | None = None,
                 task_vectors: TaskVectors | None = None, sign: Mapping[str, Any] | None = None) -> Path:
    """Export ``method``'s fused ``model`` to ``directory`` with the pool's heads, the data's class names and
    preprocessing, and what was measured (``outcome``: accuracy, coefficients, objective, protected scores) for
    merge_config.json and the model card."""
    tasks = list(tasks)
    merge_config = {
        "method": method,
        "hyperparameters": dict(hyperparameters),
        "tasks": tasks,
        "sources": pool.sources(),
        "coefficients": outcome.get("coefficients"),
        "objective": outcome.get("objective"),
        "merged_tensors": list(merged_tensors),
        "accuracy": outcome["accuracy"],
        "evaluation": evaluation_data(datamodule, tasks),
    }
    if task_vectors is not None and hasattr(task_vectors, "export_record"):  # streamed / compressed task vectors
        merge_config["task_vectors"] = task_vectors.export_record()
    agreement = outcome.get("expert_agreement") or (outcome.get("unlabeled") or {}).get("expert_agreement")
    if agreement:  # label-free: the share of evaluation inputs on which the merge predicts what the task's expert does
        merge_config["expert_agreement"] = dict(agreement)
    if outcome.get("coefficient_columns"):  # the tasks, then an alignment vector: the heatmap's column labels
        merge_config["coefficient_columns"] = outcome["coefficient_columns"]
    if alignment is not None and method != "pretrained":
        merge_config["alignment"] = alignment.config()
    if outcome.get("protected"):
        merge_config["protected"] = {task: {k: v for k, v in entry.items() if not k.endswith("_history")}
                                     for task, entry in outcome["protected"].items()}
    if module is not None and hasattr(module, "export_extras"):
        merge_config.update(module.export_extras())
    adapted = getattr(module, "adapted_heads", None)  # heads: adapt -- the export stores the adapted heads
    if adapted is not None:
        merge_config[REPORT_KEY] = export_record(outcome.get(REPORT_KEY) or adapted.report())
    extras: dict[str, Path | bytes] = dict(export_extra_files(model))
    if task_vectors is not None:
        weights = linear_adapter_weights(task_vectors, method, hyperparameters, module)
        if weights is not None:
            # The linear merge of the adapters is one adapter again: PeftModel.from_pretrained(base, "<export>/adapter").
            extras[MERGED_ADAPTER] = save_linear_adapter(task_vectors, weights, Path(tempfile.mkdtemp()) / "adapter")
            merge_config["merged_adapter"] = MERGED_ADAPTER
        mergekit = mergekit_file(pool, task_vectors, alignment, method, hyperparameters, model, module)
        if isinstance(mergekit, bytes):
            extras[MERGEKIT_FILE] = mergekit
            merge_config["mergekit"] = {"config": MERGEKIT_FILE}
        else:
            merge_config["mergekit"] = {"not_expressible": mergekit}
    return export_merged(
        model.cpu(),
        directory,
        merge_config=merge_config,
        architecture=pool.architecture,
        overwrite=overwrite,
        extra_files=extras,
        heads={task: (module.heads if adapted is not None else pool.heads)[task] for task in tasks},
        class_names={task: datamodule.class_names(task) for task in tasks} if hasattr(datamodule, "class_names") else None,
        preprocessors=({task: datamodule.task_preprocessor(task) for task in tasks}
                       if hasattr(datamodule, "task_preprocessor") else None),
        per_task_hf=per_task_hf,
        license=license,
        sign=sign,
    )


def linear_adapter_weights(vectors: Any, method: str, hparams: Mapping[str, Any], module: Any) -> torch.Tensor | None:
    """The weights ``w`` (``[K]`` or one row per merged tensor) of a merge ``Σ_k w_k τ_k`` of LoRA adapters -- learned
    task- or layer-wise coefficients, task arithmetic's λ, weight averaging's 1/K -- or None: not adapters, or a
    merge that is not linear in them (TIES, TSV-M, ... and learned methods on a base)."""
    if not isinstance(vectors, LoRATaskVectors):
        return None
    if module is not None:
        linear = method in LEARNED_AS_TASK_ARITHMETIC and hparams.get("base") is None
        return module.merged.coefficient_rows().detach().cpu() if linear else None
    # A data-free merge is linear when mergekit would replay it as task arithmetic with plain per-model weights.
    recipe = static_recipe(method, get_method(method).resolve_hparams(hparams), vectors.num_tasks)
    if isinstance(recipe, tuple) and recipe[0] == "task_arithmetic" and all(set(m) == {"weight"} for m in recipe[2]):
        return torch.tensor([m["weight"] for m in recipe[2]])
    return None


def mergekit_file(pool: ModelPool, vectors: TaskVectors, alignment: AlignmentVector | None, name: str,
                  hparams: Mapping[str, Any], model: nn.Module, module: Any) -> bytes | str:
    """``mergekit.yaml`` replaying this merge (see :mod:`adamerge.export.mergekit_config`), or why mergekit cannot."""
    if alignment is not None:
        return "an alignment vector is merged, which is not one of the pool's fine-tuned models"
    if isinstance(vectors, LoRATaskVectors):
        return "the task vectors are LoRA adapters; the merged adapter is written next to the model instead"
    if hasattr(vectors, "compression_report"):
        return "the task vectors were compressed to low rank (modelpool.compression), which mergekit does not replay"
    if pool.exclude:
        return "modelpool.exclude drops entries of the checkpoints, which mergekit would merge"
    learned_rows = module is not None and name in LEARNED_AS_TASK_ARITHMETIC
    rows = module.merged.coefficient_rows().detach().cpu().tolist() if learned_rows else None
    merged = set(vectors.names)
    kept = [n for n, t in vectors.pretrained.items() if t.is_floating_point() and n not in merged]
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    pretrained = pool.pretrained_source or (pool.architecture or {}).get("model")
    config = mergekit_config(name, get_method(name).resolve_hparams(hparams), pretrained=pretrained,
                             finetuned={task: pool.finetuned_sources[task] for task in vectors.task_names},
                             merged_names=vectors.names, kept_names=kept, coefficient_rows=rows, out_dtype=dtype)
    if isinstance(config, str):
        return config
    return mergekit_yaml(*config, method=name).encode()


def evaluation_data(datamodule: Any, tasks: list[str]) -> dict[str, dict[str, Any]]:
    """Where each task's accuracy was measured (dataset path, split, examples), for the export's model card."""
    described, settings_of = {}, getattr(datamodule, "tasks", None)
    for task in tasks:
        settings = settings_of.get(task) if isinstance(settings_of, Mapping) else None
        if settings is None or not hasattr(datamodule, "raw_splits"):
            continue
        described[task] = {"path": settings.path, "split": settings.eval_split or settings.split,
                           "examples": len(datamodule.raw_splits(task)[1])}
    return described
