"""The "Python API" block of docs/own-models.md, run as written on the reduced demo zoo: a pool and a MultiTaskDataModule, the learned
module by name, the user's own Lightning Trainer (logger, strategy), export, and load_merged back."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

import adamerge
from adamerge.demo import zoo as demo
from adamerge.methods.configs import CONF_DIR

PAGE = Path(__file__).resolve().parents[1] / "docs" / "own-models.md"


def docs_python_api() -> str:
    block = re.search(r"<!-- python-api:start -->\n```python\n(.*?)```\n<!-- python-api:end -->", PAGE.read_text(), re.S)
    assert block, "docs/own-models.md has no python-api block"
    return block.group(1)


def test_docs_python_api_learns_exports_and_loads_back(zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "build_demo_zoo", lambda *args, **kwargs: zoo)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(docs_python_api(), namespace)
    module, model, pool, trainer = namespace["module"], namespace["model"], namespace["pool"], namespace["trainer"]

    assert trainer.global_step == 10 and len(module.history) == 10
    assert any((tmp_path / "logs").rglob("metrics.csv"))  # the user's own logger got the run's metrics
    # The residual form over TSV-M: its scale 1 and the four tasks' corrections 0, frozen; the mask learned.
    assert module.merged.task_names[-1] == "base_merge" and module.coefficients() == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert any(logits.abs().max() > 0 for logits in module.mask.parameters())

    config = json.loads((tmp_path / "merged_model" / "merge_config.json").read_text())
    assert config["method"] == "concrete_task_arithmetic_on_tsv_merge" and config["coefficients"] == module.coefficients()
    assert config["hyperparameters"]["mask_lr"] == 0.05 and config["hyperparameters"]["base"] == "tsv_merge"  # defaults
    assert config["mask"]["eval_mask"] == "continuous"
    assert config["objective"]["name"] == "weighted_sum"
    assert set(config["expert_agreement"]) == set(model.tasks)  # the experts ran once over the data it was given
    assert config["accuracy"] == module.last_accuracy and set(config["accuracy"]) == set(model.tasks)
    images = torch.randn(3, 3, 32, 32)
    fused = module.merge_and_unload().eval()
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(images), fused(images), atol=1e-5, rtol=1e-5)
        for task in model.tasks:
            torch.testing.assert_close(model(images, task=task), pool.heads[task](fused(images)), atol=1e-5, rtol=1e-5)


def test_a_pool_from_yaml_builds_a_learned_module_with_the_documented_defaults(zoo, tmp_path):
    text = (CONF_DIR / "modelpool" / "demo.yaml").read_text().replace("${zoo_dir}", str(zoo))
    (tmp_path / "my_pool.yaml").write_text(text)
    pool = adamerge.pool_from_yaml(tmp_path / "my_pool.yaml")
    assert isinstance(pool, adamerge.ModelPool) and pool.architecture["_target_"].endswith("EfficientNetLite0")
    assert pool.sources()["digits"]["source"] == str(zoo / "finetuned" / "digits.safetensors")
    module = adamerge.build_learned_module(pool, "adamerging_task_wise", objective={"name": "entropy"})
    assert module.method_hyperparameters["lr"] == 1e-3 and module.objective.config()["name"] == "entropy"
