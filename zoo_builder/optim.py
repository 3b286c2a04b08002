"""Optimizers over stacked parameters: one update for a whole population, per-model hyper-parameters.

Each tensor in `params` is [m, ...] (m models); `lr` and `weight_decay` are [m]. The arithmetic follows
`torch.optim.AdamW` and `torch.optim.SGD` (single-tensor form) step for step, so a population trained
here matches models trained one by one with torch's optimizers to float tolerance (tested).
"""

from __future__ import annotations

import torch

SGD_MOMENTUM = 0.9
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def _per_model(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast [m] to [m, 1, 1, ...] for a tensor like [m, ...]."""
    return values.view(-1, *([1] * (like.dim() - 1))).to(like)


class PopulationOptimizer:
    """AdamW or SGD (momentum 0.9) over a dict of stacked parameters. Holds its state as tensors
    (`state_dict()`/`load_state_dict()`), so it can be checkpointed with safetensors."""

    def __init__(self, kind: str, lr: torch.Tensor, weight_decay: torch.Tensor):
        if kind not in ("adamw", "sgd"):
            raise ValueError(f"unknown optimizer {kind!r}")
        self.kind = kind
        self.lr = lr
        self.weight_decay = weight_decay
        self.step_count = 0
        self.state: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], active: torch.Tensor) -> None:
        """Update `params` in place. Models where `active` [m] is false (diverged) keep their weights and state,
        even when their gradients are NaN."""
        self.step_count += 1
        for name, p in params.items():
            keep = _per_model(~active, p).bool()
            g = torch.where(keep, 0.0, grads[name])
            lr = _per_model(self.lr, p)
            wd = _per_model(self.weight_decay, p)
            update = self._adamw if self.kind == "adamw" else self._sgd
            new_p = update(name, p, g, lr, wd, keep)
            p.copy_(torch.where(keep, p, new_p))

    def _adamw(self, name, p, g, lr, wd, keep):
        beta1, beta2 = ADAM_BETAS
        if f"{name}.exp_avg" not in self.state:
            self.state[f"{name}.exp_avg"] = torch.zeros_like(p)
            self.state[f"{name}.exp_avg_sq"] = torch.zeros_like(p)
        exp_avg, exp_avg_sq = self.state[f"{name}.exp_avg"], self.state[f"{name}.exp_avg_sq"]
        exp_avg.copy_(torch.where(keep, exp_avg, exp_avg.lerp(g, 1 - beta1)))
        exp_avg_sq.copy_(torch.where(keep, exp_avg_sq, exp_avg_sq * beta2 + (1 - beta2) * g * g))
        bias_correction1 = 1 - beta1**self.step_count
        bias_correction2_sqrt = (1 - beta2**self.step_count) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(ADAM_EPS)
        return p * (1 - lr * wd) - lr / bias_correction1 * exp_avg / denom

    def _sgd(self, name, p, g, lr, wd, keep):
        d_p = g + wd * p
        key = f"{name}.momentum_buffer"
        if key not in self.state:
            self.state[key] = d_p.clone()
        else:
            buffer = self.state[key]
            buffer.copy_(torch.where(keep, buffer, buffer * SGD_MOMENTUM + d_p))
        return p - lr * self.state[key]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.state, "step_count": torch.tensor(self.step_count)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        self.step_count = int(state.pop("step_count"))
        self.state = state


def torch_optimizer(kind: str, parameters, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The torch optimizer that `PopulationOptimizer` mirrors, for the per-model loop."""
    if kind == "adamw":
        return torch.optim.AdamW(
            parameters, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay, foreach=False
        )
    return torch.optim.SGD(parameters, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay, foreach=False)
