"""The merged model sharded across devices by FSDP2 (``trainer=fsdp``): for a working set one device cannot hold.

``θ_l = θ0_l + Σ_k λ_{g(l),k} τ_{k,l}`` needs θ0 and the K task vectors of every merged tensor; on one device they are
K + 1 copies of the model. Under :class:`ShardedMergeStrategy` (Lightning's
:class:`~lightning.pytorch.strategies.ModelParallelStrategy`, whose engine is torch's FSDP2 ``fully_shard``) the
learning module's ``configure_model`` hook re-lays its :class:`~adamerge.methods.learned.merged.MergedModel` out so
FSDP2 can shard it:

* each layer's θ0 and K task vectors become frozen parameters of one :class:`MergeBlock` (flattened, so FSDP2 splits
  them evenly over the ranks), whose ``forward`` forms that layer's merged tensors -- the one place they are used.
  ``fully_shard`` is applied to every block and to the :class:`MergeBlocks` around them (the FSDP2 root): each rank
  keeps ``1/N`` of θ0 and the task vectors; a block is all-gathered just before its forward and again before its
  backward (FSDP2's pre-backward hooks), and freed right after each (``reshard_after_forward``);
* the backbone's own copies of the merged tensors are replaced by empty placeholders (the forward always runs on the
  merged weights, through ``functional_call``);
* the coefficients stay ordinary replicated parameters outside FSDP2: every rank learns the same λ, and their gradient
  is averaged over the ranks (:func:`average_gradients`, the strategy's all-reduce) before each step, as DDP does.

What is *not* sharded: the merged weights θ(λ) themselves (formed whole on every rank for the forward passes, one
model's size), the backbone's tensors that are not merged, the heads, activations, and the pool the runner loads on
the host of every rank. Methods that keep the task vectors in another form (Concrete masks, AdaRank, progressive
distillation, LoRA / streamed / compressed pools) and adapted heads are refused with the method's name.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch import Tensor, nn
from torch.optim import Optimizer

from adamerge.errors import ConfigError
from adamerge.methods.learned.merged import MergedModel, weighted_task_sum

__all__ = ["MergeBlock", "MergeBlocks", "ShardedMergeStrategy", "ShardedMergedModel", "average_gradients",
           "local_shard_numel", "refuse_other_sharding", "shard_merged_model"]

STRATEGY_TARGET = "adamerge.training.sharding.ShardedMergeStrategy"  # conf/trainer/fsdp.yaml's strategy._target_
STRATEGY_NAME = f"trainer=fsdp ({STRATEGY_TARGET})"
# Why heads=adapt is refused, and a learned method other than AdaMerging (said before loading and when learning starts).
HEADS_REFUSAL = (f"heads=adapt cannot run with {STRATEGY_NAME} (the adapted heads' gradients are not averaged over "
                 "the ranks); use heads=frozen or trainer=ddp")


def method_refusal(method: str) -> str:
    return (f"method {method!r} cannot run with {STRATEGY_NAME}: only AdaMerging (task-wise and layer-wise, with or "
            "without a base: ++, _on_iso_cts, ...) is sharded; use trainer=ddp or trainer=gpu for it")


class MergeBlock(nn.Module):
    """One layer's θ0 and K task vectors as frozen, flattened parameters: the unit FSDP2 shards and gathers.

    ``forward(rows)`` (``rows``: one coefficient row ``[K]`` per tensor of the block) returns the layer's merged
    tensors ``θ0 + Σ_k row_k τ_k`` in their own shapes, computed in at least float32 like the unsharded merge.
    """

    def __init__(self, indices: list[int], shapes: list[torch.Size], pretrained: list[Tensor],
                 task_vectors: list[Tensor]) -> None:
        super().__init__()
        self.indices = indices  # positions of the block's tensors in MergedModel.names
        self.shapes = shapes
        # Parameters of the block itself (no ParameterList child), so its state-dict hooks below cover them.
        for position, (base, stacked) in enumerate(zip(pretrained, task_vectors)):
            self.register_parameter(f"pretrained_{position}",
                                    nn.Parameter(base.detach().reshape(-1), requires_grad=False))
            self.register_parameter(f"task_vectors_{position}",
                                    nn.Parameter(stacked.detach().reshape(-1), requires_grad=False))

    @property
    def pretrained(self) -> list[Tensor]:
        return [getattr(self, f"pretrained_{position}") for position in range(len(self.indices))]

    @property
    def task_vectors(self) -> list[Tensor]:
        return [getattr(self, f"task_vectors_{position}") for position in range(len(self.indices))]

    def forward(self, rows: Tensor) -> list[Tensor]:
        compute = torch.promote_types(rows.dtype, torch.float32)
        merged = []
        for position, (base, stacked) in enumerate(zip(self.pretrained, self.task_vectors)):
            shape = self.shapes[position]
            delta = weighted_task_sum(rows[position].to(compute), stacked.view(rows.shape[1], *shape))
            # A new tensor, not a view of one: FSDP2's pre-backward hook sits on it and an in-place op on a view
            # would bypass the hook.
            merged.append((base.view(shape).to(compute) + delta).to(base.dtype))
        return merged

    # θ0 and the task vectors are constants rebuilt from the pool, never checkpointed (the unsharded merge keeps its
    # task vectors in non-persistent buffers); saving nothing here also spares every checkpoint an all-gather.
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        return None

    def _load_from_state_dict(self, state_dict: Mapping, prefix: str, *args: Any, **kwargs: Any) -> None:
        return None


class MergeBlocks(nn.Module):
    """Every :class:`MergeBlock`; its forward (the FSDP2 root's) forms all merged tensors from the coefficient rows."""

    def __init__(self, blocks: Iterable[MergeBlock], count: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.count = count  # merged tensors

    def forward(self, rows: Tensor) -> list[Tensor]:
        merged: list[Tensor | None] = [None] * self.count
        for block in self.blocks:
            for index, tensor in zip(block.indices, block(rows[block.indices])):
                merged[index] = tensor
        return merged  # type: ignore[return-value]


def _tensor_slots(module: nn.Module) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    """Where each parameter or buffer object sits in ``module`` (tied tensors sit in several places):
    ``id -> [(submodule, attribute, is_parameter)]``."""
    slots: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    for is_parameter, named in ((True, module.named_parameters(remove_duplicate=False)),
                                (False, module.named_buffers(remove_duplicate=False))):
        for name, tensor in named:
            owner, _, leaf = name.rpartition(".")
            slots.setdefault(id(tensor), []).append((module.get_submodule(owner), leaf, is_parameter))
    return slots


def _replace_tensors(module: nn.Module, names: Iterable[str], new: Mapping[str, Tensor]) -> None:
    """Put ``new[name]`` wherever the tensor now named ``name`` sits in ``module`` (tied copies included)."""
    slots = _tensor_slots(module)
    current = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))
    for name in names:
        for owner, leaf, is_parameter in slots[id(current[name])]:
            if is_parameter:
                owner._parameters[leaf] = nn.Parameter(new[name], requires_grad=False)
            else:
                owner._buffers[leaf] = new[name]


