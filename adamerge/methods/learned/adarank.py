"""AdaRank (Lee et al., ICLR 2026, "AdaRank: Adaptive Rank Pruning for Enhanced Model Merging").

Every task vector of a matrix layer is decomposed once, ``τ_{k,l} = U diag(s) Vᵀ`` (thin SVD, float32, one layer
at a time on the task vectors' device). A real logit ``ℓ`` per task and singular component carries a binary mask

    m = 1[ℓ > 0]  (forward),   ∂m/∂ℓ := ∂σ(ℓ/T)/∂ℓ = σ(ℓ/T)(1 − σ(ℓ/T))/T  (straight-through backward),
    θ_l = θ0_l + Σ_k λ_{k,l} U_k diag(m_k ⊙ s_k) V_kᵀ          (matrix layers),
    θ_l = θ0_l + Σ_k λ_{k,l} τ_{k,l}                            (biases, norms, conv kernels, ...),

with layer-wise λ (one row per merged tensor, as layer-wise AdaMerging). λ and the logits train together by the
module's test-time objective (entropy by default); evaluation and export use the hard mask.

Checked against the authors' code (david3684/AdaRank @ dfa5358):
vision/src/models/merge_vit/adaptive.py:59-62 (``straight_through_mask``: ``s_masked = p·s + ((p > 0.5) − p)·s``
detached, ``p = sigmoid(mask / mask_temp)``, line 120), :95-124 (the merge; λ ``merge_weight`` is ``[K, tensors]``
initialised to ``prior``, lines 37-39, clamped only when ``clamp_weights``, default false), :185-212 (initial logits
``+0.1`` for the first ``int(r · initial_rank_ratio)`` components, ``−0.1`` for the rest), vision/runner.py:204-217
(one Adam over λ and logits, lr ``config.lr``, betas (0.9, 0.999), no weight decay), vision/configs/adarank_B_T8/*.yaml
(TA: prior 0.3, initial_rank_ratio 1.0, mask_temp 10; CART: prior 2.3, initial_rank_ratio 0.16, mask_temp 10;
10,000 steps, batch 16, lr 1e-3); lm/model_merging_methods/adarank_roberta.py:43-58, 191-207 (same for GPT-2/RoBERTa).

Where this follows the code rather than /work/shared/ALGORITHMS.md: the initial rank ratio is 1.0 (all components
on) for a task-arithmetic origin and 0.16 only with the CART origin (``origin: average``: θ0 is the mean of the
fine-tuned models and τ_k are taken from it, with ``init_value: 2.3``); λ is not clamped by default; the mask
temperature (10) only scales the straight-through gradient, the forward mask is the hard threshold.
Differences from the code: ``m = 1[ℓ > 0]`` instead of ``σ(ℓ/T) > 0.5`` (equal unless float32 rounds σ to 0.5,
|ℓ/T| ≲ 1e-7), and the forward is exactly ``m·s`` (the code's ``p·s + (m − p)·s`` rounds); the decomposed layers
are every 2-D merged tensor (``svd_patterns`` restricts them; the vision code takes the ``attn``/``mlp`` weights,
the LM code every non-bias, non-norm encoder weight) and ``1 × 1`` convolution kernels (``pointwise_convs``: the
authors ran no CNN; EfficientNet has no 2-D tensor); ``max_rank_ratio`` may store only the leading components
(the code keeps all; the dropped tail never enters the merge); two Adam parameter groups give the logits their own
``mask_lr`` (the code: one lr for both).

Memory: the factors replace the raw matrix task vectors on the device. Full rank costs ``K·r(m + n + 1)`` instead
of ``K·m·n`` per layer (2× for square matrices, 1.25× for 768 × 3072), see
:meth:`~adamerge.methods.learned.spectral_merged.SpectralMergedModel.memory_report`; the factored merged model is
:mod:`adamerge.methods.learned.spectral_merged`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from adamerge.errors import ConfigError
from adamerge.methods import checks
from adamerge.methods.learned.adamerging import check_coefficient_learning, register_learned
from adamerge.methods.learned.spectral_merged import SpectralMergedModel, centred_at_average
from adamerge.objectives import Objective
from adamerge.pool.key_filters import resolve_layer_groups
from adamerge.pool.task_vectors import TaskVectors
from adamerge.training.module import AdaMergingModule

ORIGINS = ("pretrained", "average")
MASK_FILE = "adarank_masks.safetensors"
RANKS_FILE = "adarank_ranks.png"


class AdaRankModule(AdaMergingModule):
    """λ and the rank-mask logits learn together through the base step (one merge, one backward through it)."""

    merged: SpectralMergedModel

    def __init__(self, merged: SpectralMergedModel, heads: Mapping[str, nn.Module], *, mask_lr: float,
                 **kwargs: Any) -> None:
        super().__init__(merged, heads, **kwargs)
        self.mask_lr = mask_lr
        # An unscored vector (an alignment vector) enters whole: its mask logits are held at their initial values.
        self._held_rows = [merged.task_names.index(task) for task in merged.unscored_tasks]
        self._held_logits = [logit.detach()[self._held_rows].clone() for logit in merged.rank_logits]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.merged.coefficients, *self.merged.rank_logits]

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        if self._held_rows:
            if self._held_logits[0].device != self.merged.rank_logits[0].device:  # moved once, not every step
                self._held_logits = [held.to(logit.device) for logit, held in zip(self.merged.rank_logits,
                                                                                  self._held_logits)]
            for logit, held in zip(self.merged.rank_logits, self._held_logits):
                logit[self._held_rows] = held

    def configure_optimizers(self) -> torch.optim.Optimizer:
        super().configure_optimizers()  # the check that nothing else trains
        groups = [{"params": [self.merged.coefficients], "lr": self.lr},
                  {"params": list(self.merged.rank_logits), "lr": self.mask_lr}]
        return torch.optim.Adam(groups, betas=self.betas, weight_decay=self.weight_decay)

    def merged_weights(self) -> dict[str, Tensor]:
        return self.merged.merged_weights(rank_masks=self.merged.straight_through_masks())

    def eval_weights(self) -> dict[str, Tensor]:
        return self.merged.merged_weights()

    def export_extras(self) -> dict[str, Any]:
        """Kept rank per matrix layer and task, for merge_config.json."""
        kept = self.merged.kept_ranks()
        stored = {name: int(p.shape[1]) for name, p in zip(self.merged.svd_names, self.merged.rank_logits)}
        return {"adarank": {
            "rank_kept": kept,
            "full_rank": dict(self.merged.full_rank),
            "stored_rank": stored,
            "kept_fraction_total": sum(map(sum, kept.values())) / max(sum(stored.values()) * len(self.merged.task_names), 1),
            "temperature": self.merged.temperature,
            "memory": self.merged.memory_report(),
        }}

    def save_artifacts(self, directory: str | Path) -> list[Path]:
        """``adarank_masks.safetensors`` (the logits, ``[K, stored rank]`` per tensor) and ``adarank_ranks.png``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        logits = zip(self.merged.svd_names, self.merged.rank_logits)
        tensors = {name: p.detach().cpu().contiguous() for name, p in logits}
        metadata = {"format": "adamerge.adarank_masks", "temperature": str(self.merged.temperature),
                    "tasks": json.dumps(self.merged.task_names), "full_rank": json.dumps(self.merged.full_rank)}
        save_file(tensors, str(directory / MASK_FILE), metadata=metadata)
        return [directory / MASK_FILE, self._rank_heatmap(directory / RANKS_FILE)]

    def _rank_heatmap(self, path: Path) -> Path:
        """Layers × tasks, coloured by the kept fraction of the full rank r, cells labelled with the kept rank."""
        from adamerge.reporting.plots import heatmap_figure, png_bytes

        kept, full = self.merged.kept_ranks(), self.merged.full_rank
        fractions = [[r / full[name] for r in ranks] for name, ranks in kept.items()]
        fig = heatmap_figure(fractions, self.merged.task_names, title="AdaRank: kept rank (colour: kept / r)")
        ax = fig.axes[0]
        ax.images[0].set_clim(0.0, 1.0)
        if len(kept) <= 60:
            ax.set_yticks(range(len(kept)), [f"{name} (r={full[name]})" for name in kept], fontsize=6)
            if len(self.merged.task_names) <= 12:
                for row, (ranks, shares) in enumerate(zip(kept.values(), fractions)):
                    for column, (rank, share) in enumerate(zip(ranks, shares)):
                        ax.text(column, row, str(rank), ha="center", va="center", fontsize=6,
                                color="black" if share > 0.6 else "white")
            fig.tight_layout()
        path.write_bytes(png_bytes(fig))
        return path


