"""The differentiable merged model over task vectors that are never held whole: streamed, compressed or LoRA.

:class:`StreamedMergedModel` (``modelpool.streaming``): the module's θ0 is on the device; each merged tensor's K
slices are fetched (host → device, or disk → device) when the merge forms ``Σ_k λ_k τ_k`` in the forward pass and
fetched *again* in the backward pass to form ``∂L/∂λ_k = ⟨∂L/∂θ, τ_k⟩`` (:class:`_StreamedTaskSum` saves the
coefficients and the tensor's index, never τ, and visits the tasks one at a time), so the device holds one task's
slice of one tensor at a time, whatever K is. Progressive
distillation (:func:`adamerge.methods.learned.progressive.progressive_merged_class`) fetches one block's slices per
step. :class:`LowRankMergedModel` (``modelpool.compression``) merges the low-rank factors of
:class:`~adamerge.pool.compressed.LowRankTaskVectors` without forming a dense task vector, and
:class:`LoRAMergedModel` the factors of PEFT adapters (:class:`~adamerge.pool.lora.LoRATaskVectors`).
:func:`merged_model_class`
picks the class for a pool's task vectors. Concrete masks and AdaRank keep every task vector resident and refuse a
streamed pool (:meth:`adamerge.methods.learned.merged.MergedModel.register_task_vectors`), as does a
``base_form: split`` base (its per-task vectors are model-wide).

It sits with the learned methods (layer of ``adamerge.methods.learned``), which are all that pick a merged model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from adamerge.methods.learned.merged import MergedModel, weighted_task_sum
from adamerge.pool.compressed import LowRankTaskVectors
from adamerge.pool.lora import LoRATaskVectors
from adamerge.pool.streamed import RESIDENCIES, pinned
from adamerge.pool.streamed_vectors import StreamedTaskVectors

__all__ = ["StreamedMergedModel", "LowRankMergedModel", "LoRAMergedModel", "merged_model_class", "expert_backbones"]


class _StreamedTaskSum(torch.autograd.Function):
    """``Σ_k w_k τ_k`` of one merged tensor whose slices ``τ_k`` are fetched one task at a time
    (``fetch(index, k, device)``) in the forward pass and again in the backward pass: autograd keeps the weights and
    the index, never τ, and no more than one task's slice is alive at a time, so the peak does not grow with K."""

    @staticmethod
    def forward(ctx: Any, weights: Tensor, fetch: Callable[[int, int, torch.device], Tensor], index: int) -> Tensor:
        ctx.save_for_backward(weights)
        ctx.fetch, ctx.index = fetch, index
        total = None
        for k in range(weights.shape[0]):
            part = fetch(index, k, weights.device)
            if total is None:
                total = torch.zeros(part.shape, dtype=weights.dtype, device=weights.device)
            total.addcmul_(part, weights[k])  # promotes the stored (maybe bf16) slice as it reads: no float32 copy
            del part
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (weights,) = ctx.saved_tensors
        flat = grad.reshape(-1)
        parts = []
        for k in range(weights.shape[0]):
            parts.append(torch.dot(ctx.fetch(ctx.index, k, grad.device).reshape(-1).to(grad.dtype), flat))
        return torch.stack(parts).to(weights.dtype), None, None


