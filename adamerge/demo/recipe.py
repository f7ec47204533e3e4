"""The demo zoo's identity: its recipe (every setting that changes what is built), where the zoo for a recipe is
cached, and whether a cached zoo can be used as it is (its sha256 manifest). Building it: :mod:`adamerge.demo.zoo`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adamerge.demo.tasks import TASK_BUILDERS
from adamerge.storage.manifest import manifest_problem

__all__ = ["CACHE_ENV_VAR", "DEMO_RECIPE", "DEMO_TASKS", "SECOND_ZOO_TASKS", "default_cache_dir", "demo_recipe",
           "is_complete_zoo", "override_recipe", "recipe_hash", "zoo_path", "zoo_problem"]

CACHE_ENV_VAR = "ADAMERGE_CACHE_DIR"
DEMO_TASKS: tuple[str, ...] = ("digits", "textures", "photos", "science")
# A second zoo with other tasks, for studies that must not be tuned to one zoo (needs Fashion-MNIST, see _fashion).
SECOND_ZOO_TASKS: tuple[str, ...] = ("fashion", "scale", "blur")

# Bump when the builder's behaviour changes: it is part of the recipe, so stale zoos are rebuilt, not reused.
_CODE_VERSION = 3

# Every setting that changes the zoo's contents. The cache directory name is a hash of this dict.
DEMO_RECIPE: dict[str, Any] = {
    "code_version": _CODE_VERSION,
    "tasks": list(DEMO_TASKS),
    "resolution": 32,
    "train_size": 1600,
    "test_size": 480,
    "seed": 0,
    # torch/BLAS threads of the build: float reductions are split by thread, so the thread count is part of
    # what makes two builds bit-identical (as are deterministic algorithms, always on for the build).
    "threads": 2,
    "probe": {"C": 1.0, "max_iter": 1000},
    "finetune": {"steps": 200, "batch_size": 32, "lr": 1e-4, "optimizer": "adam", "schedule": "cosine"},
}


def demo_recipe(**overrides: Any) -> dict[str, Any]:
    """The default recipe with top-level keys replaced (nested dicts are updated, not replaced).

    Tests and quick runs shrink the zoo this way (fewer tasks, steps or images) without a second code path.
    """
    return override_recipe(DEMO_RECIPE, overrides, known_tasks=list(TASK_BUILDERS), zoo="demo")


def override_recipe(defaults: Mapping[str, Any], overrides: Mapping[str, Any], *, known_tasks: list[str],
                    zoo: str) -> dict[str, Any]:
    """A copy of ``defaults`` with top-level keys replaced and nested dicts updated; a KeyError names an unknown
    setting, a ValueError an unknown task (``zoo`` names the zoo in both)."""
    recipe = json.loads(json.dumps(defaults))
    for key, value in overrides.items():
        if key not in recipe:
            raise KeyError(f"unknown {zoo} recipe setting {key!r}; known: {sorted(recipe)}")
        if isinstance(recipe[key], dict) and isinstance(value, Mapping):
            unknown = set(value) - set(recipe[key])
            if unknown:
                raise KeyError(f"unknown {zoo} recipe {key} settings {sorted(unknown)}; known: {sorted(recipe[key])}")
            recipe[key].update(value)
        else:
            recipe[key] = list(value) if isinstance(value, tuple) else value
    unknown_tasks = set(recipe["tasks"]) - set(known_tasks)
    if unknown_tasks:
        raise ValueError(f"unknown {zoo} tasks {sorted(unknown_tasks)}; available: {known_tasks}")
    return recipe


def recipe_hash(recipe: Mapping[str, Any]) -> str:
    """Short stable hash of the canonical JSON of a recipe: equal recipes share a zoo, changed ones do not."""
    canonical = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """``$ADAMERGE_CACHE_DIR`` if set, else the platform's per-user cache directory for adamerge."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("adamerge"))


def zoo_path(recipe: Mapping[str, Any] | None = None, cache_dir: str | Path | None = None) -> Path:
    """Where the zoo for ``recipe`` lives (whether or not it has been built yet)."""
    recipe = DEMO_RECIPE if recipe is None else recipe
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"demo-zoo-{recipe_hash(recipe)}"


def zoo_problem(path: str | Path) -> str | None:
    """Why the zoo at ``path`` cannot be used (not built, interrupted, a file changed, truncated, missing or
    added since it was built), or None. Its ``manifest.json`` is written last, over the bytes on disk."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} does not exist"
    return manifest_problem(path)


def is_complete_zoo(path: str | Path) -> bool:
    """Built to the end and every file as it was written (checked against the zoo's sha256 manifest)."""
    return zoo_problem(path) is None
