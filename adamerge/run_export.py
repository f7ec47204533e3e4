"""What a run exports: the fused backbone with the pool's task heads, each task's class names and input
preprocessing from the data, and the run's results (for ``merge_config.json`` and the model card)."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from adamerge.export import export_merged
from adamerge.lora import LoRATaskVectors, save_linear_adapter
from adamerge.mergekit_bridge import LEARNED_AS_TASK_ARITHMETIC, MERGEKIT_FILE, mergekit_config, mergekit_yaml
from adamerge.methods.registry import get_method
from adamerge.models.hf import export_extra_files

if TYPE_CHECKING:
    from adamerge.runner import RunContext

__all__ = ["evaluation_data", "export_run_model", "MERGED_ADAPTER"]

MERGED_ADAPTER = "adapter"


def export_run_model(ctx: RunContext, directory: Path, name: str, model: nn.Module, hparams: Mapping[str, Any],
                     result: Mapping[str, Any], module: Any) -> Path:
    """Export method ``name``'s fused ``model`` to ``directory`` with the pool's heads, the data's class names and
    preprocessing, and what the run measured (for merge_config.json and the model card)."""
    tasks = ctx.task_vectors.task_names
    merge_config = {
        "method": name,
        "hyperparameters": dict(hparams),
        "tasks": tasks,
        "sources": ctx.pool.sources(),
        "coefficients": result.get("coefficients"),
        "objective": result.get("objective"),
        "merged_tensors": ctx.task_vectors.names,
        "accuracy": result["accuracy"],
        "evaluation": evaluation_data(ctx.datamodule, tasks),
    }
    agreement = (result.get("unlabeled") or {}).get("expert_agreement")
    if agreement:  # label-free: the share of evaluation inputs on which the merge predicts what the task's expert does
        merge_config["expert_agreement"] = dict(agreement)
    if result.get("coefficient_columns"):  # the tasks, then an alignment vector: the heatmap's column labels
        merge_config["coefficient_columns"] = result["coefficient_columns"]
    if ctx.alignment is not None and name != "pretrained":
        merge_config["alignment"] = ctx.alignment.config()
    if result.get("protected"):
        merge_config["protected"] = {task: {k: v for k, v in entry.items() if not k.endswith("_history")}
                                     for task, entry in result["protected"].items()}
    if module is not None and hasattr(module, "export_extras"):
        merge_config.update(module.export_extras())
    extras: dict[str, Path | bytes] = dict(export_extra_files(model))
    if isinstance(ctx.task_vectors, LoRATaskVectors) and name in LEARNED_AS_TASK_ARITHMETIC:
        # The linear merge of the adapters is one adapter again: PeftModel.from_pretrained(base, "<export>/adapter").
        weights = module.merged.coefficient_rows().detach().cpu()
        extras[MERGED_ADAPTER] = save_linear_adapter(ctx.task_vectors, weights, Path(tempfile.mkdtemp()) / "adapter")
        merge_config["merged_adapter"] = MERGED_ADAPTER
    mergekit = mergekit_file(ctx, name, hparams, model, module)
    if isinstance(mergekit, bytes):
        extras[MERGEKIT_FILE] = mergekit
        merge_config["mergekit"] = {"config": MERGEKIT_FILE}
    else:
        merge_config["mergekit"] = {"not_expressible": mergekit}
    data = ctx.datamodule
    return export_merged(
        model.cpu(),
        directory,
        merge_config=merge_config,
        architecture=ctx.pool.architecture,
        # A resumed run may replace the export its interrupted self wrote before it could record results.json.
        overwrite=bool(ctx.cfg.export.overwrite) or bool(ctx.cfg.get("resume", False)),
        extra_files=extras,
        heads={task: ctx.pool.heads[task] for task in tasks},
        class_names={task: data.class_names(task) for task in tasks} if hasattr(data, "class_names") else None,
        preprocessors={task: data.task_preprocessor(task) for task in tasks} if hasattr(data, "task_preprocessor") else None,
        per_task_hf=bool(ctx.cfg.export.get("per_task_hf", False)),
        license=ctx.cfg.export.get("license"),
    )


def mergekit_file(ctx: RunContext, name: str, hparams: Mapping[str, Any], model: nn.Module, module: Any) -> bytes | str:
    """``mergekit.yaml`` replaying this merge (see :mod:`adamerge.mergekit_bridge`), or why mergekit cannot."""
    vectors = ctx.task_vectors
    if ctx.alignment is not None:
        return "an alignment vector is merged, which is not one of the pool's fine-tuned models"
    if isinstance(vectors, LoRATaskVectors):
        return "the task vectors are LoRA adapters; the merged adapter is written next to the model instead"
    if ctx.pool.exclude:
        return "modelpool.exclude drops entries of the checkpoints, which mergekit would merge"
    learned_rows = module is not None and name in LEARNED_AS_TASK_ARITHMETIC
    rows = module.merged.coefficient_rows().detach().cpu().tolist() if learned_rows else None
    merged = set(vectors.names)
    kept = [n for n, t in vectors.pretrained.items() if t.is_floating_point() and n not in merged]
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    pretrained = ctx.pool.pretrained_source or (ctx.pool.architecture or {}).get("model")
    config = mergekit_config(name, get_method(name).resolve_hparams(hparams), pretrained=pretrained,
                             finetuned={task: ctx.pool.finetuned_sources[task] for task in vectors.task_names},
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
