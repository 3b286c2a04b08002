"""Latent diffusion over the hyper-representation's per-token latents (p-diff / D2NWG style).

The shipped autoencoder (generative/hyper.py) encodes every training checkpoint's unit-scale delta tokens into
per-token latents [T, k]; a transformer denoiser learns their distribution, conditioned on the family (which
fixes the parent and the exact start w0), the fine-tuning slot (optimizer x learning rate) and the validation
accuracy, and a sample is decoded by the frozen autoencoder and added to its family's start at its own delta
scale (`DeltaSet.scales`: one more value the denoiser generates, as a token of its own).

What the denoiser sees (`components`): by default the top K principal components of the standardised latents
(each latent value's mean and std over the training set), whitened, K/`group` tokens of `group` coefficients with
a learned embedding each. With `components=0` it sees the raw latents: `group` consecutive latent tokens per
denoiser token (470 x 16 -> 94 x 80 for the bundled zoo) with the tokenizer's position fields (segment, block,
role, head, row, chunk) of the group's first token. Measured on the bundled zoo (README): the raw form did not
learn the data's thin manifold in 3,000 steps (samples 0.3 zero-shot, 10x farther from the training latents than
they are from each other), while K=128 components keep 99.9% of the latents' variance, decode projected training
latents at the full latents' accuracy, and give the denoiser a 128-d problem.

Training: diffusers' `DDPMScheduler` (v-prediction); sampling: `DDIMScheduler` with classifier-free guidance;
accuracy and slot are dropped at random in training so either may be left out. Time, family, accuracy, slot and
the log scale are prefix tokens before the value tokens; timm `Block`s.

Training data: every kept checkpoint the autoencoder was trained on and `mixtures` Dirichlet mixtures of a
family's runs (a share shrunk towards its start), labelled by their measured validation accuracy: the same
augmentation as the family diffusion (generative/generator.py), so that the accuracies between and below the
runs' are covered and the denoiser does not see 300 isolated points only.

Shapes: n checkpoints, B batch, T tokens, k latent width, K components, G denoiser tokens, D model width.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from timm.models.vision_transformer import Block
from torch import nn

from vitzoo.errors import ConfigError, check_number
from vitzoo.generative.autoencoder import PositionEmbedding
from vitzoo.generative.checkpoint import (
    CheckpointError,
    load_training_state,
    load_weights,
    open_checkpoint,
    require,
    save_training_state,
    update_ema,
    write_checkpoint,
)
from vitzoo.generative.data import slot_of
from vitzoo.generative.diffusion import MAX_TIMESTEPS, SCHEDULES, schedulers, timestep_embedding
from vitzoo.generative.generator import ConditionError
from vitzoo.generative.hyper import AutoencoderBundle, load_autoencoder
from vitzoo.generative.runtime import Runtime, StepClock

FORMAT = "vitzoo-latent-diffusion-2"
# shipped beside the bundled zoo: `vitzoo train bundled model=latent_diffusion` with the default config (README)
BUNDLED_LATENT_DIFFUSION = Path(__file__).resolve().parent / "bundled" / "latent_diffusion.safetensors"
StateDict = dict[str, torch.Tensor]
Measure = Callable[[list[StateDict]], list[float | None]]


# Classifier-free guidance scale for sampling: the conditional model as trained. Measured on the shipped checkpoint
# (`vitzoo conditioning`, 10 draws per slot and per target): scale 1 gave the conditioned slots 0.77-0.97x the zoo's
# runs of the slot and target Spearman 0.951; scale 2 gave 0.68-0.93x and 0.954; scale 4 overshot (0.27-0.76x).
GUIDANCE = 1.0
# Sampling temperature (the scale of DDIM's initial noise). Measured on the shipped checkpoint (README,
# `python -m benchmarks.latent_temperature`, 120 draws each): 1.0 gave 0.714 zero-shot with 11% copies at
# within-family spread 1.35, 0.85 gave 0.740 with 9%, 0.7 gave 0.762 with 3% at spread 1.11; SANE's KDE in the
# same space: 0.726 with 68% copies. 0.7 is the highest temperature clear of both the copy bar (10%) and KDE.
TEMPERATURE = 0.7


@dataclass
class LatentDiffusionConfig:
    autoencoder: str = "bundled"  # the autoencoder checkpoint whose latents it learns ("bundled": the shipped one)
    d_model: int = 128
    depth: int = 4
    heads: int = 4
    components: int = 128  # denoise the top principal components of the latents (0: the raw token latents)
    group: int = 8  # values per denoiser token: principal coefficients, or latent tokens when components=0
    timesteps: int = 1000
    schedule: str = "squaredcos_cap_v2"
    condition_dropout: float = 0.2  # accuracy and slot each dropped with this probability (classifier-free guidance)
    mixtures: int = 3000  # Dirichlet mixtures of a family's runs added to the checkpoints, labelled by measured val acc
    dirichlet: float = 0.3  # their concentration (below 1: nearer the runs; 1 crowded the draws, see README)
    shrunk: float = 0.25  # share of mixtures scaled towards the family's start by s ~ U(0.2, 1)
    checkpoint_share: float = 0.25  # share of each batch drawn from the real checkpoints (0: uniform over all)
    steps: int = 24000
    batch_size: int = 32
    lr: float = 5e-4
    ema: float = 0.995
    seed: int = 0

    def __post_init__(self):
        for name, kind, low, high, low_open, high_open in (
            ("d_model", int, 2, None, False, False),
            ("depth", int, 1, None, False, False),
            ("heads", int, 1, None, False, False),
            ("components", int, 0, None, False, False),
            ("group", int, 1, None, False, False),
            ("timesteps", int, 1, MAX_TIMESTEPS, False, False),
            ("condition_dropout", float, 0, 1, False, True),
            ("mixtures", int, 0, None, False, False),
            ("dirichlet", float, 0, None, True, False),
            ("shrunk", float, 0, 1, False, False),
            ("checkpoint_share", float, 0, 1, False, False),
            ("steps", int, 1, None, False, False),
            ("batch_size", int, 1, None, False, False),
            ("lr", float, 0, None, True, False),
            ("ema", float, 0, 1, False, True),
            ("seed", int, 0, None, False, False),
        ):  # fmt: skip
            check_number(f"latent diffusion {name}", getattr(self, name), kind, low, high, low_open, high_open)
        if self.d_model % 2 or self.d_model % self.heads:
            raise ConfigError(f"latent diffusion d_model={self.d_model} must be even and a multiple of heads")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"latent diffusion schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if not isinstance(self.autoencoder, str) or not self.autoencoder:
            raise ConfigError("latent diffusion autoencoder must name a checkpoint (or 'bundled')")

    def to_dict(self) -> dict:
        return asdict(self)


class LatentDenoiser(nn.Module):
    """Predicts the v-target of noisy standardised latents [B, T, k] and log scales [B]."""

    def __init__(self, positions: torch.Tensor, latent: int, families: int, slots: int, epochs: int,
                 config: LatentDiffusionConfig):  # fmt: skip
        super().__init__()
        d, g = config.d_model, config.group
        self.num_tokens, self.latent, self.group, self.slots = positions.shape[0], latent, g, slots
        groups = math.ceil(self.num_tokens / g)
        self.value_in = nn.Linear(g * latent, d)
        self.group_embedding = nn.Parameter(torch.randn(groups, d) * 0.02)
        self.fields = PositionEmbedding(positions[::g], d)  # the tokenizer's fields of each group's first token
        self.scale_in = nn.Linear(1, d)
        self.scale_embedding = nn.Parameter(torch.randn(d) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.family_embedding = nn.Embedding(families, d)
        self.accuracy_in = nn.Linear(1, d)
        self.no_accuracy = nn.Parameter(torch.zeros(d))
        self.slot_condition = nn.Embedding(slots + 1, d)  # index `slots` = no slot condition
        self.epoch_condition = nn.Embedding(epochs + 1, d)  # index `epochs` = no epoch condition
        self.blocks = nn.Sequential(*[Block(d, config.heads) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(d)
        self.value_out = nn.Linear(d, g * latent)
        self.scale_out = nn.Linear(d, 1)

    def forward(self, latents, scale, t, family, accuracy, has_accuracy, slot, epoch):
        """latents [B, T, k], scale [B] (noisy, standardised); t [B] timesteps; family [B]; accuracy [B]
        (standardised, ignored where has_accuracy [B] is False); slot [B] (`slots` = none); epoch [B] (index into
        the trained epochs; `epochs` = none)."""
        b, d = latents.shape[0], self.group_embedding.shape[1]
        pad = self.group_embedding.shape[0] * self.group - self.num_tokens
        grouped = nn.functional.pad(latents, (0, 0, 0, pad)).reshape(b, -1, self.group * self.latent)  # [B, G, g*k]
        tokens = self.value_in(grouped) + self.group_embedding + self.fields()  # [B, G, D]
        scale_token = self.scale_in(scale[:, None]) + self.scale_embedding  # [B, D]
        accuracy_token = torch.where(has_accuracy[:, None], self.accuracy_in(accuracy[:, None]), self.no_accuracy)
        prefix = torch.stack([self.time_mlp(timestep_embedding(t, d)), self.family_embedding(family), accuracy_token,
                              self.slot_condition(slot), self.epoch_condition(epoch), scale_token],
                             dim=1)  # fmt: skip  # [B, 6, D]
        h = self.norm(self.blocks(torch.cat([prefix, tokens], dim=1)))
        values = self.value_out(h[:, prefix.shape[1] :]).reshape(b, -1, self.latent)[:, : self.num_tokens]
        return values, self.scale_out(h[:, prefix.shape[1] - 1]).squeeze(-1)  # [B, T, k], [B]


@dataclass
class LatentSet:
    """The denoiser's training set: latents, log10 delta scales and conditions of n models."""

    latents: torch.Tensor  # [n, T, k]
    log_scale: torch.Tensor  # [n]
    family: torch.Tensor  # [n] index into DeltaSet.families
    slot: torch.Tensor  # [n] index into the slots; `slots` = none (a mixture)
    epoch: torch.Tensor  # [n] index into the epochs; `epochs` = none (a mixture of runs that ended apart)
    accuracy: torch.Tensor  # [n] validation accuracy
    unmeasured: int = 0  # mixtures the measure could not evaluate (left out)


