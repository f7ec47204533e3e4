"""Step time of the AdaMerging learning step, measured side by side with reference computations.

Prints ratios (ours / plain forward+backward of the same model on the same batches, and ours /
a per-task re-merge as in FusionBench/official code). Run: ``python bench/step_time.py``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.func import functional_call

from adamerge.merged import MergedModel
from adamerge.models.efficientnet import efficientnet_lite0
from adamerge.module import AdaMergingModule
from adamerge.objectives import prediction_entropy
from adamerge.task_vectors import TaskVectors


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    backbone = efficientnet_lite0(pretrained=True, num_classes=None).eval()
    pretrained = {k: v.clone() for k, v in backbone.state_dict().items()}
    finetuned = {
        f"task{k}": {n: v + 1e-3 * torch.randn_like(v) if v.is_floating_point() else v for n, v in pretrained.items()}
        for k in range(args.tasks)
    }
    vectors = TaskVectors.from_state_dicts(pretrained, finetuned)
    heads = {t: torch.nn.Linear(1280, 10) for t in vectors.task_names}
    module = AdaMergingModule(MergedModel(backbone, vectors, granularity="layer_wise"), heads)
    batch = {t: {"inputs": torch.randn(args.batch, 3, args.resolution, args.resolution)} for t in vectors.task_names}

    plain = efficientnet_lite0(pretrained=True, num_classes=None).eval()

    def plain_forward_backward():
        for task in vectors.task_names:
            prediction_entropy(heads[task](plain(batch[task]["inputs"]))).backward()

    def ours():
        module.merged.coefficients.grad = None
        module.accumulate_gradients(batch, module.merged.merged_weights())

    def remerge_per_task():
        module.merged.coefficients.grad = None
        for task in vectors.task_names:
            weights = module.merged.merged_weights()
            logits = heads[task](functional_call(module.merged.module, weights, (batch[task]["inputs"],)))
            prediction_entropy(logits).backward()

    t_plain = median_seconds(plain_forward_backward, args.repeats)
    t_ours = median_seconds(ours, args.repeats)
    t_remerge = median_seconds(remerge_per_task, args.repeats)
    print(f"EfficientNet-Lite0 {args.resolution}px, {args.tasks} tasks x {args.batch}, layer-wise, {args.threads} threads")
    print(f"plain forward+backward      {t_plain * 1000:8.1f} ms/step")
    print(f"adamerge step               {t_ours * 1000:8.1f} ms/step   ratio to plain {t_ours / t_plain:.2f}")
    print(f"re-merge per task (naive)   {t_remerge * 1000:8.1f} ms/step   ratio to plain {t_remerge / t_plain:.2f}")
    print(f"naive / adamerge            {t_remerge / t_ours:.2f}")


if __name__ == "__main__":
    main()
