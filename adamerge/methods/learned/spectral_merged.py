"""AdaRank's merged model: each matrix task vector kept as its SVD factors, one mask logit per task and singular
component, and the merge over the masked factors (see :mod:`adamerge.methods.learned.adarank` for the algorithm and
where it follows the authors' code).

    θ_l = θ0_l + Σ_k λ_{k,l} U_k diag(m_k ⊙ s_k) V_kᵀ   (matrix layers; other tensors merge as layer-wise AdaMerging)

The factors replace the raw ``[K, m, n]`` stack on the device: ``K·r(m + n + 1)`` numbers per layer at full rank instead
of ``K·m·n`` (:meth:`SpectralMergedModel.memory_report`). The merge of a layer is :func:`spectral_sum`, whose backward
forms no ``[m, K·r]`` product.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from adamerge.methods.data_free import spectral
from adamerge.methods.learned.merged import MergedModel
from adamerge.pool.key_filters import select_tensors
from adamerge.pool.task_vectors import TaskVectors

__all__ = ["SpectralMergedModel", "centred_at_average", "spectral_sum"]


class _SpectralSum(torch.autograd.Function):
    """``Σ_k U_k diag(c_k) V_kᵀ`` with a gradient to ``c`` only, saving no ``[m, K·r]`` product for backward.

    ``∂L/∂c_{k,i} = u_{k,i}ᵀ G v_{k,i}`` for the output gradient ``G``.
    """

    @staticmethod
    def forward(ctx: Any, c: Tensor, u: Tensor, vh: Tensor) -> Tensor:
        ctx.save_for_backward(u, vh)
        k, m, r = u.shape
        scaled = (u.to(c.dtype) * c[:, None, :]).permute(1, 0, 2).reshape(m, k * r)
        return scaled @ vh.to(c.dtype).reshape(k * r, -1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        u, vh = ctx.saved_tensors
        u, vh = u.to(grad.dtype), vh.to(grad.dtype)
        if u.shape[1] <= vh.shape[2]:  # the smaller transient: [K, m, r] or [K, r, n]
            return ((grad @ vh.mT) * u).sum(1), None, None
        return ((u.mT @ grad) * vh).sum(2), None, None


def spectral_sum(c: Tensor, u: Tensor, vh: Tensor) -> Tensor:
    return _SpectralSum.apply(c, u, vh)


def centred_at_average(task_vectors: TaskVectors) -> TaskVectors:
    """CART's origin: θ0 ← mean_k θ_k and τ_k ← θ_k − mean_j θ_j (merged tensors only)."""
    pretrained, vectors = dict(task_vectors.pretrained), {}
    for name, stacked in task_vectors.vectors.items():
        mean = stacked.float().mean(0)
        pretrained[name] = (pretrained[name].float() + mean).to(pretrained[name].dtype)
        vectors[name] = (stacked.float() - mean).to(stacked.dtype)
    return TaskVectors(list(task_vectors.task_names), pretrained, vectors, dict(task_vectors.aliases),
                       task_vectors.unscored_tasks)