class StreamedMergedModel(MergedModel):
    """:class:`~adamerge.methods.learned.merged.MergedModel` whose task vectors stay off the device: each merged
    tensor's K slices are brought to the device when its ``Σ_k λ_k τ_k`` is formed and again in the backward pass.
    It merges module by module (``merge_per_module``, :mod:`.merged_per_module`): neither the merged model nor its
    gradient is ever whole, so what a step holds is θ0, the activations and one band of one weight.

    ``residency``: ``host`` keeps every tensor's K slices on the host (page-locked with CUDA) after forming them once;
    ``disk`` keeps nothing and reads the memory-mapped checkpoints at every fetch. Default: the pool's.
    """

    merge_per_module = True
    shardable = True  # trainer=fsdp builds each layer's block from the checkpoints and shards it before the next

    def __init__(self, module: nn.Module, task_vectors: Any, *, residency: str | None = None, **kwargs: Any) -> None:
        self._residency = residency or getattr(task_vectors, "residency", "host")
        if self._residency not in RESIDENCIES:
            raise ValueError(f"residency must be one of {RESIDENCIES}, got {self._residency!r}")
        super().__init__(module, task_vectors, **kwargs)

    def register_task_vectors(self, task_vectors: Any) -> None:
        self._source = task_vectors
        self.fetches = 0  # K-slice fetches so far (2 per merged tensor per step: forward and backward)
        # Plain attributes, not buffers: .to(device) must not move them.
        self._host = ([pinned(task_vectors.vectors[name]) for name in self.names] if self._residency == "host"
                      else None)

    def _fetch(self, index: int, device: torch.device) -> Tensor:
        self.fetches += 1
        stacked = self._host[index] if self._host is not None else self._source.vectors[self.names[index]]
        return stacked.to(device, non_blocking=stacked.device.type == "cpu" and stacked.is_pinned())

    def _fetch_slice(self, index: int, task: int, device: torch.device, rows: tuple[int, int] | None = None) -> Tensor:
        if task == 0 and (rows is None or rows[0] == 0):  # ``fetches`` counts passes over a tensor's K slices
            self.fetches += 1
        if self._host is not None:
            part = self._host[index][task] if rows is None else self._host[index][task][rows[0]:rows[1]]
        else:
            name = self.names[index]
            own = self.pretrained_tensor(index)  # a path walk at every band read, not a dict of the whole model
            # θ0 as the module holds it, when that is exactly the checkpoint's (float32 holds any 16-bit value): a
            # band is then read from the fine-tuned checkpoint alone, not from θ0's too.
            base = own[rows[0]:rows[1]] if (rows is not None and own.device.type == "cpu"
                                            and own.dtype == torch.float32) else None
            part = self._source.task_slice(name, task, rows, base)
        return part.to(device, non_blocking=part.device.type == "cpu" and part.is_pinned())

    def task_vector(self, index: int) -> Tensor:
        """Tensor ``index``'s K slices, fetched onto the coefficients' device (not kept)."""
        return self._fetch(index, self.coefficients.device)

    def task_slice(self, index: int, task: int, rows: tuple[int, int] | None = None) -> Tensor:
        """Task ``task``'s slice of tensor ``index`` alone (or its band ``rows``), fetched onto the coefficients'
        device (not kept)."""
        return self._fetch_slice(index, task, self.coefficients.device, rows)

    def task_delta(self, index: int, row: Tensor, shape: torch.Size) -> Tensor:
        return _StreamedTaskSum.apply(row, self._fetch_slice, index)


class LowRankMergedModel(MergedModel):
    """:class:`~adamerge.methods.learned.merged.MergedModel` over compressed task vectors: a matrix's step delta is
    ``(B_cat · diag(λ per rank)) A_cat`` with ``B_cat = [U_1 S_1 … U_K S_K]`` and ``A_cat = [V_1ᵀ; …; V_Kᵀ]``; dense
    slices (non-matrices, tasks appended uncompressed) are summed as usual."""

    def register_task_vectors(self, task_vectors: LowRankTaskVectors) -> None:
        self._parts: list[tuple[bool, bool]] = []  # per tensor: (has factors, has dense slices)
        for index, name in enumerate(self.names):
            entries = task_vectors.entries[name]
            factored = [(k, e) for k, e in enumerate(entries) if isinstance(e, tuple)]
            dense = [(k, e) for k, e in enumerate(entries) if not isinstance(e, tuple)]
            if factored:
                self.register_buffer(f"_lowrank_B_{index}", torch.cat([us for _, (us, _) in factored], dim=1),
                                     persistent=False)
                self.register_buffer(f"_lowrank_A_{index}", torch.cat([vh for _, (_, vh) in factored]), persistent=False)
                self.register_buffer(f"_lowrank_task_{index}", torch.cat(
                    [torch.full((us.shape[1],), k, dtype=torch.long) for k, (us, _) in factored]), persistent=False)
            if dense:
                self.register_buffer(f"_lowrank_dense_{index}", torch.stack([e for _, e in dense]), persistent=False)
                self.register_buffer(f"_lowrank_dense_task_{index}", torch.tensor([k for k, _ in dense]),
                                     persistent=False)
            self._parts.append((bool(factored), bool(dense)))

    def task_delta(self, index: int, row: Tensor, shape: torch.Size) -> Tensor:
        factored, dense = self._parts[index]
        delta = None
        if factored:
            b, a = getattr(self, f"_lowrank_B_{index}"), getattr(self, f"_lowrank_A_{index}")
            per_rank = row[getattr(self, f"_lowrank_task_{index}")]
            delta = ((b.to(row.dtype) * per_rank) @ a.to(row.dtype)).reshape(shape)
        if dense:
            part = weighted_task_sum(row[getattr(self, f"_lowrank_dense_task_{index}")],
                                     getattr(self, f"_lowrank_dense_{index}"))
            delta = part if delta is None else delta + part
        return delta

    def task_vector(self, index: int) -> Tensor:
        """Tensor ``index``'s K slices, reconstructed."""
        return torch.stack([self.task_slice(index, k) for k in range(len(self.task_names))])

    def task_slice(self, index: int, task: int, rows: tuple[int, int] | None = None) -> Tensor:
        """Task ``task``'s slice of tensor ``index`` alone, reconstructed from its factors (progressive distillation's
        element-wise coefficients read one at a time)."""
        factored, dense = self._parts[index]
        like = self.coefficients
        part = torch.zeros(self.pretrained_tensors()[self.names[index]].shape, dtype=like.dtype, device=like.device)
        if factored:  # this task's ranks alone, not every task's with the others' weighted 0
            chosen = getattr(self, f"_lowrank_task_{index}") == task
            b, a = getattr(self, f"_lowrank_B_{index}")[:, chosen], getattr(self, f"_lowrank_A_{index}")[chosen]
            part += (b.to(like.dtype) @ a.to(like.dtype)).reshape(part.shape)
        if dense:
            part += getattr(self, f"_lowrank_dense_{index}")[getattr(self, f"_lowrank_dense_task_{index}") == task
                                                            ].to(like.dtype).sum(0)
        return part if rows is None else part[rows[0]:rows[1]]


