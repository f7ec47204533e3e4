"""Iso-C and Iso-CTS (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces").

Iso-C, per matrix layer: ``Σ_k τ_k = U diag(S) Vᵀ`` (thin SVD, r = min(m, n) values), then

    delta = α · mean(S) · U Vᵀ          (every singular value replaced by the mean of all r of them)

Iso-CTS, per matrix layer, with ``c`` common and ``t`` task-specific directions per task (``c + K·t = r``):

    common: the top c singular triplets (U_c, S_c, V_cᵀ) of Σ_k τ_k
    task k: the top t singular triplets of the residual  τ_k − U_c U_cᵀ τ_k
    Û = [U_1 … U_K U_c],  Ŝ = [S_1 … S_K S_c],  V̂ᵀ = [V_1ᵀ; …; V_Kᵀ; V_cᵀ]
    delta = α · mean(Ŝ) · polar(Û) polar(V̂ᵀ)

with ``c = ⌊r · common_space_fraction⌋`` first, then ``t = round((r − c) / K)`` (half to even) and ``c = r − K·t``
so that the task-specific part divides evenly among the tasks.

Tensors that are not 2-D matrices (biases, norms, scalars, 4-D conv kernels) get ``α · mean_k τ_k`` in both.
Checked against the authors' ``iso_c`` / ``iso_cts`` (danielm1405/iso-merging, src/utils/iso.py:5-27 and 30-104)
and FusionBench's copy (fusion_bench/method/isotropic_merging/iso_utils.py, iso.py).

Where this follows the authors' code rather than /work/shared/ALGORITHMS.md:

* Non-matrix tensors are averaged (``sum(tvs) / len(tvs)``, iso.py:12 and the running mean at iso.py:42-47), not
  summed, and α scales them too (their evaluation and FusionBench's ``state_dict_mul(merged_tv, scaling_factor)``
  scale the whole merged vector).
* Iso-CTS flattens the spectrum of the *concatenated* singular values Ŝ (common and task-specific together,
  iso.py:94) and orthogonalises Û and V̂ᵀ with the polar factor (iso.py:87-91).
* α: the authors choose it on validation data (src/eval/eval_utils.py, ``find_optimal_coef``); the defaults here
  are the values the paper reports for ViT-B/32 on 8 tasks (1.3 for Iso-C, 1.5 for Iso-CTS). FusionBench uses 1.5
  for both (docs/modelpool/clip_vit.md: 82.8 / 82.7).

Differences from the authors' code, without effect in ordinary cases:

* ``c = ⌊r · fraction⌋`` and ``t`` are computed exactly (the authors' ``int(r * fraction)`` can lose one to float
  rounding); where their rounding would make ``K·t > r`` (a small fraction with r < 2K) and the common size
  negative, ``t`` becomes ``⌊r / K⌋``.
* No ``text_projection`` name rule (see :mod:`adamerge.methods.data_free.tsv`); use the model pool's ``exclude`` patterns.

As in the authors' code, the directions of zero singular values (a rank-deficient sum; an all-zero or low-rank
residual in Iso-CTS) are whatever the SVD routine returns and receive the mean singular value like the others:
the result stays finite and deterministic on a given device, but those directions are arbitrary.
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from adamerge.methods.checks import check_bool, check_range, check_scaling
from adamerge.methods.data_free import spectral, steps
from adamerge.methods.data_free.static import static_method
from adamerge.pool.task_vectors import TaskVectors


def _validate_iso_c(num_tasks: int, hparams: Mapping[str, Any]) -> None:
    check_scaling("iso_c", "alpha", hparams["alpha"], num_tasks, per_task=False)
    check_bool("iso_c", "pointwise_convs", hparams["pointwise_convs"])


def _validate_iso_cts(num_tasks: int, hparams: Mapping[str, Any]) -> None:
    check_range("iso_cts", "common_space_fraction", hparams["common_space_fraction"], low_open=False, high_open=False)
    check_scaling("iso_cts", "alpha", hparams["alpha"], num_tasks, per_task=False)
    check_bool("iso_cts", "pointwise_convs", hparams["pointwise_convs"])


Factors = tuple[Tensor, Tensor, Tensor]


def iso_c_matrix(x: Tensor, total: Factors | None = None) -> Tensor:
    """Iso-C of one layer (``x``: ``[K, m, n]``): ``mean(S) · U Vᵀ`` of ``Σ_k x_k``, before α (``total``: that sum's
    SVD when the caller already has it)."""
    u, s, vh = total if total is not None else spectral.svd(x.sum(dim=0))
    return (u * spectral.flat_spectrum(s)) @ vh


def contribution_pieces(merged: Tensor, x: Tensor, total: Factors | None = None) -> Tensor:
    """Split a merged layer ``M`` (``[m, n]``) among the K tasks (``x``: ``[K, m, n]``) by their share of the summed
    matrix ``T = Σ_k x_k``: ``p_k = M T⁺ x_k + (M − M T⁺ T) / K``, so that ``Σ_k p_k = M`` exactly.

    ``T⁺`` is the pseudo-inverse (singular values below ``max(m, n) · eps · S_max`` count as zero, as in
    ``numpy.linalg.pinv``); ``M T⁺ T`` is ``M`` on ``T``'s row space, and what lies outside it (Iso-C's directions
    of zero singular value) is shared equally. For Iso-C (``M = mean(S) · U Vᵀ``) this is
    ``p_k = mean(S) · U diag(1/S) Uᵀ τ_k``: each task's vector seen through the flattened spectrum. ``total``: the
    SVD of ``T`` when the caller already has it.
    """
    u, s, vh = total if total is not None else spectral.svd(x.sum(dim=0))
    kept = s > (s[0] * max(x.shape[1:]) * torch.finfo(torch.float32).eps if s.numel() else 0)
    left = (merged @ vh[kept].mT) / s[kept]  # M V S⁻¹ on the kept directions: [m, r']
    pieces = torch.stack([left @ (u[:, kept].mT @ task) for task in x])
    del left
    return pieces + (merged - pieces.sum(dim=0)) / x.shape[0]


def iso_c_pieces(x: Tensor) -> Tensor:
    """Each task's share of the Iso-C layer (α = 1): :func:`contribution_pieces` of :func:`iso_c_matrix`."""
    total = spectral.svd(x.sum(dim=0))  # one SVD of the sum serves the merge and its split
    return contribution_pieces(iso_c_matrix(x, total), x, total)


