"""Resuming a killed run: periodic atomic checkpoints of what learns, and the record that ties a run
directory to the configuration that made it.

A learned method saves ``<method dir>/checkpoints/last.ckpt`` every ``checkpoint.every_n_steps`` steps and
when learning ends: its coefficients or mask logits, the optimisers' state, the step (hence the Concrete
stage), the frozen stage-2 mask, the RNG states and the unlabeled stream's position (see
``AdaMergingModule.on_save_checkpoint`` and the data module's resumable loader). ``resume=true`` reruns the
command in the same directory: methods whose ``results.json`` exists are kept, the one that was learning
continues from its checkpoint, the rest run, and the summary is rebuilt from every method's results.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from adamerge.errors import AdamergeError, RunDirectoryError
from adamerge.methods.checks import is_count
from adamerge.reporting.results import write_json
from adamerge.storage.atomic import write_atomic
from adamerge.storage.renamed import current_path
from adamerge.training.preemption import RunPreempted, stop_requested

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
RUN_RECORD = "run_config.json"
# Settings that change how a run is shown or how often it is saved, not what it computes: a resumed run may
# change them. Every other difference would splice two different runs into one result.
RESUMABLE_CHANGES = ("resume", "logger", "selection", "num_threads", "checkpoint", "memory_plan",
                     "trainer.enable_progress_bar", "trainer.log_every_n_steps", "trainer.enable_model_summary")


class ResumeError(AdamergeError, RuntimeError):
    """A checkpoint cannot continue this run (another method, another configuration, a damaged file)."""


def capture_rng() -> dict[str, Any]:
    """torch's CPU and CUDA generators, numpy's and Python's: every source a learning step may draw from."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # Plain lists and tuples: the checkpoint loads with torch.load(weights_only=True).
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "python": random.getstate(),
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer through :func:`adamerge.storage.atomic.write_atomic`: a kill at any moment leaves
    the old checkpoint or the new one, never a torn file, and a full disk raises a DiskFullError naming the
    checkpoint and its size while the previous checkpoint stays usable."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomic(path, buffer.getbuffer())


class StepCheckpoint(L.Callback):
    """Saves the trainer state to ``directory/last.ckpt`` every ``every_n_steps`` steps (0: never) and at the end,
    and when a stop signal arrived (:mod:`adamerge.training.preemption`): then at the end of the step under way, after
    which it stops the run with :class:`adamerge.training.preemption.RunPreempted`.
    """

    def __init__(self, directory: str | Path, every_n_steps: int) -> None:
        if not is_count(every_n_steps, minimum=0):
            raise ValueError(f"every_n_steps must be an integer >= 0, got {every_n_steps!r}")
        self.directory = Path(directory)
        self.every_n_steps = every_n_steps

    @property
    def path(self) -> Path:
        return self.directory / LAST_CHECKPOINT

    def save(self, trainer: L.Trainer) -> None:
        # With optimiser state; every rank takes part, rank 0 writes (through AtomicCheckpointIO).
        trainer.save_checkpoint(self.path, weights_only=False)

    def _due(self, step: int) -> bool:
        return self.every_n_steps > 0 and step % self.every_n_steps == 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        signum = stop_requested()
        # Under DDP a scheduler may signal only some ranks: all of them stop when any one was asked to.
        stop = trainer.strategy.reduce_boolean_decision(signum is not None, all=False)
        if self._due(trainer.global_step) or stop:
            self.save(trainer)
        if stop:
            raise RunPreempted(signum or signal.SIGTERM, f"at learning step {trainer.global_step}", self.path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_steps > 0 and not self._due(trainer.global_step):  # else the last step was just saved
            self.save(trainer)


def checkpoint_path(method_dir: Path) -> Path:
    return method_dir / CHECKPOINT_DIR / LAST_CHECKPOINT


def remove_checkpoints(method_dir: Path) -> None:
    """Once a method's results.json is written its checkpoint has no further use (it can be large)."""
    shutil.rmtree(method_dir / CHECKPOINT_DIR, ignore_errors=True)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: value}


