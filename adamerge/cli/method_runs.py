"""One method of a run: evaluate a data-free merge or the individual models, or learn a merge with a Lightning
Trainer, then export it; each writes into its method directory and returns its results row."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from adamerge.cli.settings import RunSettings
from adamerge.errors import ConfigError
from adamerge.export.from_run import export_learned, export_merge
from adamerge.methods.learned.adamerging import build_learned_module, learned_outcome
from adamerge.methods.registry import get_method
from adamerge.objectives import Objective
from adamerge.objectives.expert_targets import ExpertTargets
from adamerge.pool.modelpool import ModelPool
from adamerge.pool.task_vectors import TaskVectors
from adamerge.reporting.loggers import (
    finish, log_coefficients, log_final, log_label_free, log_profile, log_protected, log_run_config, run_identity,
)
from adamerge.reporting.results import average, coefficient_heatmap
from adamerge.training.alignment import AlignmentVector
from adamerge.training.evaluation import evaluate, finite_scores
from adamerge.training.module import AdaMergingModule
from adamerge.training.preemption import keep_lightning_off_signals
from adamerge.training.protected import ProtectedTask
from adamerge.training.protection import static_scores
from adamerge.training.resume import AtomicCheckpointIO, StepCheckpoint, checkpoint_path
from adamerge.training.sharded_merge import ShardedMergedModel, local_shard_numel
from adamerge.training.sharding import merge_per_module_under


@dataclass
class RunContext:
    settings: RunSettings
    config: DictConfig  # the composed configuration: only for Hydra to build the trainer and logger, and to log it
    run_dir: Path
    pool: ModelPool
    datamodule: L.LightningDataModule
    task_vectors: TaskVectors
    device: torch.device
    objective: Objective
    protected: list[ProtectedTask] = field(default_factory=list)
    alignment: AlignmentVector | None = None
    experts: ExpertTargets | None = None


def pick_device(accelerator: str) -> torch.device:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory of the method on GPU; the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def run_static(ctx: RunContext, name: str, hparams: Mapping[str, Any]) -> tuple[dict, nn.Module]:
    spec = get_method(name)
    deltas = spec.fn(ctx.task_vectors, **spec.resolve_hparams(hparams))
    if ctx.alignment is not None and name != "pretrained":  # the merge keeps the alignment vector at its init value
        deltas = ctx.alignment.added_to(deltas)
    model = ctx.pool.fresh_backbone()
    model.load_state_dict(ctx.task_vectors.state_dict_from_deltas(deltas), strict=False)
    result = evaluate(model, ctx.pool.heads, ctx.datamodule, ctx.task_vectors.task_names, ctx.device, ctx.objective,
                      ctx.experts)
    if ctx.protected:
        result["protected"] = static_scores(ctx.protected, model, ctx.device)
    return result, model


def run_individual(ctx: RunContext) -> dict:
    result: dict[str, Any] = {"accuracy": {}, "unlabeled": {"objective": {}, "entropy": {}, "expert_agreement": {}}}
    for task in ctx.task_vectors.task_names:
        model = ctx.pool.backbone_with(ctx.task_vectors, task)
        scores = evaluate(model, ctx.pool.heads, ctx.datamodule, [task], ctx.device, ctx.objective, ctx.experts)
        result["accuracy"].update(scores["accuracy"])
        for name, values in scores["unlabeled"].items():
            result["unlabeled"][name].update(values)
    result["unlabeled"] = {name: values for name, values in result["unlabeled"].items() if values}
    return result


def method_dir(ctx: RunContext, name: str) -> Path:
    return ctx.settings.outputs.method_dir(ctx.run_dir, name)


def make_trainer(ctx: RunContext, name: str, logger: Any, callbacks: list[L.Callback] | None = None,
                 max_steps: int | None = None) -> L.Trainer:
    trainer_cfg = OmegaConf.to_container(ctx.config.trainer, resolve=True)
    if max_steps is not None:
        trainer_cfg["max_steps"] = max_steps
    max_steps = trainer_cfg.get("max_steps", -1)
    if max_steps and max_steps > 0 and trainer_cfg.get("limit_train_batches") is None:
        # The unlabeled stream is endless; one 'epoch' of max_steps batches gives the bar a total.
        trainer_cfg["limit_train_batches"] = max_steps
        trainer_cfg["max_epochs"] = 1
    if trainer_cfg.get("plugins"):
        raise ConfigError("trainer.plugins is not supported: adamerge sets the trainer's checkpoint writer itself "
                          "(adamerge.training.resume.AtomicCheckpointIO)")
    trainer = instantiate(trainer_cfg, logger=logger if logger is not None else False, callbacks=callbacks or [],
                          default_root_dir=str(method_dir(ctx, name)), plugins=[AtomicCheckpointIO()])
    keep_lightning_off_signals(trainer)
    return trainer


def make_logger(ctx: RunContext, name: str, hparams: Mapping[str, Any]) -> Any:
    """The method's logger (None with logger=none), its config set to the full resolved run configuration."""
    if ctx.config.get("logger") is None:
        return None
    logger = instantiate(ctx.config.logger, save_dir=str(method_dir(ctx, name)), **run_identity(ctx.run_dir, name))
    log_run_config(logger, {**OmegaConf.to_container(ctx.config, resolve=True), "method_hyperparameters": dict(hparams)})
    return logger


