"""Differentiable merged models: a frozen module whose merged weights depend on learnable coefficients.

``θ_l = θ0_l + m_l ⊙ Σ_k λ_{g(l),k} τ_{k,l}`` where ``g(l)`` maps tensor ``l`` to its coefficient row
(task-wise: a single row; layer-wise: one row per tensor or per group of tensors) and ``m_l`` is an
optional shared mask (Concrete subspace). The module's own parameters hold θ0 and never train.
:class:`LoRAMergedModel` does the same over LoRA adapters without forming a dense task vector, and
:func:`run_backbone` calls a backbone, merged or not, the one way evaluation, training and a loaded export share.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from adamerge.errors import ConfigError
from adamerge.methods.learned.merged_per_module import merging_per_module, owner_modules
from adamerge.pool.task_vectors import TaskVectors

Granularity = Literal["task_wise", "layer_wise"]


class _WeightedTaskSum(torch.autograd.Function):
    """``Σ_k w_k τ_k`` computed in float32 while autograd keeps only the stored (maybe bf16) τ.

    A plain ``tensordot(w, τ.float())`` would save the float32 copy of every stacked tensor for
    backward, doubling the task-vector memory for bf16 storage.
    """

    @staticmethod
    def forward(ctx: Any, weights: Tensor, stacked: Tensor) -> Tensor:
        ctx.save_for_backward(weights, stacked)
        return torch.tensordot(weights, stacked.to(weights.dtype), dims=1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        weights, stacked = ctx.saved_tensors
        flat = stacked.reshape(weights.shape[0], -1).to(grad.dtype)
        return flat @ grad.reshape(-1), None


def weighted_task_sum(weights: Tensor, stacked: Tensor) -> Tensor:
    return _WeightedTaskSum.apply(weights, stacked)


class MergedModel(nn.Module):
    """A frozen ``module`` merged from ``task_vectors`` with learnable coefficients.

    The merged weights are computed once per call of :meth:`merged_weights` (once per optimisation
    step in the trainer) with one batched operation per tensor; :meth:`forward` accepts precomputed
    ``weights`` so several forwards can share one merge.
    """

    def __init__(
        self,
        module: nn.Module,
        task_vectors: TaskVectors,
        *,
        granularity: Granularity = "layer_wise",
        init_value: float | Sequence[float] = 0.3,
        clamp: tuple[float, float] | None = (0.0, 1.0),
        layer_groups: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if granularity not in ("task_wise", "layer_wise"):
            raise ValueError(f"granularity must be 'task_wise' or 'layer_wise', got {granularity!r}")
        self.module = module.requires_grad_(False)
        self.task_names = list(task_vectors.task_names)
        self.unscored_tasks = tuple(task_vectors.unscored_tasks)
        # Lower bounds of single coefficient columns (an alignment vector's), applied after the clamp.
        self.coefficient_floors: dict[int, float] = {}
        # (low, high) of single columns that replace the clamp there (a residual base merge's scale).
        self.column_bounds: dict[int, tuple[float, float]] = {}
        self.names = task_vectors.names
        self.granularity = granularity
        self.clamp = tuple(clamp) if clamp is not None else None
        self._load_pretrained(task_vectors)
        self.register_task_vectors(task_vectors)

        if granularity == "task_wise":
            groups = [0] * len(self.names)
        elif layer_groups is None:
            groups = list(range(len(self.names)))
        else:
            groups = list(layer_groups)
            if len(groups) != len(self.names):
                raise ValueError(f"layer_groups has {len(groups)} entries for {len(self.names)} merged tensors")
        self.layer_groups = groups
        # The row of each tensor, kept on the coefficients' device so the per-step gather copies nothing.
        self.register_buffer("_layer_index", torch.as_tensor(groups, dtype=torch.long), persistent=False)
        rows = max(groups) + 1 if granularity == "layer_wise" else None
        shape = (task_vectors.num_tasks,) if rows is None else (rows, task_vectors.num_tasks)
        initial = torch.as_tensor(init_value, dtype=torch.float32)
        if initial.ndim == 1 and initial.shape[0] != task_vectors.num_tasks:
            raise ValueError(f"init_value has {initial.shape[0]} entries for {task_vectors.num_tasks} tasks")
        self.coefficients = nn.Parameter(initial.expand(shape).clone())

    def _load_pretrained(self, task_vectors: TaskVectors) -> None:
        own = dict(self.module.named_parameters()) | dict(self.module.named_buffers())
        for name in self.names:
            if name not in own:
                raise KeyError(f"merged tensor {name!r} is not a parameter or buffer of {type(self.module).__name__}")
            if own[name].shape != task_vectors.pretrained[name].shape:
                raise ValueError(
                    f"parameter {name!r}: module has shape {tuple(own[name].shape)} but the task vectors "
                    f"have {tuple(task_vectors.pretrained[name].shape)}"
                )
        with torch.no_grad():
            for name, tensor in own.items():
                if name not in task_vectors.pretrained:
                    continue
                source = task_vectors.pretrained[name]
                if tensor.data_ptr() == source.data_ptr() or torch.equal(tensor, source.to(tensor.dtype)):
                    continue  # already θ0 -- often the pool's own storage (ModelPool.shared_backbone): keep sharing it
                # Rebind rather than copy in place: the module's tensor may share storage with the pool's backbone,
                # which an in-place copy would silently change for every later method of the run.
                tensor.data = source.detach().to(device=tensor.device, dtype=tensor.dtype).clone()

    def register_task_vectors(self, task_vectors: TaskVectors) -> None:
        """Keep the task vectors as buffers (a subclass may keep them in another form, with its own task_delta)."""
        if getattr(task_vectors, "streamed", False):  # adamerge.pool.streamed / compressed never hold them whole
            raise ConfigError(f"{type(self).__name__} keeps every task vector resident, which a streamed or compressed "
                              "pool never does: this method takes modelpool.streaming=false and modelpool.compression="
                              "null (adamerging_task_wise / adamerging_layer_wise and progressive_distillation stream)")
        for index, name in enumerate(self.names):
            # Buffers follow the module across devices; they are constants, never saved twice.
            self.register_buffer(f"_task_vector_{index}", task_vectors.vectors[name], persistent=False)

    def task_vector(self, index: int) -> Tensor:
        return getattr(self, f"_task_vector_{index}")

    def task_slice(self, index: int, task: int, rows: tuple[int, int] | None = None) -> Tensor:
        """Task ``task``'s vector of merged tensor ``index`` (a subclass that streams fetches that slice alone);
        ``rows`` (start, stop): that band of its first dimension only."""
        part = self.task_vector(index)[task]
        return part if rows is None else part[rows[0]:rows[1]]

    def pretrained_tensors(self) -> dict[str, Tensor]:
        own = dict(self.module.named_parameters()) | dict(self.module.named_buffers())
        return {name: own[name] for name in self.names}

    def pretrained_tensor(self, index: int) -> Tensor:
        """θ0 of merged tensor ``index`` (read inside :meth:`resident`): the module's own tensor, looked up by name."""
        owner, _, leaf = self.names[index].rpartition(".")
        return getattr(self.module.get_submodule(owner), leaf)

    @contextlib.contextmanager
    def resident(self, index: int) -> Iterator[None]:
        """While inside, merged tensor ``index``'s θ0 and task slices can be read (:meth:`pretrained_tensor`,
        :meth:`task_slice`). Here they always can; a sharded merge (adamerge.training.sharding) gathers the tensor's
        layer on entering and frees it on leaving, so the per-module merge reads through this."""
        yield

    def coefficient_rows(self, coefficients: Tensor | None = None) -> Tensor:
        """Coefficients (the module's own, or ``coefficients`` of the same shape) as ``[num_tensors, K]``."""
        if coefficients is None:
            coefficients = self.coefficients
        elif coefficients.shape != self.coefficients.shape:
            raise ValueError(f"coefficients of shape {tuple(coefficients.shape)}, expected {tuple(self.coefficients.shape)}")
        if self.granularity == "task_wise":
            return coefficients.unsqueeze(0).expand(len(self.names), -1)
        return coefficients[self._layer_index]

    def merged_weights(
        self, mask: Mapping[str, Tensor] | None = None, coefficients: Tensor | None = None
    ) -> dict[str, Tensor]:
        """θ0 + (mask ⊙) Σ_k λ_k τ_k for every merged tensor; differentiable in the coefficients.

        ``coefficients`` overrides the module's own (Concrete AM's inner step uses fresh ones).
        """
        return self.merge_deltas(self.coefficient_rows(coefficients), mask, self.task_delta)

    def task_delta(self, index: int, row: Tensor, shape: torch.Size) -> Tensor:
        """``Σ_k row_k τ_k`` of merged tensor ``index`` (a subclass may keep its task vectors in another form)."""
        return weighted_task_sum(row, self.task_vector(index))

    def merge_deltas(
        self, rows: Tensor, mask: Mapping[str, Tensor] | None, task_delta: Callable[[int, Tensor, torch.Size], Tensor]
    ) -> dict[str, Tensor]:
        """θ0 + (mask ⊙) ``task_delta(index, row, shape)`` for every merged tensor, computed in at least float32."""
        compute = torch.promote_types(rows.dtype, torch.float32)
        weights = {}
        for index, (name, base) in enumerate(self.pretrained_tensors().items()):
            delta = task_delta(index, rows[index].to(compute), base.shape)
            if mask is not None and name in mask:
                delta = delta * mask[name]
            weights[name] = (base.to(compute) + delta).to(base.dtype)
        return weights

    # trainer=fsdp can re-lay this class out (adamerge.training.sharded_merge): task_vector(index) gives the K dense
    # slices of one tensor. Read from the class's own namespace, so a subclass that keeps its task vectors in another
    # form (factors, ranks, element-wise blocks) is not shardable unless it says so itself.
    shardable: bool = True

    # Form each module's merged tensors when it runs instead of the whole merge up front (merged_per_module.py):
    # what a streamed pool turns on, so the merged model and its gradient are never whole in memory.
    merge_per_module: bool = False
    # Blocks a per-module merge recomputes in the backward (activation_checkpointing; a tuple: not submodules twice).
    checkpoint_blocks: tuple[nn.Module, ...] | None = None

    def per_module_owners(self) -> list[tuple[nn.Module, dict[str, int]]]:
        """The modules owning merged tensors (computed once: the module tree does not change)."""
        if getattr(self, "_owners", None) is None:
            self._owners = owner_modules(self)
        return self._owners

    def row_coefficients(self, index: int) -> bool:
        """Whether merged tensor ``index`` has one coefficient per task (a row), as the banded per-module merge needs."""
        return True

    def factored(self, index: int) -> bool:
        """Whether merged tensor ``index``'s delta is ``B · diag(λ per rank) · A`` of a linear layer's weight, which
        the per-module merge applies through ``linear_factors`` without forming it (LoRA adapters)."""
        return False

    def forward(self, *args: Any, weights: Mapping[str, Tensor] | None = None, **kwargs: Any) -> Any:
        if weights is None and self.merge_per_module:
            with merging_per_module(self):
                return self.module(*args, **kwargs)
        if weights is None:
            weights = self.merged_weights()
        call = self._compiled_call if self._compiled_call is not None else functional_call
        return call(self.module, dict(weights), args, kwargs)

    _compiled_call: Any = None

    def compile_forward(self, backend: str = "inductor") -> None:
        """Run the forward on the merged weights through ``torch.compile`` (the merge itself stays eager).

        The weights are new tensors every step with the same shapes and dtypes, so one compiled graph serves
        every step.
        """
        self._compiled_call = torch.compile(functional_call, backend=backend, dynamic=False)

    @torch.no_grad()
    def clamp_coefficients_(self) -> None:
        unclamped = {column: self.coefficients[..., column].clone() for column in self.column_bounds}
        if self.clamp is not None:
            self.coefficients.clamp_(*self.clamp)
        for column, (low, high) in self.column_bounds.items():  # from the value before the clamp, not after it
            self.coefficients[..., column] = unclamped[column].clamp(low, high)
        for column, floor in self.coefficient_floors.items():
            self.coefficients[..., column].clamp_(min=floor)

    def set_coefficient_bounds(self, task: str, low: float, high: float) -> None:
        """Keep every coefficient of ``task``'s vector within [low, high] instead of the clamp."""
        self.column_bounds[self.task_names.index(task)] = (float(low), float(high))

    def set_coefficient_floor(self, task: str, floor: float) -> None:
        """Keep every coefficient of ``task``'s vector at or above ``floor`` (checked after every optimizer step)."""
        self.coefficient_floors[self.task_names.index(task)] = float(floor)

    @torch.no_grad()
    def merge_and_unload(self, mask: Mapping[str, Tensor] | None = None) -> nn.Module:
        """A plain copy of the module with the merged weights baked in (no wrapper, no task vectors)."""
        return self.merge_and_unload_with(self.merged_weights(mask))

    @torch.no_grad()
    def merge_and_unload_with(self, weights: Mapping[str, Tensor]) -> nn.Module:
        merged = copy.deepcopy(self.module)
        own = dict(merged.named_parameters()) | dict(merged.named_buffers())
        for name, value in weights.items():
            own[name].copy_(value)
        return merged

    def coefficients_as_list(self) -> list:
        """Nested ``[layer][task]`` (layer-wise) or ``[task]`` (task-wise) list for results files."""
        return self.coefficients.detach().cpu().tolist()

    def trainable_parameter_names(self) -> list[str]:
        return [name for name, p in self.named_parameters() if p.requires_grad]


def run_backbone(backbone: nn.Module, inputs: Any, weights: Mapping[str, Tensor] | None = None) -> Any:
    """Call ``backbone`` on a tensor or on keyword inputs (tokenised text); a :class:`MergedModel` with ``weights``
    (a merge computed once for several calls), any other module as it is."""
    if isinstance(backbone, MergedModel):
        if isinstance(inputs, Mapping):
            return backbone(weights=weights, **inputs)
        return backbone(inputs, weights=weights)
    return backbone(**inputs) if isinstance(inputs, Mapping) else backbone(inputs)
