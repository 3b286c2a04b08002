"""Training, checkpoints, embeddings and SANE-style sampling of the hyper-representation autoencoder.

`train_autoencoder(zoo, out, config)` trains `HyperAutoencoder` (generative/autoencoder.py) on a zoo's
fine-tuned checkpoints as normalised delta tokens (generative/data.py), two augmented views per model (random
function-preserving permutation, noise, masked tokens), with an EMA copy; `train_state.safetensors` is written
every `save_every` steps and a rerun continues from it to the same weights (step s draws its batch and
augmentations from seed and s alone). The final `autoencoder.safetensors` holds the EMA weights and, in its
metadata, the config, the token spec, the normaliser and the checkpoints it was trained on (with sha256).

`embeddings(bundle)` gives the model-level embedding of every checkpoint (for property probes);
`sample_kde(bundle, n, ...)` is SANE's sampler: the token latents of anchor models plus Gaussian noise
(bandwidth x the latents' per-dimension std), decoded and added to the anchor family's start.

Shapes: n checkpoints, B batch, T tokens, d token width, k latent width, e embedding width.
"""

from __future__ import annotations

import dataclasses
import hashlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from vitzoo.generative.autoencoder import AutoencoderConfig, HyperAutoencoder
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
from vitzoo.generative.data import DeltaSet
from vitzoo.generative.generator import ConditionError
from vitzoo.generative.runtime import Runtime, StepClock
from vitzoo.tokenizer.dataset import mask_tokens
from vitzoo.tokenizer.normalize import Normalizer
from vitzoo.tokenizer.spec import TokenSpec
from vitzoo.tokenizer.symmetries import permutable_layers, random_permutation
from vitzoo.tokenizer.tokens import detokenize, tokenize
from vitzoo.zoo_builder.baselines import noise_around
from vitzoo.zoo_builder.zoo import Zoo, ZooError

FORMAT = "vitzoo-autoencoder-1"
# shipped beside the bundled zoo: `vitzoo train bundled model=autoencoder` with the default config (README)
BUNDLED_AUTOENCODER = Path(__file__).resolve().parent / "bundled" / "autoencoder.safetensors"
StateDict = dict[str, torch.Tensor]


@dataclass
class AutoencoderBundle:
    config: AutoencoderConfig
    data: DeltaSet
    model: HyperAutoencoder
    sha256: str = ""


def describe(data: DeltaSet) -> dict:
    return {
        "zoo": data.zoo_root,
        "head": data.head,
        "checkpoints": [[e.model_id, e.epoch, e.sha256] for e in data.entries],
    }


def augmented_views(data: DeltaSet, batch: torch.Tensor, config: AutoencoderConfig, generator, layers):
    """views [2, B, n, d] (permuted, noisy, masked), their clean targets [2, B, n, d] and the tokens' positions
    [B, n]: one random window of `config.window` consecutive tokens per model (None and n = T for window=0)."""
    clean = []
    for _ in range(2):
        rows = []
        for index in batch.tolist():
            tokens = data.tokens[index]
            if config.permute:
                permuted = random_permutation(detokenize(tokens, data.spec), generator=generator, layers=layers)
                tokens = tokenize(permuted, data.spec, check_finite=False).values
            rows.append(tokens)
        clean.append(torch.stack(rows))
    clean = torch.stack(clean)  # [2, B, T, d]
    mask = data.mask.float()
    index = None
    if config.window > 0:  # drawn after the permutations, so that window=0 draws exactly what it always drew
        starts = torch.randint(0, len(data.positions) - config.window + 1, (len(batch),), generator=generator)
        index = starts[:, None] + torch.arange(config.window)  # [B, n]
        clean = clean[:, torch.arange(len(batch))[:, None], index]  # [2, B, n, d]
        mask = mask[index]
    noisy = clean + config.noise * torch.randn(clean.shape, generator=generator) * mask
    views = torch.stack([mask_tokens(noisy[v], config.mask_fraction, generator) for v in range(2)])
    return views, clean, index