def build_adarank(
    backbone: nn.Module, task_vectors: TaskVectors, heads: Mapping[str, nn.Module], *,
    init_value: float | Sequence[float], lr: float, mask_lr: float, betas: Sequence[float], clamp: bool,
    temperature: float, initial_rank_ratio: float, initial_logit: float, max_rank_ratio: float | None,
    svd_patterns: Sequence[str] | str | None, pointwise_convs: bool, origin: str, layer_groups: Any,
    autocast_dtype: str | None, objective: Objective | None = None,
) -> AdaRankModule:
    if origin not in ORIGINS:
        raise ValueError(f"origin must be one of {ORIGINS}, got {origin!r}")
    if origin == "average":
        if task_vectors.unscored_tasks:  # CART would re-centre the alignment vector together with the experts
            raise ConfigError(f"method 'adarank': origin={origin!r} cannot take an alignment vector (it re-centres "
                              "every vector at their average); use origin=pretrained")
        task_vectors = centred_at_average(task_vectors)
    merged = SpectralMergedModel(
        backbone, task_vectors, init_value=init_value, clamp=(0.0, 1.0) if clamp else None,
        layer_groups=resolve_layer_groups(layer_groups, task_vectors.names), svd_patterns=svd_patterns,
        max_rank_ratio=max_rank_ratio, initial_rank_ratio=initial_rank_ratio, initial_logit=initial_logit,
        temperature=temperature, pointwise_convs=pointwise_convs,
    )
    return AdaRankModule(merged, heads, mask_lr=mask_lr, lr=lr, betas=tuple(betas), autocast_dtype=autocast_dtype,
                         objective=objective)