def run_learned(ctx: RunContext, name: str, hparams: Mapping[str, Any], logger: Any) -> tuple[dict, AdaMergingModule]:
    """Learn ``name`` through the Python API (build_learned_module, then a Lightning Trainer) with the run's
    settings: the experts' outputs, protected tasks, task batching, compile, checkpoints and resume."""
    options = ctx.settings.options
    module = build_learned_module(ctx.pool, name, ctx.objective, task_vectors=ctx.task_vectors,
                                  alignment=ctx.alignment, heads=ctx.settings.heads, **hparams)
    if ctx.experts is not None:
        module.use_experts(ctx.experts)
    module.check_experts()
    if ctx.protected:
        module.protect(ctx.protected, seed=options.seed, eval_batch_size=ctx.settings.data.eval_batch_size)
    module.on_nonfinite = options.on_nonfinite
    every = options.checkpoint_every
    saved = checkpoint_path(method_dir(ctx, name))
    # A method that sets its own length (progressive distillation: steps per block × blocks) overrides max_steps.
    trainer = make_trainer(ctx, name, logger, [StepCheckpoint(saved.parent, every)],  # also saves when stopped
                           max_steps=getattr(module, "total_steps", None))
    merge_per_module_under(trainer.strategy, module.merged)  # trainer=fsdp: before the settings that ask
    module.set_task_batching(options.task_batching)
    module.set_activation_checkpointing(options.activation_checkpointing)
    if module.merges_per_module and options.task_batching == "sequential":
        print(f"{name}: the merge is made module by module (a streamed pool, or trainer=fsdp), so "
              f"task_batching=sequential makes it once per task and step; task_batching=auto makes it once per step")
    if options.compile:
        module.merged.compile_forward(options.compile)
    module.use_state_directory(saved.parent)
    resume_from = str(saved) if options.resume and saved.is_file() else None
    # The starting merge is evaluated first: the reference for the label-free report (objective and
    # predictions before learning), not a labelled score anything is selected by.
    trainer.validate(module, datamodule=ctx.datamodule, verbose=False)
    if resume_from:
        print(f"{name}: resuming from {resume_from}")
    print(f"{name}: learning to step {options.max_steps}; SIGTERM or SIGINT saves a checkpoint and stops",
          flush=True)
    trainer.fit(module, datamodule=ctx.datamodule, ckpt_path=resume_from, weights_only=True)
    if hasattr(module, "save_artifacts"):
        module.save_artifacts(method_dir(ctx, name))
    trainer.validate(module, datamodule=ctx.datamodule, verbose=False)
    label_free = module.label_free_report()
    log_label_free(logger, label_free)
    log_profile(logger, module.profile.report())
    outcome = learned_outcome(module)
    columns = module.merged.task_names  # the merged vectors: the tasks, then an alignment vector if there is one
    heatmap = coefficient_heatmap(outcome["coefficients"], columns, method_dir(ctx, name) / "coefficients.png", title=name)
    log_coefficients(logger, outcome["coefficients"], columns, module.merged.names, heatmap)
    result = {
        **outcome,
        "label_free": label_free,
        "unlabeled": finite_scores({score: module.evaluations[-1][score] for score in ("objective", "entropy", "expert_agreement")
                                    if module.evaluations[-1].get(score)}),
        "start_accuracy": module.evaluations[0]["accuracy"],
        "objective_history": [h["objective"] for h in module.history],
        "entropy_history": [h["entropy"] for h in module.history],
        "skipped_steps": list(module.skipped_steps),
        "task_batching": module.task_batching_used,
        "profile": module.profile.report(),
        "heatmap": str(heatmap),
    }
    if isinstance(module.merged, ShardedMergedModel):  # trainer=fsdp: what of θ0 and the task vectors rank 0 held
        result["sharding"] = {"ranks": module.trainer.world_size, **local_shard_numel(module.merged)}
    return result, module


