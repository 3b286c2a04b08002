"""Batched, per-model image augmentations.

Random numbers come from one `torch.Generator` per model, drawn outside any `vmap`, so the population
path and the per-model loop see exactly the same augmented batches. Strength `a` in [0, 1] scales a
random resized crop (scale in [1 - 0.5a, 1]), a shift (up to 0.15a of the image) and, where the dataset
allows it, a horizontal flip with probability a/2; a = 0 is the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def epoch_generator(seed: int, epoch: int, purpose: int) -> torch.Generator:
    """A generator for one model, one epoch and one purpose (0 data order, 1 augmentation, 2 second view)."""
    return torch.Generator().manual_seed(1_000_003 * seed + 7919 * epoch + purpose)


def affine_params(batch: int, strength: float, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Affine matrices [batch, 2, 3] of a random resized crop + shift (+ flip) at the given strength."""
    uniform = torch.rand(batch, 4, generator=generator)
    scale = 1.0 - 0.5 * strength * uniform[:, 0]
    shift = 0.15 * strength * (2 * uniform[:, 1:3] - 1)
    flip = torch.where((uniform[:, 3] < strength / 2) & hflip, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = scale * flip
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    return theta


def augment(images: torch.Tensor, theta: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Apply per-image affine transforms to images [m, b, C, H, W] where `active` [m] is set.

    theta: [m, b, 2, 3]. Models with strength 0 (`active` false) get their images untouched, bit for bit.
    """
    if not bool(active.any()):
        return images
    m, b = images.shape[:2]
    flat = images.reshape(m * b, *images.shape[2:])
    grid = F.affine_grid(theta.reshape(m * b, 2, 3).to(images), list(flat.shape), align_corners=False)
    moved = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    moved = moved.reshape(images.shape)
    return torch.where(active.view(m, 1, 1, 1, 1).to(images.device), moved, images)
