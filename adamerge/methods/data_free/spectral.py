"""SVD steps shared by the spectral merges (TSV-M, Iso-C, Iso-CTS): decompose, truncate, orthogonalise, flatten.

A *layer* here is one mergeable tensor whose per-task values are matrices: stacked ``[K, m, n]``. Every other
tensor (biases, norms, scalars, spatial convolution kernels) is not a matrix and takes the method's fallback, as
the authors' code does (it tests ``len(shape) == 2``; conv kernels and 1-D tensors are averaged there).

``pointwise_convs`` (default on) also treats ``1 × 1`` convolution kernels ``[out, in, 1, 1]`` as the ``[out, in]``
linear maps they are, the only change for CNNs: the authors merged only ViTs and LMs, and a CNN such as the demo's
EfficientNet has no 2-D weight besides its head, so without it every spectral method degenerates to its fallback
there. The merged matrix is reshaped back to ``[out, in, 1, 1]``.

Memory: :func:`merge_layers` hands one layer at a time to the method and keeps only the merged ``[m, n]`` result,
and :func:`top_components` copies the kept singular vectors out of the full factors, so at most ONE layer's
decompositions are alive at any time (the full ``U``/``Vᵀ`` of a task are freed as soon as its top part is copied).
Compute is float32 on the task vectors' device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from adamerge.pool.task_vectors import TaskVectors

Deltas = dict[str, Tensor]


def is_matrix(x: Tensor) -> bool:
    """Whether stacked task values ``x`` (``[K, *shape]``) are 2-D matrices with no empty side."""
    return x.dim() == 3 and x.shape[1] > 0 and x.shape[2] > 0


def matrix_view(stacked: Tensor, pointwise_convs: bool = True) -> Tensor | None:
    """The ``[K, m, n]`` matrices of a stacked tensor: 2-D tensors, and (``pointwise_convs``) ``1 × 1`` convolution
    kernels ``[K, out, in, 1, 1]``, which are linear maps; None for everything else."""
    if pointwise_convs and stacked.dim() == 5 and stacked.shape[3:] == (1, 1):
        stacked = stacked[..., 0, 0]
    return stacked if is_matrix(stacked) else None


def svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``matrix = U diag(S) Vᵀ`` in float32: ``U [m, r]``, ``S [r]`` descending, ``Vᵀ [r, n]``, r = min(m, n).

    A wide matrix is decomposed through its transpose (``Aᵀ = V S Uᵀ``): the same factorisation, about three
    times faster with PyTorch's CPU LAPACK for a ``768 × 3072`` matrix. LAPACK's divide and conquer can fail to
    converge on matrices with many (near-)repeated singular values, such as Iso-CTS residuals with most of their
    spectrum at zero; the other orientation is then tried, then float64, before the error is raised.
    """
    matrix = matrix.float()
    wide = matrix.shape[-2] < matrix.shape[-1]
    attempts = [(matrix.mT, True), (matrix, False)] if wide else [(matrix, False), (matrix.mT, True)]
    attempts.append((matrix.double(), False))
    for i, (candidate, transposed) in enumerate(attempts):
        try:
            u, s, vh = torch.linalg.svd(candidate, full_matrices=False)
        except torch.linalg.LinAlgError:
            if i == len(attempts) - 1:
                raise
            continue
        if transposed:
            u, vh = vh.mT, u.mT
        return u.float(), s.float(), vh.float()
    raise AssertionError("unreachable")


def top_components(matrix: Tensor, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``count`` leading singular triplets of ``matrix``, copied so the full factors can be freed.

    Returns ``U[:, :count]``, ``S[:count]``, ``Vᵀ[:count]``; ``count = 0`` gives empty factors.
    """
    u, s, vh = svd(matrix)
    kept = u[:, :count].clone(), s[:count].clone(), vh[:count].clone()
    del u, s, vh
    return kept


def polar_factor(matrix: Tensor) -> Tensor:
    """The orthogonal polar factor ``P = U Vᵀ`` of ``matrix = U diag(S) Vᵀ``: the nearest matrix (Frobenius) with
    orthonormal columns (tall) or rows (wide).

    This is how TSV-M and Iso-CTS orthogonalise concatenated singular vectors (``u_u @ v_u`` after an SVD of the
    concatenation in both authors' code). With linearly dependent columns ``P`` is not unique; it is then whatever
    the SVD routine returns, which is deterministic for a given device.
    """
    u, _, vh = svd(matrix)
    return u @ vh


def flat_spectrum(singular_values: Tensor) -> Tensor:
    """Every singular value replaced by their mean (Iso-C's isotropic spectrum)."""
    if singular_values.numel() == 0:
        return singular_values.clone()
    return singular_values.mean().expand_as(singular_values).clone()


def task_mean(x: Tensor) -> Tensor:
    """``mean_k τ_k`` in float32: the spectral methods' fallback for tensors that are not matrices."""
    return x.float().mean(dim=0)


def merge_layers(
    task_vectors: TaskVectors,
    matrix_fn: Callable[[Tensor], Tensor],
    other_fn: Callable[[Tensor], Tensor] = task_mean,
    pointwise_convs: bool = True,
) -> Deltas:
    """``{name: matrix_fn(x)}`` for matrix layers and ``{name: other_fn(x)}`` for the rest, one layer at a time.

    ``x`` is the float32 stack on the task vectors' device: ``[K, m, n]`` for ``matrix_fn`` (a ``1 × 1``
    convolution seen as its matrix when ``pointwise_convs``), ``[K, *shape]`` for ``other_fn``; the functions return
    the merged delta (``[m, n]`` / ``shape``) or per-task pieces (``[K, m, n]`` / ``[K, *shape]``), given back the
    tensor's shape behind their leading dimensions.
    """
    deltas = {}
    for name, stacked in task_vectors.vectors.items():
        x = stacked.float()
        matrices = matrix_view(x, pointwise_convs)
        if matrices is None:
            deltas[name] = other_fn(x)
        else:
            merged = matrix_fn(matrices)
            deltas[name] = merged.reshape(*merged.shape[:-2], *x.shape[1:])
        del x, matrices
    return deltas


def scaled_merge(task_vectors: TaskVectors, matrix_fn: Callable[[Tensor], Tensor], alpha: float,
                 pointwise_convs: bool = True) -> Deltas:
    """``α · matrix_fn(x)`` on matrix layers and ``α · mean_k τ_k`` on the rest: the form of TSV-M, Iso-C and Iso-CTS
    (the authors average the tensors that are not matrices, and α scales the whole merged vector)."""
    scale = float(alpha)
    return merge_layers(task_vectors, lambda x: scale * matrix_fn(x), lambda x: scale * task_mean(x), pointwise_convs)
