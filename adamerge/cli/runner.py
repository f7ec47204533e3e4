"""One adamerge run: load the pool and data once, then evaluate / learn each requested method."""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from adamerge.alignment import AlignmentVector, alignment_from_config
from adamerge.errors import ConfigError, adamerge_cause
from adamerge.evaluation import evaluate, finite_scores
from adamerge.expert_targets import ExpertTargets
from adamerge.locking import run_directory_lock
from adamerge.loggers import (
    finish, log_coefficients, log_final, log_label_free, log_profile, log_protected, log_run_config, run_identity,
)
from adamerge.methods.configs import method_config
from adamerge.methods.learned import build_learned_module, learned_outcome
from adamerge.methods.registry import get_method
from adamerge.modelpool import ModelPool
from adamerge.module import AdaMergingModule
from adamerge.objectives import Objective, build_objective
from adamerge.preemption import handle_preemption, keep_lightning_off_signals, stop_if_requested
from adamerge.preflight import EVALUATION_ONLY, check_export_heads, check_pool_and_data, check_run_dir, check_settings
from adamerge.protected import ProtectedTask
from adamerge.protection import static_scores
from adamerge.protected_config import build_protected_tasks
from adamerge.reporting import average, coefficient_heatmap, protected_lines, write_json, write_summary
from adamerge.resume import AtomicCheckpointIO, StepCheckpoint, checkpoint_path, remove_checkpoints, write_run_record
from adamerge.run_export import export_learned, export_merge
from adamerge.run_memory import check_memory_plan
from adamerge.task_vectors import TaskVectors

@dataclass
class RunContext:
    cfg: DictConfig
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
    return method_dir_of(ctx.cfg, ctx.run_dir, name)


def method_dir_of(cfg: DictConfig, run_dir: Path, name: str) -> Path:
    """Where a method's files go: the run dir itself, or a sub-dir per method in a comparison."""
    return run_dir / name if cfg.method.name == "compare" else run_dir


def make_trainer(ctx: RunContext, name: str, logger: Any, callbacks: list[L.Callback] | None = None,
                 max_steps: int | None = None) -> L.Trainer:
    trainer_cfg = OmegaConf.to_container(ctx.cfg.trainer, resolve=True)
    if max_steps is not None:
        trainer_cfg["max_steps"] = max_steps
    max_steps = trainer_cfg.get("max_steps", -1)
    if max_steps and max_steps > 0 and trainer_cfg.get("limit_train_batches") is None:
        # The unlabeled stream is endless; one 'epoch' of max_steps batches gives the bar a total.
        trainer_cfg["limit_train_batches"] = max_steps
        trainer_cfg["max_epochs"] = 1
    if trainer_cfg.get("plugins"):
        raise ConfigError("trainer.plugins is not supported: adamerge sets the trainer's checkpoint writer itself "
                          "(adamerge.resume.AtomicCheckpointIO)")
    trainer = instantiate(trainer_cfg, logger=logger if logger is not None else False, callbacks=callbacks or [],
                          default_root_dir=str(method_dir(ctx, name)), plugins=[AtomicCheckpointIO()])
    keep_lightning_off_signals(trainer)
    return trainer


def make_logger(ctx: RunContext, name: str, hparams: Mapping[str, Any]) -> Any:
    """The method's logger (None with logger=none), its config set to the full resolved run configuration."""
    if ctx.cfg.get("logger") is None:
        return None
    logger = instantiate(ctx.cfg.logger, save_dir=str(method_dir(ctx, name)), **run_identity(ctx.run_dir, name))
    log_run_config(logger, {**OmegaConf.to_container(ctx.cfg, resolve=True), "method_hyperparameters": dict(hparams)})
    return logger


