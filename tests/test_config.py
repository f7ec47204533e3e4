"""The Hydra tree mirrors the code: one conf/method file per registered method, same defaults; one conf/selection
file per selection criterion (conf/objective mirrors the objectives: tests/test_objectives.py)."""


import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from adamerge.methods.registry import available_methods, get_method
from adamerge.methods.configs import CONF_DIR, method_config
from adamerge.cli.settings import EVALUATION_ONLY

COMPOSITE = ("compare",)


def _yaml_methods() -> dict[str, dict]:
    return {p.stem: OmegaConf.to_container(OmegaConf.load(p)) for p in sorted((CONF_DIR / "method").glob("*.yaml"))}


def test_method_group_mirrors_registry():
    files = _yaml_methods()
    assert set(files) - set(EVALUATION_ONLY) - set(COMPOSITE) == set(available_methods())
    for name, node in files.items():
        assert node["name"] == name
        if name in EVALUATION_ONLY or name in COMPOSITE:
            continue
        spec = get_method(name)
        hparams = {k: v for k, v in node.items() if k != "name"}
        assert set(hparams) == set(spec.defaults), name
        for key, value in spec.defaults.items():
            expected = list(value) if isinstance(value, tuple) else value
            assert hparams[key] == expected, f"{name}.{key}: yaml {hparams[key]!r} != code {expected!r}"


def test_selection_group_mirrors_the_criteria():
    """conf/selection: one file per label-free selection criterion of adamerge.reporting.selection, named as it."""
    from adamerge.reporting.selection import CRITERIA

    files = {p.stem: OmegaConf.load(p) for p in sorted((CONF_DIR / "selection").glob("*.yaml"))}
    assert set(files) == set(CRITERIA)
    assert all(node.name == name for name, node in files.items())


def test_compare_lists_only_known_methods():
    compare = OmegaConf.load(CONF_DIR / "method" / "compare.yaml")
    for name in compare.methods:
        assert name in EVALUATION_ONLY or get_method(name)


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def test_default_is_demo_comparison_and_method_override_wins():
    cfg = _compose([])
    assert cfg.method.name == "compare" and cfg.modelpool.backbone._target_.endswith("EfficientNetLite0")
    cfg = _compose(["method=adamerging_layer_wise", "trainer.max_steps=7", "logger=none", "method.lr=0.5"])
    assert cfg.method.name == "adamerging_layer_wise" and cfg.trainer.max_steps == 7
    assert cfg.get("logger") is None
    assert method_config(cfg, "adamerging_layer_wise")["lr"] == 0.5


def test_method_overrides_apply_but_command_line_wins():
    cfg = _compose(["method=adamerging_task_wise", "++method_overrides.adamerging_task_wise.init_value=0.4", "method.lr=0.5"])
    hparams = method_config(cfg, "adamerging_task_wise")
    assert hparams["lr"] == 0.5 and hparams["init_value"] == 0.4


@pytest.mark.parametrize("group", ["trainer", "logger", "data", "modelpool", "experiment", "method", "protected"])
def test_every_group_option_composes(group):
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        cfg = _compose([f"{group}={path.stem}"])
        assert cfg is not None


def test_composing_an_experiment_never_builds_a_zoo(monkeypatch):
    """Zoos are built when a run reads zoo_dir, never while Hydra composes (merging over an interpolation
    makes OmegaConf evaluate it: an experiment that replaced zoo_dir would build the default zoo first)."""
    from adamerge.demo import text_zoo
    from adamerge.demo import zoo as demo
    from adamerge.cli.main import register_resolvers

    register_resolvers()
    built = []
    monkeypatch.setattr(demo, "build_demo_zoo", lambda *args, **kwargs: built.append(kwargs) or "/zoo")
    monkeypatch.setattr(text_zoo, "build_text_zoo", lambda *args, **kwargs: built.append(kwargs) or "/text-zoo")
    for path in sorted((CONF_DIR / "experiment").glob("demo*.yaml")):
        _compose([f"experiment={path.stem}"])
    assert built == []
