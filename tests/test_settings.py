"""The run's settings are parsed once from the composed configuration into frozen, typed objects (adamerge.cli.settings),
and what older versions wrote -- a configuration, a run record -- meets a clear answer about the 0.3 layout."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from adamerge.cli.runner import build_from_config
from adamerge.cli.settings import (
    EVALUATION, ExportSettings, Outputs, RunOptions, RunSettings, parse_outputs, parse_run_settings, run_record,
)
from adamerge.errors import ConfigError
from adamerge.methods.configs import CONF_DIR
from adamerge.storage.renamed import RENAMED, current_path, recorded_target
from adamerge.training.protected_config import ProtectedSettings
from adamerge.training.resume import config_differences

TASKS = ("digits", "textures", "photos", "science")


def fake_zoo(root: Path) -> Path:
    """Empty files where the demo pool's checkpoints are: the settings check that local paths exist, nothing more."""
    (root / "finetuned").mkdir(parents=True)
    for path in [root / "pretrained.safetensors", *(root / "finetuned" / f"{task}.safetensors" for task in TASKS)]:
        path.touch()
    return root


def composed(zoo: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"zoo_dir={zoo}", "logger=none", *overrides])


def test_a_comparison_parses_into_frozen_typed_settings(tmp_path):
    cfg = composed(fake_zoo(tmp_path), "method=compare", "method.methods=[individual,ties,adamerging_task_wise]",
                   "seed=3", "data.eval_batch_size=32", "export.static=true", "on_nonfinite=skip")
    settings = parse_run_settings(cfg)
    assert isinstance(settings, RunSettings) and isinstance(settings.options, RunOptions)
    assert settings.methods == ("individual", "ties", "adamerging_task_wise")
    assert dict(settings.outputs.kinds) == {"individual": EVALUATION, "ties": "static", "adamerging_task_wise": "learned"}
    assert settings.outputs.comparison and settings.outputs.method_dir(tmp_path, "ties") == tmp_path / "ties"
    assert settings.outputs.learned == ["adamerging_task_wise"]
    assert settings.outputs.exported == (["ties", "adamerging_task_wise"] if settings.outputs.export.enabled else [])
    assert settings.options.seed == 3 and settings.options.on_nonfinite == "skip" and settings.data.eval_batch_size == 32
    assert settings.options.activation_checkpointing is False  # the default: keep every block's activations
    assert settings.hyperparameters["individual"] == {} and settings.hyperparameters["ties"]["top_k"] == 0.2
    assert settings.protected == ProtectedSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.options.seed = 4  # type: ignore[misc]


def test_the_directory_check_reads_only_what_it_needs(tmp_path):
    outputs = parse_outputs(composed(fake_zoo(tmp_path), "method=ties", "export.static=true", "export.overwrite=true"))
    assert outputs == Outputs(("ties",), {"ties": "static"}, False, False, outputs.export)
    assert isinstance(outputs.export, ExportSettings) and outputs.export.overwrite and outputs.export.static
    assert outputs.method_dir(tmp_path, "ties") == tmp_path


@pytest.mark.parametrize(("override", "message"), [
    ("expert_cache_max_gb=-1", "expert_cache_max_gb=-1 is invalid"),
    ("++resume=maybe", "resume='maybe' is invalid"),
    ("export.per_task_hf=often", "export.per_task_hf='often' is invalid"),
    ("data.batch_size=0", "data.batch_size=0 is invalid"),
    ("activation_checkpointing=5", "activation_checkpointing=5 is invalid"),
])
def test_a_bad_setting_fails_where_it_is_parsed_naming_key_and_value(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_run_settings(composed(fake_zoo(tmp_path), "method=ties", override))


def test_the_run_record_is_the_resolved_configuration_without_hydra(tmp_path):
    record = run_record(composed(fake_zoo(tmp_path), "method=ties"))
    assert "hydra" not in record and record["method"]["name"] == "ties"
    assert record["modelpool"]["pretrained"] == str(tmp_path / "pretrained.safetensors")


# -- what 0.2 wrote ------------------------------------------------------------------------------------------------
def test_every_moved_module_has_its_new_path():
    assert current_path("adamerge.models.efficientnet.EfficientNetLite0") == "adamerge.backbones.efficientnet.EfficientNetLite0"
    assert current_path("adamerge.modelpool.ModelPool") == "adamerge.pool.modelpool.ModelPool"
    assert current_path("adamerge.data.ImagePreprocessor") == "adamerge.data.preprocessing.ImagePreprocessor"
    assert current_path("adamerge.errors.ConfigError") == "adamerge.errors.ConfigError"  # did not move
    assert current_path("torch.nn.Identity") == "torch.nn.Identity"
    assert len(RENAMED) >= 70


def test_a_recorded_class_path_is_mapped_only_when_it_is_not_allowed_as_written():
    new = "adamerge.backbones.efficientnet.EfficientNetLite0"
    assert recorded_target("adamerge.models.efficientnet.EfficientNetLite0", frozenset({new})) == new
    assert recorded_target(new, frozenset({new})) == new
    assert recorded_target("my_package.Net", frozenset({new})) == "my_package.Net"  # refused later, as written


def test_a_run_recorded_before_0_3_resumes_with_the_new_paths():
    old = {"modelpool": {"_target_": "adamerge.modelpool.ModelPool", "seed": 1}, "data": {"batch_size": 8}}
    new = {"modelpool": {"_target_": "adamerge.pool.modelpool.ModelPool", "seed": 1}, "data": {"batch_size": 8}}
    assert config_differences(old, new) == []
    assert config_differences(old, {**new, "data": {"batch_size": 16}}) == ["data.batch_size"]


def test_a_config_naming_a_moved_module_says_where_it_is_now():
    # A name 0.2 never had either: the test must not depend on whether an old install is still importable.
    with pytest.raises(ConfigError, match=r"adamerge\.modelpool\.NoSuchPool .*moved.*adamerge\.pool\.modelpool\.NoSuchPool"):
        build_from_config({"_target_": "adamerge.modelpool.NoSuchPool"})
    with pytest.raises(Exception, match="Error locating target 'my_package.NoSuchPool'"):  # not ours: Hydra's error
        build_from_config({"_target_": "my_package.NoSuchPool"})
