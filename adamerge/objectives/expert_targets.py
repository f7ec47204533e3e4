"""Each task's expert (its fine-tuned model, θ0 + τ_k) on that task's inputs, computed once before learning.

Expert-matching objectives compare the merged model with the task's expert on the same unlabeled inputs, and every
evaluation reports how often the two agree. Running K experts every step would cost K extra forwards per step; instead
each expert runs once over its task's rows and its outputs (logits, backbone features) are kept per row and looked up
by the row ``index`` every batch carries. The adaptation and evaluation splits are often one dataset: then one pass
serves both.

Within ``max_bytes`` the outputs stay in host memory. A split whose outputs would exceed what is left is not cached:
a warning says so, and its expert outputs are recomputed for each batch that needs them (one expert model at a time).
Per-token outputs (causal LMs) are kept per row at the unpadded positions only, so a batch padded differently from the
caching pass still finds its tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from adamerge.data.batches import ADAPTATION, EVALUATION, to_device
from adamerge.methods.learned.merged import run_backbone
from adamerge.objectives.registry import ExpertOutputs, Objective

log = logging.getLogger(__name__)

OUTPUTS = ("logits", "features", "predictions")


def feature_tensor(output: Any) -> Tensor:
    """The tensor a head reads from a backbone's output: the output itself, or a transformers output's hidden states
    (``last_hidden_state``), else its ``logits``."""
    if isinstance(output, Tensor):
        return output
    for name in ("last_hidden_state", "logits"):
        value = getattr(output, name, None)
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"cannot take features from a backbone output of type {type(output).__name__}")


def token_mask(inputs: Any, output: Tensor, per_token_ndim: int = 3) -> Tensor | None:
    """The padding mask of per-token outputs ``[N, T, ...]`` of tokenised inputs; None for one output per example.
    Outputs with a value per class or feature are per token from 3 dimensions on; arg-max predictions (one index per
    example or token: ``per_token_ndim=2``) from 2."""
    if isinstance(inputs, Mapping) and "attention_mask" in inputs and output.ndim >= per_token_ndim:
        mask = inputs["attention_mask"]
        if tuple(mask.shape) == tuple(output.shape[:2]):
            return mask.bool()
    return None


class _RowStore:
    """One split's outputs of one kind, per row: a ``[rows, *shape]`` tensor, or a list of per-row unpadded tokens."""

    def __init__(self, rows: int):
        self.rows, self.dense, self.tokens = rows, None, None
        self.filled = torch.zeros(rows, dtype=torch.bool)

    def put(self, index: Tensor, values: Tensor, mask: Tensor | None) -> None:
        values = values.detach().cpu()
        values = values.float() if values.is_floating_point() else values  # predictions stay integers
        if mask is None:
            if self.dense is None:
                self.dense = torch.zeros(self.rows, *values.shape[1:], dtype=values.dtype)
            self.dense[index] = values
        else:
            if self.tokens is None:
                self.tokens = [None] * self.rows
            mask = mask.cpu()
            for row, value, keep in zip(index.tolist(), values, mask):
                self.tokens[row] = value[keep].clone()
        self.filled[index] = True

    def get(self, index: Tensor, mask: Tensor | None, like_shape: tuple[int, ...] | None) -> Tensor:
        if self.dense is not None:
            return self.dense[index.cpu()]
        if mask is None or like_shape is None:
            raise ValueError("per-token expert outputs need the batch's padding mask to be placed")
        first = self.tokens[int(index[0])]
        out = torch.zeros(*like_shape[:2], *first.shape[1:], dtype=first.dtype)
        for position, (row, keep) in enumerate(zip(index.tolist(), mask.cpu().bool())):
            out[position, keep] = self.tokens[row]
        return out

    @property
    def nbytes(self) -> int:
        if self.dense is not None:
            return self.dense.numel() * self.dense.element_size()
        return sum(t.numel() * t.element_size() for t in self.tokens or [] if t is not None)


