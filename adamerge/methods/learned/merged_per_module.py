"""Merging module by module inside the forward pass: the merged model is never formed whole (``merge_per_module``).

A :class:`~adamerge.methods.learned.merged.MergedModel` normally forms every merged tensor ``θ0 + Σ_k λ_k τ_k`` at
the start of a step and keeps them -- and, in the step's backward, a gradient of the same size -- for the whole
step: two models' worth of memory next to θ0, whatever streams the task vectors. With ``merge_per_module`` each
module that owns merged tensors forms its own when it is called and drops them when it returns:

* a linear layer's weight is formed a band of rows at a time (at most :data:`BAND_ELEMENTS` values) and applied
  band by band; its backward reads each band once more, for both ``∂L/∂x = g W`` and ``∂L/∂λ_k = ⟨τ_k, gᵀx⟩``,
  so nothing the size of the weight is ever alive, and a streamed pool reads the bands alone from the
  checkpoints (:meth:`~adamerge.pool.lazy_checkpoints.LazyStateDict.rows`);
* an embedding looks its rows up in θ0 and in every τ_k, ``y = θ0[ids] + Σ_k λ_k τ_k[ids]`` (banded reads), so the
  merged table -- a quarter of a small LLM with a large vocabulary -- is never formed;
* any other module (norms, convolutions) gets its merged tensors formed when it is called; autograd keeps them for
  the backward as usual (small for the transformer layers this is for).

The values and the gradients are those of the whole-model merge (tests: to 1e-6, float64). What it costs: each band
is read in the forward and again in the backward, and a step with the tasks run one after another merges once per
task -- memory for time, which is what a pool whose merged model does not fit asks for. Tied tensors (an LM head
sharing the embedding) are found by identity and merged where each module uses them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from adamerge.errors import ConfigError

__all__ = ["BAND_ELEMENTS", "merging_per_module", "owner_modules"]

BAND_ELEMENTS = 1 << 22  # values of a weight formed at a time: 16 MiB in float32


def bands(rows: int, columns: int, limit: int | None = None) -> list[tuple[int, int]]:
    """Bands ``(start, stop)`` of a ``rows × columns`` tensor's first dimension, each at most ``limit`` values
    (default: :data:`BAND_ELEMENTS`, read when called)."""
    step = max(1, (BAND_ELEMENTS if limit is None else limit) // max(columns, 1))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def owner_modules(merged: Any) -> list[tuple[nn.Module, dict[str, int]]]:
    """Every module owning merged tensors, with ``{its attribute name: merged tensor index}``; a tensor shared by
    several modules (tied weights) is listed under each."""
    index_of = {}
    own = dict(merged.module.named_parameters()) | dict(merged.module.named_buffers())
    for index, name in enumerate(merged.names):
        index_of[id(own[name])] = index
    owners = []
    for module in merged.module.modules():
        local = {name: index_of[id(tensor)] for store in (module._parameters, module._buffers)
                 for name, tensor in store.items() if tensor is not None and id(tensor) in index_of}
        if local:
            owners.append((module, local))
    return owners


def _merged_band(merged: Any, index: int, row: Tensor, base: Tensor, band: tuple[int, int] | None, dtype: torch.dtype,
                 tasks: Sequence[int]) -> Tensor:
    """``θ0 + Σ_k λ_k τ_k`` over the rows ``band`` of merged tensor ``index`` (None: all of it), no graph."""
    weight = (base if band is None else base[band[0]:band[1]]).to(dtype=dtype, copy=True)
    for k in tasks:
        weight.addcmul_(merged.task_slice(index, k, band).to(weight.device), row[k].to(dtype))
    return weight


class _BandedLinear(torch.autograd.Function):
    """``x Wᵀ`` with ``W = θ0 + Σ_k λ_k τ_k`` formed a band of rows at a time, forward and backward (module docstring);
    autograd keeps ``x`` and the coefficients, never W."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, row: Tensor, merged: Any, index: int, tasks: Sequence[int]) -> Tensor:
        dtype = torch.promote_types(row.dtype, torch.float32)
        with merged.resident(index):
            base = merged.pretrained_tensor(index)
            out = x.new_empty((*x.shape[:-1], base.shape[0]))
            for band in bands(*base.shape):
                # Rounded to θ0's dtype, as the weight merged whole is (MergedModel.merge_deltas).
                out[..., band[0]:band[1]] = F.linear(x, _merged_band(merged, index, row, base, band, dtype,
                                                                     tasks).to(base.dtype))
        ctx.save_for_backward(x, row)
        ctx.merged, ctx.index, ctx.tasks = merged, index, tuple(tasks)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        x, row = ctx.saved_tensors
        need_x, need_row = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = torch.promote_types(row.dtype, torch.float32)
        flat_x, flat_grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        grad_x = torch.zeros_like(flat_x) if need_x else None
        grad_row = torch.zeros_like(row) if need_row else None
        with ctx.merged.resident(ctx.index):  # θ0 and τ again (a sharded merge gathers its layer once more)
            base = ctx.merged.pretrained_tensor(ctx.index)
            for band in bands(*base.shape):
                part = flat_grad[:, band[0]:band[1]]
                # Each τ_k band is read once here and serves both: the band of W for ∂L/∂x, its dot with ∂L/∂W for ∂L/∂λ_k.
                weight = base[band[0]:band[1]].to(dtype=dtype, copy=True) if need_x else None
                band_grad = (part.to(dtype).t() @ flat_x.to(dtype)).reshape(-1) if need_row else None  # ∂L/∂W, these rows
                for k in ctx.tasks:
                    vector = ctx.merged.task_slice(ctx.index, k, band).to(part.device)
                    if need_x:
                        weight.addcmul_(vector, row[k].to(dtype))
                    if need_row:
                        grad_row[k] += torch.dot(band_grad, vector.reshape(-1).to(dtype)).to(row.dtype)
                if need_x:  # (the gradient may be 16-bit under autocast while x is float32)
                    grad_x += (part @ weight.to(base.dtype).to(part.dtype)).to(grad_x.dtype)
        return (grad_x.reshape(x.shape) if need_x else None), grad_row, None, None, None