@torch.no_grad()
def latent_set(bundle: AutoencoderBundle, slots: list[tuple[str, float]], epochs: list[int],
               config: LatentDiffusionConfig, measure: Measure | None,
               progress: bool = False) -> LatentSet:  # fmt: skip
    """Every checkpoint of the autoencoder's training data (and `config.mixtures` measured mixtures), encoded."""
    data, model = bundle.data, bundle.model
    latents = torch.cat([model.encode_model(data.tokens[i : i + 64])[:, 0] for i in range(0, len(data), 64)])
    conditions = data.conditions
    family = torch.tensor([c.family for c in conditions])
    slot = torch.tensor([slots.index(slot_of(e.factors)) for e in data.entries])
    epoch = torch.tensor([epochs.index(e.epoch) for e in data.entries])
    accuracy = torch.tensor([c.val_acc for c in conditions])
    log_scale = data.scales.log10()
    unmeasured = 0
    if config.mixtures:
        if measure is None:
            raise ConfigError("latent diffusion with mixtures > 0 labels them on validation: it needs a measure")
        extra = _mixtures(bundle, slots, epochs, config, measure, progress)
        latents, log_scale = torch.cat([latents, extra.latents]), torch.cat([log_scale, extra.log_scale])
        family, slot = torch.cat([family, extra.family]), torch.cat([slot, extra.slot])
        epoch, accuracy = torch.cat([epoch, extra.epoch]), torch.cat([accuracy, extra.accuracy])
        unmeasured = extra.unmeasured
    return LatentSet(latents, log_scale, family, slot, epoch, accuracy, unmeasured)


