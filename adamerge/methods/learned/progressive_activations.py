"""The activations progressive distillation learns from: each block's inputs, merged and per expert, and the experts'
outputs, cached for one block at a time.

A block's inputs are captured by a forward pre-hook on the backbone run up to that block (the forward stops there,
so no later tensor is read), with whatever other arguments the model passes its blocks (attention masks, position
embeddings). After a block is learned, both activations are propagated through it -- the merged inputs through the
learned block, each expert's through its own -- when the backbone is a plain sequence of blocks; one that is not
(checked once, on the first propagation) is re-captured block by block instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from adamerge.data.batches import ADAPTATION
from adamerge.data.batches import to_device
from adamerge.methods.learned.block_arguments import concat_rows, next_block_arguments, same_hidden_states
from adamerge.methods.learned.block_arguments import select_rows, without_cache
from adamerge.methods.learned.merged_per_module import merging_per_module

__all__ = ["BlockActivations"]

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the block's input is needed."""


class BlockActivations:
    """The block-input cache of :class:`~adamerge.methods.learned.progressive.ProgressiveDistillationModule`, mixed
    into it: ``_cache`` holds the current block's inputs per task (merged and expert), the experts' outputs there and
    the distillation inputs (``rows``). It reads what the module sets up: ``merged``, ``block_path``,
    ``samples_per_task``, ``seed``, ``distillation_source``, ``block_tensors`` and ``block_weights``."""

    _cache: dict[str, Any] | None
    _propagates: bool | None

    def _block(self, index: int) -> nn.Module:
        return self.merged.module.get_submodule(self.block_path)[index]

    def _capture(self, block: int, inputs: Any, task: int | None = None) -> tuple[tuple, dict]:
        """The arguments the backbone passes block ``block`` when run on ``inputs``: merged (``task`` None) or as task
        ``task``'s expert (θ0 + τ_task). Each module before the block merges its own tensors when it runs
        (:func:`merging_per_module`): no merged or expert model is formed whole, an embedding is looked up row by row."""
        captured: list[tuple[tuple, dict]] = []

        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append((args, without_cache(kwargs)))
            raise _StopForward

        rows = None
        if task is not None:
            rows = torch.zeros(len(self.merged.names), len(self.merged.task_names), device=self.merged.coefficients.device)
            rows[:, task] = 1.0
        handle = self._block(block).register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with merging_per_module(self.merged, rows):
                self.merged.module(*((inputs,) if not isinstance(inputs, Mapping) else ()),
                                   **(dict(inputs) if isinstance(inputs, Mapping) else {}))
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"block {self.block_path}.{block} was not called by the backbone's forward")
        return captured[0]

    def _run_block(self, block: int, weights: Mapping[str, Tensor], args: tuple, kwargs: dict) -> Tensor:
        prefix = f"{self.block_path}.{block}."
        local = {name[len(prefix):]: w for name, w in weights.items() if name.startswith(prefix)}
        return functional_call(self._block(block), local, args, kwargs)

    def expert_weights(self, task: int, block: int | None = None, indices: Sequence[int] | None = None
                       ) -> dict[str, Tensor]:
        """θ0 + τ_task: of one block's tensors (all it takes to run that block), of the tensors ``indices``, or of
        every tensor. Only that task's slice of each tensor is fetched (a streamed pool reads one checkpoint)."""
        pretrained = self.merged.pretrained_tensors()
        if indices is None:
            indices = self.block_tensors(block) if block is not None else range(len(self.merged.names))
        weights = {}
        for index in indices:
            base = pretrained[self.merged.names[index]]
            weights[self.merged.names[index]] = (base.float() + self.merged.task_slice(index, task).float()).to(base.dtype)
        return weights

    def _rows(self) -> dict[str, Any]:
        """Each task's distillation inputs: ``samples_per_task`` rows of its unlabeled split, drawn by the seed."""
        datamodule = self.distillation_source if self.distillation_source is not None else self.trainer.datamodule
        rows = {}
        for t, task in enumerate(self.task_names):
            size = datamodule.split_size(task, ADAPTATION)
            keep = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed * 1009 + t))[: self.samples_per_task]
            wanted, parts = set(keep.tolist()), []
            for batch in datamodule.split_batches(task, ADAPTATION):
                chosen = [i for i, row in enumerate(batch["index"].tolist()) if row in wanted]
                if chosen:
                    parts.append(select_rows(batch["inputs"], torch.as_tensor(chosen)))
            rows[task] = to_device(concat_rows(parts), self.device)
        return rows

    @torch.no_grad()
    def _prepare_block(self, block: int) -> None:
        """Cache block ``block``'s inputs (merged and expert, per task) and the experts' outputs, by propagating the
        previous block's cache through it when the backbone is a plain sequence of blocks, else by a fresh capture."""
        previous = self._cache
        rows = previous["rows"] if previous is not None else self._rows()  # drawn once, kept from block to block
        fresh = {}
        if previous is not None and previous["block"] == block - 1 and self._propagates is not False:
            learned = self.block_weights(block - 1)
            for task, entry in previous["tasks"].items():
                merged_out = self._run_block(block - 1, learned, *entry["merged"])
                fresh[task] = {"merged": next_block_arguments(entry["merged"], merged_out),
                               "expert": next_block_arguments(entry["expert"], entry["target"])}
            if self._propagates is None:  # check once that a block's output is what the next one is given
                task = self.task_names[0]
                self._propagates = same_hidden_states(self._capture(block, rows[task]), fresh[task]["merged"])
                if not self._propagates:
                    log.warning("progressive_distillation: the blocks of %s are not a plain sequence; re-capturing each "
                                "block's inputs by a forward through the blocks before it", self.block_path)
                    fresh = {}
        if not fresh:
            for t, task in enumerate(self.task_names):  # the forward stops at the block: later tensors are never read
                fresh[task] = {"merged": self._capture(block, rows[task]), "expert": self._capture(block, rows[task], t)}
        for t, task in enumerate(self.task_names):
            fresh[task]["target"] = self._run_block(block, self.expert_weights(t, block), *fresh[task]["expert"])
        self._cache = {"block": block, "tasks": fresh, "rows": rows}
