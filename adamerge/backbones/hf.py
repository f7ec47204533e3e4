"""Hugging Face ``transformers`` backbones: text classification and causal LMs, and their prompt data.

* **sequence classification** (BERT / RoBERTa / DeBERTa / DistilBERT / ELECTRA families): the merged
  backbone is the *body* (``model.base_model``), every task keeps its own frozen classification head,
  and :class:`SequenceClassificationHead` reproduces ``*ForSequenceClassification.forward`` from the
  body's output (each family's head consumes something different: BERT's ``pooler_output``,
  RoBERTa's first token through its own dense layer, DeBERTa's task-specific ``ContextPooler``...);
* **causal LMs** (``AutoModelForCausalLM``): the whole model is merged, the head is
  :class:`adamerge.backbones.heads.Identity` (the logits), the objective is the entropy of the
  next-token distributions over unlabeled prompts (padding masked; :class:`PromptPreprocessor`,
  :class:`PromptDataModule`), coefficients optionally shared per decoder block
  (:func:`adamerge.pool.key_filters.block_layer_groups`).

Their checkpoints are read and aligned onto the backbone's keys by :mod:`adamerge.backbones.hf_checkpoints`
(:class:`~adamerge.backbones.hf_checkpoints.HFModelPool`), which CLIP (:mod:`adamerge.backbones.clip`) shares.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adamerge.backbones.hf_checkpoints import SOURCE_ATTRIBUTE, load_pretrained_model
from adamerge.pool.checkpoints import CheckpointError, describe_source

log = logging.getLogger(__name__)

__all__ = [
    "sequence_classification_body",
    "sequence_classification_head",
    "SequenceClassificationHead",
    "causal_lm",
    "load_tokenizer",
    "PromptPreprocessor",
    "PromptDataModule",
    "export_extra_files",
]


# --- text classification --------------------------------------------------------------------------
def sequence_classification_body(model: str | os.PathLike, *, dtype: Any = None, trust_remote_code: bool = False,
                                 num_labels: int | None = None) -> nn.Module:
    """The body (``base_model``) of ``AutoModelForSequenceClassification`` built from ``model``.

    Loading through the sequence-classification class (not ``AutoModel``) gives the body exactly the
    layout the fine-tuned checkpoints have (RoBERTa's has no pooler, BERT's has one). The head that
    transformers initialises randomly on a base checkpoint is discarded.
    """
    extra = {"num_labels": num_labels} if num_labels is not None else {}
    full = load_pretrained_model(model, "AutoModelForSequenceClassification", dtype=dtype,
                                 trust_remote_code=trust_remote_code, **extra)
    body = full.base_model
    if body is full:
        raise CheckpointError(f"{describe_source(model)!r}: {type(full).__name__} has no separate body (base_model)")
    setattr(body, SOURCE_ATTRIBUTE, os.fspath(model))
    return body.eval()


class _ReplayBody(nn.Module):
    """Stands in for a classifier's body and returns the output it is handed."""

    def __init__(self) -> None:
        super().__init__()
        self.output: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.output is None:
            raise RuntimeError("SequenceClassificationHead: no body output to replay")
        return self.output