def _mixtures(bundle, slots, epochs, config, measure, progress) -> LatentSet:
    """Dirichlet mixtures of each family's last checkpoints (one per slot), shrunk towards w0 for a share, as
    latents with their measured validation accuracy; slot label: none; epoch label: the runs' last epoch where
    they all ended at the same one, else none."""
    data = bundle.data
    last = {}  # (family, slot) -> index of the run's last checkpoint
    for i, entry in enumerate(data.entries):
        last[(data.conditions[i].family, slots.index(slot_of(entry.factors)))] = i  # sorted by epoch: last wins
    families = sorted({f for f, _ in last if all((f, s) in last for s in range(len(slots)))})
    if not families:
        raise ConfigError("latent diffusion mixtures need families that ran every slot")
    rng = np.random.default_rng(config.seed)
    chosen = rng.integers(0, len(families), config.mixtures)
    weights = rng.dirichlet([config.dirichlet] * len(slots), config.mixtures)
    shrink = np.where(rng.random(config.mixtures) < config.shrunk, rng.uniform(0.2, 1.0, config.mixtures), 1.0)
    from tqdm.auto import tqdm

    latents, log_scales, accuracies = [], [], []
    for start in tqdm(range(0, config.mixtures, 250), desc="measure mixtures (val)", disable=not progress):
        states, tokens = [], []
        for c, w, s in zip(chosen[start : start + 250], weights[start : start + 250], shrink[start : start + 250]):
            f = families[c]
            runs = torch.stack([data.tokens[last[(f, k)]] * data.scales[last[(f, k)]] for k in range(len(slots))])
            values = torch.einsum("k,ktd->td", torch.as_tensor(w * s, dtype=torch.float32), runs)  # [T, d]
            scale = ((values.pow(2) * data.mask).sum() / data.mask.sum()).sqrt()
            tokens.append(values / scale)
            log_scales.append(scale.log10())
            states.append(data.decode(values, f, 1.0))
        batch = torch.stack(tokens)
        latents.append(bundle.model.encode_model(batch)[:, 0])
        accuracies += measure(states)
    keep = torch.tensor([a is not None for a in accuracies])
    accuracy = torch.tensor([a if a is not None else float("nan") for a in accuracies])
    family = torch.tensor([families[c] for c in chosen])
    none = torch.full((config.mixtures,), len(slots))
    ended = {f: {data.entries[last[(f, k)]].epoch for k in range(len(slots))} for f in families}
    epoch = torch.tensor([epochs.index(min(ended[f])) if len(ended[f]) == 1 else len(epochs) for f in family.tolist()])
    return LatentSet(torch.cat(latents)[keep], torch.stack(log_scales)[keep], family[keep], none[keep], epoch[keep],
                     accuracy[keep], int((~keep).sum()))  # fmt: skip


