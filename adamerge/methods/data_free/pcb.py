"""PCB-Merging (Du et al., NeurIPS 2024, "Parameter Competition Balancing for Model Merging").

Per task k, over the task's D entries (the whole flattened model with ``scope=model``, as the authors flatten it;
each tensor alone with ``scope=tensor``), with ``c = clamp_ratio``, ``r = pcb_ratio`` and ``sort_k`` the ascending
sort of a task's values (0-based):

    lo_k = sort_k(|τ_k|)[⌊c·D⌋],  hi_k = sort_k(|τ_k|)[⌊(1−c)·D⌋ − 1]          outlier clamp of the magnitudes
    a_k = clamp(|τ_k|, lo_k, hi_k),  τ̃_k = sign(τ_k) a_k,  n_k = (a_k − lo_k) / (hi_k − lo_k)
    intra_k = exp(K · n_k²)                                                      intra-balancing
    inter_k = tanh(τ_k ⊙ Σ_j sign(τ_j) n_j)          (inter_balancing="normalized_sum", default)
            = tanh(τ_k ⊙ Σ_j τ_j)                    ("raw_sum")
            = Σ_j tanh(sign(τ_k) n_k ⊙ sign(τ_j) n_j)  ("pairwise")
    β_k = intra_k ⊙ inter_k,  q_k = sort_k(β_k)[⌊(1−r)·D⌋],  w_k = (max(β_k, q_k) − q_k) / (max β_k − q_k)
    delta = Σ_k λ_k w_k ⊙ τ̃_k / max(Σ_k w_k, 1e−12)

so ``pcb_ratio`` is the fraction of each task's entries that keep a non-zero weight (those scoring above its
(1−r)-quantile). ``λ`` (``scaling_coefficient``) is one number or one per task. Every tensor, whatever its rank,
takes part: PCB works entry by entry on the flattened model. Zero spans (``hi = lo``, ``max β = q``: e.g. an
all-zero task vector) give zero instead of the authors' 0/0 = NaN, so such a task contributes nothing.

Checked against the authors' code (duguodong7/pcb-merging); FusionBench has no PCB. The authors' files differ from
each other in the inter-balancing term and the clamp ratio:

* ``pcb-merging.py:31-45`` (the file the README names as the method) and
  ``nlp_source_code/utils/merge_utils.py:434-448``: ``tanh(τ_k ⊙ Σ_j τ_j)`` on raw task vectors ("raw_sum"),
  outlier clamp 0.0001 and 0.01 respectively.
* ``vision_source_code/pcb.py:83-105``, the data-free ViT-B/32 script: ``tanh(τ_k ⊙ Σ_j sign(τ_j) n_j)``
  ("normalized_sum"), clamp 0.01, ``att_ratio = 0.05``, ``lams = 1.2`` per task. The defaults here come from it.
* ``vision_source_code/pcb_ES.py:15-31`` (with an evolutionary search of λ on validation data):
  ``Σ_j tanh(ŝ_k ⊙ ŝ_j)`` with ``ŝ = sign(τ) n`` ("pairwise"), the paper's Σ_j over pairs.

Where this follows the authors' code rather than /work/shared/ALGORITHMS.md:

* The "softmax" of the paper is ``exp(K · n²)`` for intra-balancing (the softmax denominator is one number per
  task and cancels in the min-max normalisation of β) and ``tanh`` for inter-balancing.
* "Drop the lowest-scoring r %" is, in the code, *keep* the top r (``clamp(β, 1 − r, 0)``: everything at or below
  the (1−r)-quantile gets weight 0), and the weights are the min-max normalised scores ``w_k``, not ``β`` itself.
* The magnitudes are first clamped to their [c, 1−c] quantiles and the *clamped* vectors τ̃ are merged.
* λ multiplies each task vector inside the weighted mean (``tvs = clamped_all_checks * lams``), which equals
  ``λ · merged`` for one λ.

Quantile positions are exact (``⌊c·D⌋`` from the fraction, not ``int(d * (1 - c) - 1)`` of a float product) and,
for tiny tensors where ``hi`` would fall below ``lo``, ``hi`` is taken at ``lo``'s position.

Memory (``scope=model``): one float32 score tensor per merged tensor (the size of the task vectors in float32)
and one task's flattened values at a time for the quantiles. Over a streamed pool (``modelpool.streaming``),
``scope=model`` runs in five reads with exact radix-select order statistics (:func:`_pcb_streamed`,
:mod:`adamerge.methods.data_free.streamed`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from adamerge.methods.checks import check_choice, check_range, check_scaling, fail, is_number
from adamerge.methods.data_free import steps
from adamerge.methods.data_free.radix import order_statistics
from adamerge.methods.data_free.static import static_method
from adamerge.methods.data_free.streamed import each_tensor, raw_blocks, register_streamed_form, visit_blocks
from adamerge.pool.streamed import StreamedVectorsBase
from adamerge.pool.task_vectors import TaskVectors

INTER_BALANCING: tuple[str, ...] = ("normalized_sum", "raw_sum", "pairwise")


def _validate_pcb(num_tasks: int, hparams: Mapping[str, Any]) -> None:
    check_range(
        "pcb", "pcb_ratio", hparams["pcb_ratio"], low_open=True, high_open=False,
        hint=" (the fraction of each task's entries kept by score: 0.05 keeps the top 5%)",
    )
    clamp_ratio = hparams["clamp_ratio"]
    if not (is_number(clamp_ratio) and 0 <= clamp_ratio < 0.5):
        raise fail("pcb", "clamp_ratio", clamp_ratio,
                   "must be a number in [0, 0.5) (0.01 clamps the top and bottom 1%)")
    check_choice("pcb", "inter_balancing", hparams["inter_balancing"], INTER_BALANCING)
    check_scaling("pcb", "scaling_coefficient", hparams["scaling_coefficient"], num_tasks, per_task=True)
    check_choice("pcb", "scope", hparams["scope"], steps.SCOPES)


def _order_statistics(
    stacked: Sequence[Tensor], positions: Sequence[int], transform: Callable[[Tensor], Tensor] | None = None
) -> list[Tensor]:
    """Per task, the values at 0-based ``positions`` of the ascending sort of all its entries in ``stacked``.

    One ``[K]`` tensor per position; one task's concatenated entries are alive at a time.
    """
    found: list[list[Tensor]] = [[] for _ in positions]
    for k in range(stacked[0].shape[0]):
        flat = torch.cat([x[k].reshape(-1).float() for x in stacked])
        if transform is not None:
            flat = transform(flat)
        for values, position in zip(found, positions):
            values.append(flat.kthvalue(position + 1).values)
        del flat
    return [torch.stack(values) for values in found]


def _min_max(x: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """``(x − low) / (high − low)`` per task; 0 where the span is 0 (the authors divide 0 by 0 there)."""
    low, high = steps.broadcast_per_task(low, x), steps.broadcast_per_task(high, x)
    span = high - low
    return torch.where(span > 0, (x - low) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)


def _clamp_magnitudes(x: Tensor, low: Tensor, high: Tensor) -> Tensor:
    low, high = steps.broadcast_per_task(low, x), steps.broadcast_per_task(high, x)
    return torch.minimum(torch.maximum(x.abs(), low), high)


def balancing_scores(x: Tensor, low: Tensor, high: Tensor, inter_balancing: str = "normalized_sum") -> Tensor:
    """β = intra ⊙ inter for float ``x`` (``[K, *shape]``), given each task's magnitude clamp ``[low, high]``."""
    normalized = _min_max(_clamp_magnitudes(x, low, high), low, high)
    intra = torch.exp(x.shape[0] * normalized.square())
    if inter_balancing == "raw_sum":
        inter = torch.tanh(x * x.sum(dim=0))
    elif inter_balancing == "normalized_sum":
        inter = torch.tanh(x * (torch.sign(x) * normalized).sum(dim=0))
    elif inter_balancing == "pairwise":
        signed = torch.sign(x) * normalized
        inter = sum(torch.tanh(signed * signed[j]) for j in range(x.shape[0]))
    else:
        raise ValueError(f"inter_balancing must be one of {INTER_BALANCING}, got {inter_balancing!r}")
    return intra * inter