ADARANK_DEFAULTS: dict[str, Any] = {
    "init_value": 0.3,  # the authors' TA prior; 2.3 with origin=average (CART, ViT-B/32 8 tasks)
    "lr": 1e-3,  # Adam on λ
    "mask_lr": 1e-3,  # Adam on the mask logits (the authors: one lr for both)
    "betas": (0.9, 0.999),
    "clamp": False,  # the authors' clamp_weights: false
    "temperature": 10.0,  # mask_temp: the straight-through gradient is that of sigmoid(logit / temperature)
    "initial_rank_ratio": 1.0,  # leading fraction of components on at the start (0.16 with origin=average)
    "initial_logit": 0.1,  # on components start at +initial_logit, off ones at -initial_logit
    "max_rank_ratio": None,  # None: keep every component; a fraction: store only the leading ones
    "svd_patterns": None,  # which 2-D tensors are decomposed; None: every matrix
    "pointwise_convs": True,  # 1x1 convolution kernels count as matrices (CNNs; the authors ran none)
    "origin": "pretrained",  # pretrained (task arithmetic) or average (CART)
    "layer_groups": None,
    "autocast_dtype": None,
}


def _validate(num_tasks: int, hparams: Mapping[str, Any]) -> None:
    method = "adarank"
    check_coefficient_learning(method, num_tasks, hparams)
    checks.check_positive(method, "mask_lr", hparams["mask_lr"])
    checks.check_positive(method, "temperature", hparams["temperature"])
    checks.check_range(method, "initial_rank_ratio", hparams["initial_rank_ratio"], low_open=True, high_open=False)
    checks.check_positive(method, "initial_logit", hparams["initial_logit"])
    if hparams["max_rank_ratio"] is not None:
        checks.check_range(method, "max_rank_ratio", hparams["max_rank_ratio"], low_open=True, high_open=False,
                           hint=" or null (every component)")
    checks.check_patterns(method, "svd_patterns", hparams["svd_patterns"])
    checks.check_bool(method, "pointwise_convs", hparams["pointwise_convs"])
    checks.check_choice(method, "origin", hparams["origin"], ORIGINS)
    checks.check_layer_groups(method, hparams["layer_groups"])


register_learned(
    "adarank", build_adarank, ADARANK_DEFAULTS,
    "AdaRank: layer-wise λ and learned binary masks over each task vector's singular components",
    _validate,
)
