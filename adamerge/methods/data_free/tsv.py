"""TSV-M: Task Singular Vectors - merge (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task
Interference in Model Merging").

Per matrix layer, with ``τ_k = U_k diag(S_k) V_kᵀ`` (thin SVD, rank r = min(m, n)) and ``c = ⌊r · f⌋`` kept
components per task (``f = rank_fraction``, default 1/K so that the K tasks fill the rank):

    Û = [U_1[:, :c] … U_K[:, :c]]    Ŝ = [S_1[:c] … S_K[:c]]    V̂ᵀ = [V_1ᵀ[:c]; …; V_Kᵀ[:c]]
    Û⊥ = polar(Û),  V̂ᵀ⊥ = polar(V̂ᵀ)     (polar(A) = P Qᵀ for A = P Σ Qᵀ, the authors' ``u_u @ v_u``)
    delta = α · Û⊥ diag(Ŝ) V̂ᵀ⊥

Tensors that are not 2-D matrices (biases, LayerNorm, scalars, 4-D conv kernels) get ``α · mean_k τ_k``; 2-D
embeddings (e.g. position embeddings) are matrices and are merged as above. Checked against the authors'
``compute_and_sum_svd_mem_reduction`` (AntoAndGar/task_singular_vectors, src/utils/TSVM_utils.py:303-377) and
FusionBench's copy (fusion_bench/method/task_singular_vector/utils/TSVM_utils.py:314-428, TSVM.py).

Where this follows the authors' code rather than /work/shared/ALGORITHMS.md:

* Non-matrix tensors are *averaged*, not summed (task arithmetic): the authors' running mean
  ``new_vector[key] += (vec - new_vector[key]) / (i + 1)`` (TSVM_utils.py:358-361), and α then scales the whole
  merged vector, means included (their evaluation scales the full task vector; FusionBench TSVM.py multiplies the
  merged state dict by α).
* α defaults to 1 (FusionBench config/method/task_singular_vector/TaskSingularVectorMerging.yaml ``alpha: 1``); the
  authors' script picks α on validation data (src/eval/eval_utils.py, ``find_optimal_coef``), which a data-free
  method cannot do.

Differences from the authors' code, all without effect on ordinary layers:

* The authors place the kept vectors in zero-padded ``[m, r]`` buffers before orthogonalising. When the
  concatenation has full column rank (always, for generic task vectors) the padded and compact forms give the
  same product, because padded columns meet zero singular values; this module keeps the compact ``[m, K·c]``
  form, which also allows ``K·c > r`` (``rank_fraction > 1/K``, which does not fit the authors' buffers; then
  ``Û⊥`` has orthonormal rows instead of columns).
* ``c = ⌊r · f⌋`` is computed exactly: the authors' ``int(r * (1 / K))`` can lose one to float rounding
  (``int(49 * (1 / 49)) == 0``). When ``c = 0`` (r < K) the layer's delta is zero, as in the authors' code.
* As in the authors' code, a task matrix of rank below ``c`` (or all zero) contributes singular vectors of zero
  singular values that are whatever the SVD routine returns; they carry no weight themselves but take part in the
  orthogonalisation. The result is finite and deterministic on a given device.
* The authors skip SVD for keys containing ``text_projection`` (an OpenCLIP text-tower weight whose task vector is
  zero there); this module has no name rule: exclude tensors with the model pool's ``exclude`` patterns instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from adamerge.methods.checks import check_bool, check_range, check_scaling
from adamerge.methods.data_free import spectral, steps
from adamerge.methods.data_free.static import static_method
from adamerge.pool.task_vectors import TaskVectors


def _validate_tsv_merge(num_tasks: int, hparams: Mapping[str, Any]) -> None:
    if hparams["rank_fraction"] is not None:
        check_range(
            "tsv_merge", "rank_fraction", hparams["rank_fraction"], low_open=True, high_open=False,
            hint=" or null (1/K: each of the K tasks keeps 1/K of each layer's rank)",
        )
    check_scaling("tsv_merge", "alpha", hparams["alpha"], num_tasks, per_task=False)
    check_bool("tsv_merge", "pointwise_convs", hparams["pointwise_convs"])


def components_per_task(rank: int, num_tasks: int, rank_fraction: float | None) -> int:
    """``⌊rank / K⌋`` by default, else ``⌊rank · rank_fraction⌋`` (exact, free of float noise)."""
    if rank_fraction is None:
        return rank // num_tasks
    return steps.count_to_drop(rank_fraction, rank)


def tsv_matrix(x: Tensor, rank_fraction: float | None = None) -> Tensor:
    """TSV-M of one layer: ``x`` is ``[K, m, n]`` float; returns ``Û⊥ diag(Ŝ) V̂ᵀ⊥`` (``[m, n]``, before α)."""
    factors = _orthogonalised_factors(x, rank_fraction)
    if factors is None:
        return x.new_zeros(x.shape[1:], dtype=torch.float32)
    u_orth, singular_values, vh_orth, _ = factors
    return (u_orth * singular_values) @ vh_orth


def tsv_pieces(x: Tensor, rank_fraction: float | None = None) -> Tensor:
    """Each task's share of the TSV-M layer (``[K, m, n]``): task k's block of columns of ``Û⊥``, its kept
    singular values and its block of rows of ``V̂ᵀ⊥``; they sum to :func:`tsv_matrix`."""
    factors = _orthogonalised_factors(x, rank_fraction)
    if factors is None:
        return torch.zeros_like(x, dtype=torch.float32)
    u_orth, singular_values, vh_orth, keep = factors
    blocks = [slice(k * keep, (k + 1) * keep) for k in range(x.shape[0])]
    return torch.stack([(u_orth[:, b] * singular_values[b]) @ vh_orth[b] for b in blocks])


def _orthogonalised_factors(x: Tensor, rank_fraction: float | None) -> tuple[Tensor, Tensor, Tensor, int] | None:
    """``(Û⊥, Ŝ, V̂ᵀ⊥, c)`` of one layer (tasks' blocks of ``c`` components side by side); None when ``c = 0``."""
    num_tasks, rows, cols = x.shape
    keep = components_per_task(min(rows, cols), num_tasks, rank_fraction)
    if keep == 0:
        return None
    us, ss, vhs = [], [], []
    for k in range(num_tasks):  # one task's full SVD at a time; only its top `keep` triplets are kept
        u, s, vh = spectral.top_components(x[k], keep)
        us.append(u)
        ss.append(s)
        vhs.append(vh)
    u_orth = spectral.polar_factor(torch.cat(us, dim=1))
    del us
    vh_orth = spectral.polar_factor(torch.cat(vhs, dim=0))
    del vhs
    return u_orth, torch.cat(ss), vh_orth, keep


@static_method("tsv_merge", _validate_tsv_merge)
def tsv_merge(
    task_vectors: TaskVectors, *, rank_fraction: float | None = None, alpha: float = 1.0, pointwise_convs: bool = True
) -> dict[str, Tensor]:
    """TSV-M (Gargiulo et al. 2025): per layer keep each task's top singular vectors, orthogonalise, × α.

    ``rank_fraction`` null keeps ⌊r/K⌋ components per task; tensors that are not matrices get α · mean_k τ_k
    (``pointwise_convs``: 1 × 1 convolutions are matrices, see :mod:`~adamerge.methods.data_free.spectral`).
    """
    return spectral.scaled_merge(task_vectors, lambda x: tsv_matrix(x, rank_fraction), alpha, pointwise_convs)
