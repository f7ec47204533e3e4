"""The merged model sharded across devices by FSDP2 (``trainer=fsdp``): for a working set one device cannot hold.

``θ_l = θ0_l + Σ_k λ_{g(l),k} τ_{k,l}`` needs θ0 and the K task vectors of every merged tensor; on one device they are
K + 1 copies of the model. Under :class:`ShardedMergeStrategy` (Lightning's
:class:`~lightning.pytorch.strategies.ModelParallelStrategy`, whose engine is torch's FSDP2 ``fully_shard``) the
learning module's ``configure_model`` hook re-lays its :class:`~adamerge.methods.learned.merged.MergedModel` out so
FSDP2 can shard it (:func:`shard_merged_model`; the layout: :mod:`.sharded_merge`):

* each layer's θ0 and K task vectors become frozen parameters of one :class:`MergeBlock` (flattened, so FSDP2 splits
  them evenly over the ranks); ``fully_shard`` is applied to every block and to the :class:`MergeBlocks` around them
  (the FSDP2 root): each rank keeps ``1/N`` of θ0 and the task vectors;
* the backbone's own copies of the merged tensors are replaced by empty placeholders;
* with ``merge_per_module`` (the default, ``trainer.strategy.merge_per_module``) each module of the backbone that owns
  merged tensors gathers its block when it runs, forms its merged weight a band at a time
  (:mod:`adamerge.methods.learned.merged_per_module`), frees the block, and gathers it again in its backward to form
  ``∂L/∂x`` and ``∂L/∂λ`` band by band: neither the merged model nor its gradient is ever whole on a rank. Without it,
  :class:`MergeBlocks` forms every merged tensor for the step (FSDP2's own hooks gather each block around its forward
  and its backward, ``reshard_after_forward``), and they and their gradients are one model's size each on every rank;
* the coefficients stay ordinary replicated parameters outside FSDP2: every rank learns the same λ, and their gradient
  is averaged over the ranks (:func:`average_gradients`, the strategy's all-reduce) before each step, as DDP does.

What is *not* sharded: the backbone's tensors that are not merged, the heads, activations, and the pool the runner
loads on the host of every rank. A streamed pool (``modelpool.streaming=disk``) is sharded layer by
layer as its task vectors are read from the checkpoints. Methods that keep the task vectors in another form
(Concrete masks, AdaRank, progressive distillation, LoRA / compressed pools) and adapted heads are refused with the
method's name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch import nn
from torch.optim import Optimizer

from adamerge.errors import ConfigError
from adamerge.methods.learned.merged import MergedModel
from adamerge.training.sharded_merge import (STRATEGY_NAME, STRATEGY_TARGET, MergeBlock, MergeBlocks,
                                             ShardedMergedModel, local_shard_numel, merge_blocks, replace_tensors)

__all__ = ["MergeBlock", "MergeBlocks", "ShardedMergeStrategy", "ShardedMergedModel", "average_gradients",
           "local_shard_numel", "merge_per_module_under", "refuse_other_sharding", "shard_merged_model"]

# Why heads=adapt is refused, and a learned method other than AdaMerging (said before loading and when learning starts).
HEADS_REFUSAL = (f"heads=adapt cannot run with {STRATEGY_NAME} (the adapted heads' gradients are not averaged over "
                 "the ranks); use heads=frozen or trainer=ddp")


def method_refusal(method: str) -> str:
    return (f"method {method!r} cannot run with {STRATEGY_NAME}: only AdaMerging (task-wise and layer-wise, with or "
            "without a base: ++, _on_iso_cts, ...) is sharded; use trainer=ddp or trainer=gpu for it")


def shard_merged_model(merged: MergedModel, strategy: ShardedMergeStrategy, method: str) -> None:
    """Re-lay ``merged`` out as a :class:`ShardedMergedModel` and shard its blocks with ``fully_shard`` over the
    strategy's ranks; idempotent (Lightning calls ``configure_model`` for every fit and validate)."""
    if isinstance(merged, ShardedMergedModel):
        return
    if not vars(type(merged)).get("shardable", False):  # declared by the class itself, not inherited
        raise ConfigError(f"method {method!r} keeps its task vectors as {type(merged).__name__} (LoRA adapters or a "
                          f"compressed pool), which {STRATEGY_NAME} cannot shard: use full checkpoints "
                          "(modelpool.compression=null) or trainer=ddp / trainer=gpu")
    if getattr(merged, "_residency", "disk") != "disk":
        raise ConfigError(f"modelpool.streaming={merged._residency} keeps every task vector on the host of each rank, "
                          f"which {STRATEGY_NAME} would then shard: use modelpool.streaming=disk (each layer read from "
                          "the checkpoints and sharded before the next) or modelpool.streaming=false")
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = strategy.device_mesh["data_parallel"]
    if strategy.cpu_offload and mesh.device_type == "cpu":
        raise ConfigError("trainer.strategy.cpu_offload=true is invalid on the CPU: it moves the shards off an "
                          "accelerator, and here they already are in host memory; set it false")
    offload = CPUOffloadPolicy() if strategy.cpu_offload else OffloadPolicy()

    # Each layer's block sharded as soon as it is made (a streamed pool's are read from the checkpoints then).
    blocks = merge_blocks(merged, lambda block: fully_shard(
        block, mesh=mesh, reshard_after_forward=strategy.reshard_after_forward, offload_policy=offload))
    # The modules owning merged tensors, found by the tensors' identity while they are still the backbone's (tied
    # copies get placeholders of their own below): the per-module merge replaces these modules' forwards.
    merged.per_module_owners()
    placeholders = {name: torch.empty(0, dtype=tensor.dtype, device=tensor.device)
                    for name, tensor in MergedModel.pretrained_tensors(merged).items()}
    replace_tensors(merged.module, merged.names, placeholders)  # the backbone's full copies are dropped
    for index in range(len(merged.names)):
        merged._buffers.pop(f"_task_vector_{index}", None)  # (a streamed pool has none)
    # Only the storage of θ0 and τ changes: the coefficients, their bounds and every setting stay the same objects
    # (the optimiser is built after configure_model, on these coefficients), so the class is swapped in place.
    merged.__class__ = ShardedMergedModel
    merged.blocks = blocks
    merged._places = {index: (number, position) for number, block in enumerate(blocks.blocks)
                      for position, index in enumerate(block.indices)}
    merged._gathered = {}
    merged.merge_per_module = strategy.merge_per_module
    fully_shard(blocks, mesh=mesh, reshard_after_forward=False, offload_policy=offload)