def export_model(ctx: RunContext, name: str, model: nn.Module | None, hparams: Mapping, result: Mapping,
                 module: AdaMergingModule | None) -> Path:
    """A learned method's export through the Python API (export_learned, with ``model`` its fused merge when already
    formed); a data-free merge's fused ``model``."""
    directory = method_dir(ctx, name) / "merged_model"
    # A resumed run may replace the export its interrupted self wrote before it could record results.json.
    export = ctx.settings.outputs.export
    settings = {"overwrite": export.overwrite or ctx.settings.options.resume, "per_task_hf": export.per_task_hf,
                "license": export.license, "sign": dict(export.sign) if export.sign else None}
    if module is not None:
        return export_learned(module, directory, ctx.pool, ctx.datamodule, task_vectors=ctx.task_vectors, fused=model,
                              **settings)
    return export_merge(directory, name, model, ctx.pool, ctx.datamodule, tasks=ctx.task_vectors.task_names,
                        merged_tensors=ctx.task_vectors.names, hyperparameters=hparams, outcome=result,
                        alignment=ctx.alignment, task_vectors=ctx.task_vectors, **settings)


def run_method(ctx: RunContext, name: str) -> dict[str, Any]:
    hparams = ctx.settings.hyperparameters[name]
    # Every method starts from the run's seed, so its result does not depend on which methods ran before it in a
    # comparison (data loaders and earlier methods draw from the global generators; Concrete masks sample them).
    L.seed_everything(ctx.settings.options.seed, workers=True, verbose=False)
    logger = make_logger(ctx, name, hparams)
    try:
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        start = time.perf_counter()
        model = module = None
        if name == "individual":
            result = run_individual(ctx)
        elif ctx.settings.outputs.kinds[name] == "static":
            result, model = run_static(ctx, name, hparams)
        else:
            result, module = run_learned(ctx, name, hparams, logger)
        result = {
            "method": name,
            "config": hparams,
            "tasks": ctx.task_vectors.task_names,
            "accuracy": result["accuracy"],
            "average_accuracy": average(result["accuracy"]),
            "coefficients": result.get("coefficients"),
            "seconds": time.perf_counter() - start,
            "peak_memory_mb": peak_memory_mb(ctx.device),
            # The objective the label-free scores ("unlabeled") are measured with, for every method.
            "objective": ctx.objective.config(),
            **{k: v for k, v in result.items() if k not in ("accuracy", "coefficients")},
        }
        log_final(logger, result)
        log_protected(logger, result.get("protected"))
    finally:
        finish(logger)
    export = ctx.settings.outputs.export
    if export.enabled and module is not None and isinstance(module.merged, ShardedMergedModel):
        model = module.merge_and_unload()  # trainer=fsdp: every rank gathers its shards of the merge; rank 0 writes it
    exported = export.enabled and (module is not None or (model is not None and export.static)) and rank_zero_only.rank == 0
    if exported:
        result["export"] = str(export_model(ctx, name, model, hparams, result, module))
    return result
