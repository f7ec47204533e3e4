"""Module paths that moved in adamerge 0.3 (the package layout), for reading what older versions wrote.

Exports record their backbone as a ``_target_`` class path in ``merge_config.json`` (and a head's class for
``module`` heads); run directories record the whole configuration, ``_target_`` paths included, in
``run_config.json``. Those written before 0.3 name the flat modules (``adamerge.models.efficientnet``,
``adamerge.modelpool``, ...): :func:`current_path` turns such a name into the one the code has now, so an old export
still loads and an interrupted old run still resumes. CHANGELOG.md holds the same table for people.

Some old paths are prefixes of new ones (``adamerge.data`` was a module and is now a package), so a path is only
ever mapped after it failed to match as it is: a new path mapped again would be wrong.
"""

from __future__ import annotations


# Old dotted module (or, for the two 0.1 aliases, object) path -> where it lives now.
RENAMED: dict[str, str] = {
    "adamerge.atomic": "adamerge.storage.atomic",
    "adamerge.locking": "adamerge.storage.locking",
    "adamerge.manifest": "adamerge.storage.manifest",
    "adamerge.modelpool": "adamerge.pool.modelpool",
    "adamerge.task_vectors": "adamerge.pool.task_vectors",
    "adamerge.checkpoints": "adamerge.pool.checkpoints",
    "adamerge.checkpoint_inventory": "adamerge.pool.inventory",
    "adamerge.lora": "adamerge.pool.lora",
    "adamerge.key_filters": "adamerge.pool.key_filters",
    "adamerge.memory_plan": "adamerge.pool.memory_plan",
    "adamerge.models.efficientnet": "adamerge.backbones.efficientnet",
    "adamerge.models.clip": "adamerge.backbones.clip",
    "adamerge.models.hf_export": "adamerge.export.hf_tasks",
    "adamerge.models.hf": "adamerge.backbones.hf",
    "adamerge.models.heads": "adamerge.backbones.heads",
    "adamerge.models": "adamerge.backbones",
    "adamerge.methods.steps": "adamerge.methods.data_free.steps",
    "adamerge.methods.static": "adamerge.methods.data_free.static",
    "adamerge.methods.spectral": "adamerge.methods.data_free.spectral",
    "adamerge.methods.isotropic": "adamerge.methods.data_free.isotropic",
    "adamerge.methods.tsv": "adamerge.methods.data_free.tsv",
    "adamerge.methods.wudi": "adamerge.methods.data_free.wudi",
    "adamerge.methods.pcb": "adamerge.methods.data_free.pcb",
    "adamerge.methods.reference": "adamerge.methods.data_free.reference",
    "adamerge.methods.learned": "adamerge.methods.learned.adamerging",
    "adamerge.methods.bases": "adamerge.methods.learned.bases",
    "adamerge.merged": "adamerge.methods.learned.merged",
    "adamerge.concrete_mask": "adamerge.methods.learned.concrete_mask",
    "adamerge.concrete": "adamerge.methods.learned.concrete",
    "adamerge.adarank": "adamerge.methods.learned.adarank",
    "adamerge.progressive": "adamerge.methods.learned.progressive",
    "adamerge.expert_objectives": "adamerge.objectives.expert",
    "adamerge.expert_targets": "adamerge.objectives.expert_targets",
    "adamerge.objectives": "adamerge.objectives.label_free",
    "adamerge.module": "adamerge.training.module",
    "adamerge.task_batching": "adamerge.training.task_batching",
    "adamerge.evaluation": "adamerge.training.evaluation",
    "adamerge.resume": "adamerge.training.resume",
    "adamerge.preemption": "adamerge.training.preemption",
    "adamerge.profiling": "adamerge.training.profiling",
    "adamerge.protected_config": "adamerge.training.protected_config",
    "adamerge.protected": "adamerge.training.protected",
    "adamerge.protection": "adamerge.training.protection",
    "adamerge.alignment": "adamerge.training.alignment",
    "adamerge.safety": "adamerge.training.safety",
    "adamerge.data": "adamerge.data.datamodule",
    "adamerge.preprocessing": "adamerge.data.preprocessing",
    "adamerge.input_cache": "adamerge.data.input_cache",
    "adamerge.demo_tasks": "adamerge.demo.tasks",
    "adamerge.demo": "adamerge.demo.zoo",
    "adamerge.export_heads": "adamerge.export.heads",
    "adamerge.export": "adamerge.export.writer",
    "adamerge.run_export": "adamerge.export.from_run",
    "adamerge.loading": "adamerge.export.loading",
    "adamerge.multitask": "adamerge.export.multitask",
    "adamerge.model_card": "adamerge.export.model_card",
    "adamerge.signing": "adamerge.export.signing",
    "adamerge.mergekit_bridge": "adamerge.export.mergekit_config",
    "adamerge.reporting": "adamerge.reporting.results",
    "adamerge.report_plots": "adamerge.reporting.plots",
    "adamerge.html_report": "adamerge.reporting.html",
    "adamerge.sweep_plots": "adamerge.reporting.sweep_plots",
    "adamerge.sweep": "adamerge.reporting.sweep",
    "adamerge.selection": "adamerge.reporting.selection",
    "adamerge.loggers": "adamerge.reporting.loggers",
    "adamerge.runner": "adamerge.cli.runner",
    "adamerge.preflight": "adamerge.cli.preflight",
    "adamerge.run_memory": "adamerge.cli.run_memory",
    "adamerge.cli": "adamerge.cli.main",
    "adamerge.data.ImagePreprocessor": "adamerge.data.preprocessing.ImagePreprocessor",
    "adamerge.data.TextPreprocessor": "adamerge.data.preprocessing.TextPreprocessor",
}
_LONGEST_FIRST = sorted(RENAMED, key=len, reverse=True)


def current_path(path: str) -> str:
    """``path`` (a dotted module or ``module.attribute`` path written before 0.3) with its old module prefix replaced
    by the new one; a string that names no moved module unchanged."""
    if not path.startswith("adamerge."):
        return path
    for old in _LONGEST_FIRST:
        if path == old or path.startswith(old + "."):
            return RENAMED[old] + path[len(old):]
    return path


def recorded_target(target: str, allowed: frozenset[str]) -> str:
    """A class path a file recorded (an export's backbone or head), as this version names it: mapped to its new place
    only when the path as written is not in ``allowed`` and its mapped path is."""
    if target in allowed:
        return target
    moved = current_path(target)
    return moved if moved in allowed else target
