"""Per-task transformers classifiers in an export (tiny random BERT and RoBERTa built here), and every text
classifier family's head surviving the trip through a head file."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
import transformers

from adamerge import load_merged
from adamerge.data.datamodule import MultiTaskDataModule
from adamerge.training.evaluation import evaluate
from adamerge.export.writer import export_merged
from adamerge.export.heads import head_records, read_head, write_head_files
from adamerge.methods.learned.merged import MergedModel
from adamerge.backbones.hf import export_extra_files, sequence_classification_body, sequence_classification_head
from adamerge.backbones.hf_checkpoints import HFModelPool
from adamerge.objectives import build_objective
from adamerge.data.preprocessing import TextPreprocessor
from tests.helpers import char_tokenizer

# Two tasks with different label counts: one declares its class names in the dataset (ClassLabel), the other
# only in its fine-tuned classifier's id2label.
TASKS = {"mood": ["sad", "glad"], "weather": ["rain", "sun", "snow"]}
SENTENCES = ["it rained all day.", "what a sunny morning!", "snow again?", "i am so glad.", "that was sad.",
             "the sun is out", "cold and grey", "lovely day"]


def tiny_config(family: str, vocab: int, labels: list[str]) -> transformers.PretrainedConfig:
    return transformers.AutoConfig.for_model(
        family, vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)}, pad_token_id=0)


@pytest.fixture(scope="module", params=["bert", "roberta"])
def text_pool(request, tmp_path_factory) -> dict:
    family = request.param
    root = tmp_path_factory.mktemp(f"text_{family}")
    tokenizer = char_tokenizer(root / "pretrained")
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(
        tiny_config(family, len(tokenizer), ["a", "b"])).save_pretrained(root / "pretrained")
    for k, (task, labels) in enumerate(TASKS.items()):
        torch.manual_seed(k + 1)
        tuned = transformers.AutoModelForSequenceClassification.from_config(tiny_config(family, len(tokenizer), labels))
        tuned.base_model.load_state_dict(transformers.AutoModelForSequenceClassification.from_pretrained(
            root / "pretrained").base_model.state_dict())
        with torch.no_grad():
            for p in tuned.base_model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        tuned.save_pretrained(root / task)
        tokenizer.save_pretrained(root / task)
        label = datasets.ClassLabel(names=labels) if task == "mood" else datasets.Value("int64")
        rows = {"sentence": SENTENCES, "label": [i % len(labels) for i in range(len(SENTENCES))]}
        features = datasets.Features({"sentence": datasets.Value("string"), "label": label})
        datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(root / "data" / task)
    return {"root": root, "family": family}


def merged_export(text_pool, tmp_path) -> tuple[Path, torch.nn.Module, HFModelPool, MultiTaskDataModule]:
    root = text_pool["root"]
    pool = HFModelPool(backbone=sequence_classification_body(root / "pretrained"),
                       finetuned={t: str(root / t) for t in TASKS},
                       heads={t: sequence_classification_head(root / t) for t in TASKS},
                       pretrained=str(root / "pretrained"), auto_class="AutoModelForSequenceClassification")
    vectors = pool.task_vectors()
    merged = MergedModel(pool.fresh_backbone(), vectors, granularity="layer_wise")
    with torch.no_grad():
        merged.coefficients.uniform_(0.2, 0.8)
    fused = merged.merge_and_unload()
    data = MultiTaskDataModule({t: {"path": str(root / "data" / t), "split": "test"} for t in TASKS},
                               eval_batch_size=4, preprocessor=TextPreprocessor(str(root / "pretrained")))
    data.setup()
    out = export_merged(
        fused, tmp_path / "merged_model", merge_config={"method": "adamerging_layer_wise", "tasks": list(TASKS)},
        heads=pool.heads, class_names={t: data.class_names(t) for t in TASKS},
        preprocessors={t: data.task_preprocessor(t) for t in TASKS},
        extra_files=export_extra_files(fused, tmp_path / "extras"), per_task_hf=True,
    )
    return out, fused, pool, data


def test_per_task_directories_are_plain_transformers_classifiers(text_pool, tmp_path):
    out, fused, pool, data = merged_export(text_pool, tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(text_pool["root"] / "pretrained")
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    ours = evaluate(fused, pool.heads, data, list(TASKS), torch.device("cpu"), build_objective("entropy"))["accuracy"]
    for task, labels in TASKS.items():
        directory = out / "tasks" / task
        classifier = transformers.AutoModelForSequenceClassification.from_pretrained(directory)
        assert type(classifier).__name__.lower().startswith(text_pool["family"])
        assert classifier.config.id2label == dict(enumerate(labels)) and classifier.config.label2id["sun" if task == "weather" else "glad"] >= 0
        own_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        assert own_tokenizer(SENTENCES, padding=True, return_tensors="pt")["input_ids"].tolist() == enc["input_ids"].tolist()
        with torch.no_grad():
            expected = pool.heads[task](fused(**enc))  # what adamerge's evaluation computes
            assert torch.equal(classifier(**enc).logits, expected)
        # Its accuracy on the task's data, batch by batch as adamerge evaluated it, is adamerge's.
        correct = 0
        for batch in data.eval_dataloader(task):
            with torch.no_grad():
                correct += int((classifier(**batch["inputs"]).logits.argmax(-1) == batch["labels"]).sum())
        assert correct / len(SENTENCES) == ours[task]


def test_text_export_predicts_sentences_by_name(text_pool, tmp_path):
    out, fused, pool, _ = merged_export(text_pool, tmp_path)
    model = load_merged(out)
    assert model.tasks == list(TASKS) and model.class_names("weather") == TASKS["weather"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(text_pool["root"] / "pretrained")
    for task, labels in TASKS.items():
        enc = tokenizer(SENTENCES, padding="longest", truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            expected = pool.heads[task](fused(**enc))
            single = load_merged(out, task=task)
            assert torch.equal(single(dict(enc)), expected)
        assert model.predict(SENTENCES, task=task) == [labels[i] for i in expected.argmax(-1).tolist()]
        assert single.predict(SENTENCES[0]) == [labels[int(expected[0].argmax())]]


@pytest.mark.parametrize("family", ["bert", "roberta", "deberta-v2", "distilbert", "electra"])
def test_every_family_head_survives_a_head_file(family, tmp_path):
    """The classifier head is rebuilt from its file and config (transformers' own class, no body allocated)."""
    if family == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=99, dim=32, n_heads=4, n_layers=2, hidden_dim=37, num_labels=3)
    else:
        config = transformers.AutoConfig.for_model(family, num_hidden_layers=2, vocab_size=99, hidden_size=32,
                                                   num_attention_heads=4, intermediate_size=37, num_labels=3)
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "model")
    head, body = sequence_classification_head(tmp_path / "model"), sequence_classification_body(tmp_path / "model")
    records = head_records({"t": head})
    write_head_files(tmp_path, {"t": head}, records)
    loaded = read_head(tmp_path, "t", records["t"])
    ids = torch.randint(5, 99, (2, 7))
    with torch.no_grad():
        features = body(input_ids=ids, attention_mask=torch.ones_like(ids))
        assert torch.equal(loaded(features), head(features))
    assert records["t"]["class_names"] is None  # LABEL_0..2: generic names are not class names


def test_sentence_pairs_are_preprocessed_as_pairs(text_pool):
    """A two-column text task (GLUE's RTE, MRPC...) takes 2-tuples; a bare sentence is refused, naming the columns."""
    from adamerge.export.multitask import TaskModel

    root = text_pool["root"]
    pre = TextPreprocessor(str(root / "pretrained"), text_columns=["premise", "hypothesis"])
    model = TaskModel(sequence_classification_body(root / "pretrained"), sequence_classification_head(root / "mood"),
                      "pairs", TASKS["mood"], pre).eval()
    pairs = [("it rained.", "it was wet."), ("sunny day", "no rain at all today")]
    enc = transformers.AutoTokenizer.from_pretrained(root / "pretrained")(
        [a for a, _ in pairs], [b for _, b in pairs], padding="longest", truncation=True, max_length=128,
        return_tensors="pt")
    with torch.no_grad():
        expected = model(dict(enc)).argmax(-1).tolist()
    assert model.predict(pairs) == [TASKS["mood"][i] for i in expected]
    with pytest.raises(ValueError, match=r"sentence pairs \(premise, hypothesis\)"):
        model.predict("just one sentence")
