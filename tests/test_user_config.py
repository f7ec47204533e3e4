"""A run on the user's own pool and data (their groups under ``--config-dir``) gets the methods' documented
defaults: none of the demo's budget, step sizes, threads or licence, and the demo zoo is never built or opened."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

USER_RUN = ["modelpool=mine", "data=mine", "method=adamerging_layer_wise"]


def write_user_groups(root: Path, zoo: Path) -> Path:
    """``root/modelpool/mine.yaml`` and ``root/data/mine.yaml``: the reduced zoo's files named the way a user
    names their own checkpoints and data (plain paths, no ``zoo_dir``)."""
    tasks = json.loads((zoo / "zoo.json").read_text())["tasks"]
    pool = {
        "_target_": "adamerge.pool.modelpool.ModelPool",
        "backbone": {"_target_": "adamerge.backbones.efficientnet.EfficientNetLite0", "num_classes": None},
        "pretrained": str(zoo / "pretrained.safetensors"),
        "finetuned": {task: str(zoo / "finetuned" / f"{task}.safetensors") for task in tasks},
        "heads": {task: {"_target_": "adamerge.backbones.heads.linear_head", "path": str(zoo / "heads" / f"{task}.safetensors")}
                  for task in tasks},
    }
    data = {
        "_target_": "adamerge.data.datamodule.MultiTaskDataModule",
        "batch_size": 8,
        "eval_batch_size": 64,
        "tasks": {task: {"path": str(zoo / "data" / task), "split": "test"} for task in tasks},
        "preprocessor": {"_target_": "adamerge.data.preprocessing.ImagePreprocessor", "image_size": 32},
    }
    for group, content in (("modelpool", pool), ("data", data)):
        (root / group).mkdir(parents=True, exist_ok=True)
        (root / group / "mine.yaml").write_text(yaml.safe_dump(content))
    return root


@pytest.fixture
def no_demo_zoo(monkeypatch, tmp_path):
    """Building the demo zoo fails the test; its cache directory is an empty one of the test's own."""
    from adamerge.demo import zoo as demo
    from adamerge.cli.main import register_resolvers

    register_resolvers()
    monkeypatch.setenv(demo.CACHE_ENV_VAR, str(tmp_path / "demo_cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("a run on the user's own pool and data built the demo zoo")

    monkeypatch.setattr(demo, "build_demo_zoo", refuse)


def test_the_command_composes_user_groups_with_the_shipped_ones_and_no_demo_setting(zoo, tmp_path):
    """``adamerge --config-dir mine modelpool=mine data=mine ... --cfg job --resolve``: every interpolation resolved,
    from a directory outside the checkout, with an empty demo cache that must stay empty."""
    mine = write_user_groups(tmp_path / "mine", zoo)
    cache = tmp_path / "demo_cache"
    env = {**os.environ, "ADAMERGE_CACHE_DIR": str(cache), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    shown = subprocess.run([sys.executable, "-m", "adamerge.cli.main", "--config-dir", str(mine), *USER_RUN,
                            "--cfg", "job", "--resolve"], capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=300, stdin=subprocess.DEVNULL)
    assert shown.returncode == 0, shown.stderr[-3000:]
    cfg = yaml.safe_load(shown.stdout)
    assert cfg["modelpool"]["pretrained"] == str(zoo / "pretrained.safetensors")
    assert cfg["trainer"]["max_steps"] == 500 and cfg["num_threads"] is None  # conf/trainer/default.yaml, torch's own
    assert cfg["method_overrides"] == {} and cfg["export"]["license"] is None
    assert "zoo_dir" not in cfg and "demo_zoo_name" not in cfg
    assert not cache.exists() or not any(cache.iterdir())


def compose_run(overrides: list[str], user_dir: Path | None = None):
    """The run's configuration, with ``user_dir`` searched for config groups as ``--config-dir`` does."""
    from hydra import compose, initialize_config_dir

    from adamerge.methods.configs import CONF_DIR

    search = [f"hydra.searchpath=[file://{user_dir}]"] if user_dir else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[*search, *overrides])


def test_a_user_run_learns_with_the_documented_defaults_and_exports_no_licence(zoo, tmp_path, no_demo_zoo):
    from adamerge.methods.configs import method_config
    from adamerge.cli.runner import run

    mine = write_user_groups(tmp_path / "mine", zoo)
    cfg = compose_run([*USER_RUN, "logger=none", "trainer.max_steps=2", "trainer.enable_progress_bar=false"], mine)
    assert method_config(cfg, "adamerging_layer_wise")["lr"] == 0.001  # conf/method/adamerging_layer_wise.yaml
    run(cfg, tmp_path / "run")
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["config"]["lr"] == 0.001 and len(result["objective_history"]) == 2
    card = (tmp_path / "run" / "merged_model" / "README.md").read_text()
    assert "license" not in yaml.safe_load(card.split("---")[1])
    assert "not recorded: none of the sources declares one" in card


def test_the_licence_a_user_sets_is_the_cards(zoo, tmp_path, no_demo_zoo):
    from adamerge.cli.runner import run

    mine = write_user_groups(tmp_path / "mine", zoo)
    cfg = compose_run(["modelpool=mine", "data=mine", "method=task_arithmetic", "export.static=true",
                                  "export.license=mit", "logger=none"], mine)
    run(cfg, tmp_path / "run")
    card = (tmp_path / "run" / "merged_model" / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["license"] == "mit"
    assert "`mit`, as declared by the run (`export.license`)" in card


def test_the_demo_keeps_its_settings():
    """``adamerge`` alone and the demo experiments: the budget, step sizes, threads and licence chosen for the demo."""
    for overrides, zoo_name in (([], "default"), (["experiment=demo"], "default"), (["experiment=demo_second"], "second")):
        cfg = compose_run(overrides)
        assert cfg.trainer.max_steps == 100 and cfg.num_threads == 2 and cfg.export.license == "apache-2.0"
        assert cfg.method_overrides.adamerging_layer_wise.lr == 0.003 and cfg.demo_zoo_name == zoo_name
