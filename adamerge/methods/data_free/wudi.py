"""WUDI-Merging (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It: Guiding Data-Free Model
Merging via Task Vectors").

Per matrix layer (stacked ``[K, m, n]``, a linear layer's ``[out, in]`` weight), minimise over τ_m

    L(τ_m) = Σ_k ‖(τ_m − τ_k) τ_kᵀ‖²_F / ‖τ_k‖²_F

by ``steps`` Adam steps (learning rate ``lr``, β = (0.9, 0.999), ε = 1e−8, no weight decay) from ``τ_m = Σ_k τ_k``;
delta = τ_m, with no scaling coefficient. The gradient is computed in closed form,

    ∇L = 2 (τ_m A − B),   A = Σ_k τ_kᵀ τ_k / ‖τ_k‖²,   B = Σ_k τ_k τ_kᵀ τ_k / ‖τ_k‖²,

with A (``[n, n]``) and B formed once per layer, so a step costs one ``[m, n] × [n, n]`` product instead of the
2K products of autograd on L (the same gradient up to float rounding; Adam then takes the same step: the tests
match an autograd reference to 1e-5). With at most one non-zero task the initial sum is already the minimum
(L = 0, autograd's gradient exactly 0) and is returned as is.
Deterministic (no randomness); float32 on the task vectors' device, or on ``device`` when given (the authors run
on a GPU: 300 steps on every layer of a ViT-B/32 take minutes on a CPU, seconds on a GPU); the result comes back
to the task vectors' device.

Checked against the authors' ``get_redundant_task_vector`` (nathanielyvo/WUDI-Merging, vit/wudi_main.py:42-62:
``Parameter(sum(vectors))``, ``Adam(lr=1e-5, weight_decay=0)``, the loss above, ``--iter`` default 300 in
vit/args.py) and FusionBench's ``wudi_merging`` (fusion_bench/method/wudi/wudi.py:17-60, ``iter_num: 400`` in
config/method/wudi/wudi.yaml).

Tensors that are not matrices (``non_matrix``):

* ``"zero"`` (default, the authors' ViT script): they keep their pretrained values. The script merges only the
  transformer blocks' linear weights (``attn.in_proj_weight``, ``attn.out_proj.weight``, ``mlp.c_fc.weight``,
  ``mlp.c_proj.weight``, vit/wudi_main.py:68) and ``TaskVector.apply_to`` skips every other key
  (vit/task_vectors.py:75-80); here every 2-D tensor is treated as a linear layer (FusionBench's rule), so a 2-D
  position embedding is optimised too — exclude it with the model pool's ``exclude`` patterns to match the script.
* ``"mean"`` (FusionBench, wudi.py:55-56): ``mean_k τ_k``.

``pointwise_convs`` (default on): a ``1 × 1`` convolution is the linear layer ``[out, in]`` it computes and is
optimised like one (:mod:`~adamerge.methods.data_free.spectral`); the authors merged no CNN.

This follows the authors' code over /work/shared/ALGORITHMS.md, which says non-matrix tensors fall back to task
arithmetic. A task whose matrix is all zero is left out of L (its term is 0/0 in the authors' code, which turns
every value into NaN); it still adds its zeros to the initial sum.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from adamerge.methods.checks import check_bool, check_choice, check_int, check_positive, fail
from adamerge.methods.data_free import spectral
from adamerge.methods.data_free.static import static_method
from adamerge.pool.task_vectors import TaskVectors

NON_MATRIX: tuple[str, ...] = ("zero", "mean")


def _check_device(value: Any) -> None:
    if value is None:
        return
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as error:
        raise fail("wudi", "device", value, f"must be null or a torch device such as 'cpu' or 'cuda' ({error})")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise fail("wudi", "device", value, "asks for CUDA, which is not available here; use null or 'cpu'")


def _validate_wudi(num_tasks: int, hparams: Mapping[str, Any]) -> None:
    check_int("wudi", "steps", hparams["steps"], minimum=0)
    check_positive("wudi", "lr", hparams["lr"])
    check_choice("wudi", "non_matrix", hparams["non_matrix"], NON_MATRIX)
    _check_device(hparams["device"])
    check_bool("wudi", "pointwise_convs", hparams["pointwise_convs"])


def wudi_objective(merged: Tensor, x: Tensor) -> Tensor:
    """``Σ_k ‖(merged − x_k) x_kᵀ‖²_F / ‖x_k‖²_F`` over the tasks with a non-zero ``x_k`` (``x``: ``[K, m, n]``)."""
    loss = merged.new_zeros(())
    for task in x.float():
        norm = task.square().sum()
        if norm > 0:
            loss = loss + ((merged - task) @ task.T).square().sum() / norm
    return loss


def wudi_matrix(x: Tensor, steps: int = 300, lr: float = 1e-5) -> Tensor:
    """WUDI of one layer (``x``: ``[K, m, n]`` float32): ``steps`` Adam steps on L from ``Σ_k x_k``."""
    merged = x.sum(dim=0).clone()
    active = [task for task in x if task.square().sum() > 0]
    if steps == 0 or len(active) <= 1:
        # One non-zero task: the initial sum is that task, where L = 0 and autograd's gradient is exactly 0 (so
        # Adam never moves); the closed form's rounding noise would be amplified by Adam into lr-sized steps.
        return merged
    gram = x.new_zeros(x.shape[2], x.shape[2])  # A = Σ_k x_kᵀ x_k / ‖x_k‖²
    target = torch.zeros_like(merged)  # B = Σ_k x_k (x_kᵀ x_k) / ‖x_k‖²
    for task in active:
        norm = task.square().sum()
        task_gram = task.T @ task
        gram += task_gram / norm
        target += (task @ task_gram) / norm
        del task_gram
    optimizer = torch.optim.Adam([merged], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    for _ in range(steps):
        merged.grad = 2 * (merged @ gram - target)
        optimizer.step()
    merged.grad = None
    return merged


@static_method("wudi", _validate_wudi)
def wudi(
    task_vectors: TaskVectors,
    *,
    steps: int = 300,
    lr: float = 1e-5,
    non_matrix: str = "zero",
    device: str | None = None,
    pointwise_convs: bool = True,
) -> dict[str, Tensor]:
    """WUDI-Merging (Cheng et al. 2025): per linear layer, Adam on Σ_k ‖(τ_m − τ_k) τ_kᵀ‖² / ‖τ_k‖² from Σ_k τ_k."""

    def matrix(x: Tensor) -> Tensor:
        home = x.device
        with torch.no_grad():
            return wudi_matrix(x.to(device) if device is not None else x, steps, lr).to(home)

    def other(x: Tensor) -> Tensor:
        return spectral.task_mean(x) if non_matrix == "mean" else torch.zeros_like(x[0])

    return spectral.merge_layers(task_vectors, matrix, other, pointwise_convs)
