"""The baselines every report on sampled models carries; a generator is only interesting where it beats them.

- `random_init`: freshly initialised ViTs of the samples' architecture and head (timm's init, seeded).
- `gaussian`: every parameter drawn independently from a normal fitted to the zoo (per-parameter mean and std
  over the reference models of that head structure).
- `noise_around`: a zoo model plus isotropic Gaussian noise scaled so that its distance to that model is a
  given value, e.g. each sample's distance to its nearest zoo model (the noise then has exactly the sample's
  novelty, and only its direction differs).

All return state dicts (float32) that the evaluator and the novelty statistics take like any sample.
"""

from __future__ import annotations

import torch

from vitzoo.zoo_builder.models import Architecture, build_vit

StateDict = dict[str, torch.Tensor]


def random_init(architecture: Architecture, head: dict, n: int, seed: int) -> list[StateDict]:
    """n ViTs as timm initialises them, model i from seed `seed + i`."""
    out = []
    for i in range(n):
        torch.manual_seed(seed + i)
        model = build_vit(architecture, head["num_classes"], head["head"], head["head_hidden"])
        out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


def gaussian(references: list[StateDict], n: int, seed: int) -> list[StateDict]:
    """n draws of an independent normal per parameter, fitted to `references` (all of one structure)."""
    if len(references) < 2:
        raise ValueError("a per-parameter Gaussian needs at least two reference models")
    generator = torch.Generator().manual_seed(seed)
    keys = sorted(references[0])  # a loaded state dict's key order varies between processes: draw in a fixed one
    mean = {k: torch.stack([sd[k].double() for sd in references]).mean(0) for k in keys}
    std = {k: torch.stack([sd[k].double() for sd in references]).std(0) for k in keys}
    return [
        {k: (mean[k] + std[k] * torch.randn(mean[k].shape, generator=generator, dtype=torch.float64)).float()
         for k in mean}
        for _ in range(n)
    ]  # fmt: skip


def noise_around(anchors: list[StateDict], distances: list[float], keys: list[str], seed: int) -> list[StateDict]:
    """anchors[i] plus isotropic noise on `keys` whose L2 norm is exactly distances[i]."""
    if len(anchors) != len(distances):
        raise ValueError("one distance per anchor")
    generator = torch.Generator().manual_seed(seed)
    out = []
    for anchor, distance in zip(anchors, distances):
        noise = {k: torch.randn(anchor[k].shape, generator=generator, dtype=torch.float64) for k in keys}
        norm = torch.sqrt(sum(v.pow(2).sum() for v in noise.values()))
        out.append({k: (v.double() + noise[k] * (distance / norm)).float() if k in noise else v.clone()
                    for k, v in anchor.items()})  # fmt: skip
    return out
