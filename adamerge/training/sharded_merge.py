"""The merge laid out so that FSDP2 can shard it (``trainer=fsdp``; the strategy and its rules: :mod:`.sharding`).

Each merged layer's θ0 and K task vectors become the frozen, flattened parameters of one :class:`MergeBlock`, the unit
FSDP2's ``fully_shard`` splits over the ranks; :class:`ShardedMergedModel` is the merged model reading them:

* merged module by module (``merge_per_module``, the default): each module that owns merged tensors gathers its block
  through :meth:`ShardedMergedModel.resident` (FSDP2's ``unshard``) when it runs, merges its weights a band at a time
  (:mod:`adamerge.methods.learned.merged_per_module`) and frees the block (``reshard``), and does the same in its
  backward; no rank ever holds the merged model or its gradient whole;
* merged whole (``merge_per_module=false``): :class:`MergeBlocks` (the FSDP2 root) forms every merged tensor for the
  step, FSDP2's own hooks gathering each block around its forward and its backward.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from adamerge.errors import ConfigError
from adamerge.methods.learned.merged import MergedModel, weighted_task_sum

__all__ = ["MergeBlock", "MergeBlocks", "ShardedMergedModel", "local_shard_numel", "merge_blocks", "replace_tensors",
           "STRATEGY_NAME", "STRATEGY_TARGET"]

STRATEGY_TARGET = "adamerge.training.sharding.ShardedMergeStrategy"  # conf/trainer/fsdp.yaml's strategy._target_
STRATEGY_NAME = f"trainer=fsdp ({STRATEGY_TARGET})"


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
        self.num_tasks = task_vectors[0].shape[0]
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


def replace_tensors(module: nn.Module, names: Iterable[str], new: Mapping[str, Tensor]) -> None:
    """Put ``new[name]`` wherever the tensor now named ``name`` sits in ``module`` (tied copies included)."""
    slots = _tensor_slots(module)
    current = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))
    for name in names:
        for owner, leaf, is_parameter in slots[id(current[name])]:
            if is_parameter:
                owner._parameters[leaf] = nn.Parameter(new[name], requires_grad=False)
            else:
                owner._buffers[leaf] = new[name]


class _GatheredTaskSum(torch.autograd.Function):
    """``Σ_k w_k τ_k`` of one sharded tensor: its layer gathered to form it and gathered again in the backward for
    ``∂L/∂w_k = ⟨τ_k, ∂L/∂Σ⟩``; autograd keeps the weights and the index, never the gathered τ (freed in between)."""

    @staticmethod
    def forward(ctx: Any, weights: Tensor, merged: ShardedMergedModel, index: int) -> Tensor:
        ctx.save_for_backward(weights)
        ctx.merged, ctx.index = merged, index
        with merged.resident(index):
            return torch.tensordot(weights, merged.stacked_task_vectors(index).to(weights.dtype), dims=1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (weights,) = ctx.saved_tensors
        with ctx.merged.resident(ctx.index):
            stacked = ctx.merged.stacked_task_vectors(ctx.index)
            return (stacked.reshape(weights.shape[0], -1).to(grad.dtype) @ grad.reshape(-1)).to(weights.dtype), None, None


class ShardedMergedModel(MergedModel):
    """A :class:`~adamerge.methods.learned.merged.MergedModel` whose θ0 and task vectors live in FSDP2-sharded
    :class:`MergeBlock` s (``self.blocks``); made by :func:`shard_merged_model`, never built directly.

    With ``merge_per_module`` its modules read θ0 and τ through :meth:`resident`, which gathers the tensor's block
    (FSDP2's ``unshard``) on entering and frees it (``reshard``) on leaving -- nested entries gather once."""

    blocks: MergeBlocks
    _places: dict[int, tuple[int, int]]  # merged tensor index -> (its block, its position in the block)
    _gathered: dict[int, int]  # block -> how many resident() entries hold it gathered now

    def _place(self, index: int) -> tuple[MergeBlock, int]:
        number, position = self._places[index]
        return self.blocks.blocks[number], position

    @contextlib.contextmanager
    def resident(self, index: int) -> Iterator[None]:
        number = self._places[index][0]
        block = self.blocks.blocks[number]
        if self._gathered.get(number, 0) == 0:
            block.unshard()  # FSDP2: all-gather the block's θ0 and K task vectors
        self._gathered[number] = self._gathered.get(number, 0) + 1
        try:
            yield
        finally:
            self._gathered[number] -= 1
            if self._gathered[number] == 0:
                block.reshard()  # FSDP2: free the gathered copies, keep this rank's shard

    def _gathered_parameter(self, parameter: Tensor, index: int) -> Tensor:
        if isinstance(parameter, DTensor):  # FSDP2 registers the full tensor only while the block is gathered
            raise RuntimeError(f"merged tensor {self.names[index]!r} of a sharded merge read outside resident(): "
                               "its layer is not gathered")
        return parameter

    def pretrained_tensor(self, index: int) -> Tensor:
        block, position = self._place(index)
        return self._gathered_parameter(block.pretrained[position], index).view(block.shapes[position])

    def stacked_task_vectors(self, index: int) -> Tensor:
        """The K task vectors of merged tensor ``index``, ``[K, *shape]`` (inside :meth:`resident`)."""
        block, position = self._place(index)
        stacked = self._gathered_parameter(block.task_vectors[position], index)
        return stacked.view(block.num_tasks, *block.shapes[position])

    def task_slice(self, index: int, task: int, rows: tuple[int, int] | None = None) -> Tensor:
        part = self.stacked_task_vectors(index)[task]
        return part if rows is None else part[rows[0]:rows[1]]

    def task_delta(self, index: int, row: Tensor, shape: torch.Size) -> Tensor:
        return _GatheredTaskSum.apply(row, self, index)

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
        replace_tensors(merged, self.names, {name: weights[name].detach().clone() for name in self.names})
        return merged


def merge_blocks(merged: MergedModel, shard: Callable[[MergeBlock], None]) -> MergeBlocks:
    """One block per layer (the module owning the tensors: a weight and its bias are gathered together), each passed
    to ``shard`` as soon as it is made: its full task vectors -- read from the checkpoints, for a streamed pool -- are
    gone before the next layer's are formed, so no more than one layer's K task vectors exist whole."""
    layers: dict[str, list[int]] = {}
    for index, name in enumerate(merged.names):
        layers.setdefault(name.rpartition(".")[0], []).append(index)
    pretrained = MergedModel.pretrained_tensors(merged)
    blocks = []
    for indices in layers.values():
        block = MergeBlock(indices, [pretrained[merged.names[i]].shape for i in indices],
                           [pretrained[merged.names[i]] for i in indices], [merged.task_vector(i) for i in indices])
        shard(block)
        blocks.append(block)
    return MergeBlocks(blocks, len(merged.names))


def local_shard_numel(merged: ShardedMergedModel) -> dict[str, int]:
    """Elements of θ0 and of the task vectors this rank holds (its shards), and their totals over all ranks."""
    counts = {"pretrained": 0, "task_vectors": 0, "pretrained_total": 0, "task_vectors_total": 0}
    for block in merged.blocks.blocks:
        for kind, parameters in (("pretrained", block.pretrained), ("task_vectors", block.task_vectors)):
            for parameter in parameters:
                counts[kind] += parameter.to_local().numel()
                counts[f"{kind}_total"] += parameter.numel()
    return counts
