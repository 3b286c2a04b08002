"""Token datasets over a zoo: one item per checkpoint, loaded lazily (memory holds one checkpoint at a time).

An item is a dict:
    values [T, d] float32 (or a window [n, d]), positions [T, P] int64, mask [T, d] bool,
    model_id, parent_id, epoch, stage, factors (dict), metrics (dict), index (int)
With `views=2`, `values` is [2, T, d] (or [2, n, d]): two augmented views of the same checkpoint, for
contrastive training (both views share the window, as SANE does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from vitzoo.tokenizer.normalize import Normalizer
from vitzoo.tokenizer.spec import TokenSpec
from vitzoo.tokenizer.symmetries import permutable_layers, random_permutation
from vitzoo.tokenizer.tokens import tokenize
from vitzoo.zoo_builder.zoo import Zoo


@dataclass
class Augmentation:
    permute: bool = False  # a random function-preserving permutation of heads and MLP units
    noise: float = 0.0  # Gaussian noise (std) added to the (normalised) values
    mask_fraction: float = 0.0  # fraction of tokens zeroed


class TokenDataset(Dataset):
    """Every checkpoint of `zoo` (already filtered as wanted) as tokens; see module docstring."""

    def __init__(
        self,
        zoo: Zoo,
        spec: TokenSpec,
        normalizer: Normalizer | None = None,
        window: int | None = None,
        augmentation: Augmentation | None = None,
        views: int = 1,
        seed: int = 0,
    ):
        if len(zoo) == 0:
            raise ValueError("the zoo selection is empty")
        if window is not None and not 0 < window <= spec.num_tokens:
            raise ValueError(f"window must be in 1..{spec.num_tokens}, got {window}")
        if views not in (1, 2):
            raise ValueError("views must be 1 or 2")
        self.entries = list(zoo)
        self.spec = spec
        self.normalizer = normalizer or Normalizer(mode="raw")
        self.window = window
        self.augmentation = augmentation or Augmentation()
        self.views = views
        self.seed = seed
        self.num_heads = zoo.architecture.num_heads
        self._layers = None
        self._draws = 0

    def __len__(self) -> int:
        return len(self.entries)

    def _generator(self, index: int) -> torch.Generator:
        # a fresh stream per draw: augmentations differ between epochs, but a run with the same seed repeats them
        self._draws += 1
        return torch.Generator().manual_seed(self.seed * 1_000_003 + index * 7919 + self._draws)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        state_dict = entry.state_dict()
        generator = self._generator(index)
        start = 0
        if self.window is not None:
            start = int(torch.randint(0, self.spec.num_tokens - self.window + 1, (1,), generator=generator))
        views = [self._view(state_dict, generator, start) for _ in range(self.views)]
        end = start + (self.window or self.spec.num_tokens)
        return {
            "values": views[0] if self.views == 1 else torch.stack(views),
            "positions": self.spec.positions()[start:end],
            "mask": self.spec.mask()[start:end],
            "model_id": entry.model_id,
            "parent_id": entry.parent_id or "",
            "epoch": entry.epoch,
            "stage": entry.stage,
            "factors": entry.factors,
            "metrics": entry.metrics,
            "index": index,
        }

    def _view(self, state_dict: dict, generator: torch.Generator, start: int) -> torch.Tensor:
        aug = self.augmentation
        if aug.permute:
            state_dict = self._random_permutation(state_dict, generator)
        normalised = {k: v.float() for k, v in self.normalizer.normalize(state_dict).items()}
        values = tokenize(normalised, self.spec).values
        end = start + (self.window or self.spec.num_tokens)
        values, mask = values[start:end], self.spec.mask()[start:end]
        if aug.noise > 0:
            values = values + aug.noise * torch.randn(values.shape, generator=generator) * mask
        return mask_tokens(values, aug.mask_fraction, generator)

    def _random_permutation(self, state_dict: dict, generator: torch.Generator) -> dict:
        if self._layers is None:  # the structure is the same for every checkpoint: find it once
            self._layers = permutable_layers(state_dict, self.num_heads)
        return random_permutation(state_dict, generator=generator, layers=self._layers)


def mask_tokens(tokens: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Zero a random `fraction` of the tokens [..., T, d] (each token drawn independently)."""
    if fraction <= 0:
        return tokens
    dropped = torch.rand(tokens.shape[:-1], generator=generator) < fraction
    return tokens.masked_fill(dropped[..., None], 0.0)


def collate(items: list[dict]) -> dict:
    """Stack tensors, keep the labels as lists (factors and metrics stay dicts per item)."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch
