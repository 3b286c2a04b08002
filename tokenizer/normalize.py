"""Per-tensor standardisation of weights with statistics pooled over a zoo, exactly invertible.

`Normalizer.fit(state_dicts)` computes every tensor's mean and standard deviation over all its values in all
the given checkpoints (float64, streaming: one checkpoint in memory at a time). `normalize` returns float64
tensors; `denormalize` maps them back and rounds to float32. Because the float64 round trip errs by about
1e-16 relative, far below half a float32 ulp (6e-8), the float32 weights come back bit for bit (tested).
Casting normalised values to float32 (e.g. to train on them) is the user's lossy step, as in any pipeline.
`mode="raw"` is the identity with the same interface.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

MODES = ("per_tensor", "raw")
MIN_STD = 1e-8  # a constant tensor (e.g. an untouched LayerNorm) is only centred


@dataclass
class Normalizer:
    mode: str = "per_tensor"
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    checkpoints: int = 0  # how many state dicts the statistics pool

    @classmethod
    def fit(cls, state_dicts: Iterable[dict[str, torch.Tensor]], mode: str = "per_tensor") -> Normalizer:
        if mode not in MODES:
            raise ValueError(f"unknown normalisation mode {mode!r}; expected one of {MODES}")
        if mode == "raw":
            return cls(mode)
        count: dict[str, int] = {}
        total: dict[str, float] = {}
        square: dict[str, float] = {}
        checkpoints = 0
        for state_dict in state_dicts:
            checkpoints += 1
            for key, tensor in state_dict.items():
                values = tensor.detach().double()
                count[key] = count.get(key, 0) + values.numel()
                total[key] = total.get(key, 0.0) + float(values.sum())
                square[key] = square.get(key, 0.0) + float((values * values).sum())
        if checkpoints == 0:
            raise ValueError("cannot fit a normaliser on no checkpoints")
        mean = {k: total[k] / count[k] for k in count}
        variance = {k: max(square[k] / count[k] - mean[k] ** 2, 0.0) for k in count}  # rounding can dip below 0
        std = {k: max(variance[k] ** 0.5, MIN_STD) for k in count}
        return cls(mode, mean, std, checkpoints)

    def normalize(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """float64 standardised tensors (raw mode: float64 copies)."""
        self._check_keys(state_dict)
        if self.mode == "raw":
            return {k: v.double() for k, v in state_dict.items()}
        return {k: (v.double() - self.mean[k]) / self.std[k] for k, v in state_dict.items()}

    def denormalize(self, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
        self._check_keys(state_dict)
        if self.mode == "raw":
            return {k: v.to(dtype) for k, v in state_dict.items()}
        return {k: (v.double() * self.std[k] + self.mean[k]).to(dtype) for k, v in state_dict.items()}

    def _check_keys(self, state_dict: dict[str, torch.Tensor]) -> None:
        if self.mode == "raw":
            return
        missing = [k for k in state_dict if k not in self.mean]
        if missing:
            raise KeyError(f"no normalisation statistics for {missing[:5]}: fitted on another architecture?")

    def save(self, path: str | Path) -> None:
        from vitzoo.zoo_builder.zoo import atomic_write_json

        atomic_write_json(Path(path), {"mode": self.mode, "mean": self.mean, "std": self.std,
                                       "checkpoints": self.checkpoints})  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> Normalizer:
        data = json.loads(Path(path).read_text())
        return cls(data["mode"], data["mean"], data["std"], data["checkpoints"])
