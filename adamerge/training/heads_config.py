"""``heads``: its settings, which inputs give a pseudo-label, which heads can adapt, and what records say of it.

The settings (:class:`HeadSettings`, parsed by :func:`head_settings` from the ``heads`` node, a mode name or a mapping)
and the rules :mod:`adamerge.training.adapted_heads` fits the heads by: a pseudo-label is the expert's arg-max where its
softmax confidence is at least ``confidence_threshold`` (:func:`pseudo_labels`), the heads' loss the cross-entropy
against those (:func:`pseudo_label_loss`), and a head can adapt only if it has floating-point parameters
(:func:`adaptable_copy`). Below them, what results.json, merge_config.json, the model card and the run's printed
summary say of adapted heads (:func:`export_record`, :func:`model_card_text`, :func:`head_lines`).

Pseudo-labels: the pseudo-label of an unlabeled input is the arg-max of the task expert's logits on it (the expert is
θ0 + τ_k with the task's original head; its logits are the ones :mod:`adamerge.objectives.expert_targets` computes
once per input before learning). A tie goes to the first class of the tie, as ``torch.max`` picks. It is kept only
where the expert is confident: its softmax probability of that class is at least ``confidence_threshold`` (``>=``: a
threshold of 0 keeps every input, 1 keeps only saturated predictions).

Defaults: ``confidence_threshold`` 0.9 (SyMerge has no fixed threshold, see :mod:`adamerge.training.adapted_heads`),
``head_lr`` 1e-2 (SyMerge's step size when its classifiers learn), ``head_steps`` 100.

What is learned: every floating-point parameter of the head (a linear head's weight and bias; a transformers
sequence classifier's ``classifier.*`` / ``pooler.*``); a CLIP zero-shot head learns its class embeddings (its logit
scale and projection stay). A head without parameters (``Identity``: a causal LM's logits are the backbone's own)
cannot be adapted: ``heads: adapt`` refuses it, naming the task. Heads stay in eval mode (no dropout) while they learn,
as the backbone does.

Reported (results.json and merge_config.json under ``head_adaptation``): the settings and, per task, the share of its
adaptation inputs kept as pseudo-labels and the pseudo-label cross-entropy of the original and of the adapted head on
the final merge's outputs (results.json also keeps each step's head loss). The export stores the adapted heads
(``heads/<task>.safetensors``) and its model card says that they were re-learned and how.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adamerge.errors import ConfigError
from adamerge.methods.checks import is_count, is_number
from adamerge.training.evaluation import IGNORE_INDEX  # positions without a kept pseudo-label

HEAD_MODES = ("frozen", "adapt")
SCHEDULES = ("after", "together")
REPORT_KEY = "head_adaptation"  # in results.json and merge_config.json ("heads" there already lists each head's file)


@dataclass(frozen=True)
class HeadSettings:
    """``heads``: ``mode`` frozen | adapt, and for adapt the threshold, schedule and the heads' Adam settings."""

    mode: str = "frozen"
    confidence_threshold: float = 0.9
    schedule: str = "after"
    head_lr: float = 1e-2  # SyMerge's step size when its classifiers learn
    head_steps: int = 100  # schedule=after: Adam steps per head on the finished merge's outputs
    batch_size: int | None = None  # schedule=after: inputs per head step (null: the data's eval_batch_size)

    @property
    def adapt(self) -> bool:
        return self.mode == "adapt"

    def config(self) -> dict[str, Any]:
        return asdict(self)


def _invalid(name: str, value: Any, requirement: str) -> ConfigError:
    return ConfigError(f"heads.{name}={value!r} is invalid: {requirement}")


def head_settings(value: Any = None) -> HeadSettings:
    """The checked settings from None (frozen), ``"frozen"`` / ``"adapt"``, a mapping (the ``heads`` node) or settings."""
    if isinstance(value, HeadSettings):
        value = value.config()
    if value is None:
        value = {}
    elif isinstance(value, str):
        value = {"mode": value}
    elif not isinstance(value, Mapping):
        raise ConfigError(f"heads={value!r} is invalid: use frozen, adapt or a mapping of settings")
    known = HeadSettings.__dataclass_fields__
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ConfigError(f"heads has unknown settings {unknown}; known: {', '.join(known)}")
    settings = HeadSettings(**dict(value))
    if settings.mode not in HEAD_MODES:
        raise _invalid("mode", settings.mode, f"must be one of {', '.join(HEAD_MODES)}")
    if settings.schedule not in SCHEDULES:
        raise _invalid("schedule", settings.schedule, f"must be one of {', '.join(SCHEDULES)}")
    if not (is_number(settings.confidence_threshold) and 0 <= settings.confidence_threshold <= 1):
        raise _invalid("confidence_threshold", settings.confidence_threshold,
                       "must be a number in [0, 1] (the expert's softmax probability of its predicted class)")
    if not (is_number(settings.head_lr) and settings.head_lr > 0):
        raise _invalid("head_lr", settings.head_lr, "must be a positive number")
    if not is_count(settings.head_steps):
        raise _invalid("head_steps", settings.head_steps, "must be an integer >= 0")
    batch = settings.batch_size
    if batch is not None and not is_count(batch, minimum=1):
        raise _invalid("batch_size", batch, "must be an integer >= 1, or null")
    return HeadSettings(**{**settings.config(), "confidence_threshold": float(settings.confidence_threshold),
                           "head_lr": float(settings.head_lr)})