class SpectralMergedModel(MergedModel):
    """Layer-wise merged model whose matrix task vectors are kept as SVD factors with per-component mask logits.

    ``rank_logits[j]`` (``[K, stored rank]``) belongs to tensor ``svd_names[j]``; its raw ``[K, m, n]`` buffer is
    replaced by the factors ``_u_j [K, m, r]``, ``_s_j [K, r]`` (float32), ``_vh_j [K, r, n]``.
    """

    def __init__(self, module: nn.Module, task_vectors: TaskVectors, *, init_value: float | Sequence[float] = 0.3,
                 clamp: tuple[float, float] | None = None, layer_groups: Sequence[int] | None = None,
                 svd_patterns: Sequence[str] | str | None = None, max_rank_ratio: float | None = None,
                 initial_rank_ratio: float = 1.0, initial_logit: float = 0.1, temperature: float = 10.0,
                 pointwise_convs: bool = True) -> None:
        super().__init__(module, task_vectors, granularity="layer_wise", init_value=init_value, clamp=clamp,
                         layer_groups=layer_groups)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        chosen = select_tensors(self.names, svd_patterns, what="svd_patterns")
        self.svd_names = [
            n for n in chosen if spectral.matrix_view(task_vectors.vectors[n], pointwise_convs) is not None
        ]
        if not self.svd_names:
            raise ValueError(f"AdaRank needs a 2-D merged tensor (or 1x1 convolution) to decompose; none among "
                             f"{chosen[:5]}")
        self._slot = {self.names.index(name): slot for slot, name in enumerate(self.svd_names)}
        self.full_rank: dict[str, int] = {}
        logits = []
        for slot, name in enumerate(self.svd_names):  # one layer's decompositions alive at a time
            stacked = spectral.matrix_view(task_vectors.vectors[name], pointwise_convs)
            full = min(stacked.shape[1:])
            stored = full if max_rank_ratio is None else max(1, int(max_rank_ratio * full))
            factors = [spectral.top_components(stacked[k], stored) for k in range(task_vectors.num_tasks)]
            u, s, vh = (torch.stack([f[i] for f in factors]) for i in range(3))
            self.register_buffer(f"_u_{slot}", u.to(stacked.dtype), persistent=False)
            self.register_buffer(f"_s_{slot}", s, persistent=False)  # float32
            self.register_buffer(f"_vh_{slot}", vh.to(stacked.dtype), persistent=False)
            del factors, u, s, vh
            index = self.names.index(name)  # the factors replace the raw stack on the device
            self.register_buffer(f"_task_vector_{index}", stacked.new_empty((stacked.shape[0], 0)), persistent=False)
            self.full_rank[name] = full
            logit = torch.full((task_vectors.num_tasks, stored), -float(initial_logit))
            logit[:, : int(full * initial_rank_ratio)] = float(initial_logit)
            logits.append(nn.Parameter(logit))
        self.rank_logits = nn.ParameterList(logits)

    def factors(self, slot: int) -> tuple[Tensor, Tensor, Tensor]:
        return getattr(self, f"_u_{slot}"), getattr(self, f"_s_{slot}"), getattr(self, f"_vh_{slot}")

    def task_vector(self, index: int) -> Tensor:
        """The stacked ``[K, *shape]`` task vectors; matrix layers rebuilt from their (stored) factors."""
        if index not in self._slot:
            return super().task_vector(index)
        u, s, vh = self.factors(self._slot[index])
        shape = self.pretrained_tensors()[self.names[index]].shape
        return ((u.float() * s[:, None, :]) @ vh.float()).to(u.dtype).reshape(u.shape[0], *shape)

    def hard_masks(self) -> list[Tensor]:
        """``1[ℓ > 0]`` per logit: the evaluation/export mask (no gradient)."""
        return [(logit.detach() > 0).to(logit.dtype) for logit in self.rank_logits]

    def straight_through_masks(self) -> list[Tensor]:
        """The hard masks in the forward, with the gradient of ``σ(ℓ / T)`` in the backward."""
        masks = []
        for logit, hard in zip(self.rank_logits, self.hard_masks()):
            p = torch.sigmoid(logit / self.temperature)
            masks.append(hard + (p - p.detach()))
        return masks

    def merged_weights(self, mask: Mapping[str, Tensor] | None = None, coefficients: Tensor | None = None,
                       rank_masks: Sequence[Tensor] | None = None) -> dict[str, Tensor]:
        """θ0 + Σ_k λ_k τ'_k, ``τ'`` the masked low-rank form of matrix layers (``rank_masks``: the hard masks by
        default); ``mask`` and ``coefficients`` as :meth:`MergedModel.merged_weights`."""
        rank_masks = self.hard_masks() if rank_masks is None else rank_masks

        def masked_low_rank_delta(index: int, row: Tensor, shape: torch.Size) -> Tensor:
            if index not in self._slot:
                return self.task_delta(index, row, shape)
            u, s, vh = self.factors(self._slot[index])
            c = row[:, None] * rank_masks[self._slot[index]].to(row.dtype) * s.to(row.dtype)
            return spectral_sum(c, u, vh).reshape(shape)

        return self.merge_deltas(self.coefficient_rows(coefficients), mask, masked_low_rank_delta)

    @torch.no_grad()
    def kept_ranks(self) -> dict[str, list[int]]:
        return {name: [int(v) for v in m.sum(1).tolist()] for name, m in zip(self.svd_names, self.hard_masks())}

    def memory_report(self) -> dict[str, int | float]:
        """Bytes of the factors and logits against the raw task vectors layer-wise AdaMerging keeps."""
        size = lambda t: t.numel() * t.element_size()  # noqa: E731
        factors = sum(size(t) for slot in range(len(self.svd_names)) for t in self.factors(slot))
        logits = sum(size(p) for p in self.rank_logits)
        kept_raw = sum(size(super(SpectralMergedModel, self).task_vector(i)) for i in range(len(self.names)))
        itemsize = self.factors(0)[0].element_size()
        replaced = sum(self.coefficients.shape[1] * self.pretrained_tensors()[n].numel() * itemsize
                       for n in self.svd_names)
        adamerging = kept_raw + replaced
        ours = kept_raw + factors + logits
        return {"factor_bytes": factors, "logit_bytes": logits, "raw_task_vector_bytes": kept_raw,
                "adamerging_task_vector_bytes": adamerging, "total_bytes": ours,
                "ratio_to_adamerging": ours / max(adamerging, 1)}
