"""Hugging Face ``transformers`` backbones: checkpoint key alignment, text classification, causal LMs.

Three kinds of real backbones share this module:

* **sequence classification** (BERT / RoBERTa / DeBERTa / DistilBERT / ELECTRA families): the merged
  backbone is the *body* (``model.base_model``), every task keeps its own frozen classification head,
  and :class:`SequenceClassificationHead` reproduces ``*ForSequenceClassification.forward`` from the
  body's output (each family's head consumes something different: BERT's ``pooler_output``,
  RoBERTa's first token through its own dense layer, DeBERTa's task-specific ``ContextPooler``...);
* **causal LMs** (``AutoModelForCausalLM``): the whole model is merged, the head is
  :class:`adamerge.models.heads.Identity` (the logits), the objective is the entropy of the
  next-token distributions over unlabeled prompts (padding masked), coefficients optionally shared
  per decoder block (:func:`block_layer_groups`);
* **CLIP** (:mod:`adamerge.models.clip`), which reuses the key alignment below.

Fine-tuned checkpoints rarely have exactly the backbone's keys: a ``BertForSequenceClassification``
file says ``bert.encoder...`` and has a ``classifier``; a ``CLIPModel`` file has a text tower;
checkpoints written by transformers 4.x keep ``vision_model.`` prefixes that 5.x's
``CLIPVisionModel`` no longer has. :func:`align_state_dict` finds the prefix that maps a checkpoint
onto the backbone's keys, drops what the backbone does not have (logged), and fails with a message
naming the checkpoint when the backbone's tensors are not all there. :class:`HFModelPool` applies it
to the pretrained and every fine-tuned checkpoint.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adamerge.checkpoints import CheckpointError, describe_source, load_hf_model, load_state_dict
from adamerge.merged import block_layer_groups, resolve_layer_groups
from adamerge.modelpool import ModelPool
from adamerge.task_vectors import tied_aliases

log = logging.getLogger(__name__)

__all__ = [
    "HFModelPool",
    "align_state_dict",
    "load_checkpoint_state",
    "cache_dir",
    "sequence_classification_body",
    "sequence_classification_head",
    "SequenceClassificationHead",
    "causal_lm",
    "block_layer_groups",
    "resolve_layer_groups",
    "PromptPreprocessor",
    "PromptDataModule",
    "export_extra_files",
]

# Set on every model this module loads, so the pool can skip re-reading the same pretrained
# checkpoint and the export can copy the tokenizer / processor next to the merged weights.
SOURCE_ATTRIBUTE = "adamerge_source"


# --- where cached artefacts (zero-shot heads) live ------------------------------------------------
def cache_dir() -> Path:
    """``$ADAMERGE_CACHE_DIR``, else the user cache directory (``~/.cache/adamerge`` on Linux)."""
    override = os.environ.get("ADAMERGE_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("adamerge"))


def _dtype(dtype: str | torch.dtype | None) -> Any:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if not hasattr(torch, str(dtype)) or not isinstance(getattr(torch, str(dtype)), torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use e.g. float32, bfloat16, float16 or auto")
    return getattr(torch, str(dtype))


def load_pretrained_model(source: str | os.PathLike, auto_class: str, *, dtype: Any = None,
                          trust_remote_code: bool = False, **kwargs: Any) -> nn.Module:
    """``transformers.<auto_class>.from_pretrained(source)`` with adamerge's offline-aware errors."""
    if dtype is not None:
        kwargs["dtype"] = _dtype(dtype)
    model = load_hf_model(source, auto_class, trust_remote_code=trust_remote_code, **kwargs)
    setattr(model, SOURCE_ATTRIBUTE, os.fspath(source))
    return model.eval()


# --- aligning checkpoint keys with the backbone ---------------------------------------------------
def _prefix_votes(state_keys: Iterable[str], expected: set[str]) -> Counter:
    """For every dotted split ``prefix + rest`` of a checkpoint key with ``rest`` expected, one vote."""
    votes: Counter = Counter()
    for key in state_keys:
        if key in expected:
            votes[""] += 1
        parts = key.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[i:]) in expected:
                votes[".".join(parts[:i]) + "."] += 1
    return votes


def _groups(keys: Iterable[str], depth: int = 2) -> str:
    counts = Counter(".".join(k.split(".")[:depth]) for k in keys)
    return ", ".join(f"{name}.* ({n})" if n > 1 else name for name, n in sorted(counts.items()))


