import os

import pytest
import torch

# Tests must never block on wandb or reach a hub, and two busy cores make >1 thread slower.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): one worker per core, at most 4 -- each runs its own end-to-end subprocesses
    and builds its own session zoo, so more workers would add memory, not speed."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 4))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """The reduced demo zoo (tests.helpers.REDUCED_RECIPE), built once for every end-to-end test."""
    from adamerge.demo.zoo import build_demo_zoo
    from tests.helpers import REDUCED_RECIPE

    return build_demo_zoo(tmp_path_factory.mktemp("cache"), recipe=REDUCED_RECIPE, progress=False)
