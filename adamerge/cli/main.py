"""The ``adamerge`` command: a Hydra entry point over ``conf/``.

``adamerge`` alone runs the embedded offline demo (the demo pool on the demo data, with the settings in
``conf/pool_data/demo_demo.yaml``); ``adamerge method=...``, ``modelpool=...``, ``data=...`` point the same run at
other methods, models and data, which then get the methods' documented defaults.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from adamerge.cli.runner import run
from adamerge.errors import report_cli_error
from adamerge.methods.configs import CONF_DIR
from adamerge.reporting.sweep import ERROR_FILE, job_score, selection_criterion
from adamerge.storage.locking import acquire_run_lock, release_run_lock
from adamerge.training.preemption import PREEMPTED_EXIT_CODE, RunPreempted


def _demo_zoo(which: str = "") -> str:
    """``${demo_zoo:default}`` (or ``${demo_zoo:}``): the default demo zoo; ``${demo_zoo:second}``: the second zoo;
    ``${demo_zoo:text}``: the text study zoo (adamerge/demo/text_zoo.py)."""
    from adamerge.demo.zoo import SECOND_ZOO_TASKS, build_demo_zoo

    if which not in ("", "default", "second", "text"):
        raise ValueError(f"unknown demo zoo {which!r}: use ${{demo_zoo:}}, ${{demo_zoo:second}} or ${{demo_zoo:text}}")
    if which == "text":
        from adamerge.demo.text_zoo import build_text_zoo

        return str(build_text_zoo())
    return str(build_demo_zoo(recipe={"tasks": list(SECOND_ZOO_TASKS)} if which == "second" else None))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("demo_zoo"):
        # Resolved lazily, so only configs that mention the demo zoo build (or reuse) it.
        OmegaConf.register_new_resolver("demo_zoo", _demo_zoo, use_cache=True)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _main(cfg: DictConfig) -> float | None:
    status, score = run_job(cfg, HydraConfig.get().runtime.output_dir)
    # sys.exit below skips Hydra's on_run_end, where RunDirectoryGuard would release the directory's lock.
    release_run_lock(HydraConfig.get().runtime.output_dir)
    if status == PREEMPTED_EXIT_CODE:  # a sweep stops too: the signal was for the whole process
        sys.exit(status)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        # One failed job must not end a sweep: its error.json is in its directory, and the sweep summary
        # (adamerge.reporting.sweep.SweepSummary) lists it as a failed row and sets the exit status once all are done.
        # The return value is what a hyperparameter search (Optuna) minimises; None marks the trial failed.
        return score
    if status:
        sys.exit(status)
    return score


def execute(cfg: DictConfig, run_dir: str | os.PathLike) -> int:
    """Run one composed configuration the way the command does: 0 on success; on an error, one clean line
    on stderr and 1 (the traceback only with ``HYDRA_FULL_ERROR=1``)."""
    return run_job(cfg, run_dir)[0]


def run_job(cfg: DictConfig, run_dir: str | os.PathLike) -> tuple[int, float | None]:
    """:func:`execute`, also returning the job's label-free score (``adamerge.reporting.sweep.job_score`` under the
    configured selection criterion). A failure is recorded in ``run_dir/error.json`` for the sweep summary."""
    try:
        outcome = run(cfg, run_dir)
    except RunPreempted as stopped:
        print(f"adamerge: {stopped}. Resume with:\n{resume_command(run_dir)}", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT_CODE, None
    except Exception as error:
        try:
            record_failure(Path(run_dir), cfg, error)
        except OSError:  # a full disk: the error itself still reaches the user, on stderr
            pass
        return report_error(error), None
    (Path(run_dir) / ERROR_FILE).unlink(missing_ok=True)  # a resumed job that now finished is no failure
    return 0, job_score(outcome["rows"], selection_criterion(cfg))


def resume_command(run_dir: str | os.PathLike) -> str:
    """The command line that continues the run in ``run_dir``: this command's own overrides (from Hydra),
    without any ``resume`` or run directory given, plus ``resume=true hydra.run.dir=<run_dir>``."""
    try:
        overrides = HydraConfig.get().overrides
        given = [*overrides.task, *overrides.hydra]
    except ValueError:  # composed in Python (execute), not from a command line: no overrides to repeat
        given = []
    replaced = ("resume", "hydra.run.dir", "hydra.mode", "hydra.sweep.dir", "hydra.sweep.subdir")
    kept = [o for o in given if o.split("=", 1)[0].lstrip("+~") not in replaced]
    return shlex.join(["adamerge", *kept, "resume=true", f"hydra.run.dir={Path(run_dir).absolute()}"])


def record_failure(run_dir: Path, cfg: DictConfig, error: BaseException) -> None:
    """The job's error as ``error.json`` (type, message, traceback), unless the error is that the directory
    itself must not be written to."""
    import traceback

    from adamerge.errors import RunDirectoryError
    from adamerge.reporting.results import write_json

    shown = shown_error(error)
    if isinstance(shown, RunDirectoryError):
        return
    write_json(run_dir / ERROR_FILE, {
        "method": OmegaConf.select(cfg, "method.name", default=None), "type": type(shown).__name__,
        "message": str(shown), "traceback": "".join(traceback.format_exception(error)),
    })


class RunDirectoryGuard(Callback):
    """Refuses a run whose directory would lose something *before* Hydra writes ``.hydra/`` into it.

    Hydra saves the job's config into the run directory before the job starts, so a check made only inside
    the job would already have rewritten the neighbours of an export it then refuses to overwrite.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from adamerge.errors import AdamergeError
        from adamerge.cli.runner import check_outputs

        run_dir = Path(str(config.hydra.run.dir))
        try:
            # Held until the run ends (run() takes it again): a second process on this directory is refused
            # before Hydra writes its .hydra/ over the first one's.
            acquire_run_lock(run_dir)
            check_outputs(config, run_dir)
        except AdamergeError as error:
            release_run_lock(run_dir)
            sys.exit(report_error(error))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        release_run_lock(Path(str(config.hydra.run.dir)))


def shown_error(error: BaseException) -> BaseException:
    """The first adamerge error in the cause chain (it names what to change), else the innermost cause:
    Hydra wraps errors raised while building objects from config."""
    from adamerge.errors import adamerge_cause

    shown = adamerge_cause(error)
    if shown is None:
        shown = error
        while shown.__cause__ is not None:
            shown = shown.__cause__
    return shown


def user_message(error: BaseException) -> str:
    shown = shown_error(error)
    return f"{type(shown).__name__}: {shown}"


def report_error(error: BaseException) -> int:
    """One clean line on stderr and exit status 1; with ``HYDRA_FULL_ERROR=1`` the error propagates instead."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    # One clean message, not a traceback: the errors a user can act on name the file / parameter / value.
    return report_cli_error("adamerge", f"{user_message(error)}\n(set HYDRA_FULL_ERROR=1 for the traceback)", 1)


def quiet_framework_chatter() -> None:
    """Hide Lightning notices that are expected here (frozen eval-mode backbone, endless stream)."""
    for pattern in (
        r".*module\(s\) in eval mode.*",
        r".*LeafSpec.*",
        r".*smaller than the logging interval.*",
        r".*does not have many workers.*",
        r".*validation_step.*no `val_dataloader`.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.accelerators.cuda").setLevel(logging.WARNING)


def main() -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    quiet_framework_chatter()
    register_resolvers()
    _main()


if __name__ == "__main__":
    main()