class _PerModuleState:
    """One forward's coefficient rows (graph to what trains) and, per merged tensor, the tasks worth reading."""

    def __init__(self, merged: Any, rows: Tensor | None = None) -> None:
        self.merged = merged
        self.fixed = rows is not None  # given rows (an expert's one-hot ones) replace every coefficient, element-wise too
        rows = merged.coefficient_rows() if rows is None else rows
        self.rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        if torch.is_grad_enabled() and self.rows.requires_grad:
            self.tasks = [tuple(range(self.rows.shape[1]))] * self.rows.shape[0]  # every λ_k needs its gradient
        else:  # evaluation, an expert (one-hot coefficients): a task with λ = 0 is never read
            nonzero = (self.rows != 0).tolist()
            self.tasks = [tuple(k for k, yes in enumerate(line) if yes) for line in nonzero]

    def tensor(self, index: int) -> Tensor:
        """Merged tensor ``index`` whole, through the merged model's own ``task_delta`` (graph to the coefficients).
        A new tensor: nothing of θ0 or τ is kept past the merged model's ``resident`` (a sharded layer is freed)."""
        with self.merged.resident(index):
            base = self.merged.pretrained_tensor(index)
            if self.fixed:
                return _merged_band(self.merged, index, self.rows[index], base, None, self.rows.dtype,
                                    self.tasks[index]).to(base.dtype)
            delta = self.merged.task_delta(index, self.rows[index], base.shape)
            return (base.to(delta.dtype) + delta).to(base.dtype)


def _linear(module: nn.Linear, local: Mapping[str, int], state: _PerModuleState, x: Tensor) -> Tensor:
    index = local["weight"]
    return _with_bias(module, local, state, _BandedLinear.apply(x, state.rows[index], state.merged, index,
                                                                 state.tasks[index]))


def _with_bias(module: nn.Linear, local: Mapping[str, int], state: _PerModuleState, out: Tensor) -> Tensor:
    """``out`` plus the layer's bias: merged when it is a merged tensor, else the module's own."""
    if "bias" in local:
        return out + state.tensor(local["bias"]).to(out.dtype)
    return out if module.bias is None else out + module.bias.to(out.dtype)


def _factored_linear(module: nn.Linear, local: Mapping[str, int], state: _PerModuleState, x: Tensor) -> Tensor:
    """A linear layer whose task vectors are low-rank factors (LoRA adapters): ``x θ0ᵀ + ((x A_catᵀ) · λ·s) B_catᵀ``.
    Autograd keeps ``x A_catᵀ`` (rank-sized), never a weight-sized tensor. Equal to the whole merge up to rounding:
    the merged weight is not rounded to θ0's dtype first."""
    index = local["weight"]
    a, b, per_rank = state.merged.linear_factors(index, state.rows[index])
    low_rank = F.linear(F.linear(x, a.to(x.dtype)) * per_rank.to(x.dtype), b.to(x.dtype))
    return _with_bias(module, local, state, F.linear(x, state.merged.pretrained_tensor(index).to(x.dtype)) + low_rank)


def _embedding(module: nn.Embedding, local: Mapping[str, int], state: _PerModuleState, ids: Tensor) -> Tensor:
    index = local["weight"]
    row = state.rows[index]
    with state.merged.resident(index):
        base = state.merged.pretrained_tensor(index)
        out = F.embedding(ids, base, module.padding_idx).to(row.dtype)
        flat = ids.reshape(-1)
        present = torch.unique(flat).tolist()
        used = [band for band in bands(*base.shape) if any(band[0] <= i < band[1] for i in present)]
        for k in state.tasks[index]:
            picked = torch.zeros((flat.shape[0], base.shape[1]), dtype=row.dtype, device=base.device)
            for band in used:
                inside = (flat >= band[0]) & (flat < band[1])
                picked[inside] = state.merged.task_slice(index, k, band).to(base.device)[flat[inside] - band[0]].to(row.dtype)
            out = out + row[k] * picked.reshape(*ids.shape, base.shape[1])
        return out.to(base.dtype)  # as the table merged whole would give: rounded to θ0's dtype


