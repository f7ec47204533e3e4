"""The model card of an export: ``README.md`` with Hugging Face front matter, and the coefficient heatmap.

Written from the export's own ``merge_config.json`` content (so it says nothing the export does not record):
front matter (``base_model`` -- the hub ids among the sources --, tags, ``license`` as declared by the run or by
the sources' own model cards, ``pipeline_tag`` where the heads tell), the lines of code that load it, the run's
per-task accuracy, the method and its hyperparameters, the learned coefficients as ``coefficients.png``, the
heads and the source checkpoints with their sha256.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adamerge.pool.checkpoints import looks_like_path

__all__ = ["MODEL_CARD", "HEATMAP", "declared_license", "write_model_card"]

MODEL_CARD = "README.md"
HEATMAP = "coefficients.png"
TAGS = ("adamerge", "merge", "model-merging")


def declared_license(source: str) -> str | None:
    """The ``license`` of a local checkpoint directory's own model card (its README.md front matter), if any."""
    readme = Path(source).expanduser() / MODEL_CARD
    if not readme.is_file():
        return None
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("---"):
        return None
    import yaml

    try:
        front = yaml.safe_load(text[3:].split("\n---", 1)[0])
    except yaml.YAMLError:
        return None
    value = front.get("license") if isinstance(front, Mapping) else None
    return str(value) if isinstance(value, (str, int, float)) and str(value).strip() else None