def _pcb_group(
    group: Mapping[str, Tensor], pcb_ratio: float, clamp_ratio: float, inter_balancing: str
) -> Iterator[tuple[str, Tensor]]:
    """PCB's per-task pieces ``w_k ⊙ τ̃_k / Σ_j w_j`` (``[K, *shape]``), one tensor at a time, over the entries
    of ``group`` ranked together (the whole model, or one tensor); the merge is ``Σ_k λ_k`` of them. A
    generator, so the merge can reduce each piece before the next is made."""
    stacked = list(group.values())
    num_tasks = stacked[0].shape[0]
    total = sum(x[0].numel() for x in stacked)
    if total == 0:
        yield from ((name, torch.zeros(x.shape, device=x.device)) for name, x in group.items())
        return
    low_at = steps.count_to_drop(clamp_ratio, total)
    high_at = max(total - steps.ceil_count(clamp_ratio, total) - 1, low_at)
    low, high = _order_statistics(stacked, [low_at, high_at], torch.abs)
    scores = {name: balancing_scores(x.float(), low, high, inter_balancing) for name, x in group.items()}
    (threshold,) = _order_statistics(list(scores.values()), [total - steps.ceil_count(pcb_ratio, total)])
    top = torch.stack([s.reshape(num_tasks, -1).amax(dim=1) for s in scores.values() if s[0].numel()]).amax(dim=0)
    for name, x in group.items():
        beta = scores.pop(name)
        weight = _min_max(torch.maximum(beta, steps.broadcast_per_task(threshold, beta)), threshold, top)
        del beta
        x = x.float()
        clamped = torch.sign(x) * _clamp_magnitudes(x, low, high)
        yield name, clamped * weight / weight.sum(dim=0).clamp(min=1e-12)


