"""Progressive layer-wise distillation (ProDistill, Xu et al., ICML 2025) as a learned method.

Block by block, the merge coefficients of one block (per task and element, or per task and tensor) learn so that the
merged block, fed the merged model's own activations, reproduces each task's expert block fed the expert's activations:

    min_α  Σ_k  mean_x ‖ f_l(θ0_l + Σ_j α_j ⊙ τ_{j,l};  h^merged_{k,l−1}(x)) − f_l(θ0_l + τ_{k,l};  h^expert_{k,l−1}(x)) ‖²

over a few unlabeled inputs x of each task k. The block is then frozen and both activations are propagated through it
(merged: the learned block; expert k: its own block) to the next one. Only the current block, its K task-vector slices
and the cached activations take part in a step, so the cost of a step is one block's forward and backward.

Where it follows the authors' code (github JingXuTHU/Scalable_Model_Merging_with_Progressive_Layerwise_Distillation,
Vision/main_prodistill.py, utils.py, merge_models.py): the dual inputs (merged activations for the merged block, each
expert's own for its block), element-wise coefficients starting at 0.3 without a clamp, MSE between block outputs, the
tensors outside the blocks merged by task arithmetic with that same 0.3 and not learned, and the propagation.
Where it differs: the blocks are found in any backbone (the largest ``nn.ModuleList``: EfficientNet's MBConv blocks,
CLIP ViT and BERT encoder layers, a causal LM's decoder layers) and their inputs are captured by a forward hook, with
whatever other arguments the model passes them (attention masks, position embeddings); the authors' loss sums the
squared error over features and examples, ours averages it (a scale Adam does not care about); steps per block and
inputs per task are settings rather than epochs over a validation split; and it composes with ``method.base`` in the
residual form (the base merge whole, per-block corrections from 0, the tensors outside the blocks at the base merge).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adamerge.backbones.blocks import find_blocks
from adamerge.errors import ConfigError
from adamerge.errors import NonFiniteError
from adamerge.methods import checks
from adamerge.methods.learned.adamerging import check_coefficient_learning, register_learned
from adamerge.methods.learned.block_arguments import batch_size_of, first_output, select_argument_rows
from adamerge.methods.learned.progressive_activations import BlockActivations
from adamerge.methods.learned.progressive_merged import ProgressiveMergedModel, progressive_merged_class
from adamerge.objectives import Objective
from adamerge.objectives.expert_targets import feature_tensor
from adamerge.pool.task_vectors import TaskVectors
from adamerge.training.module import AdaMergingModule, Batch

GRANULARITIES = ("element", "tensor")


def block_of(names: Sequence[str], path: str, count: int) -> list[int | None]:
    """The block index of every merged tensor (None for tensors outside the blocks: stem, embeddings, final norm)."""
    prefix = f"{path}." if path else ""
    out: list[int | None] = []
    for name in names:
        head = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else ""
        out.append(int(head) if head.isdigit() and int(head) < count else None)
    return out


class ProgressiveDistillationModule(BlockActivations, AdaMergingModule):
    """Learns one block's coefficients at a time; the block of step ``s`` is ``s // steps_per_block``. The inputs and
    targets of the block being learned come from :class:`~.progressive_activations.BlockActivations`."""

    def __init__(self, merged: ProgressiveMergedModel, heads: Mapping[str, nn.Module], *, blocks: str,
                 steps_per_block: int, samples_per_task: int, batch_size: int, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(merged, heads, **kwargs)
        self.block_path, block_list = find_blocks(merged.module, blocks)
        self.num_blocks = len(block_list)
        self.tensor_block = block_of(merged.names, self.block_path, self.num_blocks)
        if not any(b is not None for b in self.tensor_block):
            raise ConfigError(f"method 'progressive_distillation': no merged tensor lies in the blocks {self.block_path!r}")
        self.steps_per_block, self.samples_per_task, self.batch_size = int(steps_per_block), int(samples_per_task), int(batch_size)
        self.seed = int(seed)
        self.total_steps = self.steps_per_block * self.num_blocks
        # Where the distillation inputs come from (split_size / split_batches, as a MultiTaskDataModule has them);
        # None: the trainer's datamodule.
        self.distillation_source: Any = None
        self._cache: dict[str, Any] | None = None  # the current block's captured inputs and expert targets
        self._propagates: bool | None = None  # whether a block's output is the next block's input (checked once)
        merged.begin_block(0, self.block_tensors(0))

    # -- what learns ------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.merged.learning_parameters()

    def use_state_directory(self, directory: Path) -> None:
        """Over a streamed pool, finished blocks' element-wise coefficients go to ``directory`` (see
        :mod:`.progressive_merged`): the method's state in memory stays one block's."""
        if self.merged.merge_per_module:
            self.merged.keep_finished_in(directory / "element_coefficients")

    def _start_block(self, block: int, optimizer: torch.optim.Optimizer) -> None:
        """A fresh Adam for every block, as the authors' one per layer, over what learns in that block."""
        # The finished block's moments, gradients and the optimiser's hold on its coefficients go first, before the
        # next block's are allocated: at no moment are two blocks' states alive.
        optimizer.state.clear()
        for parameter in optimizer.param_groups[0]["params"]:
            parameter.grad = None
        optimizer.param_groups[0]["params"] = []
        optimizer.param_groups[0]["params"] = self.merged.begin_block(block, self.block_tensors(block))

    def extra_resume_state(self) -> dict[str, Any]:
        return {**super().extra_resume_state(), "progressive": self.merged.block_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Before the state dict loads (Lightning's order): the learning block's parameters in the checkpoint's shapes.
        state = checkpoint.get("adamerge", {}).get("progressive")
        if state is not None:
            self.merged.load_block_state(state)
        super().on_load_checkpoint(checkpoint)

    def block_tensors(self, block: int) -> list[int]:
        return [i for i, b in enumerate(self.tensor_block) if b == block]

    def block_weights(self, block: int) -> dict[str, Tensor]:
        """The merged weights of one block's tensors only (graph to their coefficients): a step touches nothing else."""
        return self.merged_weights_of(self.block_tensors(block))

    def merged_weights_of(self, indices: Sequence[int]) -> dict[str, Tensor]:
        """The merged weights of the tensors ``indices`` only."""
        pretrained, rows = self.merged.pretrained_tensors(), self.merged.coefficient_rows()
        weights = {}
        for index in indices:
            name = self.merged.names[index]
            base = pretrained[name]
            delta = self.merged.task_delta(index, rows[index].float(), base.shape)
            weights[name] = (base.float() + delta).to(base.dtype)
        return weights

    def after_optimizer_step(self) -> None:
        """Nothing to clamp (the authors' coefficients are free)."""

    # -- the learning step ------------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        super().configure_optimizers()  # the check that only coefficients train
        return torch.optim.Adam(self.trainable_parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)

    def training_step(self, batch: Mapping[str, Batch], batch_idx: int) -> Tensor | None:
        step = self.global_step
        block = min(step // self.steps_per_block, self.num_blocks - 1)
        optimizer = self.optimizers()
        if self._cache is None or self._cache["block"] != block:
            if self._cache is not None or step % self.steps_per_block == 0:  # not a block resumed midway
                self._start_block(block, optimizer.optimizer)
            self._prepare_block(block)
        optimizer.zero_grad(set_to_none=True)
        with self.profile.phase("merge"):
            weights = self.block_weights(block)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + step)
        losses = {}
        with self.profile.phase("forward"):
            for task, entry in self._cache["tasks"].items():
                size = batch_size_of(entry["merged"])
                pick = torch.randperm(size, generator=generator)[: self.batch_size].to(self.device)
                args, kwargs = select_argument_rows(entry["merged"], pick, size)
                output = feature_tensor(first_output(self._run_block(block, weights, args, kwargs)))
                target = feature_tensor(first_output(entry["target"]))[pick]
                losses[task] = F.mse_loss(output.float(), target.float())
            total = sum(losses.values())
        values = {task: v.item() for task, v in losses.items()}
        if not all(math.isfinite(v) for v in values.values()):  # before backward: a NaN must never reach the coefficients
            raise NonFiniteError(f"the block {block} distillation loss is not finite at step {step} ({values}); stopping")
        with self.profile.phase("backward"):
            self._backward(total)
        with self.profile.phase("optimizer"):
            optimizer.step()
        self.log("train/block", float(block), batch_size=1)
        self.log("train/distillation_loss", sum(values.values()), prog_bar=True, batch_size=1)
        for task, value in values.items():
            self.log(f"train/distillation_loss/{task}", value, batch_size=1)
        # The history records the block loss (what this method minimises); no prediction entropy is computed.
        self.history.append({"step": step, "objective": sum(values.values()), "entropy": None, "block": block})
        return total.detach()

    def protect(self, tasks: Sequence[Any], seed: int = 0, eval_batch_size: int = 64) -> Any:
        raise ConfigError("method 'progressive_distillation' cannot take protected tasks: its steps match one block's "
                          "outputs, where a protected task's loss on the whole model has no place; use another learned method")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.global_step >= self.total_steps:
            self.trainer.should_stop = True


PROGRESSIVE_DEFAULTS: dict[str, Any] = {
    "init_value": 0.3,  # the authors' init_scale (and backbone_merging_coef for the tensors outside the blocks)
    "granularity": "element",  # element (the authors') or tensor: one coefficient per task and tensor
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "weight_decay": 0.0,
    "clamp": False,  # the authors' coefficients are unbounded
    "blocks": "auto",  # the module list distilled block by block; auto: the one with the most parameters
    "steps_per_block": 50,  # trainer.max_steps is ignored: the method takes steps_per_block × blocks steps
    "samples_per_task": 64,  # unlabeled inputs per task whose activations are cached (the authors: few-shot)
    "batch_size": 32,  # cached inputs per task per step
    "seed": 0,  # which inputs, and the order of the minibatches
    "autocast_dtype": None,
}


def build_progressive_distillation(
    backbone: nn.Module, task_vectors: TaskVectors, heads: Mapping[str, nn.Module], *,
    init_value: float | Sequence[float], granularity: str, lr: float, betas: Sequence[float], weight_decay: float,
    clamp: bool, blocks: str, steps_per_block: int, samples_per_task: int, batch_size: int, seed: int,
    autocast_dtype: str | None, objective: Objective | None = None,
) -> ProgressiveDistillationModule:
    from adamerge.training.alignment import ALIGNMENT_TASK

    if ALIGNMENT_TASK in task_vectors.task_names:  # its floor is a bound on whole-model coefficients, not a block's
        raise ConfigError("method 'progressive_distillation' cannot take an alignment vector (protected.alignment); "
                          "use another learned method")
    k = task_vectors.num_tasks
    initial = [float(v) for v in init_value] if isinstance(init_value, Sequence) else [float(init_value)] * k
    path, block_list = find_blocks(backbone, blocks)
    learned = [b is not None for b in block_of(task_vectors.names, path, len(block_list))]
    merged = progressive_merged_class(task_vectors)(backbone, task_vectors, init_value=initial,
                                                    granularity=granularity, learned=learned)
    return ProgressiveDistillationModule(
        merged, heads, blocks=blocks, steps_per_block=steps_per_block, samples_per_task=samples_per_task,
        batch_size=batch_size, seed=seed, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
        autocast_dtype=autocast_dtype, objective=objective)


def _validate(num_tasks: int, hparams: Mapping[str, Any]) -> None:
    method = "progressive_distillation"
    check_coefficient_learning(method, num_tasks, hparams)
    checks.check_choice(method, "granularity", hparams["granularity"], GRANULARITIES)
    for name in ("steps_per_block", "samples_per_task", "batch_size"):
        value = hparams[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise checks.fail(method, name, value, "must be a whole number >= 1")
    if not isinstance(hparams["blocks"], str):
        raise checks.fail(method, "blocks", hparams["blocks"], "must be 'auto' or the path of a module list")


register_learned(
    "progressive_distillation", build_progressive_distillation, PROGRESSIVE_DEFAULTS,
    "ProDistill: block by block, coefficients learned so each merged block reproduces each expert block's output",
    _validate,
)