def _generic(module: nn.Module, local: Mapping[str, int], state: _PerModuleState, args: tuple, kwargs: dict) -> Any:
    """Any other module: its merged tensors formed now, in place of its own for this call."""
    saved = {}
    try:
        for name, index in local.items():
            store = module._parameters if name in module._parameters else module._buffers
            saved[name] = (store, store[name])
            store[name] = state.tensor(index)
        return type(module).forward(module, *args, **kwargs)
    finally:
        for name, (store, tensor) in saved.items():
            store[name] = tensor


def _override(module: nn.Module, local: Mapping[str, int], state: _PerModuleState):
    # Exact types only: a subclass may do more in its forward (a scaled embedding, a quantised linear layer), which
    # the generic path keeps by calling that forward on the merged tensors.
    banded = state.fixed or state.merged.row_coefficients(local.get("weight", -1))
    if banded and type(module) is nn.Linear and "weight" in local and state.merged.factored(local["weight"]):
        return lambda x: _factored_linear(module, local, state, x)
    if banded and type(module) is nn.Linear and "weight" in local:
        return lambda x: _linear(module, local, state, x)
    if (banded and type(module) is nn.Embedding and set(local) == {"weight"} and module.max_norm is None
            and not module.sparse):
        return lambda ids: _embedding(module, local, state, ids)
    return lambda *args, **kwargs: _generic(module, local, state, args, kwargs)


def _activation_checkpointing(module: nn.Module) -> bool:
    """Whether a transformers model recomputes its layers in the backward (its checkpointing flags)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        try:
            if bool(getattr(module, name, False)):
                return True
        except Exception:  # noqa: BLE001 -- a property that is deprecated or absent on this version
            continue
    return False


@contextlib.contextmanager
def _forwards(replacements: Sequence[tuple[nn.Module, Any]]) -> Iterator[None]:
    """Each module's ``forward`` replaced while inside (an instance attribute; the one before is put back)."""
    installed = []
    try:
        for module, forward in replacements:
            installed.append((module, module.__dict__.get("forward")))
            module.forward = forward
        yield
    finally:
        for module, previous in reversed(installed):
            if previous is None:
                del module.forward
            else:
                module.forward = previous


def _checkpointed(block: nn.Module, replacements: Sequence[tuple[nn.Module, Any]]) -> Any:
    """``block``'s forward under activation checkpointing: only its inputs are kept for the backward, which runs the
    block again -- with its modules' merging forwards put back for that run, so the recomputation is the merge's
    (the same coefficient rows, so the same graph to them), not θ0's."""
    inner = block.forward

    def run(*args: Any, **kwargs: Any) -> Any:
        with _forwards(replacements):
            return inner(*args, **kwargs)

    def forward(*args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

    return forward


@contextlib.contextmanager
def merging_per_module(merged: Any, rows: Tensor | None = None) -> Iterator[None]:
    """While inside, every module of ``merged.module`` that owns merged tensors merges them itself when called (see
    the module docstring). A weight whose coefficients are not one per task (``merged.row_coefficients(index)``
    false: progressive distillation's element-wise ones) is formed whole by its module instead of band by band.
    ``rows`` (``[tensors, K]``) replaces the merged model's coefficients, e.g. one-hot rows: task k's expert.
    With ``merged.checkpoint_blocks`` (an ``nn.ModuleList`` of the backbone's blocks) and gradients on, each block
    keeps only its inputs for the backward and runs again there (activation checkpointing)."""
    if torch.is_grad_enabled() and _activation_checkpointing(merged.module):
        raise ConfigError(
            f"{type(merged.module).__name__} has the model's own activation (gradient) checkpointing on: its backward "
            "would run the modules again after this merge's forward is over, on θ0 instead of the merge. Turn it off "
            "(gradient_checkpointing_disable()) and set activation_checkpointing=true, which recomputes each block "
            "with its merge")
    state = _PerModuleState(merged, rows)
    replacements = [(module, _override(module, local, state)) for module, local in merged.per_module_owners()]
    if merged.checkpoint_blocks is not None and torch.is_grad_enabled():
        for block, inside in _block_owners(merged):
            replacements.append((block, _checkpointed(block, [replacements[i] for i in inside])))
    with _forwards(replacements):
        yield


def _block_owners(merged: Any) -> list[tuple[nn.Module, list[int]]]:
    """Each checkpointed block with the positions, in ``merged.per_module_owners()``, of the owners inside it; a block
    that owns merged tensors itself is left out (its own forward merges them). Worked out once per set of blocks: the
    module tree does not change between steps."""
    cached = merged.__dict__.get("_block_owners")
    if cached is None or cached[0] is not merged.checkpoint_blocks:
        owners = merged.per_module_owners()
        positions = {id(module): i for i, (module, _) in enumerate(owners)}
        groups = [(block, [positions[id(m)] for m in block.modules() if id(m) in positions])
                  for block in merged.checkpoint_blocks if id(block) not in positions]
        cached = (merged.checkpoint_blocks, groups)
        merged.__dict__["_block_owners"] = cached
    return cached[1]
