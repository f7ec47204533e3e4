"""Learning on a tiny pool, sharded over 2 CPU processes by trainer=fsdp (run by tests/test_sharding.py).

``python tests/sharding_worker.py <out dir>`` starts rank 0; Lightning's launcher starts rank 1 by running this script
again. Each rank sees its half of every step's batch; rank 0 writes what each method learned, and every rank the
elements of θ0 and the task vectors it holds, to ``<out dir>``. :func:`build_module` and :func:`step_batches` are the
single-process reference's too, so both sides learn from the same model and the same rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from adamerge.methods.learned.adamerging import build_learned
from adamerge.objectives import Entropy
from adamerge.pool.task_vectors import TaskVectors
from adamerge.training.module import AdaMergingModule
from adamerge.training.resume import LAST_CHECKPOINT, AtomicCheckpointIO, StepCheckpoint
from adamerge.training.sharded_merge import MergeBlocks, ShardedMergedModel, local_shard_numel
from adamerge.training.sharding import ShardedMergeStrategy

TASKS = ("digits", "textures", "photos")
STEPS = 4
BATCH = 8  # rows per task and step: 4 on each of the 2 ranks
# Raw task vectors task- and layer-wise, the split ++ form (TIES-trimmed vectors) and a residual base (one more,
# unscored vector with its own bounds): the forms trainer=fsdp supports.
METHODS = ("adamerging_task_wise", "adamerging_layer_wise", "adamerging_layer_wise_plus_plus",
           "adamerging_layer_wise_on_iso_cts")
RESUMED = "adamerging_layer_wise"


def _backbone() -> nn.Module:
    from tests.helpers import TinyConvNet

    return TinyConvNet()


def build_module(method: str, streamed_from: Path | None = None) -> AdaMergingModule:
    """``method`` on a tiny conv pool of three tasks, in float64, the paper's entropy objective (a mean over the rows
    of each task's batch, so the mean of two halves' gradients is the whole batch's). ``streamed_from``: the same
    pool written there as safetensors files and streamed from them (``modelpool.streaming=disk``)."""
    from tests.helpers import finetuned_states

    torch.manual_seed(0)
    pretrained = _backbone()
    finetuned = dict(zip(TASKS, finetuned_states(pretrained, len(TASKS), scale=0.3).values()))
    if streamed_from is None:
        task_vectors = TaskVectors.from_state_dicts(pretrained.state_dict(), finetuned)
    else:
        from safetensors.torch import save_file

        from adamerge.pool.streamed_vectors import StreamedTaskVectors

        streamed_from.mkdir(parents=True, exist_ok=True)
        floats = lambda state: {n: t.double() if t.is_floating_point() else t for n, t in state.items()}  # noqa: E731
        save_file(floats(pretrained.state_dict()), str(streamed_from / "pretrained.safetensors"))
        for task, state in finetuned.items():
            save_file(floats(state), str(streamed_from / f"{task}.safetensors"))
        task_vectors = StreamedTaskVectors.from_sources(
            streamed_from / "pretrained.safetensors", {t: streamed_from / f"{t}.safetensors" for t in TASKS},
            storage_dtype=torch.float64)
    # In eval mode, as a pool's backbone and heads are: BatchNorm uses its running statistics, one row at a time.
    heads = {task: nn.Linear(6, 3).eval() for task in TASKS}
    module = build_learned(method, _backbone().double().eval(), task_vectors, heads, objective=Entropy(), lr=0.05)
    return module.double()


def step_batches(rank: int, world_size: int) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Every step's batch, this rank's share of its rows (``world_size`` 1: the whole batch)."""
    generator = torch.Generator().manual_seed(1)
    rows = {task: torch.randn(STEPS * BATCH, 3, 5, 5, generator=generator, dtype=torch.float64) for task in TASKS}
    share = BATCH // world_size
    return [{task: {"inputs": rows[task][step * BATCH + rank * share: step * BATCH + (rank + 1) * share]}
             for task in TASKS} for step in range(STEPS)]


class StepBatches:
    """The batches of the steps still to take, from the trainer's step on (a resumed fit continues where it stopped,
    like adamerge's own unlabeled stream)."""

    def __init__(self, batches: list, module: L.LightningModule) -> None:
        self.batches, self.module = batches, module

    def __iter__(self):
        return iter(self.batches[self.module.global_step:])

    def __len__(self) -> int:
        return len(self.batches)


