"""CLIP image classification: merged vision towers with zero-shot text heads.

The merged backbone is the CLIP **vision tower** as a transformers ``CLIPVisionModel`` -- the
format of the public fine-tuned checkpoints (``tanganke/clip-vit-base-patch32_<task>``), so a merge
exports as a directory that ``CLIPVisionModel.from_pretrained`` opens. Its forward(pixel_values)
returns the pooled image representation; every task's :class:`ZeroShotHead` applies the pretrained
``visual_projection`` (frozen: the fine-tuned vision checkpoints do not have one) to get the image
embedding, normalises it and scores it against that task's class embeddings:

    logits = logit_scale.exp() · normalize(P · pooled) · Tᵀ,

``T`` [C, D] being the text tower's normalised embeddings of the class names averaged over the
task's prompt templates and renormalised (Radford et al. 2021; the task-arithmetic / AdaMerging
setup). Heads are computed once and cached on disk (:func:`zero_shot_head`).

Checkpoint keys: transformers 5's ``CLIPVisionModel`` has keys ``embeddings.*`` / ``encoder.*``;
4.x checkpoints (all public fine-tuned ones) say ``vision_model.embeddings.*``, and a full
``CLIPModel`` has ``vision_model.*`` plus a text tower. :class:`adamerge.backbones.hf_checkpoints.HFModelPool`
aligns them all onto the backbone (``modelpool: clip_*``).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from adamerge.backbones.hf import load_tokenizer
from adamerge.backbones.hf_checkpoints import cache_dir, load_pretrained_model
from adamerge.pool.checkpoints import CheckpointError, describe_source, sha256_of
from adamerge.storage.atomic import write_atomic

__all__ = [
    "clip_vision_model",
    "ZeroShotHead",
    "zero_shot_head",
    "zero_shot_weights",
    "clip_task",
    "clip_tasks",
    "CLIP_EIGHT_TASKS",
]

CLIP_EIGHT_TASKS = ("sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
HEAD_CACHE_VERSION = 1
_RESOURCE = "clip_zero_shot.json"


# --- class names and prompt templates shipped with the package -------------------------------------
@lru_cache(maxsize=1)
def _resources() -> dict[str, Any]:
    text = resources.files("adamerge").joinpath("resources", _RESOURCE).read_text(encoding="utf-8")
    return json.loads(text)["tasks"]


def clip_tasks() -> list[str]:
    """Tasks whose class names and templates ship in ``adamerge/resources/clip_zero_shot.json``."""
    return sorted(_resources())


def clip_task(task: str) -> tuple[list[str], list[str]]:
    """``(class names, templates)`` of a shipped task; templates use ``{}`` for the class name."""
    table = _resources()
    if task not in table:
        raise KeyError(f"no class names shipped for CLIP task {task!r}; shipped: {sorted(table)}. "
                       f"Pass classnames= and templates= instead.")
    return list(table[task]["classnames"]), list(table[task]["templates"])


# --- the backbone ----------------------------------------------------------------------------------
def clip_vision_model(model: str | os.PathLike, *, dtype: Any = None, attn_implementation: str | None = None) -> nn.Module:
    """The vision tower of a CLIP checkpoint (``CLIPModel`` or ``CLIPVisionModel``) as ``CLIPVisionModel``."""
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return load_pretrained_model(model, "CLIPVisionModel", dtype=dtype, **extra)


# --- zero-shot heads --------------------------------------------------------------------------------
def _pooled(features: Any) -> Tensor:
    """A transformers output (or tuple, or tensor) → its pooled representation tensor."""
    if isinstance(features, Tensor):
        return features
    for name in ("image_embeds", "pooler_output", "text_embeds"):
        value = getattr(features, name, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(features, (tuple, list)) and len(features) > 1 and isinstance(features[1], Tensor):
        return features[1]
    raise TypeError(f"cannot find pooled features in a {type(features).__name__}")


class ZeroShotHead(nn.Module):
    """Frozen CLIP zero-shot classifier: ``scale · normalize(P x) · Tᵀ``.

    ``text_embeddings`` [C, D] (rows normalised), ``logit_scale`` the *log* scale of the CLIP model,
    ``projection`` the ``visual_projection`` weight [D, H] (``None`` when the backbone already returns
    projected embeddings, e.g. ``CLIPVisionModelWithProjection``). ``class_names`` and ``templates`` (what the
    text embeddings were made from) travel with the head into an export.
    """

    def __init__(self, text_embeddings: Tensor, logit_scale: Tensor | float, projection: Tensor | None = None, *,
                 class_names: Sequence[str] | None = None, templates: Sequence[str] | None = None) -> None:
        super().__init__()
        if text_embeddings.ndim != 2:
            raise ValueError(f"text_embeddings must be [classes, dim], got shape {tuple(text_embeddings.shape)}")
        if class_names is not None and len(class_names) != text_embeddings.shape[0]:
            raise ValueError(f"{len(class_names)} class names for {text_embeddings.shape[0]} text embeddings")
        self.class_names = [str(c) for c in class_names] if class_names is not None else None
        self.templates = [str(t) for t in templates] if templates is not None else None
        self.register_buffer("text_embeddings", text_embeddings.detach().float().clone())
        self.register_buffer("logit_scale", torch.as_tensor(logit_scale, dtype=torch.float32).detach().clone().reshape(()))
        if projection is not None:
            if projection.ndim != 2 or projection.shape[0] != text_embeddings.shape[1]:
                raise ValueError(f"projection {tuple(projection.shape)} does not map onto {text_embeddings.shape[1]} dims")
            self.register_buffer("projection", projection.detach().float().clone())
        else:
            self.projection = None
        self.requires_grad_(False)

    @property
    def num_classes(self) -> int:
        return self.text_embeddings.shape[0]

    def forward(self, features: Any) -> Tensor:
        x = getattr(features, "image_embeds", None)
        if x is None:
            x = _pooled(features)
            if self.projection is not None and x.shape[-1] == self.projection.shape[1]:
                x = x.to(self.projection.dtype) @ self.projection.t()
        x = x.float()
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.logit_scale.exp() * x @ self.text_embeddings.t()


def _source_fingerprint(model: str | os.PathLike, revision: str | None) -> dict[str, Any]:
    """What identifies the text tower: the hub id (+ revision) or the local weights' size and mtime."""
    name = os.fspath(model)
    path = Path(name).expanduser()
    if not path.exists():
        return {"hub_id": name, "revision": revision}
    files = (sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))) if path.is_dir() else [path]
    return {"path": str(path.resolve()),
            "files": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]}