class SequenceClassificationHead(nn.Module):
    """A fine-tuned ``*ForSequenceClassification`` model minus its body: body output → logits.

    The model's own ``forward`` runs with its body swapped for a stub that returns the (merged)
    backbone's output, so whatever the family's head consumes -- BERT's ``pooler_output``, RoBERTa's
    and ELECTRA's first token through a dense layer, DeBERTa's ``ContextPooler``, DistilBERT's
    ``pre_classifier`` -- is reproduced exactly. Decoder classifiers that locate the last token from
    ``input_ids`` (GPT-2, Llama) are not supported.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        prefix = getattr(model, "base_model_prefix", "")
        if not prefix or not isinstance(getattr(model, prefix, None), nn.Module):
            raise ValueError(f"{type(model).__name__} has no body attribute {prefix!r} to replace")
        setattr(model, prefix, _ReplayBody())
        self.prefix = prefix
        self.model = model.eval().requires_grad_(False)
        self.num_labels = getattr(getattr(model, "config", None), "num_labels", None)

    def forward(self, body_output: Any) -> Tensor:
        stub = getattr(self.model, self.prefix)
        stub.output = body_output
        try:
            out = self.model(return_dict=True)
        finally:
            stub.output = None
        return out.logits


def sequence_classification_head(model: str | os.PathLike, *, dtype: Any = None,
                                 trust_remote_code: bool = False) -> SequenceClassificationHead:
    """The frozen head of the fine-tuned sequence classifier at ``model`` (hub id or directory)."""
    full = load_pretrained_model(model, "AutoModelForSequenceClassification", dtype=dtype,
                                 trust_remote_code=trust_remote_code)
    return SequenceClassificationHead(full)


# --- causal LMs -----------------------------------------------------------------------------------
def causal_lm(model: str | os.PathLike, *, dtype: Any = None, trust_remote_code: bool = False,
              attn_implementation: str | None = None) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(model)``: the whole LM is the merged backbone."""
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    lm = load_pretrained_model(model, "AutoModelForCausalLM", dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    if getattr(lm, "generation_config", None) is not None:
        lm.config.use_cache = False  # no KV cache during the entropy forwards
    return lm




class PromptPreprocessor:
    """Tokenises a text column of prompts for a causal LM; no labels needed.

    ``inputs`` are ``input_ids`` / ``attention_mask`` (right padding; the entropy objective masks
    padding). ``labels`` are the next-token targets ``input_ids[:, 1:]`` with ``-100`` where there is
    no next token (padding, last position): what an evaluation of next-token accuracy or perplexity
    on held-out prompts needs.
    """

    provides_labels = True

    def __init__(self, tokenizer: str | os.PathLike, text_column: str = "text", max_length: int = 256,
                 next_token_labels: bool = True, add_special_tokens: bool = True) -> None:
        self.tokenizer = os.fspath(tokenizer)
        self.text_column, self.max_length = text_column, int(max_length)
        self.next_token_labels, self.add_special_tokens = next_token_labels, add_special_tokens
        self._tok = None

    @property
    def required_columns(self) -> tuple[str, ...]:
        return (self.text_column,)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tok": None}

    def _tokenizer(self) -> Any:
        if self._tok is None:
            self._tok = load_tokenizer(self.tokenizer)
            if self._tok.pad_token is None:  # GPT-2, Llama: padding is masked anyway
                self._tok.pad_token = self._tok.eos_token or self._tok.unk_token
            self._tok.padding_side = "right"
        return self._tok

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        enc = self._tokenizer()([str(t) for t in batch[self.text_column]], padding="longest", truncation=True,
                                max_length=self.max_length, return_tensors="pt",
                                add_special_tokens=self.add_special_tokens)
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        out: dict[str, Any] = {"inputs": inputs}
        if self.next_token_labels:
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            labels = torch.full_like(ids, -100)
            labels[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], torch.full_like(ids[:, 1:], -100))
            out["labels"] = labels
        return out


def load_tokenizer(source: str | os.PathLike) -> Any:
    """``AutoTokenizer.from_pretrained`` with the same clear offline error as model loading."""
    from transformers import AutoTokenizer

    name = os.fspath(source)
    try:
        if not Path(name).expanduser().exists() and os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
            return AutoTokenizer.from_pretrained(name, local_files_only=True)
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # OSError, ValueError, HTTP errors
        raise CheckpointError(
            f"could not load the tokenizer of {name!r}: {type(e).__name__}: {str(e).strip()[:300]}. "
            f"A hub id needs the Hugging Face hub (offline?); pass a local save_pretrained directory instead."
        ) from e


def _datamodule_base() -> type:
    from adamerge.data.datamodule import MultiTaskDataModule

    return MultiTaskDataModule


class PromptDataModule(_datamodule_base()):  # type: ignore[misc]
    """:class:`~adamerge.data.datamodule.MultiTaskDataModule` for prompt data without a label column.

    Evaluation works when the task's preprocessor produces labels itself (``provides_labels``,
    e.g. :class:`PromptPreprocessor`'s next-token targets).
    """

    def has_labels(self, task: str) -> bool:
        self._ensure_setup(task)
        pre = self.tasks[task].preprocessor or self.preprocessor
        return bool(getattr(pre, "provides_labels", False)) or super().has_labels(task)


# --- export ---------------------------------------------------------------------------------------
def export_extra_files(model: nn.Module, directory: str | os.PathLike | None = None) -> dict[str, Path]:
    """Tokenizer / processor files of the checkpoint ``model`` was loaded from, for the export.

    Returns ``{file name: path}`` for ``export_merged(..., extra_files=...)`` so that the exported
    directory opens with ``AutoTokenizer`` / ``AutoProcessor`` as well as ``AutoModel``. Empty for
    models not loaded by this module, or when the source has no tokenizer or processor.
    """
    source = getattr(model, SOURCE_ATTRIBUTE, None)
    if source is None:
        return {}
    target = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="adamerge-extra-"))
    target.mkdir(parents=True, exist_ok=True)
    writers: list[Callable[[], Any]] = []
    from transformers import AutoImageProcessor, AutoTokenizer

    for loader in (AutoTokenizer, AutoImageProcessor):
        def write(loader: Any = loader) -> None:
            loader.from_pretrained(source, local_files_only=not Path(source).exists() and _offline()).save_pretrained(target)
        writers.append(write)
    for write in writers:
        try:
            write()
        except Exception as e:  # no tokenizer (vision models) / no processor (text models)
            log.debug("no extra files from %s: %s", source, e)
    reserved = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json"}
    return {f.name: f for f in sorted(target.iterdir()) if f.is_file() and f.name not in reserved}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