def align_state_dict(
    state: Mapping[str, Tensor],
    expected: Iterable[str],
    *,
    source: str = "checkpoint",
    optional: Iterable[str] = (),
    prefixes: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Rename ``state``'s keys onto ``expected`` (the backbone's), dropping what the backbone lacks.

    The mapping is one prefix removed from every key (``""``, ``"bert."``, ``"vision_model."``,
    ``"model."``...), chosen as the prefix that covers the most expected keys (``prefixes`` limits
    the candidates). Keys of ``state`` outside that prefix or not expected are dropped and logged.
    ``optional`` keys (tied aliases that save_pretrained omits) may be missing; any other missing
    key raises :class:`CheckpointError` naming ``source`` and showing both sides' keys.
    """
    expected = list(expected)
    wanted = set(expected)
    optional = set(optional)
    required = wanted - optional
    votes = _prefix_votes(state, wanted)
    if prefixes is not None:
        votes = Counter({p: n for p, n in votes.items() if p in set(prefixes) | {""}})
    if not votes:
        raise CheckpointError(
            f"checkpoint {source!r} does not fit the backbone: none of its {len(state)} keys matches a "
            f"backbone tensor under any prefix. Backbone keys look like {sorted(wanted)[:3]}; the "
            f"checkpoint's look like {sorted(state)[:3]}. Is it a checkpoint of the same architecture?"
        )
    # Most coverage wins; on a tie the shorter prefix (identity first).
    prefix = max(votes, key=lambda p: (votes[p], -len(p)))
    aligned = {key[len(prefix):]: value for key, value in state.items()
               if key.startswith(prefix) and key[len(prefix):] in wanted}
    missing = sorted(required - set(aligned))
    if missing:
        raise CheckpointError(
            f"checkpoint {source!r} does not contain every tensor of the backbone: after removing the "
            f"prefix {prefix!r} it lacks {len(missing)} of {len(required)}, e.g. {missing[:5]}. "
            f"Checkpoint keys look like {sorted(state)[:5]}. Check that the fine-tuned and pretrained "
            f"models share one architecture (and that a CLIP checkpoint is the vision tower of the "
            f"same CLIP model)."
        )
    dropped = [key for key in state if not (key.startswith(prefix) and key[len(prefix):] in wanted)]
    if dropped:
        log.info("checkpoint %s: using keys under prefix %r; not part of the merged backbone: %s",
                 source, prefix, _groups(dropped))
    return aligned


def _is_hf_directory(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def load_checkpoint_state(source: Any, auto_class: str = "AutoModel", *, trust_remote_code: bool = False,
                          dtype: Any = None) -> dict[str, Tensor]:
    """A checkpoint's state dict, read the way transformers itself would read it.

    Hub ids and ``save_pretrained`` directories go through ``<auto_class>.from_pretrained`` so that
    transformers' own key conversions (legacy prefixes, fused experts...) apply; weights the
    checkpoint did not contain (freshly initialised by transformers) are left out, so they can never
    pass for fine-tuned values. Files, modules and state dicts go through
    :func:`adamerge.checkpoints.load_state_dict`.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(os.fspath(source)).expanduser()
        from_hub = isinstance(source, str) and not path.exists()
        if _is_hf_directory(path) or from_hub:
            kwargs: dict[str, Any] = {"output_loading_info": True}
            if dtype is not None:
                kwargs["dtype"] = _dtype(dtype)
            # A missing local path is reported as such by load_hf_model; hub failures name the id.
            model, info = load_hf_model(source, auto_class, trust_remote_code=trust_remote_code, **kwargs)
            absent = set(info.get("missing_keys") or ())
            return {k: v.detach() for k, v in model.state_dict().items() if k not in absent}
    return load_state_dict(source, trust_remote_code=trust_remote_code)


class HFModelPool(ModelPool):
    """A :class:`~adamerge.modelpool.ModelPool` whose checkpoints are aligned onto the backbone's keys.

    ``auto_class`` is the transformers class that reads hub ids and ``save_pretrained`` directories
    (``AutoModel`` for CLIP vision towers and text bodies, ``AutoModelForCausalLM`` for LMs).
    ``pretrained`` may name the checkpoint the backbone was built from: it is then not read twice.
    """

    def __init__(self, *args: Any, auto_class: str = "AutoModel", trust_remote_code: bool = False,
                 checkpoint_prefixes: Sequence[str] | None = None, **kwargs: Any) -> None:
        self.auto_class = auto_class
        self.trust_remote_code = trust_remote_code
        self.checkpoint_prefixes = list(checkpoint_prefixes) if checkpoint_prefixes is not None else None
        super().__init__(*args, **kwargs)

    def _expected(self) -> tuple[list[str], set[str]]:
        own = self.backbone.state_dict()
        return list(own), set(tied_aliases(own))

    def load_checkpoint(self, source: Any) -> dict[str, Tensor]:
        """One checkpoint's state dict with exactly the backbone's keys (tied aliases may be absent)."""
        state = load_checkpoint_state(source, self.auto_class, trust_remote_code=self.trust_remote_code)
        expected, aliases = self._expected()
        return align_state_dict(state, expected, source=describe_source(source), optional=aliases,
                                prefixes=self.checkpoint_prefixes)

    def _load_pretrained(self, source: Any) -> None:
        built_from = getattr(self.backbone, SOURCE_ATTRIBUTE, None)
        if isinstance(source, (str, os.PathLike)) and built_from is not None and _same_source(source, built_from):
            return  # the backbone factory already loaded exactly these weights
        state = self.load_checkpoint(source)
        result = self.backbone.load_state_dict(state, strict=False)
        _, aliases = self._expected()
        missing = [name for name in result.missing_keys if name not in aliases]
        if missing:  # align_state_dict already guarantees this; kept as a last line of defence
            raise CheckpointError(f"pretrained checkpoint {describe_source(source)!r} lacks {missing[:5]}")


def _same_source(a: Any, b: Any) -> bool:
    a, b = os.fspath(a), os.fspath(b)
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


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
    from adamerge.data import MultiTaskDataModule

    return MultiTaskDataModule


class PromptDataModule(_datamodule_base()):  # type: ignore[misc]
    """:class:`~adamerge.data.MultiTaskDataModule` for prompt data without a label column.

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