class ShardedMergedModel(MergedModel):
    """A :class:`~adamerge.methods.learned.merged.MergedModel` whose θ0 and task vectors live in FSDP2-sharded
    :class:`MergeBlock` s (``self.blocks``); made by :func:`shard_merged_model`, never built directly."""

    blocks: MergeBlocks

    def merged_weights(self, mask: Mapping[str, Tensor] | None = None,
                       coefficients: Tensor | None = None) -> dict[str, Tensor]:
        if mask is not None:
            raise ConfigError(f"a merge mask cannot be applied to a sharded merge ({STRATEGY_NAME})")
        return dict(zip(self.names, self.blocks(self.coefficient_rows(coefficients))))

    def task_vector(self, index: int) -> Tensor:
        raise ConfigError(f"the task vectors of a sharded merge ({STRATEGY_NAME}) are split over the ranks; only "
                          "its merged weights can be formed")

    def pretrained_tensors(self) -> dict[str, Tensor]:
        raise ConfigError(f"θ0 of a sharded merge ({STRATEGY_NAME}) is split over the ranks; only its merged weights "
                          "can be formed")

    @torch.no_grad()
    def merge_and_unload_with(self, weights: Mapping[str, Tensor]) -> nn.Module:
        merged = copy.deepcopy(self.module)  # its merged tensors are placeholders: nothing large is copied
        _replace_tensors(merged, self.names, {name: weights[name].detach().clone() for name in self.names})
        return merged


