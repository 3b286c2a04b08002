"""Training, checkpoints and sampling of the family-coordinate diffusion generator (generative/diffusion.py).

`train_generator` builds the training set (every family's runs, plus random in-family mixtures whose
validation accuracy is measured by the `measure` callback: the CLI passes the batched evaluator, so this
package does not import `eval`), trains the denoiser with an EMA copy, and writes `generator.safetensors`:
the EMA weights (a few hundred KB) and, in its metadata, the config, the basis it decodes into (zoo, head,
slots, families, and the sha256 of every run it adds up) and the standardisation statistics. Training
state (model, EMA, optimizer, step, the measured training set) is written to `train_state.safetensors`
every `save_every` steps; a rerun continues from there and ends with the same weights as an uninterrupted run
(the batch of step s is drawn from seed and s alone).

`sample(generator, n, ...)` draws coordinates, decodes them exactly in the family basis and returns state
dicts with their factors; conditions outside what was trained raise `ConditionError`.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vitzoo.errors import VitzooError, check_number
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
from vitzoo.generative.diffusion import (
    CoordinateDenoiser,
    DiffusionConfig,
    diffusion_loss,
    sample_coordinates,
    schedulers,
)
from vitzoo.generative.family import FamilyBasis
from vitzoo.generative.runtime import Runtime, StepClock
from vitzoo.zoo_builder.baselines import gaussian, noise_around, random_init
from vitzoo.zoo_builder.zoo import Zoo, ZooError

FORMAT = "vitzoo-generator-1"
BUNDLED_GENERATOR = Path(__file__).resolve().parent / "bundled" / "generator.safetensors"  # `vitzoo sample bundled`
StateDict = dict[str, torch.Tensor]
Measure = Callable[[list[StateDict]], list[float | None]]  # validation accuracy of each state dict; None: failed


BASELINES = ("random", "gaussian", "noise")
METHODS = ("mix", "pick", "diffusion", *BASELINES)


# Classifier-free guidance scale for method=diffusion. Measured on the shipped generator (`vitzoo conditioning`, 10
# draws per slot and per target): scale 2 gave target Spearman 0.977 and conditioned slots within 0.98-1.04x of the
# zoo's runs; scale 1 gave 0.959 and let the weakest slot drift up (SGD 1e-4: 0.597 against the runs' 0.436).
GUIDANCE = 2.0


class ConditionError(VitzooError, ValueError):
    """A sampling condition the generator was not trained on."""


@dataclass
class TrainingSet:
    coordinates: torch.Tensor  # [N, K] raw (sums to 1)
    family: torch.Tensor  # [N] int64
    accuracy: torch.Tensor  # [N] measured validation accuracy
    slot: torch.Tensor  # [N] int64: the run with the largest coordinate
    unmeasured: int = 0  # models left out because they could not be evaluated (the measure gave None)


def training_set(
    basis: FamilyBasis,
    config: DiffusionConfig,
    measure: Measure,
    progress: bool = False,
    runtime: Runtime | None = None,
) -> TrainingSet:
    """Every run (one-hot coordinates, its recorded val accuracy) and `config.mixtures` Dirichlet mixtures of
    one family's runs with their measured val accuracy. A share `config.shrunk` of the mixtures is scaled by
    s ~ U(0.2, 1) towards the family's start (partly trained models): novel models at low accuracies, so the
    accuracy condition covers the zoo's whole range. The slot label of a mixture is its dominant run when that
    run weighs at least half and the mixture is not shrunk (a slot stands for its run's full training), else
    none. A model the measure could not evaluate (None) is left out of the set and counted in `unmeasured`.

    Under torchrun every rank draws the same mixtures and measures every W-th chunk of them; the measurements are
    gathered, so every rank ends with the whole set."""
    runtime = runtime or Runtime()
    f_count, k_count = basis.num_families, basis.num_slots
    family = torch.arange(f_count).repeat_interleave(k_count)
    coordinates = torch.eye(k_count).repeat(f_count, 1)
    accuracy = basis.val_acc.flatten()
    unrecorded = [i for i, m in enumerate(m for ms in basis.members for m in ms) if "val_acc" not in m.metrics]
    if unrecorded:  # e.g. an imported zoo that logged test accuracy only: measure the runs on val
        runs = [basis.decode(int(family[i]), coordinates[i]) for i in unrecorded]
        accuracy[unrecorded] = torch.tensor(_nan_for_none(measure(runs)), dtype=accuracy.dtype)
    rng = np.random.default_rng(config.seed)
    mixed_family = torch.as_tensor(rng.integers(0, f_count, config.mixtures))
    mixed = torch.as_tensor(rng.dirichlet([config.dirichlet] * k_count, config.mixtures), dtype=torch.float32)
    shrunk = torch.as_tensor(rng.random(config.mixtures) < config.shrunk)
    scale = torch.where(shrunk, torch.as_tensor(rng.uniform(0.2, 1.0, config.mixtures), dtype=torch.float32), 1.0)
    mixed = mixed * scale[:, None]
    parameters = sum(v.numel() for v in basis.decode(0, torch.zeros(k_count)).values())
    chunk = max(1, min(250, 2**28 // parameters))  # models per measure call: 1 GiB of float32 weights at most
    starts = list(range(0, config.mixtures, chunk))[runtime.rank :: runtime.world_size]  # this rank's chunks
    from tqdm.auto import tqdm

    mine = {}
    for start in tqdm(starts, desc="measure mixtures (val)", disable=not (progress and runtime.main)):
        state_dicts = [basis.decode(int(f), a) for f, a in zip(mixed_family[start : start + chunk],
                                                                  mixed[start : start + chunk])]  # fmt: skip
        mine[start] = measure(state_dicts)
    by_start = {start: values for part in runtime.gather(mine) for start, values in part.items()}
    measured = [value for start in sorted(by_start) for value in by_start[start]]
    all_coordinates = torch.cat([coordinates, mixed])
    weight, dominant = all_coordinates.max(dim=1)
    full = torch.cat([torch.ones(len(family), dtype=torch.bool), ~shrunk])  # runs and unshrunk mixtures
    all_accuracy = torch.cat([accuracy, torch.tensor(_nan_for_none(measured), dtype=torch.float32)])
    measured_ok = ~all_accuracy.isnan()
    if not measured_ok.any():
        raise ZooError(f"no model of {basis.zoo_root} or mixture of its runs could be evaluated on val")
    return TrainingSet(
        all_coordinates[measured_ok],
        torch.cat([family, mixed_family])[measured_ok],
        all_accuracy[measured_ok],
        torch.where((weight >= 0.5) & full, dominant, k_count)[measured_ok],
        int((~measured_ok).sum()),
    )


def _nan_for_none(accuracies: list[float | None]) -> list[float]:
    return [float("nan") if a is None else a for a in accuracies]


@dataclass
class Generator:
    config: DiffusionConfig
    basis: FamilyBasis
    model: CoordinateDenoiser
    stats: dict  # coordinate mean/std [K], accuracy mean/std/min/max, copy_threshold
    sha256: str = ""


def _standardise(data: TrainingSet) -> dict:
    return {
        "coordinate_mean": data.coordinates.mean(0).tolist(),
        "coordinate_std": data.coordinates.std(0).clamp_min(1e-3).tolist(),
        "accuracy_mean": data.accuracy.mean().item(),
        "accuracy_std": max(data.accuracy.std().item(), 1e-3),
        "accuracy_min": data.accuracy.min().item(),
        "accuracy_max": data.accuracy.max().item(),
    }


def train_generator(
    zoo: Zoo,
    out: Path,
    config: DiffusionConfig,
    measure: Measure,
    head: str = "linear",
    save_every: int = 500,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
    runtime: Runtime | None = None,
    sample_every: int = 0,
    sample_n: int = 16,
) -> Path:
    """Train (or continue training) and write `out/generator.safetensors`; returns its path.

    runtime: device, precision and processes (generative/runtime.py); None is one process on the CPU in fp32.
    Under torchrun every rank calls this; rank 0 writes the files and calls `log`. With `log`, every
    `sample_every` steps (0: never) `sample_n` models drawn from the EMA weights are measured by `measure`
    (validation accuracy) and logged as `sample/val_acc`; the draws use their own generators, so logging does
    not change the trained weights."""
    preparing_since = time.perf_counter()
    runtime = runtime or Runtime()
    out.mkdir(parents=True, exist_ok=True)
    basis = FamilyBasis(zoo, head)
    state_path = out / "train_state.safetensors"
    part = runtime.share(config.batch_size)
    torch.manual_seed(config.seed)
    model = CoordinateDenoiser(basis.num_slots, basis.num_families, config).to(runtime.device)
    ema = CoordinateDenoiser(basis.num_slots, basis.num_families, config).to(runtime.device)
    ema.load_state_dict(model.state_dict())
    trained = runtime.wrap(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    described = {"config": config.to_dict(), "basis": basis.describe(), **runtime.describe()}
    start = 0
    if state_path.exists():
        metadata, saved = load_training_state(state_path, model, ema, optimizer, described | runtime.expected())
        unmeasured = int(metadata.get("unmeasured", 0))  # states written before it was recorded: unknown, 0
        data = TrainingSet(saved["coordinates"], saved["family"], saved["accuracy"], saved["slot"], unmeasured)
        start = int(metadata["step"])
    else:
        data = training_set(basis, config, measure, progress, runtime)
    stats = _standardise(data) | {"copy_threshold": basis.min_pairwise_distance()}
    x0 = (data.coordinates - torch.tensor(stats["coordinate_mean"])) / torch.tensor(stats["coordinate_std"])
    accuracy = (data.accuracy - stats["accuracy_mean"]) / stats["accuracy_std"]
    train_scheduler, _ = schedulers(config)
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=start, desc="train diffusion", disable=not (progress and runtime.main))
    clock = StepClock(config.batch_size, preparing_since)
    for step in range(start, config.steps):
        # the whole batch drawn on the CPU from seed and step (the same on every rank); this rank computes `part`
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        batch = torch.randint(0, len(x0), (config.batch_size,), generator=generator)
        with runtime.autocast():
            loss = diffusion_loss(trained, train_scheduler, x0[batch], data.family[batch], accuracy[batch],
                                  data.slot[batch], config.condition_dropout, generator, part)  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema, model, config.ema)
        bar.update(1)
        clock.tick()
        last = step == config.steps - 1
        if step % 50 == 0 or last:
            logs = runtime.mean({"loss": loss.item()})  # a collective: every rank takes part, rank 0 logs
            if log is not None and runtime.main:
                log({"step": step, "train/loss": logs["loss"], "train/lr": optimizer.param_groups[0]["lr"],
                     "train/steps_per_second": clock.steps_per_second()})  # fmt: skip
        if log is not None and runtime.main and sample_every > 0 and ((step + 1) % sample_every == 0 or last):
            current = Generator(config, basis, copy.deepcopy(ema).cpu().eval(), stats)
            sampled = sample_accuracy(current, measure, sample_n, config.seed)
            if sampled is not None:
                log({"step": step, "sample/val_acc": sampled})
        if runtime.main and ((step + 1) % save_every == 0 or last):
            tensors = {"coordinates": data.coordinates, "family": data.family, "accuracy": data.accuracy,
                       "slot": data.slot}  # fmt: skip
            save_training_state(state_path, model, ema, optimizer,
                                {"step": step + 1, "unmeasured": data.unmeasured, **described}, tensors)  # fmt: skip
    bar.close()
    if runtime.main:
        metadata = {"format": FORMAT, "config": config.to_dict(), "basis": basis.describe(), "stats": stats,
                    "architecture": basis.architecture.to_dict(), "unmeasured": data.unmeasured,
                    **runtime.describe()}  # fmt: skip
        write_checkpoint(out / "generator.safetensors", ema.state_dict(), metadata)
        clock.write(out / "timing.json")
    runtime.barrier()  # no rank returns before the checkpoint is written
    return out / "generator.safetensors"


def sample_accuracy(generator: Generator, measure: Measure, n: int, seed: int) -> float | None:
    """Mean measured (validation) accuracy of n unconditioned draws, copies included: a training-time check that
    draws from its own seeded generators (never from the training streams). Draws that could not be evaluated are
    left out; None when none could."""
    samples, _, _ = sample(generator, n, seed=seed, novel_only=False)
    accuracies = [a for a in measure([state_dict for state_dict, _, _ in samples]) if a is not None]
    return sum(accuracies) / len(accuracies) if accuracies else None


def load_generator(path: str | Path, zoo: str | None = None) -> Generator:
    """A generator checkpoint and the basis it decodes into (rebuilt from its zoo and checked run by run);
    `"bundled"` is the generator shipped beside the bundled zoo."""
    path = BUNDLED_GENERATOR if str(path) == "bundled" else Path(path)
    weights, metadata, config = open_checkpoint(path, FORMAT, DiffusionConfig)
    recorded = require(metadata, "basis", dict, path)
    for key in ("zoo", "head"):
        require(recorded, key, str, path)
    stats = require(metadata, "stats", dict, path)
    check_stats(stats, len(require(recorded, "slots", list, path)), path)  # before the (slow) basis is rebuilt
    basis = FamilyBasis(Zoo.open(zoo or recorded["zoo"]), recorded["head"])
    if basis.describe() | {"zoo": recorded["zoo"]} != recorded:
        raise ZooError(
            f"{path} was trained on other runs than {zoo or recorded['zoo']} holds now (families, slots, or "
            "checkpoint sha256 differ); retrain it on this zoo"
        )
    model = CoordinateDenoiser(basis.num_slots, basis.num_families, config)
    load_weights(model, weights, path)
    model.eval()
    return Generator(config, basis, model, stats, hashlib.sha256(path.read_bytes()).hexdigest())


STATS = ("coordinate_mean", "coordinate_std", "accuracy_mean", "accuracy_std", "accuracy_min", "accuracy_max",
         "copy_threshold")  # fmt: skip


def check_stats(stats: dict, slots: int, path: Path) -> None:
    """A generator's standardisation statistics, as `train_generator` writes them, or a CheckpointError."""
    if sorted(stats) != sorted(STATS):
        raise CheckpointError(f"{path}: its stats must hold exactly {', '.join(STATS)}; found {', '.join(stats)}")
    for name in ("coordinate_mean", "coordinate_std"):
        values = stats[name]
        if not isinstance(values, list) or len(values) != slots:
            raise CheckpointError(f"{path}: stats.{name} must list {slots} numbers (one per slot), got {values!r}")
        for value in values:
            low = 0 if name == "coordinate_std" else None
            check_number(f"{path}: stats.{name}[]", value, float, low, None, True, error=CheckpointError)
    for name in ("accuracy_min", "accuracy_mean", "accuracy_max"):
        check_number(f"{path}: stats.{name}", stats[name], float, error=CheckpointError)
    if not stats["accuracy_min"] <= stats["accuracy_mean"] <= stats["accuracy_max"]:
        raise CheckpointError(f"{path}: stats must have accuracy_min <= accuracy_mean <= accuracy_max")
    check_number(f"{path}: stats.accuracy_std", stats["accuracy_std"], float, 0, None, True, error=CheckpointError)
    # 0 would silently turn the copy check off
    check_number(f"{path}: stats.copy_threshold", stats["copy_threshold"], float, 0, None, True, error=CheckpointError)


# ----------------------------------------------------------------------------------------------- sampling


def sample(
    generator: Generator,
    n: int,
    seed: int = 0,
    method: str = "mix",
    parent: str | None = None,
    target_acc: float | None = None,
    optimizer: str | None = None,
    lr: float | None = None,
    guidance: float = GUIDANCE,
    steps: int = 50,
    dirichlet: float = 1.0,
    novel_only: bool = True,
    max_rounds: int = 20,
    distance: float | None = None,
    head: str | None = None,
    measure: Measure | None = None,
    pool: int = 300,
) -> tuple[list[tuple[StateDict, dict, dict]], list[str | None], dict]:
    """n models as (state_dict, factors, head), their parents, and a summary of the draw.

    Conditions: `parent` and `head` (linear | mlp, for a generator trained with head=all) choose the families
    drawn from; `target_acc` (validation accuracy) and `optimizer`+`lr` (a slot) condition the denoiser.

    method: "mix" (Dirichlet mixtures of a family's runs, no learning: the default, because it measures better
    than the trained diffusion; README), "pick" (measure-and-pick for `target_acc`: `pool` mixtures measured on
    validation by `measure`, the n nearest the target kept), "diffusion" (the trained generator, which also
    takes optimizer/lr), or one of the evaluator's baselines over the generator's runs: "random" (timm's init),
    "gaussian" (a per-parameter normal fitted to the runs) and "noise" (a random run plus isotropic noise of L2
    norm `distance`). With `novel_only`, mixture and diffusion draws closer to one of the family's runs than the
    closest two runs of any family (`stats["copy_threshold"]`) are redrawn (counted apart: `redrawn_as_copies`;
    the evaluator measures copies on its own)."""
    basis, stats = generator.basis, generator.stats
    if n <= 0:
        raise ConditionError(f"n must be positive, got {n}")
    if method not in METHODS:
        raise ConditionError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method in BASELINES:
        if target_acc is not None or optimizer is not None or lr is not None or parent is not None:
            raise ConditionError(f"method={method} is a baseline: it takes no condition but head")
        return _baselines(generator, n, seed, method, distance, head)
    families = _families(basis, parent, head)
    if method == "diffusion" and not 1 <= steps <= generator.config.timesteps:
        raise ConditionError(f"steps must be in [1, {generator.config.timesteps}] (the trained timesteps), got {steps}")
    if target_acc is not None and not stats["accuracy_min"] <= target_acc <= stats["accuracy_max"]:
        raise ConditionError(
            f"target_acc={target_acc} is outside the validation accuracies it was trained on "
            f"[{stats['accuracy_min']:.3f}, {stats['accuracy_max']:.3f}]; it does not extrapolate"
        )
    slot = None
    if (optimizer is None) != (lr is None):
        raise ConditionError("condition on optimizer and lr together (a slot is the pair)")
    if optimizer is not None:
        wanted = (optimizer, float(lr))
        if wanted not in basis.slots:
            raise ConditionError(f"optimizer/lr {wanted} is not a trained condition; trained: {basis.slots}")
        slot = basis.slots.index(wanted)
    if method == "mix" and (target_acc is not None or slot is not None):
        raise ConditionError("method=mix draws unconditioned mixtures; condition with method=pick or diffusion")
    if method == "pick":
        if target_acc is None or slot is not None:
            raise ConditionError("method=pick conditions on target_acc only (optimizer/lr: method=diffusion)")
        if measure is None:
            raise ConditionError("method=pick measures candidates on validation: it needs a measure callback")
        if not n <= pool:
            raise ConditionError(f"method=pick keeps n of pool={pool} measured mixtures: n={n} is more")
        return _pick(generator, n, seed, parent, head, target_acc, dirichlet, novel_only, measure, pool)
    rng = torch.Generator().manual_seed(seed)
    numpy_rng = np.random.default_rng(seed)
    mean, std = torch.tensor(stats["coordinate_mean"]), torch.tensor(stats["coordinate_std"])
    kept: list[tuple[int, torch.Tensor]] = []
    redrawn = 0
    for _ in range(max_rounds):
        need = n - len(kept)
        if need == 0:
            break
        family = torch.as_tensor(families)[torch.randint(len(families), (need,), generator=rng)]
        if method == "mix":
            coordinates = torch.as_tensor(numpy_rng.dirichlet([dirichlet] * basis.num_slots, need))
        else:
            accuracy = None
            if target_acc is not None:
                accuracy = torch.full((need,), (target_acc - stats["accuracy_mean"]) / stats["accuracy_std"])
            slots = None if slot is None else torch.full((need,), slot)
            x = sample_coordinates(generator.model, schedulers(generator.config)[1], family, accuracy, slots,
                                   guidance, steps, rng)  # fmt: skip
            coordinates = x * std + mean
        for f, a in zip(family.tolist(), coordinates):
            nearest = basis.distances(f, a[None])[0].min().item()
            if novel_only and nearest < stats["copy_threshold"]:
                redrawn += 1
                continue
            kept.append((f, a.float()))
    if len(kept) < n:
        raise ConditionError(
            f"only {len(kept)} of {n} draws were novel after {max_rounds} rounds; try novel_only=false"
        )
    samples, parents = [], []
    for f, a in kept[:n]:
        parent_id, _, _, head_seed, _ = basis.families[f]
        factors = {
            "method": method,
            "space": "family",  # coordinates in a family's basis of runs
            "generator": generator.sha256,
            "family_seed": head_seed,
            "target_acc": target_acc,
            "optimizer": optimizer,
            "lr": lr,
            "guidance": guidance if method == "diffusion" else None,
            "coordinates": [round(v, 6) for v in a.tolist()],
            "sample_seed": seed,
        }
        samples.append((basis.decode(f, a), factors, basis.head_of(f)))
        parents.append(parent_id)
    return samples, parents, {"drawn": len(kept) + redrawn, "redrawn_as_copies": redrawn}


def _pick(
    generator: Generator,
    n: int,
    seed: int,
    parent: str | None,
    head: str | None,
    target_acc: float,
    dirichlet: float,
    novel_only: bool,
    measure: Measure,
    pool: int,
):
    """Measure-and-pick: `pool` Dirichlet mixtures (novel ones, with `novel_only`) measured on validation; the n
    whose accuracy lies nearest `target_acc` (ties: in draw order). No learning: the reference a conditioned
    generator must beat at the same number of validation evaluations."""
    candidates, parents, info = sample(generator, pool, seed, "mix", parent, dirichlet=dirichlet,
                                       novel_only=novel_only, head=head)  # fmt: skip
    measured = measure([state_dict for state_dict, _, _ in candidates])
    usable = [i for i, accuracy in enumerate(measured) if accuracy is not None]
    if len(usable) < n:
        raise ConditionError(f"only {len(usable)} of {pool} candidates could be measured; {n} were asked for")
    chosen = sorted(usable, key=lambda i: (abs(measured[i] - target_acc), i))[:n]
    samples = []
    for i in chosen:
        state_dict, factors, head_of = candidates[i]
        picked = factors | {"method": "pick", "target_acc": target_acc, "val_acc": measured[i], "pool": pool}
        samples.append((state_dict, picked, head_of))
    return samples, [parents[i] for i in chosen], info | {"measured": len(measured), "unmeasured": pool - len(usable)}


def _families(basis: FamilyBasis, parent: str | None, head: str | None) -> list[int]:
    """The families a draw may come from: those of `parent` and of head type `head` (None: any)."""
    families = list(range(basis.num_families))
    if parent is not None:
        families = [f for f in families if basis.families[f][0] == parent]
        if not families:
            known = sorted({key[0] for key in basis.families})
            raise ConditionError(f"parent {parent!r} is not one the generator was trained on: {known}")
    if head is not None:
        trained = sorted({basis.families[f][1] for f in families})
        families = [f for f in families if basis.families[f][1] == head]
        if not families:
            raise ConditionError(f"head={head} is not one the generator was trained on here: {trained}")
    return families


def _baselines(generator: Generator, n: int, seed: int, method: str, distance: float | None, head: str | None):
    """The evaluator's baselines (zoo_builder/baselines.py) over the generator's runs of one head type (the first
    family's, unless `head` says), as samples."""
    basis = generator.basis
    families = _families(basis, None, head or basis.families[0][1])
    head_spec = basis.head_of(families[0])
    rng = torch.Generator().manual_seed(seed)
    parents: list[str | None] = [None] * n
    if method == "random":
        state_dicts = random_init(basis.architecture, head_spec, n, seed)
    elif method == "gaussian":
        runs = [basis.decode(f, torch.eye(basis.num_slots)[k]) for f in families for k in range(basis.num_slots)]
        state_dicts = gaussian(runs, n, seed)
    else:
        if distance is None or distance <= 0:
            raise ConditionError("method=noise needs distance=<L2 norm of the noise> (e.g. your samples' distance "
                                 "to their nearest zoo model, which vitzoo evaluate reports)")  # fmt: skip
        picks = torch.randint(len(families) * basis.num_slots, (n,), generator=rng).tolist()
        chosen = [(families[i // basis.num_slots], i % basis.num_slots) for i in picks]  # (family, run)
        anchors = [basis.decode(f, torch.eye(basis.num_slots)[k]) for f, k in chosen]
        state_dicts = noise_around(anchors, [distance] * n, sorted(anchors[0]), seed)
        parents = [basis.families[f][0] for f, _ in chosen]
    factors = {"method": method, "generator": generator.sha256, "distance": distance, "sample_seed": seed}
    samples = [(state_dict, dict(factors), head_spec) for state_dict in state_dicts]
    return samples, parents, {"drawn": n, "redrawn_as_copies": 0}
