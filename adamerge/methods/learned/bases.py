"""Learning on top of a data-free merge: the per-task vectors a learned method combines (``method.base``).

A learned method learns coefficients λ over K task vectors. With ``base=<data-free method>`` it learns them over
that method's *per-task* vectors instead of the raw τ_k -- AdaMerging++ is AdaMerging with ``base=ties``.
Each base's per-task vectors ``τ'_k`` are defined so that its own merge is ``Σ_k c_k τ'_k`` with its scaling
coefficient ``c`` (task arithmetic over them):

* ``ties``: τ_k trimmed to its top-k magnitudes, then only the entries that agree with the elected sign (the
  AdaMerging++ paper's vectors; TIES' disjoint mean itself is no per-task sum);
* ``dare``: τ_k with random entries dropped and the rest rescaled (the same draws as the ``dare`` merge);
* ``breadcrumbs``: τ_k with its top-β and bottom-γ magnitudes zeroed;
* ``pcb``: ``K · w_k ⊙ τ̃_k / Σ_j w_j`` (balancing weights, clamped magnitudes): PCB's merge is ``(λ/K) Σ_k τ'_k``,
  and the K keeps the vectors on task arithmetic's scale, so the usual λ ≈ 0.3 start still fits;
* ``tsv_merge``: each task's block of the orthogonalised singular vectors, ``Û⊥_k diag(Ŝ_k) V̂ᵀ⊥_k`` (they sum to
  the TSV-M layer); tensors that are not matrices ``τ_k / K`` (TSV-M averages them);
* ``iso_c`` / ``iso_cts``: the isotropic layer ``M`` (α = 1) split by each task's share of ``Σ_j τ_j``,
  ``M (Σ_j τ_j)⁺ τ_k`` plus an equal share of the rest (:func:`~adamerge.methods.data_free.isotropic.contribution_pieces`;
  adamerge's own split, not from the papers); non-matrix tensors ``τ_k / K``. They sum to Iso-C / Iso-CTS with
  α = 1, so λ starts at the method's α (1.3 / 1.5) to begin from the data-free merge.

A base's hyperparameters are the data-free method's own (conf/method/<base>.yaml) without its combination
settings (scaling coefficient, DARE's ``combine``), given as ``method.base_hparams``.

That is the *split* form (``base_form: split``). The *residual* form (``base_form: residual``) keeps the base merge
whole and learns a correction on top of it:

    θ = θ0 + a_l · (θ_base − θ0)_l + Σ_k c_{k,l} · τ_{k,l},   a = 1 and c = 0 at the start,

so step 0 *is* the data-free merge and learning moves away from it only where the objective says so. The base merge
is appended to the raw task vectors as one more, unscored vector (no head, no data) whose coefficient is ``a``; any
data-free method can be the base (its full hyperparameters, scaling included, in ``base_hparams``). With ``clamp``
the corrections stay in [−1, 1] and the base's scale in [0, 2].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from adamerge.errors import ConfigError
from adamerge.methods.data_free import spectral, steps
from adamerge.methods.data_free.isotropic import iso_c_pieces, iso_cts_pieces
from adamerge.methods.data_free.pcb import pcb_pieces
from adamerge.methods.data_free.static import breadcrumbs_masked, dare_dropped
from adamerge.methods.data_free.tsv import tsv_pieces
from adamerge.methods.registry import get_method
from adamerge.pool.task_vectors import TaskVectors


@dataclass(frozen=True)
class Base:
    """A data-free method's per-task form: ``per_task(task_vectors, **hparams) -> {name: [K, *shape]}``."""

    method: str
    hparams: tuple[str, ...]  # the method's hyperparameters that shape the per-task vectors
    per_task: Callable[..., dict[str, Tensor]]


def _ties(task_vectors: TaskVectors, *, top_k: float, scope: str) -> dict[str, Tensor]:
    return steps.ties_trim({name: v.float() for name, v in task_vectors.vectors.items()}, top_k, scope)


def _dare(task_vectors: TaskVectors, *, drop_rate: float, seed: int, rescale: bool) -> dict[str, Tensor]:
    return dare_dropped(task_vectors.vectors, drop_rate, seed, rescale)


def _breadcrumbs(task_vectors: TaskVectors, *, top_beta: float, bottom_gamma: float) -> dict[str, Tensor]:
    return breadcrumbs_masked(task_vectors.vectors, top_beta, bottom_gamma)


def _pcb(task_vectors: TaskVectors, **hparams: Any) -> dict[str, Tensor]:
    return {name: task_vectors.num_tasks * piece for name, piece in pcb_pieces(task_vectors, **hparams)}


def _spectral_pieces(task_vectors: TaskVectors, matrix_pieces: Callable[[Tensor], Tensor],
                     pointwise_convs: bool) -> dict[str, Tensor]:
    """Per-task pieces of a spectral merge, one layer at a time: ``matrix_pieces`` on matrix layers, ``τ_k / K`` on
    the rest (the spectral merges average them)."""
    return spectral.merge_layers(task_vectors, matrix_pieces, lambda x: x / task_vectors.num_tasks, pointwise_convs)


def _tsv(task_vectors: TaskVectors, *, rank_fraction: float | None, pointwise_convs: bool) -> dict[str, Tensor]:
    return _spectral_pieces(task_vectors, lambda x: tsv_pieces(x, rank_fraction), pointwise_convs)


def _iso_c(task_vectors: TaskVectors, *, pointwise_convs: bool) -> dict[str, Tensor]:
    return _spectral_pieces(task_vectors, iso_c_pieces, pointwise_convs)


