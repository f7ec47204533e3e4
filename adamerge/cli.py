"""The ``adamerge`` command: a Hydra entry point over ``conf/``.

``adamerge`` alone runs the embedded offline demo (``experiment=demo``); ``adamerge method=...``,
``modelpool=...``, ``data=...`` point the same run at other methods, models and data.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from adamerge.runner import CONF_DIR, run


def _demo_zoo(which: str = "") -> str:
    """``${demo_zoo:default}`` (or ``${demo_zoo:}``): the default demo zoo; ``${demo_zoo:second}``: the second zoo."""
    from adamerge.demo import SECOND_ZOO_TASKS, build_demo_zoo

    if which not in ("", "default", "second"):
        raise ValueError(f"unknown demo zoo {which!r}: use ${{demo_zoo:}} or ${{demo_zoo:second}}")
    return str(build_demo_zoo(recipe={"tasks": list(SECOND_ZOO_TASKS)} if which == "second" else None))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("demo_zoo"):
        # Resolved lazily, so only configs that mention the demo zoo build (or reuse) it.
        OmegaConf.register_new_resolver("demo_zoo", _demo_zoo, use_cache=True)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _main(cfg: DictConfig) -> None:
    status = execute(cfg, HydraConfig.get().runtime.output_dir)
    if status:
        sys.exit(status)


def execute(cfg: DictConfig, run_dir: str | os.PathLike) -> int:
    """Run one composed configuration the way the command does: 0 on success; on an error, one clean line
    on stderr and 1 (the traceback only with ``HYDRA_FULL_ERROR=1``)."""
    try:
        run(cfg, run_dir)
    except Exception as error:
        return report_error(error)
    return 0


class RunDirectoryGuard(Callback):
    """Refuses a run whose directory would lose something *before* Hydra writes ``.hydra/`` into it.

    Hydra saves the job's config into the run directory before the job starts, so a check made only inside
    the job would already have rewritten the neighbours of an export it then refuses to overwrite.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from adamerge.errors import AdamergeError
        from adamerge.runner import check_outputs

        try:
            check_outputs(config, Path(str(config.hydra.run.dir)))
        except AdamergeError as error:
            sys.exit(report_error(error))


def user_message(error: BaseException) -> str:
    """The message of the first adamerge error in the cause chain (it names what to change), else of the
    innermost cause: Hydra wraps errors raised while building objects from config."""
    from adamerge.errors import adamerge_cause

    shown = adamerge_cause(error)
    if shown is None:
        shown = error
        while shown.__cause__ is not None:
            shown = shown.__cause__
    return f"{type(shown).__name__}: {shown}"


def report_error(error: BaseException) -> int:
    """One clean line on stderr and exit status 1; with ``HYDRA_FULL_ERROR=1`` the error propagates instead."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    # One clean message, not a traceback: the errors a user can act on name the file / parameter / value.
    print(f"adamerge: error: {user_message(error)}\n(set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
    return 1


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
