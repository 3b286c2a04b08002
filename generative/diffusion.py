"""Diffusion over family coordinates: new fine-tuned ViTs as learned combinations of one family's runs.

Every family of the zoo (same parent, head type and head seed: identical starting weights w0, see
generative/data.py) holds one run per fine-tuning condition slot (optimizer x learning rate). A model of the
family's basin is written w0 + sum_k a_k * delta_k, with delta_k the final delta of the family's run in slot
k: its **coordinates** a in R^K. Real runs are the one-hot vertices; mixtures inside the simplex are new
models that keep the accuracy of their runs (`python -m benchmarks.family_interpolation`: 0.846 for midpoints of
AdamW runs that average 0.820, against 0.483 for isotropic noise at the same distance), while mixing different
head seeds loses (0.760 -> 0.563).

The generator learns p(a | family, target accuracy, condition slot): a transformer denoiser (timm `Block`s)
over K coordinate tokens plus condition tokens, trained with diffusers' `DDPMScheduler` (v-prediction) on the
real runs and on random in-family mixtures labelled by their measured validation accuracy (the batched
evaluator, validation split only: test is never seen), and sampled with `DDIMScheduler` and classifier-free
guidance. Accuracy and slot conditions are dropped at random in training, so each can be left out when
sampling. Decoding is exact: w0 and the deltas are recomputed from the zoo, checked against its sha256s.

Shapes: B batch, K slots, F families, D model width.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from timm.models.vision_transformer import Block
from torch import nn

from vitzoo.errors import ConfigError, check_number

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")  # diffusers' beta schedules
MAX_TIMESTEPS = 10_000


@dataclass
class DiffusionConfig:
    d_model: int = 64
    depth: int = 3
    heads: int = 4
    timesteps: int = 1000
    schedule: str = "squaredcos_cap_v2"
    condition_dropout: float = 0.2  # each of accuracy and slot dropped independently (classifier-free guidance)
    mixtures: int = 3000  # random in-family mixtures added to the real runs, labelled by measured val accuracy
    dirichlet: float = 0.3  # concentration of the mixtures' coordinates (< 1: many near edges and vertices)
    shrunk: float = 0.25  # share of mixtures scaled towards the family's start (partly trained models)
    steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-3
    ema: float = 0.995
    seed: int = 0

    def __post_init__(self):
        for name, kind, low, high, low_open, high_open in (
            ("d_model", int, 2, None, False, False),
            ("depth", int, 1, None, False, False),
            ("heads", int, 1, None, False, False),
            ("timesteps", int, 1, MAX_TIMESTEPS, False, False),
            ("condition_dropout", float, 0, 1, False, True),
            ("mixtures", int, 0, None, False, False),
            ("dirichlet", float, 0, None, True, False),
            ("shrunk", float, 0, 1, False, False),
            ("steps", int, 1, None, False, False),  # 0 steps would write an untrained generator
            ("batch_size", int, 1, None, False, False),
            ("lr", float, 0, None, True, False),
            ("ema", float, 0, 1, False, True),
            ("seed", int, 0, None, False, False),
        ):  # fmt: skip
            check_number(f"diffusion {name}", getattr(self, name), kind, low, high, low_open, high_open)
        if self.d_model % 2 or self.d_model % self.heads:
            raise ConfigError(f"diffusion d_model={self.d_model} must be even and a multiple of heads={self.heads}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"diffusion schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps [B] -> [B, dim]."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class CoordinateDenoiser(nn.Module):
    """Predicts the v-target of noisy coordinates [B, K] given timestep and conditions."""

    def __init__(self, slots: int, families: int, config: DiffusionConfig):
        super().__init__()
        d = config.d_model
        self.slots = slots
        self.value_in = nn.Linear(1, d)
        self.slot_embedding = nn.Parameter(torch.randn(slots, d) * 0.02)  # which run each token weighs
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.family_embedding = nn.Embedding(families, d)
        self.accuracy_in = nn.Linear(1, d)
        self.slot_condition = nn.Embedding(slots + 1, d)  # index `slots` = no slot condition
        self.no_accuracy = nn.Parameter(torch.zeros(d))
        self.blocks = nn.Sequential(*[Block(d, config.heads) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, 1)

    def forward(
        self,
        x: torch.Tensor,  # [B, K] noisy coordinates (standardised)
        t: torch.Tensor,  # [B] int timesteps
        family: torch.Tensor,  # [B] int
        accuracy: torch.Tensor,  # [B] float (standardised), ignored where has_accuracy is False
        has_accuracy: torch.Tensor,  # [B] bool
        slot: torch.Tensor,  # [B] int, `slots` = none
    ) -> torch.Tensor:
        d = self.slot_embedding.shape[1]
        tokens = self.value_in(x[..., None]) + self.slot_embedding  # [B, K, D]
        accuracy_token = torch.where(has_accuracy[:, None], self.accuracy_in(accuracy[:, None]), self.no_accuracy)
        conditions = torch.stack(
            [self.time_mlp(timestep_embedding(t, d)), self.family_embedding(family), accuracy_token,
             self.slot_condition(slot)], dim=1,
        )  # fmt: skip  # [B, 4, D]
        h = self.blocks(torch.cat([conditions, tokens], dim=1))
        return self.out(self.norm(h[:, conditions.shape[1] :])).squeeze(-1)  # [B, K]


def schedulers(config: DiffusionConfig) -> tuple[DDPMScheduler, DDIMScheduler]:
    """Training (DDPM) and sampling (DDIM) schedulers. `clip_sample=False`: diffusers clips the predicted clean
    sample to [-1, 1] by default (images in that range); standardised weights have unit variance, so a third of the
    values lie outside it, and clipping them at every step pulled samples towards the mean (measured: latent
    diffusion samples at 0.37 of the data's norm)."""
    train = DDPMScheduler(num_train_timesteps=config.timesteps, beta_schedule=config.schedule,
                          prediction_type="v_prediction", clip_sample=False)  # fmt: skip
    return train, DDIMScheduler.from_config(train.config)


def diffusion_loss(
    model: nn.Module,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    family: torch.Tensor,
    accuracy: torch.Tensor,
    slot: torch.Tensor,
    dropout: float,
    generator: torch.Generator,
    part: slice = slice(None),
) -> torch.Tensor:
    """v-prediction MSE on one batch, with the accuracy and slot conditions dropped at random.

    The noise, timesteps and dropped conditions of the whole batch are drawn on the CPU from `generator`; the
    model (a `CoordinateDenoiser`, or DDP around one) sees only the rows `part` on its own device, so that the
    ranks of a multi-process run draw the same numbers and each computes its share."""
    b, k = x0.shape  # [B, K]
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    noisy = scheduler.add_noise(x0, noise, t)
    target = scheduler.get_velocity(x0, noise, t)
    has_accuracy = torch.rand(b, generator=generator) >= dropout
    slot = torch.where(torch.rand(b, generator=generator) < dropout, k, slot)  # k = no slot condition
    device = next(model.parameters()).device
    inputs = [v[part].to(device) for v in (noisy, t, family, accuracy, has_accuracy, slot)]
    predicted = model(*inputs)
    return (predicted - target[part].to(device)).pow(2).mean()


@torch.no_grad()
def sample_coordinates(
    model: CoordinateDenoiser,
    scheduler: DDIMScheduler,
    family: torch.Tensor,
    accuracy: torch.Tensor | None,
    slot: torch.Tensor | None,
    guidance: float,
    steps: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Standardised coordinates [B, K] by DDIM with classifier-free guidance on the given conditions."""
    b = family.shape[0]
    x = torch.randn(b, model.slots, generator=generator)
    scheduler.set_timesteps(steps)
    conditioned = (accuracy is not None) or (slot is not None)
    accuracy_values = accuracy if accuracy is not None else torch.zeros(b)
    has_accuracy = torch.full((b,), accuracy is not None)
    slots = slot if slot is not None else torch.full((b,), model.slots)
    for t in scheduler.timesteps:
        steps_t = torch.full((b,), int(t))
        output = model(x, steps_t, family, accuracy_values, has_accuracy, slots)
        if conditioned and guidance != 1.0:
            free = model(x, steps_t, family, accuracy_values, torch.zeros(b, dtype=torch.bool),
                         torch.full((b,), model.slots))  # fmt: skip
            output = free + guidance * (output - free)
        x = scheduler.step(output, t, x, eta=0.0).prev_sample
    return x