def _mapping(config: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """A mapping entry of a merge config (written by callers of export_merged: anything else counts as absent)."""
    value = config.get(key)
    return value if isinstance(value, Mapping) else {}


def _source_entries(config: Mapping[str, Any]) -> list[tuple[str, str, str | None]]:
    """(role, source, sha256) of every recorded source checkpoint."""
    sources = config.get("sources")
    items = sources.items() if isinstance(sources, Mapping) else enumerate(sources or []) if isinstance(sources, list) else []
    entries = []
    for role, entry in items:
        entry = entry if isinstance(entry, Mapping) else {"source": entry}
        entries.append((str(entry.get("role", role)), str(entry.get("source", entry.get("path", ""))), entry.get("sha256")))
    return entries


def _hub_id(source: str) -> bool:
    return not looks_like_path(source) and not Path(source).expanduser().exists()


def _license(config: Mapping[str, Any], declared: str | None) -> tuple[str | None, str]:
    """(front-matter license, the sentence saying where it comes from)."""
    if declared:
        return declared, f"`{declared}`, as declared by the run (`export.license`)."
    found = {}
    for role, source, _ in _source_entries(config):
        value = declared_license(source)
        if value:
            found[role] = value
    if not found:
        return None, "not recorded: none of the sources declares one (set `export.license` to state it)."
    said = ", ".join(f"{role}: `{value}`" for role, value in found.items())
    if len(set(found.values())) == 1:
        return next(iter(found.values())), f"from the sources' model cards ({said}); the other sources declare none."
    return "other", f"the sources declare different licenses ({said})."


def _pipeline_tag(config: Mapping[str, Any]) -> str | None:
    heads = list(_mapping(config, "heads").values())
    inputs = {(head.get("inputs") or {}).get("kind") for head in heads}
    if heads and inputs == {"image"}:
        return "image-classification"
    if heads and inputs == {"text"}:
        return "text-classification"
    architecture = str(_mapping(config, "architecture").get("transformers_class", ""))
    if heads and all(head.get("kind") == "identity" for head in heads) and architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return "text-generation"
    return None


def _front_matter(config: Mapping[str, Any], license_id: str | None) -> str:
    import yaml

    front: dict[str, Any] = {}
    hub = [source for _, source, _ in _source_entries(config) if source and _hub_id(source)]
    if hub:
        front["base_model"] = hub
        front["base_model_relation"] = "merge"
    front["tags"] = [*TAGS, str(config.get("method", "unknown"))]
    if license_id:
        front["license"] = license_id
    if tag := _pipeline_tag(config):
        front["pipeline_tag"] = tag
    if "transformers_class" in _mapping(config, "architecture"):
        front["library_name"] = "transformers"
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _code(lines: Sequence[str]) -> str:
    return "```python\n" + "\n".join(lines) + "\n```"


def _load_code(config: Mapping[str, Any], name: str, directory: Path) -> str:
    heads = _mapping(config, "heads")
    blocks = []
    has_tokenizer = (directory / "tokenizer_config.json").is_file()
    classifier_tasks = [task for task, head in heads.items() if head.get("kind") != "identity"]
    if classifier_tasks:
        task = classifier_tasks[0]
        inputs = heads[task].get("inputs") or {}
        kind = inputs.get("kind")
        sentence = ('[("a first sentence.", "a second sentence.")]' if len(inputs.get("text_columns") or ()) == 2
                    else '["an example sentence."]')
        example = {"image": "images", "text": sentence}.get(kind, "inputs")
        note = {"image": "  # images: a PIL image or an H×W×3 uint8 array, or a list of them",
                "text": ""}.get(kind, "  # inputs: model-ready tensors")
        blocks.append(_code(["import adamerge",
                             f'model = adamerge.load_merged("{name}")  # tasks: {", ".join(heads)}',
                             f'print(model.predict({example}, task="{task}")){note}']))
        custom = [task for task, head in heads.items() if head.get("kind") == "module"]
        if custom:
            blocks.append(f"The heads of {', '.join(f'`{t}`' for t in custom)} are of classes an export does not rebuild "
                          "by itself: pass them as `load_merged(..., heads={task: module})` (or name their class in "
                          "`trust=`).")
    for task, head in heads.items():
        if head.get("transformers_dir"):
            where = f"{name}/{head['transformers_dir']}"
            lines = ["from transformers import AutoModelForSequenceClassification, AutoTokenizer",
                     f'classifier = AutoModelForSequenceClassification.from_pretrained("{where}")']
            if has_tokenizer:
                lines.append(f'tokenizer = AutoTokenizer.from_pretrained("{where}")')
            blocks.append(f"Task `{task}` as a plain transformers classifier (one directory per task under "
                          f"`tasks/`):\n\n" + _code(lines))
            break
    architecture = _mapping(config, "architecture").get("transformers_class")
    if not classifier_tasks and architecture:
        auto = "AutoModelForCausalLM" if _pipeline_tag(config) == "text-generation" else "AutoModel"
        lines = [f"from transformers import {auto}, AutoTokenizer", f'model = {auto}.from_pretrained("{name}")']
        if has_tokenizer:
            lines.append(f'tokenizer = AutoTokenizer.from_pretrained("{name}")')
        blocks.append(_code(lines))
    if not blocks:  # exported without heads: the merged backbone alone
        blocks.append(_code(["import adamerge", f'backbone = adamerge.load_backbone("{name}")']))
    return "\n\n".join(blocks)


def _accuracy(config: Mapping[str, Any]) -> str:
    accuracy = _mapping(config, "accuracy")
    if not accuracy:
        return "No accuracy was recorded with this export."
    data, agreement = _mapping(config, "evaluation"), _mapping(config, "expert_agreement")

    def percent(value: Any) -> str:
        return f"{100 * value:.2f}" if isinstance(value, (int, float)) else "n/a"

    rows = []
    for task, value in accuracy.items():
        where = data.get(task) or {}
        split = f"`{where['path']}` ({where.get('split')}, {where.get('examples')} examples)" if where.get("path") else ""
        rows.append([task, percent(value), *([percent(agreement.get(task))] if agreement else []), split])
    finite = [v for v in accuracy.values() if isinstance(v, (int, float))]
    if finite:
        agreed = [v for v in agreement.values() if isinstance(v, (int, float))]
        mean = [percent(sum(agreed) / len(agreed)) if agreed else "n/a"] if agreement else []
        rows.append(["**average**", f"{100 * sum(finite) / len(finite):.2f}", *mean, ""])
    header = ["task", "accuracy (%)", *(["agrees with the task's expert (%)"] if agreement else []), "evaluated on"]
    text = ("Accuracy (%) of this merged model on each task's evaluation split, measured by adamerge during the "
            "run that wrote this export")
    if agreement:
        text += (", and the share of those inputs on which it predicts what that task's own fine-tuned model predicts "
                 "(label-free: no labels are needed to measure it)")
    return text + ":\n\n" + _table(header, rows)


def _method(config: Mapping[str, Any]) -> str:
    hyperparameters = _mapping(config, "hyperparameters")
    rows = [[f"`{key}`", f"`{json.dumps(value)}`"] for key, value in hyperparameters.items()]
    objective = config.get("objective")
    text = f"Method: **{config.get('method', 'unknown')}**"
    if objective:
        text += f"; label-free objective: `{json.dumps(objective)}`"
    return text + ".\n\n" + (_table(["hyperparameter", "value"], rows) if rows else "No hyperparameters.")


def _heatmap(directory: Path, config: Mapping[str, Any]) -> str:
    import numpy as np

    coefficients = config.get("coefficients")
    try:
        matrix = np.asarray(coefficients, dtype=float)
    except (TypeError, ValueError):
        matrix = np.empty(0)
    if not isinstance(coefficients, list) or matrix.ndim not in (1, 2) or matrix.size == 0:
        return "No learned coefficients were recorded (a data-free merge)."
    from adamerge.reporting.results import coefficient_heatmap

    rows, columns = (1, matrix.shape[0]) if matrix.ndim == 1 else matrix.shape
    named = config.get("coefficient_columns") or config.get("tasks")
    names = [str(t) for t in named] if isinstance(named, list) else []
    labels = names if len(names) == columns else [f"task {i}" for i in range(columns)]
    coefficient_heatmap(matrix, labels, directory / HEATMAP, title=f"{config.get('method', '')} coefficients")
    shape = f"{rows} layer rows × {columns} vectors" if rows > 1 else f"one coefficient per vector ({columns})"
    return f"The learned merge coefficients ({shape}; exact values in `merge_config.json`):\n\n![merge coefficients]({HEATMAP})"


def _heads(config: Mapping[str, Any]) -> str:
    rows = []
    for task, head in _mapping(config, "heads").items():
        names = head.get("class_names") or []
        shown = ", ".join(names[:6]) + (f", … ({len(names)})" if len(names) > 6 else "")
        rows.append([task, head.get("kind"), head.get("num_classes") if head.get("num_classes") is not None else "",
                     shown, f"`{head['file']}`" if head.get("file") else "", f"`{head['sha256']}`" if head.get("sha256") else ""])
    if not rows:
        return "This export holds no task heads."
    return _table(["task", "head", "classes", "class names", "file", "sha256"], rows)


def _sources(config: Mapping[str, Any]) -> str:
    rows = [[role, f"`{source}`", f"`{sha256}`" if sha256 else "(not hashed: a hub id or an in-memory module)"]
            for role, source, sha256 in _source_entries(config)]
    return _table(["role", "checkpoint", "sha256"], rows) if rows else "No sources were recorded."


def write_model_card(directory: Path, config: Mapping[str, Any], *, name: str, license: str | None = None) -> None:
    """Write ``README.md`` (and ``coefficients.png`` when the merge has learned coefficients) into ``directory``;
    ``name`` is the export directory's final name, which the loading code in the card opens."""
    license_id, license_text = _license(config, license)
    tasks = [str(t) for t in config.get("tasks") or []] if isinstance(config.get("tasks"), list) else list(_mapping(config, "heads"))
    versions = _mapping(config, "versions")
    from adamerge.training.heads_config import model_card_text  # heads: adapt -- the card says they were re-learned

    adapted_heads = model_card_text(config)
    head_state = "adapted" if adapted_heads else "frozen"
    software = ", ".join(f"{package} {version}" for package, version in versions.items() if version)
    sections = [
        _front_matter(config, license_id),
        f"# {config.get('method', 'merged')} merge of {len(tasks)} tasks\n\n"
        f"One backbone merged by adamerge from {len(tasks)} fine-tuned checkpoints of one pretrained model "
        f"(tasks: {', '.join(f'`{t}`' for t in tasks)}), with each task's {head_state} head under `heads/`. Every file "
        "is listed with its sha256 in `merge_config.json`; loading checks them.",
        "## Load it\n\n" + _load_code(config, name, directory),
        "## Accuracy\n\n" + _accuracy(config),
        "## Method\n\n" + _method(config),
        "## Merge coefficients\n\n" + _heatmap(directory, config),
        "## Task heads\n\n" + (adapted_heads + "\n\n" if adapted_heads else "") + _heads(config),
        "## Sources\n\n" + _sources(config),
        "## License\n\n" + license_text,
        f"## Software\n\n{software}." if software else "",
    ]
    (directory / MODEL_CARD).write_text("\n\n".join(s for s in sections if s).rstrip() + "\n", encoding="utf-8")
