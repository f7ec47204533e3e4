"""A method's hyperparameters: its conf/method file, the experiment's overrides, then the command line."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def shipped_conf_dir() -> Path:
    """The configuration tree: ``adamerge/conf`` inside an installed package (setup.py maps the repository's
    ``conf/`` there when building), else the top-level ``conf/`` of the source checkout this module runs from."""
    installed = Path(str(files("adamerge") / "conf"))  # wheels install unzipped: a real directory
    if (installed / "config.yaml").is_file():
        return installed
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    raise FileNotFoundError(f"adamerge's configs are missing: neither {installed} (an installed package) nor {checkout} "
                            "(a source checkout) holds config.yaml; reinstall adamerge")


CONF_DIR = shipped_conf_dir()


def method_config(cfg: DictConfig, name: str) -> dict[str, Any]:
    """Hyperparameters of ``name``: conf/method/<name>.yaml ← ``method_overrides[name]`` ← command line.

    ``method_overrides`` lets an experiment retune methods it compares; values the user changed on
    the command line (``method.lr=...``) win over it.
    """
    path = CONF_DIR / "method" / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no config for method {name!r}: expected {path}")
    defaults = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    node = dict(defaults)
    overrides = (cfg.get("method_overrides") or {}).get(name)
    if overrides:
        node.update(OmegaConf.to_container(overrides, resolve=True))
    if cfg.method.name == name:
        selected = OmegaConf.to_container(cfg.method, resolve=True)
        typed = command_line_method_keys()
        node.update({k: v for k, v in selected.items() if k in typed or k not in defaults or v != defaults[k]})
    node.pop("name", None)
    return node


def command_line_method_keys() -> set[str]:
    """``method.*`` keys set on the command line, which win even when equal to the file default."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    keys = set()
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("method."):
            keys.add(key.removeprefix("method.").split(".", 1)[0])
    return keys