def run_learned(ctx: RunContext, name: str, hparams: Mapping[str, Any], logger: Any) -> tuple[dict, AdaMergingModule]:
    """Learn ``name`` through the Python API (build_learned_module, then a Lightning Trainer) with the run's
    settings: the experts' outputs, protected tasks, task batching, compile, checkpoints and resume."""
    module = build_learned_module(ctx.pool, name, ctx.objective, task_vectors=ctx.task_vectors,
                                  alignment=ctx.alignment, **hparams)
    if ctx.experts is not None:
        module.use_experts(ctx.experts)
    module.check_experts()
    if ctx.protected:
        module.protect(ctx.protected, seed=int(ctx.cfg.seed), eval_batch_size=int(ctx.cfg.data.get("eval_batch_size", 64)))
    module.on_nonfinite = ctx.cfg.get("on_nonfinite", "stop")
    module.set_task_batching(ctx.cfg.get("task_batching", "sequential"))
    if ctx.cfg.get("compile"):
        module.merged.compile_forward(ctx.cfg.compile)
    every = int((ctx.cfg.get("checkpoint") or {}).get("every_n_steps", 0))
    saved = checkpoint_path(method_dir(ctx, name))
    resume_from = str(saved) if ctx.cfg.get("resume", False) and saved.is_file() else None
    # A method that sets its own length (progressive distillation: steps per block × blocks) overrides max_steps.
    trainer = make_trainer(ctx, name, logger, [StepCheckpoint(saved.parent, every)],  # also saves when stopped
                           max_steps=getattr(module, "total_steps", None))
    # The starting merge is evaluated first: the reference for the label-free report (objective and
    # predictions before learning), not a labelled score anything is selected by.
    trainer.validate(module, datamodule=ctx.datamodule, verbose=False)
    if resume_from:
        print(f"{name}: resuming from {resume_from}")
    print(f"{name}: learning to step {ctx.cfg.trainer.max_steps}; SIGTERM or SIGINT saves a checkpoint and stops",
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
    return result, module


def export_model(ctx: RunContext, name: str, model: nn.Module | None, hparams: Mapping, result: Mapping,
                 module: AdaMergingModule | None) -> Path:
    """A learned method's export through the Python API (export_learned); a data-free merge's fused ``model``."""
    directory = method_dir(ctx, name) / "merged_model"
    # A resumed run may replace the export its interrupted self wrote before it could record results.json.
    settings = {"overwrite": bool(ctx.cfg.export.overwrite) or bool(ctx.cfg.get("resume", False)),
                "per_task_hf": bool(ctx.cfg.export.get("per_task_hf", False)), "license": ctx.cfg.export.get("license"),
                "sign": OmegaConf.to_container(ctx.cfg.export.sign, resolve=True) if ctx.cfg.export.get("sign") else None}
    if module is not None:
        return export_learned(module, directory, ctx.pool, ctx.datamodule, task_vectors=ctx.task_vectors, **settings)
    return export_merge(directory, name, model, ctx.pool, ctx.datamodule, tasks=ctx.task_vectors.task_names,
                        merged_tensors=ctx.task_vectors.names, hyperparameters=hparams, outcome=result,
                        alignment=ctx.alignment, task_vectors=ctx.task_vectors, **settings)


def run_method(ctx: RunContext, name: str) -> dict[str, Any]:
    hparams = method_config(ctx.cfg, name) if name not in EVALUATION_ONLY else {}
    # Every method starts from the run's seed, so its result does not depend on which methods ran before it in a
    # comparison (data loaders and earlier methods draw from the global generators; Concrete masks sample them).
    L.seed_everything(int(ctx.cfg.seed), workers=True, verbose=False)
    logger = make_logger(ctx, name, hparams)
    try:
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        start = time.perf_counter()
        model = module = None
        if name == "individual":
            result = run_individual(ctx)
        elif get_method(name).kind == "static":
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
    exported = (
        ctx.cfg.export.enabled
        and (module is not None or (model is not None and ctx.cfg.export.static))
        and rank_zero_only.rank == 0
    )
    if exported:
        result["export"] = str(export_model(ctx, name, model, hparams, result, module))
    return result


def build_from_config(node: DictConfig, **kwargs: Any) -> Any:
    """``instantiate``, re-raising an adamerge error from inside as itself rather than Hydra's wrapper, so
    Python callers can catch it by type."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = adamerge_cause(error)
        if cause is None:
            raise
        raise cause  # keeps its own cause (the low-level error) for HYDRA_FULL_ERROR tracebacks


def method_names(cfg: DictConfig) -> list[str]:
    if cfg.method.name != "compare":
        return [cfg.method.name]
    if not cfg.method.get("methods"):  # a comparison of nothing would "succeed" and write an empty summary
        raise ConfigError(f"method.methods={cfg.method.get('methods')!r} is empty: list the methods to compare, "
                          "e.g. method.methods=[task_arithmetic,ties]")
    return list(cfg.method.methods)


def check_outputs(cfg: DictConfig, run_dir: Path) -> None:
    """The run directory is writable and the run would overwrite nothing (see preflight.check_run_dir)."""
    check_run_dir(cfg, run_dir, method_names(cfg), lambda name: method_dir_of(cfg, run_dir, name))


def build_expert_targets(cfg: DictConfig, pool: ModelPool, task_vectors: TaskVectors, datamodule: Any,
                         device: torch.device, objective: Objective) -> ExpertTargets:
    """Each task's expert (θ0 + τ_k with its head) run once over its evaluation rows (the agreement signal) and, for an
    objective that compares with the experts, its adaptation rows: never once per step (adamerge.expert_targets)."""
    start = time.perf_counter()
    experts = ExpertTargets.for_objective(pool, task_vectors, datamodule, device, objective,
                                          max_bytes=float(cfg.get("expert_cache_max_gb", 4.0)) * 2**30,
                                          batch_size=int(cfg.data.get("eval_batch_size", 64)))
    report = experts.report()
    print(f"expert outputs: {sum(report['examples_forwarded'].values())} inputs through the experts, "
          f"{report['cached_mb']:.1f} MB kept ({time.perf_counter() - start:.1f} s)")
    return experts


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Execute the configured method (or comparison) and write results.json / summary files.

    With ``resume=true`` the run continues in ``run_dir``: finished methods (their results.json) are kept,
    an interrupted learned method continues from its checkpoint, and the summary covers them all.
    """
    run_dir = Path(run_dir)
    # One process per run directory; SIGTERM / SIGINT stop at the next step boundary with a checkpoint.
    with run_directory_lock(run_dir), handle_preemption():
        return _run_locked(cfg, run_dir)


def _run_locked(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    names = method_names(cfg)
    # A typo, a bad value or a directory that would lose results fails here, before any checkpoint is read.
    check_settings(cfg, names, method_config)
    check_outputs(cfg, run_dir)
    device = pick_device(cfg.trainer.get("accelerator", "auto"))
    learned = any(name not in EVALUATION_ONLY and get_method(name).kind == "learned" for name in names)
    check_memory_plan(cfg, learned, on_device=device.type == "cuda")
    objective = build_objective(**OmegaConf.to_container(cfg.objective, resolve=True))
    if not cfg.get("resume", False):
        write_run_record(run_dir, cfg)
    torch.set_num_threads(int(cfg.num_threads)) if cfg.get("num_threads") else None
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    pool: ModelPool = build_from_config(cfg.modelpool, _recursive_=False)
    datamodule = build_from_config(cfg.data)
    datamodule.setup("fit")
    check_pool_and_data(pool, datamodule)
    check_export_heads(cfg, names, pool)
    task_vectors = pool.task_vectors(list(datamodule.task_names))
    print(f"task vectors: {task_vectors.memory_report()}")
    protected_node = build_from_config(cfg.protected, _convert_="all") if cfg.get("protected") else {}
    protected = build_protected_tasks(protected_node, pool, task_vectors, getattr(datamodule, "preprocessor", None),
                                      seed=int(cfg.seed))
    alignment = alignment_from_config(pool, protected_node.get("alignment"))
    experts = build_expert_targets(cfg, pool, task_vectors, datamodule, device, objective)
    ctx = RunContext(cfg, run_dir, pool, datamodule, task_vectors, device, objective, protected, alignment, experts)

    rows = []
    for name in names:
        finished = method_dir(ctx, name) / "results.json"
        if cfg.get("resume", False) and finished.is_file():
            rows.append(json.loads(finished.read_text()))
            print(f"{name}: finished before the interruption; kept {finished}")
            continue
        stop_if_requested(f"before {name} started")
        result = run_method(ctx, name)
        if rank_zero_only.rank != 0:  # DDP workers only help learning; rank 0 reports and exports
            continue
        rows.append(result)
        write_json(finished, result)
        if not (cfg.get("checkpoint") or {}).get("keep", False):
            remove_checkpoints(method_dir(ctx, name))
        print(f"{name}: average accuracy {100 * result['average_accuracy']:.2f}% ({result['seconds']:.1f} s)")
        if result.get("profile"):
            print("  step profile: " + ", ".join(f"{phase} {values['ms_per_step']:.1f} ms ({100 * values['fraction']:.0f}%)"
                                                for phase, values in result["profile"].items()))
        if result.get("skipped_steps"):
            print(f"  warning: {len(result['skipped_steps'])} step(s) skipped for non-finite values (on_nonfinite=skip)")
        agreement = (result.get("unlabeled") or {}).get("expert_agreement")
        if agreement:
            print("  agreement with each task's expert (label-free): "
                  + ", ".join(f"{task} {100 * value:.1f}%" for task, value in agreement.items() if value is not None))
        for task, signals in (result.get("label_free") or {}).items():
            print(f"  {task}: {ctx.objective.name} {signals['objective_start']:.4f} -> {signals['objective_end']:.4f}, "
                  f"{100 * signals['prediction_changed']:.1f}% of predictions changed")
        for line in protected_lines(result.get("protected")):
            print(f"  {line}")
    if len(names) > 1 and rows:
        table = write_summary(run_dir, rows, task_vectors.task_names)
        print("\n" + table)
    return {"rows": rows, "run_dir": str(run_dir)}