def _merge_blocks(merged: MergedModel) -> MergeBlocks:
    """One block per layer (the module owning the tensors: a weight and its bias are gathered together)."""
    layers: dict[str, list[int]] = {}
    for index, name in enumerate(merged.names):
        layers.setdefault(name.rpartition(".")[0], []).append(index)
    pretrained = MergedModel.pretrained_tensors(merged)
    blocks = [MergeBlock(indices, [pretrained[merged.names[i]].shape for i in indices],
                         [pretrained[merged.names[i]] for i in indices],
                         [MergedModel.task_vector(merged, i) for i in indices]) for indices in layers.values()]
    return MergeBlocks(blocks, len(merged.names))


def shard_merged_model(merged: MergedModel, strategy: ShardedMergeStrategy, method: str) -> None:
    """Re-lay ``merged`` out as a :class:`ShardedMergedModel` and shard its blocks with ``fully_shard`` over the
    strategy's ranks; idempotent (Lightning calls ``configure_model`` for every fit and validate)."""
    if isinstance(merged, ShardedMergedModel):
        return
    if type(merged) is not MergedModel:
        raise ConfigError(f"method {method!r} keeps its task vectors as {type(merged).__name__} (LoRA adapters, a "
                          f"streamed or a compressed pool), which {STRATEGY_NAME} cannot shard: use the pool's dense "
                          "task vectors (modelpool.streaming=false, modelpool.compression=null, full checkpoints) or "
                          "trainer=ddp / trainer=gpu")
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = strategy.device_mesh["data_parallel"]
    if strategy.cpu_offload and mesh.device_type == "cpu":
        raise ConfigError("trainer.strategy.cpu_offload=true is invalid on the CPU: it moves the shards off an "
                          "accelerator, and here they already are in host memory; set it false")

    blocks = _merge_blocks(merged)
    placeholders = {name: torch.empty(0, dtype=tensor.dtype, device=tensor.device)
                    for name, tensor in MergedModel.pretrained_tensors(merged).items()}
    _replace_tensors(merged.module, merged.names, placeholders)  # the backbone's full copies are dropped
    for index in range(len(merged.names)):
        del merged._buffers[f"_task_vector_{index}"]
    # Only the storage of θ0 and τ changes: the coefficients, their bounds and every setting stay the same objects
    # (the optimiser is built after configure_model, on these coefficients), so the class is swapped in place.
    merged.__class__ = ShardedMergedModel
    merged.blocks = blocks
    offload = CPUOffloadPolicy() if strategy.cpu_offload else OffloadPolicy()
    for block in blocks.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=strategy.reshard_after_forward, offload_policy=offload)
    fully_shard(blocks, mesh=mesh, reshard_after_forward=False, offload_policy=offload)


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


def local_shard_numel(merged: ShardedMergedModel) -> dict[str, int]:
    """Elements of θ0 and of the task vectors this rank holds (its shards), and their totals over all ranks."""
    counts = {"pretrained": 0, "task_vectors": 0, "pretrained_total": 0, "task_vectors_total": 0}
    for block in merged.blocks.blocks:
        for kind, parameters in (("pretrained", block.pretrained), ("task_vectors", block.task_vectors)):
            for parameter in parameters:
                counts[kind] += parameter.to_local().numel()
                counts[f"{kind}_total"] += parameter.numel()
    return counts


class ShardedMergeStrategy(ModelParallelStrategy):
    """Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy` (FSDP2) sharding the merge over every
    rank (one data-parallel mesh dimension, no tensor parallelism), with the settings of ``conf/trainer/fsdp.yaml``.

    ``reshard_after_forward``: free each block's gathered tensors after its forward and gather them again for its
    backward (FSDP's FULL_SHARD; False keeps them until the backward, SHARD_GRAD_OP: less communication, more
    memory). ``cpu_offload``: keep the shards in host memory and copy each block to the device when used. Checkpoints
    are single files written by rank 0 with only what learns (the coefficients are replicated), read by every rank.
    """

    def __init__(self, reshard_after_forward: bool = True, cpu_offload: bool = False,
                 process_group_backend: str | None = None, timeout: timedelta | None = None) -> None:
        for name, value in (("reshard_after_forward", reshard_after_forward), ("cpu_offload", cpu_offload)):
            if not isinstance(value, bool):
                raise ConfigError(f"trainer.strategy.{name}={value!r} is invalid: it must be true or false")
        kwargs = {} if timeout is None else {"timeout": timeout}
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False,
                         process_group_backend=process_group_backend, **kwargs)
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload

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