def head_cache_key(model: str | os.PathLike, classnames: Sequence[str], templates: Sequence[str],
                   revision: str | None = None) -> str:
    payload = {"version": HEAD_CACHE_VERSION, "model": _source_fingerprint(model, revision),
               "classnames": list(classnames), "templates": list(templates)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


_MODEL_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def _clip_model(model: str, revision: str | None) -> nn.Module:
    # One CLIP model in memory serves the K heads built one after another from the same checkpoint.
    extra = {"revision": revision} if revision else {}
    return load_pretrained_model(model, "CLIPModel", **extra)


@lru_cache(maxsize=1)
def _clip_tokenizer(model: str) -> Any:
    return load_tokenizer(model)


def clear_model_cache() -> None:
    """Free the CLIP model kept in memory while heads are built."""
    _clip_model.cache_clear()
    _clip_tokenizer.cache_clear()


@torch.no_grad()
def zero_shot_weights(model: str | os.PathLike, classnames: Sequence[str], templates: Sequence[str], *,
                      revision: str | None = None, batch_size: int = 256,
                      device: str | torch.device | None = None) -> dict[str, Tensor]:
    """Compute ``text_embeddings`` [C, D], ``logit_scale`` and ``visual_projection`` from a CLIP model."""
    if not classnames or not templates:
        raise ValueError("zero-shot heads need at least one class name and one template")
    with _MODEL_LOCK:
        clip = _clip_model(os.fspath(model), revision)
        tokenizer = _clip_tokenizer(os.fspath(model))
    for needed in ("text_model", "text_projection", "visual_projection", "logit_scale"):
        if not hasattr(clip, needed):
            raise CheckpointError(f"{describe_source(model)!r} is not a full CLIP model (no {needed}); zero-shot "
                                  f"heads need the text tower: pass the CLIPModel checkpoint (e.g. openai/clip-vit-base-patch32)")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clip = clip.to(device)
    prompts = [template.format(name) for name in classnames for template in templates]
    max_length = getattr(clip.config.text_config, "max_position_embeddings", 77)
    embeddings = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start:start + batch_size], padding=True, truncation=True,
                           max_length=max_length, return_tensors="pt")
        tokens = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        # transformers 5 returns a BaseModelOutputWithPooling (projected pooler_output); 4.x a tensor.
        features = _pooled(clip.get_text_features(**tokens)).float()
        embeddings.append(features / features.norm(dim=-1, keepdim=True))
    per_prompt = torch.cat(embeddings).reshape(len(classnames), len(templates), -1)
    text = per_prompt.mean(dim=1)
    text = text / text.norm(dim=-1, keepdim=True)
    result = {
        "text_embeddings": text.cpu().contiguous(),
        "logit_scale": clip.logit_scale.detach().float().cpu().reshape(()).clone(),
        "visual_projection": clip.visual_projection.weight.detach().float().cpu().contiguous(),
    }
    clip.to("cpu")
    return result


