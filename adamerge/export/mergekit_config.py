"""The same merge as a mergekit configuration (``mergekit.yaml`` next to an export).

mergekit (arcee-ai/mergekit, v0.1.5) merges out of core but learns nothing; a merge adamerge learned or chose can be
replayed by it when mergekit has the same pipeline: task arithmetic (learned task- and layer-wise AdaMerging
coefficients are per-tensor task-arithmetic weights), TIES and DARE on per-tensor top-k (``scope: tensor``),
Breadcrumbs. Per-tensor weights use mergekit's conditional parameters: a list of ``{filter, value}`` whose first
entry whose filter is a substring of the tensor name applies; every merged tensor's full name is its own filter,
longest first (so no other tensor's name can match before its own), and a last entry without a filter gives weight
0 to the tensors adamerge keeps at θ0. Anything else (a Concrete mask, AdaRank, a data-free base under a learned
merge, an alignment vector, sources that are not files or hub ids) has no mergekit form: :func:`mergekit_config`
returns the reason instead.

Where the two differ by construction, the YAML says so in its header: mergekit keeps ``floor(density·n)`` entries
where adamerge keeps ``ceil(top_k·n)`` (equal when ``top_k·n`` is whole), and DARE's random masks are mergekit's own
draws (same drop rate and rescaling, other entries).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adamerge.pool.checkpoints import looks_like_path

__all__ = ["MERGEKIT_FILE", "LEARNED_AS_TASK_ARITHMETIC", "mergekit_config", "mergekit_yaml", "static_recipe"]

MERGEKIT_FILE = "mergekit.yaml"
# Learned methods whose merge is θ0 + Σ_k λ_{l,k} τ_{k,l} with nothing else (no mask, no trimmed vectors).
LEARNED_AS_TASK_ARITHMETIC = ("adamerging_task_wise", "adamerging_layer_wise")


def _model_reference(source: Any) -> str | None:
    """A model directory or hub id mergekit can open, or None (an in-memory model, a single weights file)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(os.fspath(source)).expanduser()
    if path.is_dir():
        return str(path.resolve())
    hub_id = isinstance(source, str) and not path.exists() and not looks_like_path(source)
    return source if hub_id else None


def _per_tensor(values: Mapping[str, float], every_tensor: bool) -> float | list[dict[str, Any]]:
    """One weight when every tensor of the model is merged with the same one; else a filter per merged tensor
    (longest name first) and weight 0 for the rest."""
    distinct = set(values.values())
    if every_tensor and len(distinct) == 1:
        return float(distinct.pop())
    ordered = sorted(values, key=lambda name: (-len(name), name))
    return [*({"filter": name, "value": float(values[name])} for name in ordered), {"value": 0.0}]


def static_recipe(method: str, hparams: Mapping[str, Any], num_tasks: int
                   ) -> tuple[str, dict[str, Any], list[dict[str, Any]], list[str]] | str:
    """(merge_method, shared parameters, per-model parameters, notes) of a data-free method, or why there is none."""
    def per_task(value: Any) -> list[float]:
        return [float(v) for v in value] if isinstance(value, Sequence) else [float(value)] * num_tasks

    if method == "weight_average":
        return "task_arithmetic", {}, [{"weight": 1.0 / num_tasks} for _ in range(num_tasks)], []
    if method == "task_arithmetic":
        return "task_arithmetic", {}, [{"weight": w} for w in per_task(hparams["scaling_coefficient"])], []
    if method == "ties":
        if hparams["scope"] != "tensor":
            return "TIES with scope=model ranks each task over the whole model; mergekit ranks per tensor"
        return ("ties", {"lambda": float(hparams["scaling_coefficient"]), "normalize": True},
                [{"weight": 1.0, "density": float(hparams["top_k"])} for _ in range(num_tasks)],
                ["mergekit keeps floor(density·n) entries per tensor, adamerge ceil(top_k·n): equal when top_k·n is whole"])
    if method == "dare":
        if hparams["combine"] != "task_arithmetic":
            return "DARE with combine=ties trims the dropped vectors to their top-k; mergekit's dare_ties does not"
        keep = 1.0 - float(hparams["drop_rate"])
        scale = 1.0 / keep if hparams["rescale"] else 1.0  # adamerge rescales by 1/(1-p); mergekit's rescale is an L1 match
        return ("dare_linear", {"rescale": False},
                [{"weight": w * scale, "density": keep} for w in per_task(hparams["scaling_coefficient"])],
                ["DARE's masks are drawn by mergekit (same drop rate and 1/(1-p) rescale, other entries than adamerge's)"])
    if method == "breadcrumbs":
        beta, gamma = float(hparams["top_beta"]), float(hparams["bottom_gamma"])
        return ("breadcrumbs", {},
                [{"weight": w, "density": 1.0 - beta - gamma, "gamma": beta}
                 for w in per_task(hparams["scaling_coefficient"])],
                ["mergekit counts floor(density·n) kept and floor(gamma·n) outliers: equal when β·n and γ·n are whole"])
    return f"{method!r} has no mergekit counterpart"


