"""One adamerge run: parse its settings, load the pool and data once, then evaluate / learn each requested method
(:mod:`adamerge.cli.method_runs`) and write the results and the comparison's summary."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from adamerge.cli.method_runs import RunContext, method_dir, pick_device, run_method
from adamerge.cli.preflight import check_export_heads, check_pool_and_data, check_run_dir, check_sharding
from adamerge.cli.run_memory import check_memory_plan
from adamerge.cli.settings import RunSettings, parse_outputs, parse_run_settings, run_record
from adamerge.errors import ConfigError, adamerge_cause
from adamerge.objectives import Objective, build_objective
from adamerge.methods.learned.merged_streamed import expert_backbones
from adamerge.objectives.expert_targets import ExpertTargets
from adamerge.pool.modelpool import ModelPool
from adamerge.pool.task_vectors import TaskVectors
from adamerge.reporting.results import protected_lines, write_json, write_summary
from adamerge.storage.locking import run_directory_lock
from adamerge.storage.renamed import current_path
from adamerge.training.alignment import load_alignment
from adamerge.training.heads_config import REPORT_KEY as HEAD_REPORT, check_adaptable, head_lines
from adamerge.training.host_memory import release_freed_memory
from adamerge.training.preemption import handle_preemption, stop_if_requested
from adamerge.training.protected_config import build_protected_tasks, parse_protected
from adamerge.training.resume import remove_checkpoints, write_run_record


def build_from_config(node: DictConfig, **kwargs: Any) -> Any:
    """``instantiate``, re-raising an adamerge error from inside as itself rather than Hydra's wrapper, so
    Python callers can catch it by type; a ``_target_`` that names a module adamerge 0.3 moved says where it is now."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = adamerge_cause(error)
        if cause is not None:
            raise cause  # keeps its own cause (the low-level error) for HYDRA_FULL_ERROR tracebacks
        target = re.search(r"Error locating target '([\w.]+)'", str(error))
        if target and current_path(target.group(1)) != target.group(1):
            raise ConfigError(f"_target_: {target.group(1)} names a module that moved in adamerge 0.3: use "
                              f"{current_path(target.group(1))} (CHANGELOG.md lists every move)") from error
        raise


def check_outputs(cfg: DictConfig, run_dir: Path) -> None:
    """The run directory is writable and the run would overwrite nothing (see preflight.check_run_dir); run by the
    command's guard before Hydra writes into the directory, and again by :func:`run`."""
    check_run_dir(run_dir, parse_outputs(cfg), lambda: run_record(cfg))


def build_expert_targets(settings: RunSettings, pool: ModelPool, task_vectors: TaskVectors, datamodule: Any,
                         device: torch.device, objective: Objective) -> ExpertTargets:
    """Each task's expert (θ0 + τ_k with its head) run once over its evaluation rows (the agreement signal) and, for an
    objective that compares with the experts, its adaptation rows: never once per step (adamerge.objectives.expert_targets)."""
    start = time.perf_counter()
    experts = ExpertTargets.for_objective(pool, task_vectors, datamodule, device, objective,
                                          backbone=expert_backbones(pool, task_vectors),
                                          max_bytes=settings.options.expert_cache_max_gb * 2**30,
                                          batch_size=settings.data.eval_batch_size,
                                          logits=settings.heads.adapt)  # adapted heads learn on the experts' logits
    release_freed_memory()  # each expert was a whole model for a moment: give its pages back before learning
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
    # A typo, a bad value or a directory that would lose results fails here, before any checkpoint is read.
    settings = parse_run_settings(cfg)
    options, names = settings.options, settings.methods
    check_run_dir(run_dir, settings.outputs, lambda: run_record(cfg))
    check_sharding(OmegaConf.to_container(cfg.trainer, resolve=True), settings.outputs, settings.heads.adapt)
    device = pick_device(options.accelerator)
    check_memory_plan(cfg, settings.outputs.learned, on_device=device.type == "cuda",
                      hyperparameters=settings.hyperparameters)
    objective = build_objective(**OmegaConf.to_container(cfg.objective, resolve=True))
    if not options.resume:
        write_run_record(run_dir, run_record(cfg))
    torch.set_num_threads(options.num_threads) if options.num_threads else None
    L.seed_everything(options.seed, workers=True, verbose=False)
    pool: ModelPool = build_from_config(cfg.modelpool, _recursive_=False)
    datamodule = build_from_config(cfg.data)
    datamodule.setup("fit")
    check_pool_and_data(pool, datamodule)
    check_export_heads(settings.outputs, pool)
    if settings.heads.adapt:  # heads: adapt -- every head has parameters to learn, before any fine-tuned checkpoint
        check_adaptable(pool.heads, list(datamodule.task_names))
    task_vectors = pool.task_vectors(list(datamodule.task_names))
    print(f"task vectors: {task_vectors.memory_report()}")
    # The protected node again, its _target_ entries (heads, preprocessors, guards) built now.
    protected_settings = (parse_protected(build_from_config(cfg.protected, _convert_="all"), pool.task_names)
                          if cfg.get("protected") else settings.protected)
    protected = build_protected_tasks(protected_settings, pool, task_vectors, getattr(datamodule, "preprocessor", None),
                                      seed=options.seed)
    alignment = load_alignment(pool, protected_settings.alignment)
    experts = build_expert_targets(settings, pool, task_vectors, datamodule, device, objective)
    ctx = RunContext(settings, cfg, run_dir, pool, datamodule, task_vectors, device, objective, protected, alignment,
                     experts)

    rows = []
    for name in names:
        finished = method_dir(ctx, name) / "results.json"
        if options.resume and finished.is_file():
            rows.append(json.loads(finished.read_text()))
            print(f"{name}: finished before the interruption; kept {finished}")
            continue
        stop_if_requested(f"before {name} started")
        result = run_method(ctx, name)
        if rank_zero_only.rank != 0:  # DDP workers only help learning; rank 0 reports and exports
            continue
        rows.append(result)
        write_json(finished, result)
        if not options.keep_checkpoints:
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
        for line in protected_lines(result.get("protected")) + head_lines(result.get(HEAD_REPORT)):
            print(f"  {line}")
    if len(names) > 1 and rows:
        table = write_summary(run_dir, rows, task_vectors.task_names)
        print("\n" + table)
    return {"rows": rows, "run_dir": str(run_dir)}