def _iso_cts(task_vectors: TaskVectors, *, common_space_fraction: float, pointwise_convs: bool) -> dict[str, Tensor]:
    return _spectral_pieces(task_vectors, lambda x: iso_cts_pieces(x, common_space_fraction), pointwise_convs)


BASES: dict[str, Base] = {
    "ties": Base("ties", ("top_k", "scope"), _ties),
    "dare": Base("dare", ("drop_rate", "seed", "rescale"), _dare),
    "breadcrumbs": Base("breadcrumbs", ("top_beta", "bottom_gamma"), _breadcrumbs),
    "pcb": Base("pcb", ("pcb_ratio", "clamp_ratio", "inter_balancing", "scope"), _pcb),
    "tsv_merge": Base("tsv_merge", ("rank_fraction", "pointwise_convs"), _tsv),
    "iso_c": Base("iso_c", ("pointwise_convs",), _iso_c),
    "iso_cts": Base("iso_cts", ("common_space_fraction", "pointwise_convs"), _iso_cts),
}


def resolve_base(method: str, base: str | None, hparams: Mapping[str, Any] | None, num_tasks: int) -> dict[str, Any]:
    """The base's full hyperparameters (its defaults ← ``hparams``), checked by the data-free method's own
    validator; a ConfigError naming ``method``, the parameter and the value otherwise."""
    if base is None:
        if hparams:
            raise ConfigError(f"method {method!r}: base_hparams={dict(hparams)!r} given without a base; set "
                              f"base to one of {sorted(BASES)}")
        return {}
    if base not in BASES:
        raise ConfigError(f"method {method!r}: base={base!r} is invalid: a learned method can start from the "
                          f"per-task vectors of {', '.join(sorted(BASES))}, or null (the raw task vectors)")
    if hparams is not None and not isinstance(hparams, Mapping):
        raise ConfigError(f"method {method!r}: base_hparams={hparams!r} is invalid: it must be a mapping of "
                          f"{base}'s hyperparameters ({', '.join(BASES[base].hparams)})")
    allowed = BASES[base].hparams
    full = _checked_hparams(method, base, hparams, allowed, num_tasks)
    return {name: full[name] for name in allowed}


def _checked_hparams(method: str, base: str, hparams: Mapping[str, Any] | None, allowed: Sequence[str],
                     num_tasks: int) -> dict[str, Any]:
    """``base``'s full hyperparameters (its defaults ← ``hparams``, which may only name ``allowed``), checked by the
    data-free method's own validator; a ConfigError naming ``method``, the parameter and the value otherwise."""
    spec = get_method(base)
    unknown = sorted(set(hparams or {}) - set(allowed))
    if unknown:
        raise ConfigError(f"method {method!r}: base_hparams {', '.join(unknown)} not used by base {base!r}; "
                          f"allowed: {', '.join(allowed) or 'none'}")
    full = spec.resolve_hparams(dict(hparams or {}))
    if spec.validate is not None:
        try:
            spec.validate(num_tasks, full)
        except ValueError as error:
            raise ConfigError(f"method {method!r}: base {base!r}: {error}") from error
    return full


BASE_FORMS = ("split", "residual")
BASE_MERGE = "base_merge"  # the residual form's extra vector: the whole data-free merge θ_base − θ0
RESIDUAL_BOUNDS = {"corrections": (-1.0, 1.0), "base_scale": (0.0, 2.0)}


def resolve_residual_base(method: str, base: str, hparams: Mapping[str, Any] | None, num_tasks: int) -> dict[str, Any]:
    """The full hyperparameters of any data-free method used whole as a residual base (its defaults ← ``hparams``)."""
    try:
        spec = get_method(base)
    except ConfigError:
        spec = None
    if spec is None or spec.kind != "static" or base == "pretrained":
        raise ConfigError(f"method {method!r}: base={base!r} is invalid for base_form=residual: it must name a data-free "
                          "merge (task_arithmetic, ties, tsv_merge, iso_c, iso_cts, wudi, ...)")
    if hparams is not None and not isinstance(hparams, Mapping):
        raise ConfigError(f"method {method!r}: base_hparams={hparams!r} is invalid: it must be a mapping of {base}'s "
                          "hyperparameters")
    return _checked_hparams(method, base, hparams, list(spec.defaults), num_tasks)


def with_residual_base(task_vectors: TaskVectors, base: str, hparams: Mapping[str, Any]) -> TaskVectors:
    """The raw task vectors with ``base``'s whole merge ``θ_base − θ0`` appended as the unscored ``BASE_MERGE``."""
    deltas = get_method(base).fn(task_vectors, **hparams)
    whole = {name: deltas[name] if name in deltas else torch.zeros_like(vectors[0], dtype=torch.float32)
             for name, vectors in task_vectors.vectors.items()}
    return task_vectors.with_task(BASE_MERGE, whole, scored=False)


def apply_base(task_vectors: TaskVectors, base: str | None, hparams: Mapping[str, Any]) -> TaskVectors:
    """``task_vectors`` replaced by ``base``'s per-task vectors (unchanged when ``base`` is None)."""
    if base is None:
        return task_vectors
    if getattr(task_vectors, "streamed", False):  # adamerge.pool.streamed: the per-task vectors are model-wide
        raise ConfigError(f"base={base!r} with base_form=split learns over every per-task vector of {base} at once, "
                          "which a streamed or compressed pool never holds: use base_form=residual, or "
                          "modelpool.streaming=false and modelpool.compression=null")
    per_task = BASES[base].per_task(task_vectors, **hparams)
    return task_vectors.map(lambda name, _: per_task.pop(name))