def iso_cts_pieces(x: Tensor, common_space_fraction: float) -> Tensor:
    """Each task's share of the Iso-CTS layer (α = 1): :func:`contribution_pieces` of :func:`iso_cts_matrix`."""
    return contribution_pieces(iso_cts_matrix(x, common_space_fraction), x)


def subspace_sizes(rank: int, num_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """``(c, t)``: common directions and task-specific directions per task, ``c + K·t = rank``."""
    common = steps.count_to_drop(common_space_fraction, rank)
    per_task = round(Fraction(rank - common, num_tasks))  # Python's round: half to even, as the authors' round()
    if per_task * num_tasks > rank:
        per_task = rank // num_tasks
    return rank - per_task * num_tasks, per_task


def iso_cts_matrix(x: Tensor, common_space_fraction: float) -> Tensor:
    """Iso-CTS of one layer (``x``: ``[K, m, n]``): ``mean(Ŝ) · polar(Û) polar(V̂ᵀ)``, before α."""
    num_tasks, rows, cols = x.shape
    common, per_task = subspace_sizes(min(rows, cols), num_tasks, common_space_fraction)
    u_c, s_c, vh_c = spectral.top_components(x.sum(dim=0), common)
    us, ss, vhs = [], [], []
    if per_task:
        for k in range(num_tasks):  # one residual's SVD at a time
            residual = x[k] - u_c @ (u_c.T @ x[k])
            u, s, vh = spectral.top_components(residual, per_task)
            del residual
            us.append(u)
            ss.append(s)
            vhs.append(vh)
    spectrum = spectral.flat_spectrum(torch.cat([*ss, s_c]))
    u_orth = spectral.polar_factor(torch.cat([*us, u_c], dim=1))
    del us, u_c
    vh_orth = spectral.polar_factor(torch.cat([*vhs, vh_c], dim=0))
    return (u_orth * spectrum) @ vh_orth


@static_method("iso_c", _validate_iso_c)
def iso_c(task_vectors: TaskVectors, *, alpha: float = 1.3, pointwise_convs: bool = True) -> dict[str, Tensor]:
    """Iso-C (Marczak et al. 2025): per layer, flatten the spectrum of Σ_k τ_k to its mean, × α."""
    return spectral.scaled_merge(task_vectors, iso_c_matrix, alpha, pointwise_convs)


@static_method("iso_cts", _validate_iso_cts)
def iso_cts(
    task_vectors: TaskVectors, *, common_space_fraction: float = 0.8, alpha: float = 1.5, pointwise_convs: bool = True
) -> dict[str, Tensor]:
    """Iso-CTS (Marczak et al. 2025): common subspace of Σ_k τ_k plus task-specific directions, flattened, × α."""
    return spectral.scaled_merge(task_vectors, lambda x: iso_cts_matrix(x, common_space_fraction), alpha,
                                 pointwise_convs)