def _hash_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _cached_head_intact(path: Path) -> bool:
    """A cached head is used only when its recorded sha256 matches: a changed, truncated or half-written entry (or
    one without its hash) is recomputed, never trusted."""
    recorded = _hash_file(path)
    return recorded.is_file() and recorded.read_text().strip() == sha256_of(path)


def zero_shot_head(
    model: str | os.PathLike,
    task: str | None = None,
    *,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    revision: str | None = None,
    cache: bool = True,
    cache_directory: str | os.PathLike | None = None,
    project: bool = True,
    device: str | None = None,
) -> ZeroShotHead:
    """A task's frozen zero-shot head from the CLIP checkpoint ``model`` (hub id or directory).

    Class names and templates come from the shipped resources for ``task`` unless given. The head is
    cached at ``<cache>/zero_shot_heads/<key>.safetensors`` where ``<cache>`` is ``cache_directory``,
    ``$ADAMERGE_CACHE_DIR`` or the user cache dir, and the key hashes the model id (local checkpoints:
    path, weight files' sizes and mtimes), the class names and the templates. ``project=False``
    builds a head for backbones that already return projected embeddings.
    """
    if classnames is None or templates is None:
        if task is None:
            raise ValueError("zero_shot_head needs task= (shipped class names) or classnames= and templates=")
        shipped_names, shipped_templates = clip_task(task)
        classnames = list(classnames) if classnames is not None else shipped_names
        templates = list(templates) if templates is not None else shipped_templates
    classnames, templates = [str(c) for c in classnames], [str(t) for t in templates]
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"templates must contain '{{}}' where the class name goes: {bad[:3]}")
    weights = None
    path = None
    if cache:
        root = Path(cache_directory).expanduser() if cache_directory is not None else cache_dir()
        path = root / "zero_shot_heads" / f"{head_cache_key(model, classnames, templates, revision)}.safetensors"
        if path.is_file() and _cached_head_intact(path):
            try:
                weights = load_file(str(path))
            except Exception:  # a corrupt cache entry is recomputed, never trusted
                weights = None
            if weights is not None and weights["text_embeddings"].shape[0] != len(classnames):
                weights = None
    if weights is None:
        weights = zero_shot_weights(model, classnames, templates, revision=revision, device=device)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            save_file(weights, str(tmp), metadata={"model": os.fspath(model), "task": task or "",
                                                   "classes": str(len(classnames))})
            os.replace(tmp, path)
            write_atomic(_hash_file(path), sha256_of(path))  # written last: a head without it is never used
    head = ZeroShotHead(weights["text_embeddings"], weights["logit_scale"],
                        weights["visual_projection"] if project else None, class_names=classnames, templates=templates)
    return head.eval()
