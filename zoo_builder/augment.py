"""Batched, per-model image augmentations.

Random numbers come from one `torch.Generator` per model, drawn outside any `vmap`, so the population
path and the per-model loop see exactly the same augmented batches. Strength `a` in [0, 1] scales a
random resized crop (scale in [1 - 0.5a, 1]), a shift (up to 0.15a of the image) and, where the dataset
allows it, a horizontal flip with probability a/2 (or a fixed probability); a rotation of up to r degrees
can be added; a = 0, no flip and r = 0 is the identity.

The paper's regularisers and SimCLR colour views are timm's and torchvision's own transforms: timm's
`Mixup` (CutMix included), `mixup_target` and `RandomErasing`, torchvision's `ColorJitter`, `RandomGrayscale`
and `GaussianBlur`. None of them takes a generator (they draw from numpy's, python's and torch's global
generators), so each call runs inside `seeded_global_rng` with a seed drawn from the model's own per-epoch
generator, and the global generators are restored afterwards: the draws depend only on the model's seed,
epoch and step, never on the population around it.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from timm.data.mixup import Mixup, mixup_target
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import v2


def epoch_generator(seed: int, epoch: int, purpose: int) -> torch.Generator:
    """A generator for one model, one epoch and one purpose (0 data order, 1 augmentation, 2 second view,
    3 the seeds of the global-generator transforms below)."""
    return torch.Generator().manual_seed(1_000_003 * seed + 7919 * epoch + purpose)


def affine_params(
    batch: int,
    strength: float,
    hflip: bool,
    generator: torch.Generator,
    flip_prob: float | None = None,
    rotation: float = 0.0,
) -> torch.Tensor:
    """Affine matrices [batch, 2, 3] of a random resized crop + shift (+ flip) at the given strength.

    flip_prob: the flip's probability; None is `strength / 2`. rotation: the largest angle in degrees of a
    uniform random rotation; its angles are drawn after the other numbers, so rotation 0 changes nothing.
    """
    uniform = torch.rand(batch, 4, generator=generator)
    scale = 1.0 - 0.5 * strength * uniform[:, 0]
    shift = 0.15 * strength * (2 * uniform[:, 1:3] - 1)
    flip_prob = strength / 2 if flip_prob is None else flip_prob
    flip = torch.where((uniform[:, 3] < flip_prob) & hflip, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = scale * flip
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    if rotation > 0:
        angle = torch.deg2rad(rotation * (2 * torch.rand(batch, generator=generator) - 1))
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotate = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [batch, 2, 2]
        theta[:, :, :2] = rotate @ theta[:, :, :2]
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


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed python's, numpy's and torch's global generators (CPU and `device`) with `seed`; restore them after."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def mix_and_erase(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    mixup: float,
    cutmix: float,
    label_smoothing: float,
    random_erasing: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One model's batch through timm's Mixup/CutMix and RandomErasing, as the paper's training does.

    images: [b, C, H, W], normalised; labels: [b]. Returns new images and soft targets [b, k] (mixed and smoothed;
    one-hot and smoothed when mixup = cutmix = 0). Mixup/CutMix draw one lambda per batch (timm's default mode,
    as the paper); erasing fills with per-pixel normal noise (the paper's mode "pixel").
    """
    images = images.clone()  # both transforms work in place
    with seeded_global_rng(seed, images.device):
        if mixup > 0 or cutmix > 0:
            mixer = Mixup(
                mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes
            )
            images, targets = mixer(images, labels)
        else:
            targets = mixup_target(labels, num_classes, smoothing=label_smoothing)
        if random_erasing > 0:
            images = RandomErasing(probability=random_erasing, mode="pixel", device=images.device)(images)
    return images, targets


def colour_transform(
    brightness: float, contrast: float, saturation: float, hue: float, jitter_prob: float, grayscale: float, blur: int
) -> v2.Transform | None:
    """SimCLR's colour distortions (torchvision's), those that are switched on; None when none is."""
    steps = []
    if jitter_prob > 0 and max(brightness, contrast, saturation, hue) > 0:
        steps.append(v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=jitter_prob))
    if grayscale > 0:
        steps.append(v2.RandomGrayscale(p=grayscale))
    if blur > 0:
        steps.append(v2.GaussianBlur(kernel_size=blur))  # sigma uniform in [0.1, 2], torchvision's default
    return v2.Compose(steps) if steps else None


def distort_colours(
    images: torch.Tensor,
    transform: v2.Transform,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    seed: int,
) -> torch.Tensor:
    """One model's batch [b, C, H, W] (normalised) through SimCLR's colour distortions, image by image (each image
    draws its own jitter, as in SimCLR), in pixel space [0, 1]; returns it normalised again."""
    mean_ = torch.tensor(mean, device=images.device).view(-1, 1, 1)
    std_ = torch.tensor(std, device=images.device).view(-1, 1, 1)
    pixels = (images * std_ + mean_).clamp(0, 1)
    with seeded_global_rng(seed, images.device):
        pixels = torch.stack([transform(image) for image in pixels])
    return (pixels - mean_) / std_