@dataclass
class LatentGenerator:
    config: LatentDiffusionConfig
    bundle: AutoencoderBundle
    model: LatentDenoiser
    slots: list[tuple[str, float]]
    epochs: list[int]  # the checkpoint epochs it was trained on (the epoch condition's values)
    stats: dict  # latent_mean/latent_std [T, k] tensors; scale and accuracy mean/std/min/max floats
    sha256: str = ""


def _stats(data: LatentSet, components: int) -> dict:
    """Standardisation of latents, log scales and accuracies; with `components` > 0 also the principal directions of
    the standardised latents ("basis" [K, T*k]) and each component's std ("component_std" [K])."""
    std = data.latents.std(dim=0)  # [T, k]
    mean, std = data.latents.mean(dim=0), std.clamp_min(0.1 * std.median().item())  # near-constant: not blown up
    tensors = {"latent_mean": mean, "latent_std": std}
    if components:
        standardised = ((data.latents - mean) / std).flatten(1).double()  # [n, T*k], mean 0
        if components > min(standardised.shape):
            raise ConfigError(f"components={components} is more than the {min(standardised.shape)} the latents have")
        _, singular, directions = torch.linalg.svd(standardised, full_matrices=False)
        tensors["basis"] = directions[:components].float()  # [K, T*k]
        tensors["component_std"] = (singular[:components] / (len(standardised) - 1) ** 0.5).float()  # [K]
    return tensors | {
        "scale_mean": data.log_scale.mean().item(),
        "scale_std": max(data.log_scale.std().item(), 1e-3),
        "accuracy_mean": data.accuracy.mean().item(),
        "accuracy_std": max(data.accuracy.std().item(), 1e-3),
        "accuracy_min": data.accuracy.min().item(),
        "accuracy_max": data.accuracy.max().item(),
    }


