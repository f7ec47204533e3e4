"""Experiment loggers; wandb falls back to offline mode so a run never prompts or blocks."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger


def wandb_credentials_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_logger(
    save_dir: str | Path,
    project: str = "adamerge",
    name: str | None = None,
    group: str | None = None,
    job_type: str | None = None,
    offline: bool | str = "auto",
    **kwargs: Any,
) -> WandbLogger:
    """A WandbLogger that is offline unless credentials exist (or ``WANDB_MODE`` says otherwise).

    The runner sets ``group`` to the sweep (all jobs of a multirun, or the methods of one comparison, side by
    side in the dashboard) and ``job_type`` to the method.
    """
    if offline == "auto":
        mode = os.environ.get("WANDB_MODE")
        offline = mode in ("offline", "disabled", "dryrun") if mode else not wandb_credentials_available()
    os.environ.setdefault("WANDB_SILENT", "true")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        save_dir=str(save_dir), project=project, name=name, group=group, job_type=job_type, offline=bool(offline),
        settings={"console": "off", "silent": True}, **kwargs,
    )


# group / job_type are wandb's dashboard grouping; a CSV or TensorBoard log already sits in its sweep's and its
# method's directory, so those loggers take them only to share one call signature.
def csv_logger(save_dir: str | Path, name: str | None = None, group: str | None = None,
               job_type: str | None = None, **kwargs: Any) -> CSVLogger:
    return CSVLogger(save_dir=str(save_dir), name=name or "csv", **kwargs)


def tensorboard_logger(save_dir: str | Path, name: str | None = None, group: str | None = None,
                       job_type: str | None = None, **kwargs: Any) -> TensorBoardLogger:
    return TensorBoardLogger(save_dir=str(save_dir), name=name or "tensorboard", **kwargs)


def run_identity(run_dir: Path, method: str) -> dict[str, str]:
    """wandb's group, job type and run name of one method's run.

    In a multirun the group is the sweep directory (every job of the sweep together); otherwise the run
    directory (the methods of one comparison together). The name carries the job number in a sweep.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        hydra = HydraConfig.get()
        return {"group": str(hydra.sweep.dir), "job_type": method, "name": f"{hydra.job.num}_{method}"}
    return {"group": str(run_dir), "job_type": method, "name": method}


def finish(logger: Logger | None) -> None:
    """Close a run so the next method of a comparison starts its own (wandb allows one at a time)."""
    if isinstance(logger, WandbLogger):
        import wandb

        if wandb.run is not None:
            wandb.finish()
    elif logger is not None:
        logger.finalize("success")


def log_coefficients(logger: Logger | None, coefficients: list, task_names: list[str], layer_names: list[str], heatmap: Path | None) -> None:
    """The coefficient matrix as a table and as an image, in whatever form the logger supports."""
    if logger is None:
        return
    rows = coefficients if coefficients and isinstance(coefficients[0], list) else [coefficients]
    labels = layer_names if len(rows) == len(layer_names) else ["all"]
    if isinstance(logger, WandbLogger):
        logger.log_table(key="coefficients", columns=["layer", *task_names], data=[[l, *r] for l, r in zip(labels, rows)])
        if heatmap is not None:
            logger.log_image(key="coefficients_heatmap", images=[str(heatmap)])
    elif isinstance(logger, TensorBoardLogger) and heatmap is not None:
        import numpy as np
        from PIL import Image

        image = np.asarray(Image.open(heatmap).convert("RGB"))
        logger.experiment.add_image("coefficients_heatmap", image, dataformats="HWC")
    elif isinstance(logger, CSVLogger):
        for label, row in zip(labels, rows):
            logger.log_metrics({f"coefficient/{label}/{t}": float(v) for t, v in zip(task_names, row)})


def log_label_free(logger: Logger | None, report: dict[str, dict[str, float]]) -> None:
    """Per task: objective before / after learning and the fraction of predictions changed."""
    if logger is None or not report:
        return
    logger.log_metrics({f"label_free/{task}/{key}": float(v) for task, signals in report.items() for key, v in signals.items()})


def log_profile(logger: Logger | None, report: dict[str, dict[str, float]]) -> None:
    """Per phase of the learning step (merge, forward, backward, optimizer, data): ms per step and share."""
    if logger is None or not report:
        return
    logger.log_metrics({f"profile/{phase}/{key}": float(v) for phase, values in report.items()
                        for key, v in values.items() if key != "seconds"})


def log_run_config(logger: Logger | None, config: dict[str, Any]) -> None:
    """The full resolved configuration (and the method's hyperparameters) as the run's config."""
    if logger is not None:
        logger.log_hyperparams(config)


def log_final(logger: Logger | None, result: dict[str, Any]) -> None:
    """What the method ended at: per-task accuracy, the label-free scores, seconds and peak memory."""
    if logger is None:
        return
    metrics = {f"final/accuracy/{task}": value for task, value in result["accuracy"].items()}
    metrics["final/average_accuracy"] = result["average_accuracy"]
    for score, values in (result.get("unlabeled") or {}).items():
        metrics.update({f"final/unlabeled_{score}/{task}": v for task, v in values.items() if v is not None})
    metrics.update({"final/seconds": result["seconds"], "final/peak_memory_mb": result["peak_memory_mb"]})
    logger.log_metrics({key: float(value) for key, value in metrics.items()})


def log_protected(logger: Logger | None, report: dict[str, dict[str, Any]] | None) -> None:
    """Per protected task: each stage's scores (``protected/<task>/<stage>/<score>``), the loss in excess of
    ``L_ref`` and the final multiplier under a budget."""
    if logger is None or not report:
        return
    metrics = {f"protected/{task}/{stage}/{key}": float(value) for task, entry in report.items()
               for stage, scores in entry["scores"].items() for key, value in scores.items()}
    for task, entry in report.items():
        for key in ("excess_loss", "multiplier", "within_budget"):
            if key in entry:
                metrics[f"protected/{task}/{key}"] = float(entry[key])
    logger.log_metrics(metrics)