class LoRAMergedModel(MergedModel):
    """:class:`MergedModel` over adapters (:class:`~adamerge.pool.lora.LoRATaskVectors`): each step's delta of a
    targeted weight is ``B_cat · diag(λ·s) · A_cat``, so neither the step nor autograd ever holds a dense task vector."""

    def register_task_vectors(self, task_vectors: LoRATaskVectors) -> None:
        self.transposed = []
        for index, name in enumerate(self.names):
            a, b, task, scale, transposed = task_vectors.concatenated(name)
            for part, tensor in (("A", a), ("B", b), ("task", task), ("scale", scale)):
                self.register_buffer(f"_lora_{part}_{index}", tensor, persistent=False)
            self.transposed.append(transposed)

    # Each module merges itself when called (merged_per_module.py): a linear layer runs x θ0ᵀ + ((x A_catᵀ)·λ·s) B_catᵀ.
    merge_per_module = True

    def task_delta(self, index: int, row: Tensor, shape: torch.Size) -> Tensor:
        a, b, per_rank = self.linear_factors(index, row)
        delta = (b * per_rank) @ a
        return delta.T if self.transposed[index] else delta

    def factored(self, index: int) -> bool:
        return not self.transposed[index]  # a fan_in_fan_out layer (GPT-2's Conv1D) forms its merge instead

    def linear_factors(self, index: int, row: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(A_cat [R, in], B_cat [out, R], λ·s per rank [R])`` of merged tensor ``index``: its delta is
        ``B_cat · diag(λ·s) · A_cat`` (transposed when ``self.transposed[index]``); graph to ``row``."""
        per_rank = row[getattr(self, f"_lora_task_{index}")] * getattr(self, f"_lora_scale_{index}")
        return getattr(self, f"_lora_A_{index}"), getattr(self, f"_lora_B_{index}"), per_rank

    def task_slice(self, index: int, task: int, rows: tuple[int, int] | None = None) -> Tensor:
        """Task ``task``'s dense delta ``s_k B_k A_k`` of merged tensor ``index`` (``rows``: that band only)."""
        chosen = getattr(self, f"_lora_task_{index}") == task
        a = getattr(self, f"_lora_A_{index}")[chosen]
        b = getattr(self, f"_lora_B_{index}")[:, chosen] * getattr(self, f"_lora_scale_{index}")[chosen]
        if self.transposed[index]:  # the weight is (B A)ᵀ: its rows are columns of B A
            return (b @ (a if rows is None else a[:, rows[0]:rows[1]])).T
        return (b if rows is None else b[rows[0]:rows[1]]) @ a


def merged_model_class(task_vectors: Any) -> type[MergedModel]:
    """The :class:`MergedModel` class for a pool's task vectors: LoRA factors, streamed, compressed or in memory."""
    if isinstance(task_vectors, LoRATaskVectors):
        return LoRAMergedModel
    if isinstance(task_vectors, LowRankTaskVectors):
        return LowRankMergedModel
    if isinstance(task_vectors, StreamedTaskVectors):
        return StreamedMergedModel
    return MergedModel


def expert_backbones(pool: Any, task_vectors: Any) -> Callable[[str], nn.Module] | None:
    """For streamed task vectors: ``task -> `` that task's fine-tuned model θ0 + τ_task as a view over the pool's own
    θ0 that merges module by module with one-hot coefficients (only that task's slices are read, a band at a time),
    instead of a copy of the model plus a whole task vector (:meth:`ModelPool.backbone_with`); None otherwise."""
    if not isinstance(task_vectors, StreamedTaskVectors):
        return None

    def view(task: str) -> nn.Module:
        k = task_vectors.task_names.index(task)
        onehot = [1.0 if i == k else 0.0 for i in range(task_vectors.num_tasks)]
        expert = StreamedMergedModel(pool.shared_backbone(), task_vectors, granularity="task_wise", init_value=onehot,
                                     clamp=None)
        return expert.requires_grad_(False).eval()

    return view