def to_coordinates(latents: torch.Tensor, stats: dict) -> torch.Tensor:
    """Latents [n, T, k] -> what the denoiser models: standardised latents [n, T, k], or whitened principal
    coefficients [n, K, 1]."""
    standardised = (latents - stats["latent_mean"]) / stats["latent_std"]
    if "basis" not in stats:
        return standardised
    return ((standardised.flatten(1) @ stats["basis"].T) / stats["component_std"])[..., None]


def from_coordinates(x: torch.Tensor, stats: dict) -> torch.Tensor:
    """The inverse of `to_coordinates` (exact on the principal subspace): [n, T, k] or [n, K, 1] -> latents."""
    mean, std = stats["latent_mean"], stats["latent_std"]
    if "basis" in stats:
        x = ((x[..., 0] * stats["component_std"]) @ stats["basis"]).view(-1, *mean.shape)
    return x * std + mean


def latent_loss(model, scheduler, x0, s0, family, accuracy, slot, epoch, dropout, generator, slots, epochs):
    """v-prediction MSE over latents and log scale, with the accuracy, slot and epoch conditions each dropped at
    random; the noise, timesteps and dropped conditions are drawn from `generator` on the CPU."""
    b = x0.shape[0]
    noise, scale_noise = torch.randn(x0.shape, generator=generator), torch.randn(b, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    has_accuracy = torch.rand(b, generator=generator) >= dropout
    slot = torch.where(torch.rand(b, generator=generator) < dropout, slots, slot)
    epoch = torch.where(torch.rand(b, generator=generator) < dropout, epochs, epoch)
    device = next(model.parameters()).device
    values, scale = model(*[v.to(device) for v in (scheduler.add_noise(x0, noise, t),
                                                    scheduler.add_noise(s0, scale_noise, t), t, family, accuracy,
                                                    has_accuracy, slot, epoch)])  # fmt: skip
    value_target = scheduler.get_velocity(x0, noise, t).to(device)
    scale_target = scheduler.get_velocity(s0, scale_noise, t).to(device)
    # the scale is one number against T x k latents: weighted as one token of k values
    return (values - value_target).pow(2).mean() + (scale - scale_target).pow(2).mean() / values.shape[1]


def train_latent_diffusion(
    out: Path,
    config: LatentDiffusionConfig,
    measure: Measure | None = None,
    zoo: str | None = None,
    head: str | None = None,
    save_every: int = 500,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
    runtime: Runtime | None = None,
) -> Path:
    """Train (or continue training) and write `out/latent_diffusion.safetensors`; returns its path. `zoo`: the
    autoencoder's zoo if it moved; `head`: the head type asked for (the autoencoder's, else ConfigError);
    `measure`: validation accuracy of state dicts (for `config.mixtures`)."""
    preparing_since = time.perf_counter()
    runtime = runtime or Runtime()
    bundle = _autoencoder(config.autoencoder, zoo)
    if head is not None and head != bundle.data.head:
        raise ConfigError(f"autoencoder {config.autoencoder} encodes head={bundle.data.head} fine-tunes, not {head}")
    out.mkdir(parents=True, exist_ok=True)
    slots = sorted({slot_of(e.factors) for e in bundle.data.entries})
    epochs = sorted({e.epoch for e in bundle.data.entries})
    state_path = out / "train_state.safetensors"
    torch.manual_seed(config.seed)
    model, ema = (_denoiser(bundle, slots, epochs, config).to(runtime.device) for _ in range(2))
    ema.load_state_dict(model.state_dict())
    trained = runtime.wrap(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    described = {"config": config.to_dict(), "autoencoder_sha256": bundle.sha256, **runtime.describe()}
    start = 0
    if state_path.exists():
        metadata, saved = load_training_state(state_path, model, ema, optimizer, described | runtime.expected())
        data = LatentSet(saved["latents"], saved["log_scale"], saved["family"], saved["slot"], saved["epoch"],
                         saved["accuracy"], int(metadata["unmeasured"]))  # fmt: skip
        start = int(metadata["step"])
    else:
        data = latent_set(bundle, slots, epochs, config, measure, progress and runtime.main)
    stats = _stats(data, config.components)
    x0 = to_coordinates(data.latents, stats)  # [n, T, k], or [n, K, 1] principal coefficients
    s0 = (data.log_scale - stats["scale_mean"]) / stats["scale_std"]  # [n]
    accuracy = (data.accuracy - stats["accuracy_mean"]) / stats["accuracy_std"]
    checkpoints = (data.slot < len(slots)).nonzero()[:, 0]  # the real checkpoints (mixtures have no slot)
    from_checkpoints = round(config.checkpoint_share * config.batch_size)
    scheduler, _ = schedulers(config)
    part = runtime.share(config.batch_size)
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=start, desc="train latent diffusion",
               disable=not (progress and runtime.main))  # fmt: skip
    clock = StepClock(config.batch_size, preparing_since)
    for step in range(start, config.steps):
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)  # the batch of step s: seed and s
        real = checkpoints[torch.randint(0, len(checkpoints), (from_checkpoints,), generator=generator)]
        anywhere = torch.randint(0, len(x0), (config.batch_size - from_checkpoints,), generator=generator)
        batch = torch.cat([real, anywhere])
        with runtime.autocast():
            loss = latent_loss(trained, scheduler, x0[batch][part], s0[batch][part], data.family[batch][part],
                               accuracy[batch][part], data.slot[batch][part], data.epoch[batch][part],
                               config.condition_dropout, generator, len(slots), len(epochs))  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema, model, config.ema)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        clock.tick()
        last = step == config.steps - 1
        if step % 50 == 0 or last:
            logs = runtime.mean({"loss": loss.item()})  # a collective: every rank takes part, rank 0 logs
            if log is not None and runtime.main:
                log({"step": step, "train/loss": logs["loss"], "train/steps_per_second": clock.steps_per_second()})
        if runtime.main and ((step + 1) % save_every == 0 or last):
            tensors = {"latents": data.latents, "log_scale": data.log_scale, "family": data.family,
                       "slot": data.slot, "epoch": data.epoch, "accuracy": data.accuracy}  # fmt: skip
            save_training_state(state_path, model, ema, optimizer,
                                {"step": step + 1, "unmeasured": data.unmeasured, **described}, tensors)  # fmt: skip
    bar.close()
    if runtime.main:
        tensors = {f"model.{k}": v for k, v in ema.state_dict().items()}
        tensors |= {f"stats.{k}": v for k, v in stats.items() if isinstance(v, torch.Tensor)}
        scalars = {k: v for k, v in stats.items() if not isinstance(v, torch.Tensor)}
        metadata = {"format": FORMAT, "config": config.to_dict(), "autoencoder_sha256": bundle.sha256,
                    "slots": [list(s) for s in slots], "epochs": epochs, "families": len(bundle.data.families),
                    "stats": scalars,
                    "training_models": len(x0), "unmeasured": data.unmeasured, **runtime.describe()}  # fmt: skip
        write_checkpoint(out / "latent_diffusion.safetensors", tensors, metadata)
        clock.write(out / "timing.json")
    runtime.barrier()
    return out / "latent_diffusion.safetensors"