def merge_per_module_under(strategy: Any, merged: MergedModel) -> None:
    """Under a :class:`ShardedMergeStrategy` with ``merge_per_module``, let ``merged`` merge module by module from now
    on, before it is sharded (Lightning's ``configure_model``, at the first fit or validate): the settings that need
    a per-module merge (``activation_checkpointing``, the task batching it picks) see the merge the steps will run.
    Until it is sharded the per-module merge reads the dense task vectors: the same values."""
    if isinstance(strategy, ShardedMergeStrategy) and strategy.merge_per_module and type(merged) is MergedModel:
        merged.merge_per_module = True


def refuse_other_sharding(strategy: Any) -> None:
    """Lightning's own FSDP / FSDP2 / DeepSpeed strategies would wrap the whole learning module (its coefficients and
    its manual optimisation step included): refuse them, naming the setting that shards adamerge's merge."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy)):
        raise ConfigError(f"trainer.strategy={type(strategy).__name__} is not supported: adamerge shards its merge "
                          f"itself with {STRATEGY_NAME}; use trainer=fsdp, or trainer=ddp to replicate it")


def average_gradients(parameters: Iterable[nn.Parameter], strategy: Any) -> None:
    """Average the replicated coefficients' gradients over the ranks (what DDP does for the unsharded merge), so every
    rank takes the same optimiser step: λ stays identical everywhere."""
    for parameter in parameters:
        if parameter.grad is not None:
            parameter.grad = strategy.reduce(parameter.grad, reduce_op="mean")


class ShardedMergeStrategy(ModelParallelStrategy):
    """Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy` (FSDP2) sharding the merge over every
    rank (one data-parallel mesh dimension, no tensor parallelism), with the settings of ``conf/trainer/fsdp.yaml``.

    ``merge_per_module``: each module gathers its block, merges its own weights (a band at a time) and frees the block
    when it runs, and again in its backward, so no rank ever holds the merged model or its gradient whole (module
    docstring); False forms every merged tensor for the step. ``reshard_after_forward`` (the whole-merge form's
    setting): free each block's gathered tensors after its forward and gather them again for its backward (FSDP's
    FULL_SHARD; False keeps them until the backward, SHARD_GRAD_OP: less communication, more memory).
    ``cpu_offload``: keep the shards in host memory and copy each block to the device when used. Checkpoints are
    single files written by rank 0 with only what learns (the coefficients are replicated), read by every rank.
    """

    def __init__(self, reshard_after_forward: bool = True, cpu_offload: bool = False, merge_per_module: bool = True,
                 process_group_backend: str | None = None, timeout: timedelta | None = None) -> None:
        for name, value in (("reshard_after_forward", reshard_after_forward), ("cpu_offload", cpu_offload),
                            ("merge_per_module", merge_per_module)):
            if not isinstance(value, bool):
                raise ConfigError(f"trainer.strategy.{name}={value!r} is invalid: it must be true or false")
        kwargs = {} if timeout is None else {"timeout": timeout}
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False,
                         process_group_backend=process_group_backend, **kwargs)
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload
        self.merge_per_module = merge_per_module

    # Checkpoints: what learns is replicated and the sharded tensors save nothing (MergeBlock), so rank 0's own state is
    # the whole state -- saved and restored the plain way (Strategy's, as under DDP), without ModelParallelStrategy's
    # gathering of full state dicts or its sharded checkpoint folders.
    def lightning_module_state_dict(self) -> dict[str, Any]:
        return Strategy.lightning_module_state_dict(self)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        return Strategy.optimizer_state(self, optimizer)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        Strategy.save_checkpoint(self, checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        return Strategy.load_checkpoint(self, self.broadcast(checkpoint_path), weights_only=weights_only)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        Strategy.load_model_state_dict(self, checkpoint, strict=strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        Strategy.load_optimizer_state_dict(self, checkpoint)

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    def setup_environment(self) -> None:
        # Every rank holds one shard: the data-parallel dimension spans them all (ModelParallelStrategy's "auto"
        # would make it the number of nodes and put the devices of a node in a tensor-parallel dimension).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