class AutoencoderObjective(nn.Module):
    """`HyperAutoencoder.loss` as a module DDP can wrap, with the NT-Xent negatives gathered from every rank.

    Each rank reconstructs its share of the batch; the contrastive term sees the whole batch's embeddings, as one
    process would, so the result does not depend on the number of processes. In one process it is `model.loss`."""

    def __init__(self, model: HyperAutoencoder):
        super().__init__()
        self.model = model

    def forward(
        self, views: torch.Tensor, clean: torch.Tensor, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """views, clean [2, B/W, n, d]: this rank's share of the two augmented views and their targets; index
        [B/W, n]: each model's window (None: all T tokens). Returns the loss and the logs (whole-batch
        contrastive terms, this rank's reconstruction)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        return self.model.loss(views, clean, index, gather=_gather_shares if world > 1 else None)


def _gather_shares(embeddings: torch.Tensor) -> torch.Tensor:
    """This rank's embeddings [2, B/W, e] -> the whole batch's [2, B, e] (ranks hold contiguous shares, so it is
    batch order). Only this rank's share carries gradients: every rank computes the same NT-Xent but back-propagates
    into its own share, and DDP then averages over the W ranks, so that share's gradient is scaled by W."""
    world = dist.get_world_size()
    shares = [torch.empty_like(embeddings) for _ in range(world)]
    dist.all_gather(shares, embeddings.detach().contiguous())
    shares[dist.get_rank()] = _ScaleGradient.apply(embeddings, float(world))
    return torch.cat(shares, dim=1)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient times `scale` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        return gradient * ctx.scale, None


def train_autoencoder(
    zoo: Zoo,
    out: Path,
    config: AutoencoderConfig,
    head: str = "linear",
    save_every: int = 200,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
    runtime: Runtime | None = None,
) -> Path:
    """Train (or continue training) and write `out/autoencoder.safetensors`; returns its path.

    runtime: device, precision and processes (generative/runtime.py); None is one process on the CPU in fp32.
    Under torchrun every rank calls this; rank 0 writes the files and calls `log`."""
    preparing_since = time.perf_counter()
    runtime = runtime or Runtime()
    out.mkdir(parents=True, exist_ok=True)
    data = DeltaSet(zoo, head, holdout=config.holdout)
    layers = permutable_layers(detokenize(data.tokens[0], data.spec), data.num_heads)
    state_path = out / "train_state.safetensors"
    part = runtime.share(config.batch_size)
    torch.manual_seed(config.seed)
    model = HyperAutoencoder(data.spec, config).to(runtime.device)
    ema = HyperAutoencoder(data.spec, config).to(runtime.device)
    ema.load_state_dict(model.state_dict())
    objective = runtime.wrap(AutoencoderObjective(model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    described = {"config": config.to_dict(), "data": describe(data), **runtime.describe()}
    start = 0
    if state_path.exists():
        start = int(load_training_state(state_path, model, ema, optimizer, described | runtime.expected())[0]["step"])
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=start, desc="train autoencoder", disable=not (progress and runtime.main))
    clock = StepClock(config.batch_size, preparing_since)
    for step in range(start, config.steps):
        # the whole batch and its augmentations, drawn on the CPU from seed and step (the same on every rank)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        batch = torch.randint(0, len(data), (config.batch_size,), generator=generator)
        views, clean, index = augmented_views(data, batch, config, generator, layers)  # [2, B, n, d], [B, n]
        index = None if index is None else index[part].to(runtime.device)
        with runtime.autocast():
            loss, logs = objective(views[:, part].to(runtime.device), clean[:, part].to(runtime.device), index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema, model, config.ema)
        bar.update(1)
        bar.set_postfix(reconstruction=f"{logs['reconstruction']:.3f}")
        clock.tick()
        if step % 25 == 0 or step == config.steps - 1:
            logs = runtime.mean(logs)  # a collective: every rank takes part, rank 0 logs
            if log is not None and runtime.main:
                lr = optimizer.param_groups[0]["lr"]
                log({"step": step, **{f"train/{k}": v for k, v in logs.items()}, "train/lr": lr,
                     "train/steps_per_second": clock.steps_per_second()})  # fmt: skip
        if runtime.main and ((step + 1) % save_every == 0 or step + 1 == config.steps):
            save_training_state(state_path, model, ema, optimizer, {"step": step + 1, **described})
    bar.close()
    if runtime.main:
        metadata = {
            "format": FORMAT,
            "config": config.to_dict(),
            "spec": data.spec.to_dict(),
            "normalizer": {"mode": data.normalizer.mode, "mean": data.normalizer.mean, "std": data.normalizer.std},
            "data": describe(data),
            **runtime.describe(),
        }
        write_checkpoint(out / "autoencoder.safetensors", ema.state_dict(), metadata)
        clock.write(out / "timing.json")
    runtime.barrier()  # no rank returns before the checkpoint is written
    return out / "autoencoder.safetensors"


def embedding_rows(bundle: AutoencoderBundle) -> list[dict]:
    """One row per training checkpoint: who it is, its validation accuracy, the first two principal components of
    its model embedding (`pca_x`, `pca_y`, for a scatter plot) and the embedding itself (`e0`..)."""
    values = embeddings(bundle)  # [n, e]
    centred = values - values.mean(dim=0)
    _, _, directions = torch.linalg.svd(centred, full_matrices=False)  # directions [e, e], rows by variance
    pca = centred @ directions[:2].T  # [n, 2]
    rows = []
    for entry, condition, point, embedding in zip(bundle.data.entries, bundle.data.conditions, pca, values):
        row = {"model_id": entry.model_id, "epoch": entry.epoch, "parent_id": entry.parent_id,
               "optimizer": entry.factors["optimizer"], "lr": entry.factors["lr"], "val_acc": condition.val_acc,
               "pca_x": point[0].item(), "pca_y": point[1].item()}  # fmt: skip
        rows.append(row | {f"e{i}": v for i, v in enumerate(embedding.tolist())})
    return rows


def load_autoencoder(path: str | Path, zoo: str | None = None) -> AutoencoderBundle:
    """An autoencoder checkpoint and its training data, rebuilt from its zoo and checked checkpoint by checkpoint."""
    path = Path(path)
    # written before pooling and windows were options: those pooled the mean over the whole sequence
    legacy = {"pooling": "mean", "window": 0, "window_stride": 0, "projections": "shared", "holdout": "none"}
    weights, metadata, config = open_checkpoint(path, FORMAT, AutoencoderConfig, legacy)
    recorded = require(metadata, "data", dict, path)
    for key in ("zoo", "head"):
        require(recorded, key, str, path)
    try:
        spec = TokenSpec.from_dict(require(metadata, "spec", dict, path))
        normalizer = Normalizer(**require(metadata, "normalizer", dict, path))
    except (KeyError, TypeError) as error:  # a field missing from or foreign to the recorded spec or normaliser
        raise CheckpointError(f"{path}: its token spec or normaliser is incomplete ({error})") from None
    data = DeltaSet(Zoo.open(zoo or recorded["zoo"]), recorded["head"], spec, normalizer, config.holdout)
    if describe(data) | {"zoo": recorded["zoo"]} != recorded:
        raise ZooError(f"{path} was trained on other checkpoints than {zoo or recorded['zoo']} holds now")
    model = HyperAutoencoder(spec, config)
    load_weights(model, weights, path)
    model.eval()
    return AutoencoderBundle(config, data, model, hashlib.sha256(path.read_bytes()).hexdigest())


@torch.no_grad()
def embeddings(bundle: AutoencoderBundle, batch: int = 64) -> torch.Tensor:
    """[n, e + 1] model-level embeddings of every training checkpoint (no augmentation): the autoencoder's
    embedding of its unit-scale delta, and the log10 of that delta's scale (`DeltaSet.scales`)."""
    out = []
    for start in range(0, len(bundle.data), batch):
        out.append(bundle.model.embed_model(bundle.data.tokens[start : start + batch]))
    return torch.cat([torch.cat(out), bundle.data.scales.log10()[:, None]], dim=1)


@torch.no_grad()
def reconstruct(bundle: AutoencoderBundle, indices: list[int], batch: int = 64) -> list[StateDict]:
    """Encode -> decode of training checkpoints (no augmentation, no noise), as weights on their family start."""
    data, out = bundle.data, []
    for start in range(0, len(indices), batch):
        chosen = indices[start : start + batch]
        tokens = bundle.model.decode_model(bundle.model.encode_model(data.tokens[chosen]))  # [b, T, d]
        out += [data.decode(t, data.conditions[i].family, data.scales[i]) for t, i in zip(tokens, chosen)]
    return out


def held_out_bundle(bundle: AutoencoderBundle, zoo: str | None = None) -> AutoencoderBundle | None:
    """The same autoencoder over the models its `holdout` kept out of training (None when it held none out)."""
    if bundle.config.holdout == "none":
        return None
    data = bundle.data
    held = DeltaSet(Zoo.open(zoo or data.zoo_root), data.head, data.spec, data.normalizer, bundle.config.holdout,
                    "held_out")  # fmt: skip
    return dataclasses.replace(bundle, data=held)


def reconstruction_rows(bundle: AutoencoderBundle, measure: Callable[[list[StateDict]], list[float | None]]) -> list:
    """How well the autoencoder reconstructs the models it was trained on, per fine-tuning slot and overall.

    Every training model's last checkpoint is encoded and decoded (no augmentation, no noise) and measured by
    `measure` (accuracy on a split; None: could not be evaluated), beside the model itself and beside the
    non-learned control at the same error: the model plus isotropic noise at exactly the reconstruction's
    distance from it. Per slot: mean accuracy of the models, the reconstructions and the control; the
    reconstruction / model ratio on the mean and the median of per-model ratios; the median relative weight
    error ||reconstruction - w|| / ||w - w0||."""
    data = bundle.data
    last = {}
    for i, entry in enumerate(data.entries):
        last[entry.model_id] = i  # entries are sorted by epoch within a model: the last one wins
    indices = sorted(last.values())
    originals = [data.entries[i].state_dict() for i in indices]
    rebuilt = reconstruct(bundle, indices)
    keys = sorted(rebuilt[0])  # with head="all": the bodies
    flat = lambda state_dict: torch.cat([state_dict[k].double().flatten() for k in keys])  # noqa: E731
    distances = [(flat(r) - flat(o)).norm().item() for r, o in zip(rebuilt, originals)]
    sizes = [(flat(o) - flat(data.inits[data.conditions[i].family])).norm().item() for o, i in zip(originals, indices)]
    control = noise_around(originals, distances, keys, seed=0)
    model_acc, rebuilt_acc, control_acc = measure(originals), measure(rebuilt), measure(control)
    slots: dict[str, list[int]] = {}
    for n, i in enumerate(indices):
        factors = data.entries[i].factors
        slots.setdefault(f"{factors['optimizer']} {factors['lr']:g}", []).append(n)
    rows = []
    for slot, members in [*sorted(slots.items()), ("all", list(range(len(indices))))]:
        ok = [n for n in members if None not in (model_acc[n], rebuilt_acc[n], control_acc[n])]
        if not ok:
            continue
        model, rebuilt_mean, control_mean = (statistics.mean(v[n] for n in ok) for v in (model_acc, rebuilt_acc,
                                                                                            control_acc))  # fmt: skip
        rows.append({
            "slot": slot, "models": len(members), "unevaluated": len(members) - len(ok),
            "model_acc": model, "reconstruction_acc": rebuilt_mean, "control_acc": control_mean,
            "ratio_of_means": rebuilt_mean / model,
            "median_ratio": statistics.median(rebuilt_acc[n] / model_acc[n] for n in ok if model_acc[n] > 0),
            "median_relative_error": statistics.median(distances[n] / sizes[n] for n in ok),
        })  # fmt: skip
    return rows


@torch.no_grad()
def sample_kde(
    bundle: AutoencoderBundle, n: int, seed: int = 0, bandwidth: float = 0.2, top: float = 1.0
) -> tuple[list[tuple[StateDict, dict, dict]], list[str]]:
    """SANE's sampler: latents of anchors (each model's last checkpoint; the `top` fraction by validation
    accuracy) plus noise of `bandwidth` x the per-dimension std of the anchors' latents, decoded; the delta's log
    scale is one more latent dimension, perturbed the same way."""
    if n <= 0:
        raise ConditionError(f"n must be positive, got {n}")
    if not 0 < top <= 1:
        raise ConditionError(f"top must be in (0, 1], got {top}")
    data = bundle.data
    if data.head == "all":
        raise ConditionError("this autoencoder encodes the bodies of both head types, not whole models; KDE needs one "
                             "trained with head=linear or head=mlp")  # fmt: skip
    last = {}
    for i, entry in enumerate(data.entries):
        last[entry.model_id] = i  # entries are sorted by epoch within a model: the last one wins
    anchors = sorted(last.values(), key=lambda i: -data.conditions[i].val_acc)[: max(1, round(top * len(last)))]
    latents = bundle.model.encode_model(data.tokens[anchors])  # [A, W, n, k]
    spread = latents.std(dim=0, keepdim=True)  # [1, W, n, k]
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randint(len(anchors), (n,), generator=generator)
    noisy = latents[chosen] + bandwidth * spread * torch.randn(n, *latents.shape[1:], generator=generator)
    tokens = bundle.model.decode_model(noisy)  # [n, T, d]
    log_scales = data.scales[anchors].log()  # [A]
    spread = log_scales.std() if len(anchors) > 1 else torch.tensor(0.0)
    scales = (log_scales[chosen] + bandwidth * spread * torch.randn(n, generator=generator)).exp()  # [n]
    samples, parents = [], []
    for token_values, a, scale in zip(tokens, chosen.tolist(), scales):
        anchor = data.entries[anchors[a]]
        factors = {"method": "kde", "space": "latent", "generator": bundle.sha256, "anchor": anchor.model_id,
                   "bandwidth": bandwidth, "top": top, "sample_seed": seed}  # fmt: skip
        samples.append((data.decode(token_values, data.conditions[anchors[a]].family, scale), factors, anchor.head))
        parents.append(anchor.parent_id)
    return samples, parents
