"""What a run exports: the fused backbone with the pool's task heads, each task's class names and input
preprocessing from the data, and the run's results (for ``merge_config.json`` and the model card)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from adamerge.alignment import AlignmentVector
from adamerge.export import export_merged
from adamerge.methods.learned import learned_outcome
from adamerge.modelpool import ModelPool
from adamerge.models.hf import export_extra_files
from adamerge.module import AdaMergingModule

__all__ = ["evaluation_data", "export_learned", "export_merge"]


def export_learned(module: AdaMergingModule, directory: str | Path, pool: ModelPool, datamodule: Any = None, *,
                   overwrite: bool = False, per_task_hf: bool = False, license: str | None = None) -> Path:
    """Export a fitted learned ``module`` (built by :func:`adamerge.build_learned_module`) to ``directory``: the
    fused backbone with ``pool``'s heads, the method, its hyperparameters and learned coefficients, and, from
    ``datamodule``, each task's class names, input preprocessing and the accuracy of the last validation. Load it
    back with :func:`adamerge.load_merged`. ``license``: the model card's (default: the sources' own cards')."""
    return export_merge(
        directory, module.method_name, module.merge_and_unload(), pool, datamodule, tasks=module.task_names,
        merged_tensors=module.merged.names, hyperparameters=module.method_hyperparameters,
        outcome=learned_outcome(module), module=module, alignment=module.alignment, overwrite=overwrite,
        per_task_hf=per_task_hf, license=license,
    )


def export_merge(directory: str | Path, method: str, model: nn.Module, pool: ModelPool, datamodule: Any, *,
                 tasks: Sequence[str], merged_tensors: Sequence[str], hyperparameters: Mapping[str, Any],
                 outcome: Mapping[str, Any], module: Any = None, alignment: AlignmentVector | None = None,
                 overwrite: bool = False, per_task_hf: bool = False, license: str | None = None) -> Path:
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
    if outcome.get("coefficient_columns"):  # the tasks, then an alignment vector: the heatmap's column labels
        merge_config["coefficient_columns"] = outcome["coefficient_columns"]
    if alignment is not None and method != "pretrained":
        merge_config["alignment"] = alignment.config()
    if outcome.get("protected"):
        merge_config["protected"] = {task: {k: v for k, v in entry.items() if not k.endswith("_history")}
                                     for task, entry in outcome["protected"].items()}
    if module is not None and hasattr(module, "export_extras"):
        merge_config.update(module.export_extras())
    return export_merged(
        model.cpu(),
        directory,
        merge_config=merge_config,
        architecture=pool.architecture,
        overwrite=overwrite,
        extra_files=export_extra_files(model),
        heads={task: pool.heads[task] for task in tasks},
        class_names={task: datamodule.class_names(task) for task in tasks} if hasattr(datamodule, "class_names") else None,
        preprocessors=({task: datamodule.task_preprocessor(task) for task in tasks}
                       if hasattr(datamodule, "task_preprocessor") else None),
        per_task_hf=per_task_hf,
        license=license,
    )


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