def _autoencoder(name: str, zoo: str | None) -> AutoencoderBundle:
    from vitzoo.generative.hyper import BUNDLED_AUTOENCODER

    bundle = load_autoencoder(BUNDLED_AUTOENCODER if name == "bundled" else name, zoo)
    if bundle.config.window != 0:
        raise ConfigError("latent diffusion learns whole-model latents: it needs an autoencoder trained with window=0")
    if bundle.data.head == "all":
        raise ConfigError("latent diffusion generates whole models: it needs an autoencoder trained with head=linear "
                          "or head=mlp, not head=all (bodies only)")  # fmt: skip
    return bundle


def _denoiser(bundle: AutoencoderBundle, slots: list, epochs: list, config: LatentDiffusionConfig) -> LatentDenoiser:
    families = len(bundle.data.families)
    if config.components:  # K coefficients, each its own position
        return LatentDenoiser(torch.arange(config.components)[:, None], 1, families, len(slots), len(epochs), config)
    return LatentDenoiser(bundle.data.positions, bundle.config.latent, families, len(slots), len(epochs), config)


SCALARS = ("scale_mean", "scale_std", "accuracy_mean", "accuracy_std", "accuracy_min", "accuracy_max")


def load_latent_diffusion(path: str | Path, zoo: str | None = None) -> LatentGenerator:
    """A latent diffusion checkpoint and the autoencoder it decodes through (which must be the one it was
    trained on: same sha256); `"bundled"` is the one shipped beside the bundled zoo."""
    path = BUNDLED_LATENT_DIFFUSION if str(path) == "bundled" else Path(path)
    weights, metadata, config = open_checkpoint(path, FORMAT, LatentDiffusionConfig)
    stats = require(metadata, "stats", dict, path)
    if sorted(stats) != sorted(SCALARS):
        raise CheckpointError(f"{path}: its stats must hold exactly {', '.join(SCALARS)}")
    for name in SCALARS:
        low = 0 if name.endswith("_std") else None
        check_number(f"{path}: stats.{name}", stats[name], float, low, None, True, error=CheckpointError)
    slots = [(str(o), float(lr)) for o, lr in require(metadata, "slots", list, path)]
    epochs = require(metadata, "epochs", list, path)
    if not epochs or not all(isinstance(e, int) for e in epochs):
        raise CheckpointError(f"{path}: epochs must be a list of integers")
    bundle = _autoencoder(config.autoencoder, zoo)
    if bundle.sha256 != require(metadata, "autoencoder_sha256", str, path):
        raise CheckpointError(f"{path} was trained on the latents of another autoencoder than {config.autoencoder}")
    model = _denoiser(bundle, slots, epochs, config)
    load_weights(model, {k[len("model.") :]: v for k, v in weights.items() if k.startswith("model.")}, path)
    model.eval()
    shape = (bundle.data.spec.num_tokens, bundle.config.latent)
    shapes = {"latent_mean": shape, "latent_std": shape}
    if config.components:
        shapes |= {"basis": (config.components, shape[0] * shape[1]), "component_std": (config.components,)}
    for name, wanted in shapes.items():
        value = weights.get(f"stats.{name}")
        if value is None or tuple(value.shape) != wanted:
            raise CheckpointError(f"{path}: stats.{name} must be a tensor of shape {wanted}")
        stats[name] = value
    return LatentGenerator(config, bundle, model, slots, epochs, stats, hashlib.sha256(path.read_bytes()).hexdigest())