def mergekit_config(method: str, hparams: Mapping[str, Any], *, pretrained: Any, finetuned: Mapping[str, Any],
                    merged_names: Sequence[str], kept_names: Sequence[str] = (),
                    coefficient_rows: Sequence[Sequence[float]] | None = None,
                    out_dtype: str = "float32") -> tuple[dict[str, Any], list[str]] | str:
    """mergekit's configuration of this merge and the notes on where it differs, or why it has none.

    ``kept_names``: floating tensors adamerge keeps at θ0 (not merged). ``coefficient_rows`` (learned methods): one
    row of K coefficients per merged tensor, in ``merged_names`` order.
    """
    base = _model_reference(pretrained)
    models = {task: _model_reference(source) for task, source in finetuned.items()}
    unreachable = [name for name, ref in {"pretrained": base, **models}.items() if ref is None]
    if unreachable:
        return f"mergekit opens model directories or hub ids; {unreachable} are not ({type(pretrained).__name__} ...)"
    notes: list[str] = []
    if coefficient_rows is not None:
        if method not in LEARNED_AS_TASK_ARITHMETIC or hparams.get("base") is not None:
            return f"the learned method {method!r} is not task arithmetic over the raw task vectors"
        rows = dict(zip(merged_names, coefficient_rows, strict=True))
        merge_method, shared = "task_arithmetic", {}
        per_model = [{"weight": {name: float(row[k]) for name, row in rows.items()}} for k in range(len(models))]
    else:
        recipe = static_recipe(method, hparams, len(models))
        if isinstance(recipe, str):
            return recipe
        merge_method, shared, per_model, notes = recipe
        per_model = [{**entry, "weight": dict.fromkeys(merged_names, entry["weight"])} for entry in per_model]
    for entry in per_model:
        entry["weight"] = _per_tensor(entry["weight"], every_tensor=not kept_names)
    config = {"merge_method": merge_method, "base_model": base, "dtype": "float32", "out_dtype": out_dtype,
              "models": [{"model": ref, "parameters": params} for ref, params in zip(models.values(), per_model)]}
    if shared:
        config["parameters"] = shared
    return config, notes


def mergekit_yaml(config: Mapping[str, Any], notes: Sequence[str], method: str) -> str:
    """The YAML text, with a header saying what it is and where mergekit's result may differ."""
    import yaml

    header = [f"# adamerge's {method} merge for mergekit: mergekit-yaml {MERGEKIT_FILE} OUTPUT_DIR",
              "# Tensors without their own weight entry (filter) keep the base model's values (weight 0), as in adamerge.",
              *(f"# Note: {note}" for note in notes)]
    return "\n".join(header) + "\n" + yaml.safe_dump(dict(config), sort_keys=False, width=120)