def pcb_pieces(task_vectors: TaskVectors, *, pcb_ratio: float, clamp_ratio: float, inter_balancing: str,
               scope: str) -> Iterator[tuple[str, Tensor]]:
    """Each tensor's per-task shares ``w_k ⊙ τ̃_k / Σ_j w_j`` (``[K, *shape]``), one tensor at a time."""
    vectors = task_vectors.vectors
    groups = [list(vectors)] if scope == "model" else [[name] for name in vectors]
    for names in groups:
        yield from _pcb_group({name: vectors[name] for name in names}, pcb_ratio, clamp_ratio, inter_balancing)


@static_method("pcb", _validate_pcb)
def pcb(
    task_vectors: TaskVectors,
    *,
    pcb_ratio: float = 0.05,
    clamp_ratio: float = 0.01,
    inter_balancing: str = "normalized_sum",
    scaling_coefficient: float | Sequence[float] = 1.2,
    scope: str = "model",
) -> dict[str, Tensor]:
    """PCB-Merging (Du et al. 2024): intra- and inter-balancing scores, keep the top pcb_ratio, weighted mean × λ."""
    if is_number(scaling_coefficient):
        weights = torch.full((task_vectors.num_tasks,), float(scaling_coefficient))
    else:
        weights = torch.tensor([float(v) for v in scaling_coefficient], dtype=torch.float32)
    pieces = pcb_pieces(task_vectors, pcb_ratio=pcb_ratio, clamp_ratio=clamp_ratio,
                        inter_balancing=inter_balancing, scope=scope)
    return {name: torch.tensordot(weights.to(piece.device), piece, dims=1) for name, piece in pieces}


def _pcb_streamed(vectors: StreamedVectorsBase, hparams: Mapping[str, Any]) -> Deltas:
    """PCB with ``scope=model``: the in-memory ``_pcb_group`` over the whole model in five reads."""
    num_tasks, inter = vectors.num_tasks, hparams["inter_balancing"]
    scaling = hparams["scaling_coefficient"]
    weights = (torch.full((num_tasks,), float(scaling)) if is_number(scaling)
               else torch.tensor([float(v) for v in scaling], dtype=torch.float32))
    total = vectors.parameters_per_task()
    if total == 0:
        return {name: torch.zeros(vectors.shape(name)) for name in vectors.names}
    low_at = steps.count_to_drop(hparams["clamp_ratio"], total)
    high_at = max(total - steps.ceil_count(hparams["clamp_ratio"], total) - 1, low_at)

    def blocks() -> Iterator[dict[str, Tensor]]:
        return raw_blocks(vectors)

    low, high = order_statistics(lambda: each_tensor(blocks, lambda x: x.float().abs().reshape(num_tasks, -1)), num_tasks,
                                 [low_at, high_at])
    top = [torch.full((num_tasks,), -torch.inf)]

    def scores(x: Tensor) -> Tensor:
        beta = balancing_scores(x.float(), low, high, inter).reshape(num_tasks, -1)
        if beta.shape[1]:
            top[0] = torch.maximum(top[0], beta.amax(dim=1))
        return beta

    (threshold,) = order_statistics(lambda: each_tensor(blocks, scores), num_tasks,
                                    [total - steps.ceil_count(hparams["pcb_ratio"], total)])
    deltas: Deltas = {}

    def merge(name: str, x: Tensor) -> None:
        x = x.float()
        beta = balancing_scores(x, low, high, inter)
        weight = _min_max(torch.maximum(beta, steps.broadcast_per_task(threshold, beta)), threshold, top[0])
        del beta
        clamped = torch.sign(x) * _clamp_magnitudes(x, low, high)
        piece = clamped * weight / weight.sum(dim=0).clamp(min=1e-12)
        deltas[name] = torch.tensordot(weights.to(piece.device), piece, dims=1)

    visit_blocks(blocks, merge)
    return deltas


# A streamed pool: scope=tensor block by block, scope=model in five reads of the pool.
register_streamed_form("pcb", lambda h: "block" if h["scope"] == "tensor" else _pcb_streamed)