def config_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ, leaving out the settings a resume may change. A class path recorded before
    adamerge 0.3 equals its new name (``_target_: adamerge.modelpool.ModelPool`` is ``adamerge.pool.modelpool...``)."""
    old, new = _flatten(recorded), _flatten(json.loads(json.dumps(current)))

    def free(key: str) -> bool:
        return any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE_CHANGES)

    def same(before: Any, now: Any) -> bool:
        return before == now or (isinstance(before, str) and current_path(before) == now)

    return sorted(key for key in set(old) | set(new) if not free(key) and not same(old.get(key), new.get(key)))


def write_run_record(run_dir: Path, record: Mapping[str, Any]) -> None:
    """``run_config.json``: the resolved configuration that made the run directory (``record``, plain values)."""
    write_json(run_dir / RUN_RECORD, record)


def check_resume(run_dir: Path, record: Mapping[str, Any]) -> None:
    """``resume=true`` needs the record of the run to continue, made by the same settings (``record``: this run's)."""
    path = run_dir / RUN_RECORD
    if not path.is_file():
        raise RunDirectoryError(
            f"resume=true but there is nothing to resume in {run_dir}: it has no {RUN_RECORD}. Point the command "
            "at the killed run's directory (hydra.run.dir=<that directory>)"
        )
    try:
        recorded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RunDirectoryError(f"cannot resume from {run_dir}: {path} is unreadable ({error})") from error
    differences = config_differences(recorded, record)
    if differences:
        shown = ", ".join(f"{key} (was {_flatten(recorded).get(key)!r})" for key in differences[:5])
        raise RunDirectoryError(
            f"cannot resume the run in {run_dir} with other settings: {shown}"
            f"{' …' if len(differences) > 5 else ''}. Resume with the original settings, or start a new run"
        )


def check_no_unfinished_learning(method_dirs: Sequence[Path]) -> None:
    """Without ``resume=true``, a directory holding an interrupted run's checkpoints is not reused."""
    for directory in method_dirs:
        if checkpoint_path(directory).is_file():
            raise RunDirectoryError(
                f"{checkpoint_path(directory)} holds an interrupted run's progress; pass resume=true to continue it, "
                "or choose another run directory"
            )


class ResumableState:
    """The checkpoint hooks of :class:`~adamerge.training.module.AdaMergingModule`: a checkpoint holds only what
    learns (coefficients, mask logits and their reset values) and the run's own state -- history, skipped steps, step
    profile, RNG states, protected tasks' multipliers, adapted heads -- so a resumed run continues exactly where it stopped."""

    FROZEN_PREFIXES = ("merged.module.", "heads.", "protection.")

    def resumable_state_keys(self) -> list[str]:
        """State entries a checkpoint must hold: coefficients, mask logits and their reset values."""
        return [key for key in self.state_dict() if not key.startswith(self.FROZEN_PREFIXES)]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keys = set(self.resumable_state_keys())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        checkpoint["adamerge"] = {"history": list(self.history), "skipped_steps": list(self.skipped_steps),
                                  "profile": self.profile.state(), "rng": capture_rng(), **self.extra_resume_state()}
        if self.protection is not None:
            checkpoint["adamerge"]["protection"] = self.protection.state()
        if self.adapted_heads is not None:  # heads: adapt -- the "heads." entries are not in the state dict above
            checkpoint["adamerge"]["adapted_heads"] = self.adapted_heads.state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = sorted(set(self.resumable_state_keys()) - set(checkpoint.get("state_dict", {})))
        if missing or "adamerge" not in checkpoint:
            raise ResumeError(f"the checkpoint is not one of this method's: it lacks {missing[:5] or ['adamerge']}")
        state = checkpoint["adamerge"]
        self.history, self.skipped_steps = list(state["history"]), list(state["skipped_steps"])
        self.profile.load_state(state["profile"])
        # Applied just before the next step: creating the data iterator in between draws from torch's RNG.
        self._rng_to_restore = state["rng"]
        self.load_extra_resume_state(state)
        if self.protection is not None:
            if "protection" not in state:
                raise ResumeError("the checkpoint was written without protected tasks")
            self.protection.load_state(state["protection"])
        if self.adapted_heads is not None:
            if "adapted_heads" not in state:
                raise ResumeError("the checkpoint was written without adapted heads (heads: frozen)")
            self.adapted_heads.load_state(state["adapted_heads"])

    def use_state_directory(self, directory: Path) -> None:
        """``directory`` (the method's checkpoint directory, removed once its results are written) may hold learned
        state too large for memory; a method that has such state overrides this (progressive distillation)."""

    def extra_resume_state(self) -> dict[str, Any]:
        """What a subclass keeps across a resume beyond the state dict (the Concrete stage's frozen mask)."""
        return {}

    def load_extra_resume_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`extra_resume_state` saved."""