def parse_heads(node: Any, learned_methods: Sequence[str]) -> HeadSettings:
    """The run's ``heads`` group (``conf/heads``, plain values): :func:`head_settings`, and adapt needs a learned method."""
    settings = head_settings(node)
    if settings.adapt and not learned_methods:
        raise ConfigError("heads.mode=adapt re-learns the heads of a learned merge, but this run has no learned method; "
                          "set heads=frozen or choose a learned method")
    return settings


# --- pseudo-labels -------------------------------------------------------------------------------------------------
def pseudo_labels(expert_logits: Tensor, threshold: float, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The expert's arg-max where its softmax probability of it is ``>= threshold`` (and ``mask`` allows), else
    ``IGNORE_INDEX``; and the kept positions. A tie between classes goes to the first of them."""
    confidence, labels = expert_logits.detach().float().softmax(-1).max(-1)
    keep = confidence >= threshold
    if mask is not None:
        keep &= mask.to(keep.device).bool()
    return torch.where(keep, labels, torch.full_like(labels, IGNORE_INDEX)), keep


def pseudo_label_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of ``logits`` against the kept pseudo-labels (``IGNORE_INDEX`` positions do not count)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


# --- which heads can adapt ----------------------------------------------------------------------------------------
def learnable_parameters(head: nn.Module) -> list[nn.Parameter]:
    return [p for p in head.parameters() if p.is_floating_point()]


def adaptable_copy(task: str, head: nn.Module) -> nn.Module:
    """A copy of ``task``'s head whose parameters can learn (frozen until a head step); ConfigError if it has none."""
    from adamerge.backbones.clip import ZeroShotHead  # lazily: the settings are parsed before any backbone is needed

    clone = copy.deepcopy(head)
    if isinstance(clone, ZeroShotHead):  # its class embeddings are what learns; they are a buffer in the frozen head
        embeddings = clone._buffers.pop("text_embeddings")
        clone.text_embeddings = nn.Parameter(embeddings.detach().clone())
    if not learnable_parameters(clone):
        raise ConfigError(f"heads.mode=adapt: the head of task {task!r} ({type(head).__name__}) has no parameters to "
                          "learn (e.g. a causal LM, whose logits are the backbone's own); set heads=frozen")
    return clone.requires_grad_(False).eval()


@contextlib.contextmanager
def learning(head: nn.Module) -> Iterator[list[nn.Parameter]]:
    """The head's learnable parameters with gradients on, frozen again on leaving (a backward inside still fills them)."""
    parameters = learnable_parameters(head)
    for parameter in parameters:
        parameter.requires_grad_(True)
    try:
        yield parameters
    finally:
        for parameter in parameters:
            parameter.requires_grad_(False)


def check_adaptable(heads: Mapping[str, nn.Module], tasks: Sequence[str] | None = None) -> None:
    """Preflight once the pool is loaded, before any fine-tuned checkpoint: every head to adapt has parameters."""
    for task in tasks if tasks is not None else list(heads):
        adaptable_copy(task, heads[task])  # raises, naming the task


# --- what records say ---------------------------------------------------------------------------------------------
def export_record(report: Mapping[str, Any]) -> dict[str, Any]:
    """merge_config.json's ``head_adaptation``: the report without the per-step losses."""
    return {key: value for key, value in report.items() if key != "loss_history"}


def model_card_text(config: Mapping[str, Any]) -> str:
    """The model card's paragraph on adapted heads ('' when the heads are the fine-tuned models' own)."""
    record = config.get(REPORT_KEY)
    if not isinstance(record, Mapping) or record.get("mode") != "adapt":
        return ""
    when = ("after the merge was learned, on the finished merge's outputs, "
            f"{record.get('head_steps')} Adam steps per head" if record.get("schedule") == "after"
            else "together with the merge, one Adam step per learning step")
    lines = [
        f"The heads under `heads/` are not the fine-tuned models' own: each task's head was re-learned on pseudo-labels "
        f"(no labels were used). A pseudo-label is the task's fine-tuned model's prediction on an unlabeled input, kept "
        f"only where its softmax confidence is at least {record.get('confidence_threshold')}; the head learned by "
        f"cross-entropy on the merged backbone's outputs, {when} (learning rate {record.get('head_lr')}).",
    ]
    rows = []
    for task, entry in (record.get("tasks") or {}).items():
        losses = [f"{entry[key]:.4f}" if isinstance(entry.get(key), (int, float)) else "" for key in ("loss_frozen",
                                                                                                  "loss_adapted")]
        adapted = "yes" if entry.get("adapted", True) else "no: no input kept"
        rows.append(f"| {task} | {100 * float(entry.get('kept_share', 0)):.1f} | {losses[0]} | {losses[1]} | {adapted} |")
    if rows:
        lines.append("| task | inputs kept (%) | pseudo-label loss, original head | pseudo-label loss, adapted head | "
                     "adapted |\n| --- | --- | --- | --- | --- |\n" + "\n".join(rows))
    return "\n\n".join(lines)


def head_lines(report: Mapping[str, Any] | None) -> list[str]:
    """The run's printed summary of adapted heads: per task, the share kept and the pseudo-label loss before/after."""
    if not report:
        return []
    lines = []
    for task, entry in report["tasks"].items():
        losses = ""
        if entry.get("loss_frozen") is not None and entry.get("loss_adapted") is not None:
            losses = f", pseudo-label loss {entry['loss_frozen']:.4f} -> {entry['loss_adapted']:.4f}"
        state = "" if entry["adapted"] else " (not adapted: no input kept)"
        lines.append(f"head {task}: {100 * entry['kept_share']:.1f}% of inputs kept as pseudo-labels{losses}{state}")
    return lines
