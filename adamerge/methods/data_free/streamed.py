"""Data-free merges over streamed task vectors, block by block: the pool is never held whole.

:class:`~adamerge.pool.streamed_vectors.StreamedTaskVectors` and
:class:`~adamerge.pool.compressed.LowRankTaskVectors` (:mod:`adamerge.pool.streamed`) form each tensor's ``[K, *shape]``
when it is read. **Data-free methods** run *block by block* (:meth:`StreamedTaskVectors.blocks`: contiguous runs of tensors of one
``layers.<i>`` / ``h.<i>`` / ``blocks.<i>`` block, :data:`~adamerge.pool.key_filters.BLOCK_PATTERN`, every other tensor alone): only
the current block's K slices are resident, and the result (the merged delta, 1× the model) is the only thing that
grows. :func:`merge_streamed` picks the form by method (``static_method`` sends a streamed pool here):

=====================  ====================  ===========================================================================
method                 needs                 streamed form
=====================  ====================  ===========================================================================
weight_average         one tensor            block by block, the method's own function on the block
task_arithmetic        one tensor            block by block
breadcrumbs            one tensor and task   block by block
tsv_merge              one layer             block by block (SVDs of one layer at a time, as in memory)
iso_c, iso_cts         one layer             block by block
wudi                   one layer             block by block
ties  scope=tensor     one tensor            block by block
ties  scope=model      model-wide top-k      two phases, 4 reads of the pool: exact per-task top-k thresholds by radix
                       threshold per task;   select over the float32 bit patterns (2 reads, a 65 536-bin histogram per
                       model-wide sign       task), the sign fallback's model-wide balance (1 read), then the merge
                       fallback              (1 read)
dare  combine=task_ar  one seeded generator  block by block, one generator carried through the tensors in the model's
                       drawn in tensor order order, so the draws are the in-memory merge's
dare  combine=ties     as TIES               scope=tensor: block by block; scope=model: as TIES, the generator reseeded
                                             and replayed at every read, so every read sees the same drops
pcb   scope=tensor     one tensor            block by block
pcb   scope=model      model-wide order      two phases, 5 reads: the magnitude clamp's two order statistics per task
                       statistics and max    (2 reads), the score threshold and per-task maximum of the balancing
                                             scores (2 reads), then the merge (1 read)
pretrained             nothing               zeros of each tensor's shape (from the headers: nothing read)
=====================  ====================  ===========================================================================

Each form gives the in-memory merge's values: the same functions on the same float32 values, and thresholds that are
the exact order statistics ``kthvalue`` returns. A data-free method registered by a user has no declared form and is
refused on a streamed pool; :func:`register_block_local` declares one that needs only one tensor (or layer) at a time.

The exact order statistics are :func:`adamerge.methods.data_free.radix.order_statistics`; PCB's ``scope=model`` form
lives with PCB (:mod:`adamerge.methods.data_free.pcb`), which declares it here (:func:`register_streamed_form`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from adamerge.errors import ConfigError
from adamerge.methods.data_free import steps
from adamerge.methods.data_free.radix import order_statistics
from adamerge.pool.streamed import StreamedVectorsBase

__all__ = ["merge_streamed", "register_block_local", "register_streamed_form", "streamed_form", "raw_blocks",
           "visit_blocks", "each_tensor"]

Deltas = dict[str, Tensor]
BlockSource = Callable[[], Iterator[dict[str, Tensor]]]

# method -> form, or a function of the resolved hyperparameters giving the form: "block", one of the forms below, or a
# merge of its own ``(vectors, hparams) -> Deltas`` (a method module declares it: register_streamed_form).
Form = str | Callable[[StreamedVectorsBase, Mapping[str, Any]], Deltas]
_FORMS: dict[str, Form | Callable[[Mapping[str, Any]], Form]] = {
    "weight_average": "block",
    "task_arithmetic": "block",
    "breadcrumbs": "block",
    "tsv_merge": "block",
    "iso_c": "block",
    "iso_cts": "block",
    "wudi": "block",
    "ties": lambda h: "block" if h["scope"] == "tensor" else "ties_model",
    "dare": lambda h: "dare",
}


def register_block_local(name: str) -> None:
    """Declare that data-free method ``name`` needs one tensor (or layer) at a time, so a streamed pool runs it block
    by block."""
    _FORMS[name] = "block"


def register_streamed_form(name: str, form: Callable[[Mapping[str, Any]], Form]) -> None:
    """Declare how data-free method ``name`` runs over a streamed pool: ``form(hparams)`` gives ``"block"`` or a merge
    ``(vectors, hparams) -> deltas`` of its own (PCB's ``scope=model``)."""
    _FORMS[name] = form


def streamed_form(method: str, hparams: Mapping[str, Any]) -> Form:
    form = _FORMS.get(method)
    if form is None:
        raise ConfigError(f"method {method!r} has no streamed form: it is not known to need one tensor at a time. "
                          "Declare it with adamerge.methods.data_free.streamed.register_block_local if it does, or set "
                          "modelpool.streaming=false")
    return form(hparams) if callable(form) else form


def merge_streamed(vectors: StreamedVectorsBase, method: str, fn: Callable[..., Deltas],
                   hparams: Mapping[str, Any]) -> Deltas:
    """Data-free method ``method`` (its function ``fn`` and resolved ``hparams``) over streamed task vectors, in the
    form the module docstring's table gives; returns the float32 deltas of every merged tensor."""
    form = streamed_form(method, hparams)
    if form == "block":
        deltas: Deltas = {}
        for block in vectors.blocks():
            deltas.update(fn(vectors.materialize(block), **hparams))
        return deltas
    if form == "ties_model":
        return ties_model(lambda: raw_blocks(vectors), vectors.num_tasks, vectors.parameters_per_task(),
                          hparams["top_k"], hparams["scaling_coefficient"])
    if callable(form):
        return form(vectors, hparams)
    return _dare(vectors, hparams)


def raw_blocks(vectors: StreamedVectorsBase) -> Iterator[dict[str, Tensor]]:
    for block in vectors.blocks():
        yield {name: vectors.stacked(name) for name in block}


def visit_blocks(blocks: BlockSource, visit: Callable[[str, Tensor], None]) -> None:
    """``visit(name, stacked)`` for every tensor of a block source, in order. Each block's dict is emptied as its
    tensors are handed over, so nothing of a block is left when the next one is formed: one block is resident."""
    for block in blocks():
        for name in list(block):
            visit(name, block.pop(name))


def each_tensor(blocks: BlockSource, transform: Callable[[Tensor], Tensor]) -> Iterator[Tensor]:
    """``transform(stacked)`` of every tensor of a block source, in order, one block resident (see
    :func:`visit_blocks`)."""
    for block in blocks():
        for name in list(block):
            yield transform(block.pop(name))


def _dare_blocks(vectors: StreamedVectorsBase, drop_rate: float, seed: int,
                 rescale: bool) -> Iterator[dict[str, Tensor]]:
    """DARE's dropped vectors block by block: one generator seeded with ``seed`` drawn through the tensors in order,
    as :func:`adamerge.methods.data_free.static.dare_dropped` draws them; every call replays the same draws."""
    generator = torch.Generator().manual_seed(seed)
    for block in raw_blocks(vectors):
        dropped = {name: steps.dare_drop(block.pop(name), drop_rate, generator, rescale=rescale) for name in list(block)}
        yield dropped
        del dropped


def _dare(vectors: StreamedVectorsBase, hparams: Mapping[str, Any]) -> Deltas:
    def blocks() -> Iterator[dict[str, Tensor]]:
        return _dare_blocks(vectors, hparams["drop_rate"], hparams["seed"], hparams["rescale"])

    scaling = hparams["scaling_coefficient"]
    if hparams["combine"] == "ties" and hparams["scope"] == "model":
        return ties_model(blocks, vectors.num_tasks, vectors.parameters_per_task(), hparams["top_k"], scaling)
    deltas: Deltas = {}
    for dropped in blocks():
        if hparams["combine"] == "ties":
            deltas.update(steps.ties_combine(dropped, hparams["top_k"], scaling, "tensor"))
        else:
            deltas.update(steps.scaled_sum(dropped, scaling))
        dropped.clear()
    return deltas


def ties_model(blocks: BlockSource, num_tasks: int, total: int, top_k: float, scaling_coefficient: float) -> Deltas:
    """TIES with ``scope=model`` over a replayable block source (``total`` entries per task): the in-memory
    ``steps.ties_combine`` in four reads -- two for the per-task thresholds, one for the sign fallback, one to merge."""
    kept = steps.count_to_keep(top_k, total)
    if total == 0 or kept == total:  # as topk_masks: keep everything
        threshold = torch.zeros(num_tasks)
    else:
        threshold = order_statistics(lambda: each_tensor(blocks, lambda x: x.detach().abs().float().reshape(num_tasks, -1)),
                                     num_tasks, [total - kept])[0]

    def trimmed(x: Tensor) -> Tensor:
        keep = x.abs().float() >= steps.broadcast_per_task(threshold.to(x.device), x)
        return torch.where(keep, x.float(), 0.0)

    balance = [0]

    def count(name: str, x: Tensor) -> None:
        signs = torch.sign(trimmed(x).sum(dim=0))
        balance[0] += int((signs > 0).sum()) - int((signs < 0).sum())

    visit_blocks(blocks, count)
    fallback = -1.0 if balance[0] < 0 else 1.0
    deltas: Deltas = {}

    def merge(name: str, x: Tensor) -> None:
        x = trimmed(x)
        signs = torch.sign(x.sum(dim=0))
        signs = torch.where(signs == 0, torch.full_like(signs, fallback), signs)
        deltas[name] = scaling_coefficient * steps.disjoint_mean(x, signs)

    visit_blocks(blocks, merge)
    return deltas
