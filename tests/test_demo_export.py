"""Round trip on the (reduced) demo zoo: run -> export -> load_merged -> each task's test accuracy equals results.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest
import torch
import yaml

from adamerge import load_backbone, load_merged
from adamerge.export.multitask import TaskModel

METHODS = ("task_arithmetic", "adamerging_layer_wise")
EVAL_BATCH = 16


@pytest.fixture(scope="module")
def demo_run(zoo, tmp_path_factory) -> Path:
    from hydra import compose, initialize_config_dir

    from adamerge.cli.main import register_resolvers
    from adamerge.methods.configs import CONF_DIR
    from adamerge.cli.runner import run

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"zoo_dir={zoo}", f"method.methods=[{','.join(METHODS)}]", "export.static=true", "num_threads=1",
            "trainer=cpu", "trainer.max_steps=3", "trainer.enable_progress_bar=false", "logger=none",
            "++method_overrides.adamerging_layer_wise.lr=0.05", "data.batch_size=8", f"data.eval_batch_size={EVAL_BATCH}",
        ])
    run_dir = tmp_path_factory.mktemp("demo_run")
    run(cfg, run_dir)
    return run_dir


@pytest.mark.parametrize("method", METHODS)
def test_exported_model_reproduces_the_runs_accuracy(demo_run, zoo, method):
    results = json.loads((demo_run / method / "results.json").read_text())
    manifest = json.loads((zoo / "zoo.json").read_text())
    model = load_merged(results["export"])
    assert model.tasks == manifest["tasks"]
    for task in model.tasks:
        names = manifest["class_names"][task]
        assert model.class_names(task) == names  # the datasets' ClassLabel names
        test = datasets.load_from_disk(str(zoo / "data" / task))["test"]
        # Raw PIL images, preprocessed as the run recorded, in the run's evaluation batches.
        predicted = model.predict(list(test["image"]), task=task, batch_size=EVAL_BATCH)
        correct = sum(p == names[y] for p, y in zip(predicted, test["label"]))
        assert correct / len(test) == results["accuracy"][task], task
    single = load_merged(results["export"], task=model.tasks[0])
    assert isinstance(single, TaskModel)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(single(x), model(x, task=model.tasks[0]))
        assert torch.equal(load_backbone(results["export"])(x), model.backbone(x))


def test_model_card_of_a_demo_export(demo_run, zoo, monkeypatch, capsys):
    for method in METHODS:
        export = Path(json.loads((demo_run / method / "results.json").read_text())["export"])
        card = (export / "README.md").read_text()
        front = yaml.safe_load(card.split("---")[1])
        # The demo's weights derive from EfficientNet-Lite0 (Apache-2.0, declared by conf/pool_data/demo_demo.yaml).
        assert front["license"] == "apache-2.0" and front["pipeline_tag"] == "image-classification"
        assert method in front["tags"] and "base_model" not in front  # local sources only: no hub ids
        config = json.loads((export / "merge_config.json").read_text())
        for role, source in config["sources"].items():
            assert f"| {role} | `{source['source']}` | `{source['sha256']}` |" in card
        for task, accuracy in config["accuracy"].items():
            assert f"| {task} | {100 * accuracy:.2f} |" in card
        learned = method != "task_arithmetic"
        assert (export / "coefficients.png").is_file() == learned and ("(coefficients.png)" in card) == learned
        (code,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
        monkeypatch.chdir(export.parent)
        test = datasets.load_from_disk(str(zoo / "data" / "digits"))["test"]
        exec(code, {"images": test["image"][0]})
        assert re.fullmatch(r"\['\d'\]\n", capsys.readouterr().out)