@torch.no_grad()
def sample_latent(
    generator: LatentGenerator,
    n: int,
    seed: int = 0,
    parent: str | None = None,
    target_acc: float | None = None,
    optimizer: str | None = None,
    lr: float | None = None,
    guidance: float = GUIDANCE,
    steps: int = 50,
    temperature: float = TEMPERATURE,
    epoch: int | None = None,
) -> tuple[list[tuple[StateDict, dict, dict]], list[str]]:
    """n models as (state_dict, factors, head) and their parents: latents and log scale drawn by DDIM with
    classifier-free guidance on `target_acc` (validation accuracy) and `optimizer`+`lr`, for families drawn
    uniformly (of `parent` only, if given), decoded through the autoencoder onto the family's start. `epoch`: the
    checkpoint epoch asked for (None: the last one trained on, a finished fine-tune, as the zoo's runs are compared).
    `guidance` 1 is the plain conditional model (see GUIDANCE); `temperature` scales the initial noise (1: as
    trained; lower trades within-family spread for accuracy, see TEMPERATURE)."""
    data, stats, model = generator.bundle.data, generator.stats, generator.model
    if n <= 0:
        raise ConditionError(f"n must be positive, got {n}")
    if not 1 <= steps <= generator.config.timesteps:
        raise ConditionError(f"steps must be in [1, {generator.config.timesteps}] (the trained timesteps), got {steps}")
    if target_acc is not None and not stats["accuracy_min"] <= target_acc <= stats["accuracy_max"]:
        raise ConditionError(f"target_acc={target_acc} is outside the validation accuracies it was trained on "
                             f"[{stats['accuracy_min']:.3f}, {stats['accuracy_max']:.3f}]")  # fmt: skip
    if (optimizer is None) != (lr is None):
        raise ConditionError("condition on optimizer and lr together (a slot is the pair)")
    if not temperature >= 0:
        raise ConditionError(f"temperature must be >= 0, got {temperature}")
    epoch = generator.epochs[-1] if epoch is None else epoch
    if epoch not in generator.epochs:
        raise ConditionError(f"epoch={epoch} is not a trained condition; trained: {generator.epochs}")
    slot = None
    if optimizer is not None:
        if (optimizer, float(lr)) not in generator.slots:
            trained = ", ".join(f"{o} {r:g}" for o, r in generator.slots)
            raise ConditionError(f"optimizer={optimizer} lr={lr} is not a trained condition; trained: {trained}")
        slot = generator.slots.index((optimizer, float(lr)))
    families = [f for f, key in enumerate(data.families) if parent is None or key[0] == parent]
    if not families:
        raise ConditionError(f"parent {parent!r} has no family in the generator's zoo; parents: {data.parents}")
    rng = torch.Generator().manual_seed(seed)
    family = torch.as_tensor(families)[torch.randint(len(families), (n,), generator=rng)]
    components = generator.config.components
    shape = (components, 1) if components else tuple(stats["latent_mean"].shape)
    x = temperature * torch.randn(n, *shape, generator=rng)  # [n, T, k] or [n, K, 1]
    s = temperature * torch.randn(n, generator=rng)
    standardised = 0.0 if target_acc is None else (target_acc - stats["accuracy_mean"]) / stats["accuracy_std"]
    accuracy = torch.full((n,), standardised)
    has_accuracy = torch.full((n,), target_acc is not None)
    slots = torch.full((n,), len(generator.slots) if slot is None else slot)
    free_slots = torch.full((n,), len(generator.slots))
    epochs = torch.full((n,), generator.epochs.index(epoch))
    conditioned = target_acc is not None or slot is not None
    _, scheduler = schedulers(generator.config)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        steps_t = torch.full((n,), int(t))
        values, scale = model(x, s, steps_t, family, accuracy, has_accuracy, slots, epochs)
        if conditioned and guidance != 1.0:  # guided away from the model free of accuracy and slot (same epoch)
            free_values, free_scale = model(x, s, steps_t, family, accuracy, torch.zeros(n, dtype=torch.bool),
                                            free_slots, epochs)  # fmt: skip
            values = free_values + guidance * (values - free_values)
            scale = free_scale + guidance * (scale - free_scale)
        x = scheduler.step(values, t, x, eta=0.0).prev_sample
        s = scheduler.step(scale, t, s, eta=0.0).prev_sample
    latents = from_coordinates(x, stats)  # [n, T, k]
    log_scale = s * stats["scale_std"] + stats["scale_mean"]  # [n]
    tokens = torch.cat([generator.bundle.model.decode_model(latents[i : i + 64, None]) for i in range(0, n, 64)])
    samples, parents = [], []
    for values, f, scale in zip(tokens, family.tolist(), log_scale.tolist()):
        parent_id, head, head_hidden, head_seed, _ = data.families[f]
        factors = {"method": "latent_diffusion", "space": "latent", "generator": generator.sha256,
                   "family_seed": head_seed, "target_acc": target_acc, "optimizer": optimizer, "lr": lr,
                   "target_epoch": epoch,
                   "guidance": guidance if conditioned else None, "temperature": temperature,
                   "sample_seed": seed}  # fmt: skip
        head_spec = {"head": head, "head_hidden": head_hidden, "num_classes": data.entries[0].head["num_classes"]}
        samples.append((data.decode(values, f, 10**scale), factors, head_spec))
        parents.append(parent_id)
    return samples, parents
