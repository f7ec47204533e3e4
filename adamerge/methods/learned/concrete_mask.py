"""The Concrete (relaxed-Bernoulli) mask shared by the tasks: logits, samples, deterministic masks, files.

``m / mean(m)`` per tensor is what multiplies the summed task vectors (see :mod:`adamerge.methods.learned.concrete`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from adamerge.pool.key_filters import select_tensors


def rescale(mask: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``m / mean(m)`` per tensor; an all-zero tensor stays zero (its task vectors are dropped)."""
    return {name: m / m.mean().clamp_min(torch.finfo(m.dtype).tiny) for name, m in mask.items()}


class ConcreteMask(nn.Module):
    """Mask logits for the tensors in ``shapes`` (restricted to ``patterns``), shared by all tasks."""

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]],
        *,
        temperature: float = 0.5,
        initial_logit: float = 0.0,
        patterns: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.names = select_tensors(list(shapes), patterns)
        # A ParameterList, not a ParameterDict: tensor names contain dots.
        self.logits = nn.ParameterList(
            [nn.Parameter(torch.full(tuple(shapes[n]), float(initial_logit))) for n in self.names]
        )

    def logits_by_name(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.logits))

    def probabilities(self) -> dict[str, Tensor]:
        return {name: torch.sigmoid(logit) for name, logit in self.logits_by_name().items()}

    def sample(self, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Relaxed-Bernoulli samples ``sigmoid((logit + log u − log(1−u)) / T)``, differentiable in the logits."""
        samples = {}
        for name, logit in self.logits_by_name().items():
            u = torch.rand(logit.shape, generator=generator, device=logit.device, dtype=logit.dtype)
            u = u.clamp(torch.finfo(u.dtype).tiny, 1 - torch.finfo(u.dtype).eps)
            samples[name] = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / self.temperature)
        return samples

    def rescaled_sample(self, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return rescale(self.sample(generator))

    def expected_mask(self) -> dict[str, Tensor]:
        """``sigmoid(logits)`` rescaled by its mean: the deterministic continuous mask."""
        return rescale(self.probabilities())

    def binary_mask(self) -> dict[str, Tensor]:
        """``p > 0.5`` rescaled by its mean (the kept entries scaled up, the rest dropped)."""
        return rescale({name: (p > 0.5).to(p.dtype) for name, p in self.probabilities().items()})

    @torch.no_grad()
    def kept_fraction(self) -> dict[str, float]:
        return {name: float((p > 0.5).float().mean()) for name, p in self.probabilities().items()}

    @torch.no_grad()
    def kept_fraction_total(self) -> float:
        kept = sum(int((p > 0.5).sum()) for p in self.probabilities().values())
        return kept / max(self.numel(), 1)

    def numel(self) -> int:
        return sum(logit.numel() for logit in self.logits)

    def memory_report(self) -> dict[str, int | float]:
        logits_bytes = sum(logit.numel() * logit.element_size() for logit in self.logits)
        return {"tensors": len(self.names), "elements": self.numel(), "logits_bytes": logits_bytes,
                "logits_mb": logits_bytes / 2**20}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: logit.detach().cpu().contiguous() for name, logit in self.logits_by_name().items()}
        metadata = {"format": "adamerge.methods.learned.concrete_mask", "temperature": str(self.temperature)}
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(
        cls, path: str | Path, shapes: Mapping[str, Sequence[int]] | None = None, *, temperature: float | None = None
    ) -> ConcreteMask:
        """Logits saved by :meth:`save`; with ``shapes``, every saved tensor must be one of them, same shape."""
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
        if shapes is not None:
            for name, logit in tensors.items():
                if name not in shapes:
                    raise ValueError(f"mask file {path} has logits for {name!r}, which is not a merged tensor")
                if tuple(logit.shape) != tuple(shapes[name]):
                    raise ValueError(
                        f"mask file {path}: tensor {name!r} has shape {tuple(logit.shape)}, "
                        f"the model's has {tuple(shapes[name])}"
                    )
            order = [name for name in shapes if name in tensors]
        else:
            order = list(tensors)
        if temperature is None:
            temperature = float(metadata.get("temperature", 0.5))
        mask = cls({name: tensors[name].shape for name in order}, temperature=temperature)
        with torch.no_grad():
            for name, logit in mask.logits_by_name().items():
                logit.copy_(tensors[name])
        return mask