def fit(module: AdaMergingModule, batches: list, steps: int, strategy: Any, devices: int,
        checkpoints: Path | None = None, resume_from: Path | None = None) -> L.Trainer:
    """``steps`` optimiser steps as the command takes them (its checkpoint writer and callback, when
    ``checkpoints``: a checkpoint every 2 steps, as a run stopped there leaves it)."""
    callbacks = [StepCheckpoint(checkpoints, every_n_steps=2)] if checkpoints is not None else []
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps,
                        limit_train_batches=STEPS, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()], callbacks=callbacks)
    trainer.fit(module, train_dataloaders=StepBatches(batches, module),
                ckpt_path=str(resume_from) if resume_from else None, weights_only=True)
    return trainer


class GatheringCounts:
    """While inside: how many times every merged tensor was formed at once (MergeBlocks' forward, the whole-merge
    form) and the most blocks gathered at the same time by the per-module merge (ShardedMergedModel.resident)."""

    def __enter__(self) -> GatheringCounts:
        self.whole_merges, self.most_gathered = 0, 0
        self.forward, self.resident = MergeBlocks.forward, ShardedMergedModel.resident
        counts = self

        def forward(blocks: MergeBlocks, rows: torch.Tensor) -> list:
            counts.whole_merges += 1
            return counts.forward(blocks, rows)

        @contextlib.contextmanager
        def resident(merged: ShardedMergedModel, index: int):
            with counts.resident(merged, index):
                counts.most_gathered = max(counts.most_gathered, sum(1 for n in merged._gathered.values() if n))
                yield

        MergeBlocks.forward, ShardedMergedModel.resident = forward, resident
        return self

    def __exit__(self, *exc: object) -> None:
        MergeBlocks.forward, ShardedMergedModel.resident = self.forward, self.resident


def main(out: Path) -> None:
    world_size = 2
    rank = int(os.environ.get("LOCAL_RANK", 0))  # set by Lightning's launcher in rank 1; rank 0 starts it
    batches = step_batches(rank, world_size)
    results: dict[str, Any] = {}
    for method in METHODS:
        module = build_module(method)
        with GatheringCounts() as counts:  # the default: merged module by module
            trainer = fit(module, batches, STEPS, ShardedMergeStrategy(), world_size)
        fused = module.merge_and_unload()  # every rank takes part in gathering the merge
        results[method] = {"coefficients": module.coefficients(), "shards": local_shard_numel(module.merged),
                           "objective": [h["objective"] for h in module.history],
                           "whole_merges": counts.whole_merges, "most_gathered": counts.most_gathered}
        if trainer.global_rank == 0:
            torch.save(fused.state_dict(), out / f"{method}.fused.pt")
    # The whole merge formed for each step (merge_per_module=false), FSDP2's own hooks gathering each block around
    # its forward (FULL_SHARD), or keeping it from its forward to its backward (SHARD_GRAD_OP).
    for name, reshard in (("whole_merge", True), ("shard_grad_op", False)):
        module = build_module(RESUMED)
        with GatheringCounts() as counts:
            fit(module, batches, STEPS, ShardedMergeStrategy(merge_per_module=False, reshard_after_forward=reshard),
                world_size)
        results[name] = {"coefficients": module.coefficients(), "whole_merges": counts.whole_merges}
    # A streamed pool: each layer's block read from the checkpoints and sharded before the next is read.
    module = build_module(RESUMED, streamed_from=out / f"pool-rank{rank}")
    with GatheringCounts() as counts:
        fit(module, batches, STEPS, ShardedMergeStrategy(), world_size)
    results["streamed"] = {"coefficients": module.coefficients(), "names": list(module.merged.names),
                           "shards": local_shard_numel(module.merged),
                           "whole_merges": counts.whole_merges, "most_gathered": counts.most_gathered}
    # Resume: stopped after 2 steps with its checkpoint, then a fresh module continues from it to the last step.
    fit(build_module(RESUMED), batches, 2, ShardedMergeStrategy(), world_size, checkpoints=out)
    resumed = build_module(RESUMED)
    trainer = fit(resumed, batches, STEPS, ShardedMergeStrategy(), world_size, resume_from=out / LAST_CHECKPOINT)
    results["resumed"] = {"coefficients": resumed.coefficients()}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers, when run as a script
    main(Path(sys.argv[1]))