class ExpertTargets:
    """Every task's expert outputs on that task's splits, kept per row; see the module docstring.

    ``experts(task)`` returns ``(backbone, head)`` of the task's fine-tuned model; ``needs`` are the outputs to keep
    ("logits", "features"). ``datamodule`` gives each task's splits (``split_key``, ``split_size``, ``split_batches``:
    a :class:`~adamerge.data.datamodule.MultiTaskDataModule`). ``forwarded[task]`` counts the examples through the task's expert.
    """

    def __init__(self, experts: Any, datamodule: Any, device: torch.device, needs: Iterable[str] = ("logits",),
                 max_bytes: float = 4 * 2**30, batch_size: int | None = None) -> None:
        unknown = set(needs) - set(OUTPUTS)
        if unknown:
            raise ValueError(f"unknown expert outputs {sorted(unknown)}; known: {OUTPUTS}")
        self.experts, self.datamodule, self.device = experts, datamodule, device
        self.needs = tuple(sorted(set(needs)))
        self.max_bytes, self.batch_size = float(max_bytes), batch_size
        self.forwarded: dict[str, int] = {}
        self._stores: dict[tuple[Any, str], _RowStore] = {}
        self._lazy: set[Any] = set()
        self._loaded: tuple[str, nn.Module, nn.Module] | None = None

    @classmethod
    def from_pool(cls, pool: Any, task_vectors: Any, datamodule: Any, device: torch.device, needs: Iterable[str],
                  max_bytes: float = 4 * 2**30, batch_size: int | None = None,
                  backbone: Callable[[str], nn.Module] | None = None) -> ExpertTargets:
        """The experts of a :class:`~adamerge.pool.modelpool.ModelPool`: task k's backbone at θ0 + τ_k with its head.
        ``backbone(task)`` builds that backbone (default: a copy of the pool's, :meth:`ModelPool.backbone_with`; a
        streamed pool's runs pass a view that merges module by module and copies nothing)."""
        build = backbone or (lambda task: pool.backbone_with(task_vectors, task))
        return cls(lambda task: (build(task), pool.heads[task]), datamodule, device, needs,
                   max_bytes=max_bytes, batch_size=batch_size)

    @classmethod
    def for_objective(cls, pool: Any, task_vectors: Any, datamodule: Any, device: torch.device, objective: Objective,
                      max_bytes: float = 4 * 2**30, batch_size: int | None = None,
                      backbone: Callable[[str], nn.Module] | None = None, logits: bool = False) -> ExpertTargets:
        """The pool's experts run once over what a run needs: every task's evaluation rows (the agreement signal) and,
        for an objective that compares with the experts, its adaptation rows with the outputs that objective reads.
        The logits are kept when the objective reads them or ``logits`` says so (adapted heads learn on them); else
        the arg-max predictions alone, all the agreement needs (a causal LM's logits are a vocabulary per token)."""
        needs = {*objective.needs, "logits" if logits or "logits" in objective.needs else "predictions"}
        experts = cls.from_pool(pool, task_vectors, datamodule, device, needs,
                                max_bytes=max_bytes, batch_size=batch_size, backbone=backbone)
        experts.prepare(task_vectors.task_names, [EVALUATION, ADAPTATION] if objective.needs else [EVALUATION])
        return experts

    # -- the experts' forward ---------------------------------------------------------------------------------
    def _expert(self, task: str) -> tuple[nn.Module, nn.Module]:
        """One expert model at a time on the device (a 7B pool cannot hold K of them)."""
        if self._loaded is None or self._loaded[0] != task:
            self._loaded = None
            backbone, head = self.experts(task)
            self._loaded = (task, backbone.to(self.device).eval(), head.to(self.device).eval())
        return self._loaded[1], self._loaded[2]

    @torch.no_grad()
    def _forward(self, task: str, inputs: Any) -> dict[str, Tensor]:
        backbone, head = self._expert(task)
        inputs = to_device(inputs, self.device)
        output = run_backbone(backbone, inputs)
        logits = head(output)
        self.forwarded[task] = self.forwarded.get(task, 0) + int(logits.shape[0])
        derive = {"features": lambda: feature_tensor(output), "logits": lambda: logits,
                  "predictions": lambda: logits.argmax(-1).to(torch.int32)}
        return {need: derive[need]() for need in self.needs}  # only what is kept is formed

    # -- caching ------------------------------------------------------------------------------------------------
    def prepare(self, tasks: Iterable[str], splits: Iterable[int]) -> None:
        """Run each task's expert once over the rows of ``splits`` (a split shared with one already done is skipped)."""
        for task in tasks:
            for split in splits:
                self._cache_split(task, split)
        self._loaded = None  # the expert's weights are no longer needed on the device

    def _used_bytes(self) -> int:
        return sum(store.nbytes for store in self._stores.values())

    def _cache_split(self, task: str, split: int) -> None:
        key = self.datamodule.split_key(task, split)
        if key in self._lazy or all((key, need) in self._stores for need in self.needs):
            return
        loader = self.datamodule.split_batches(task, split, self.batch_size)
        rows = self.datamodule.split_size(task, split)
        stores = {need: _RowStore(rows) for need in self.needs}
        budget, seen = self.max_bytes - self._used_bytes(), 0
        for batch in loader:
            outputs = self._forward(task, batch["inputs"])
            for need, values in outputs.items():
                per_token_ndim = 2 if need == "predictions" else 3
                stores[need].put(batch["index"], values, token_mask(batch["inputs"], values, per_token_ndim))
            seen += len(batch["index"])
            projected = sum(store.nbytes for store in stores.values()) * rows / max(seen, 1)
            if projected > budget:
                log.warning("expert outputs of task %r (split %d, %d rows) would take about %.2f GB, more than the %.2f GB "
                            "left of expert_cache_max_gb: they are recomputed for every batch instead of cached",
                            task, split, rows, projected / 2**30, max(budget, 0) / 2**30)
                self._lazy.add(key)
                return
        for need, store in stores.items():
            self._stores[key, need] = store

    def lookup(self, task: str, split: int, batch: Mapping[str, Any]) -> ExpertOutputs:
        """The task's expert outputs on ``batch`` (its inputs and row ``index``), on the batch's device."""
        key = self.datamodule.split_key(task, split)
        inputs = batch["inputs"]
        if key in self._lazy or any((key, need) not in self._stores for need in self.needs):
            if key not in self._lazy:
                self._cache_split(task, split)
                self._loaded = None
            if key in self._lazy:
                values = self._forward(task, inputs)
                return ExpertOutputs(**{need: values[need].float() if values[need].is_floating_point() else values[need]
                                        for need in self.needs})
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        device = batch["index"].device
        out = {}
        for need in self.needs:
            store = self._stores[key, need]
            shape = tuple(mask.shape) if mask is not None and store.dense is None else None
            out[need] = store.get(batch["index"], mask, shape).to(device)
        return ExpertOutputs(**out)

    def report(self) -> dict[str, Any]:
        """What was cached, for results.json: bytes kept, splits recomputed lazily, examples through each expert."""
        return {"cached_mb": self._used_bytes() / 2**20, "lazy_splits": len(self._lazy),
                "examples_forwarded": dict(self.forwarded)}
