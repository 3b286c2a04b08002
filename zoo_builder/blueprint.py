"""Blueprints: the grid of generating factors that defines a zoo, and its expansion into runs.

A blueprint has a `pretrain` stage (models trained from scratch) and an optional `finetune` stage
(every grid point applied to every finished pre-trained parent, with a fresh head). Each stage has
base `factors` and a `grid`: a list of sub-grids, each a mapping factor -> list of values whose
cartesian product is taken; the union over sub-grids gives the stage's runs (e.g. 7 supervised seeds
plus 3 contrastive seeds). Every factor is a typed config value, so any of them can also be swept
with Hydra's `--multirun`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, List, Optional  # OmegaConf's typed configs need typing's generics

from vitzoo.errors import ConfigError
from vitzoo.zoo_builder.data import info as dataset_info
from vitzoo.zoo_builder.models import HEADS, INIT_SCHEMES, Architecture

OBJECTIVES = ("supervised", "contrastive")
LOSSES = ("cross_entropy", "soft_target")  # soft_target: timm's SoftTargetCrossEntropy on (mixed) smoothed targets
OPTIMIZERS = ("adamw", "sgd")
STAGES = ("pretrain", "finetune")


@dataclass
class Factors:
    """The generating factors of one model. Every field can be set in a blueprint or swept."""

    seed: int = 0
    objective: str = "supervised"  # supervised | contrastive (SimCLR-style, two views, InfoNCE)
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9)
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 5
    head: str = "linear"  # linear | mlp (dim-hidden-ReLU-classes)
    head_hidden: int = 32
    augment: float = 0.0  # augmentation strength in [0, 1]: random resized crop, shift, flip where valid
    dropout: float = 0.0
    drop_path: float = 0.0
    label_smoothing: float = 0.0
    init: str = (
        "timm"  # timm | torch | kaiming_normal | xavier_uniform (whole model from scratch; the head when fine-tuning)
    )
    temperature: float = 0.1  # InfoNCE temperature (contrastive only)
    projection_dim: int = 32  # contrastive head's output size
    dataset: str = "digits"
    classes: Optional[List[int]] = None  # class subset; None = all classes
    train_subset: Optional[int] = None  # only the first n images of the (fixed) train split
    # Added later (see LATER_FACTORS): the paper's training settings. Each default leaves training as it was.
    hflip: Optional[float] = None  # horizontal flip probability; None = augment / 2
    rotation: float = 0.0  # random rotation of up to this many degrees
    loss: str = "cross_entropy"  # cross_entropy | soft_target (supervised only; needed by mixup and cutmix)
    mixup: float = 0.0  # timm Mixup alpha (0 = off)
    cutmix: float = 0.0  # timm CutMix alpha (0 = off); with mixup on too, each batch takes one of them at p 0.5
    random_erasing: float = 0.0  # timm RandomErasing probability per image (per-pixel noise)
    jitter_brightness: float = 0.0  # SimCLR colour jitter (torchvision ColorJitter) strengths ...
    jitter_contrast: float = 0.0
    jitter_saturation: float = 0.0
    jitter_hue: float = 0.0
    jitter_prob: float = 0.0  # ... applied to an image with this probability (0 = off)
    grayscale_prob: float = 0.0  # torchvision RandomGrayscale probability
    blur_kernel: int = 0  # torchvision GaussianBlur kernel size (odd; sigma in [0.1, 2]); 0 = off

    def validate(self) -> None:
        checks = [
            (self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}"),
            (self.head in HEADS, f"head must be one of {HEADS}"),
            (self.init in INIT_SCHEMES, f"init must be one of {INIT_SCHEMES}"),
            (self.lr > 0, "lr must be positive"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.batch_size > 0, "batch_size must be positive"),
            (self.epochs > 0, "epochs must be positive"),
            (0 <= self.augment <= 1, "augment must be in [0, 1]"),
            (0 <= self.dropout < 1 and 0 <= self.drop_path < 1, "dropout and drop_path must be in [0, 1)"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.temperature > 0, "temperature must be positive"),
            (self.hflip is None or 0 <= self.hflip <= 1, "hflip must be None or in [0, 1]"),
            (not self.hflip or dataset_info(self.dataset).hflip, f"flips do not preserve {self.dataset}'s labels"),
            (0 <= self.rotation <= 180, "rotation must be in [0, 180] degrees"),
            (self.loss in LOSSES, f"loss must be one of {LOSSES}"),
            (self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix must be >= 0"),
            (0 <= self.random_erasing <= 1, "random_erasing must be in [0, 1]"),
            (not (self.mixup or self.cutmix) or self.loss == "soft_target", "mixup and cutmix need loss=soft_target"),
            (not (self.mixup or self.cutmix) or self.batch_size % 2 == 0, "mixup and cutmix need an even batch_size"),
            (
                self.objective == "supervised"
                or (self.loss, self.mixup, self.cutmix, self.random_erasing) == ("cross_entropy", 0, 0, 0),
                "loss, mixup, cutmix and random_erasing are supervised settings",
            ),
            (
                min(self.jitter_brightness, self.jitter_contrast, self.jitter_saturation) >= 0
                and 0 <= self.jitter_hue <= 0.5,
                "jitter strengths must be >= 0 (hue <= 0.5)",
            ),
            (0 <= self.jitter_prob <= 1 and 0 <= self.grayscale_prob <= 1, "probabilities must be in [0, 1]"),
            (self.blur_kernel == 0 or (self.blur_kernel > 0 and self.blur_kernel % 2), "blur_kernel must be 0 or odd"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"bad factors: {message} (got {self.to_dict()})")
        dataset_info(self.dataset)

    @property
    def num_outputs(self) -> int:
        if self.objective == "contrastive":
            return self.projection_dim
        return len(self.classes) if self.classes else dataset_info(self.dataset).num_classes

    def to_dict(self) -> dict:
        """All factors, except later ones at their defaults: the ids and records of older zoos stay as they were."""
        return {
            name: value
            for name, value in asdict(self).items()
            if name not in LATER_FACTORS or value != LATER_FACTORS[name]
        }


FACTOR_NAMES = tuple(f.name for f in fields(Factors))
# Factors added after zoos had been built (the bundled one among them), with their defaults. `to_dict` (hence
# `model_id`, run records and zoo.json's blueprints) leaves them out at their defaults, so adding them changed no id.
LATER_FACTOR_NAMES = """hflip rotation loss mixup cutmix random_erasing jitter_brightness jitter_contrast
    jitter_saturation jitter_hue jitter_prob grayscale_prob blur_kernel""".split()
LATER_FACTORS = {f.name: f.default for f in fields(Factors) if f.name in LATER_FACTOR_NAMES}


@dataclass
class StageConfig:
    """One stage: base factors, then a list of sub-grids ({factor: [values]}) whose union gives the runs."""

    factors: Factors = field(default_factory=Factors)
    grid: List[Any] = field(default_factory=list)


@dataclass
class ArchitectureConfig:
    model_name: str = "vit_small_patch16_224"
    kwargs: Any = field(default_factory=dict)


@dataclass
class Blueprint:
    """The typed schema of a `zoo/` preset (Hydra validates presets and overrides against it)."""

    name: str = "custom"
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    pretrain: StageConfig = field(default_factory=StageConfig)
    finetune: Optional[StageConfig] = None

    @property
    def model_architecture(self) -> Architecture:
        return Architecture(self.architecture.model_name, dict(self.architecture.kwargs))

    @property
    def final_dataset(self) -> str:
        return (self.finetune or self.pretrain).factors.dataset

    def datasets(self) -> list[str]:
        return sorted({f.dataset for stage in (self.pretrain, self.finetune) if stage for f in expand_stage(stage)})

    def to_dict(self) -> dict:
        data = asdict(self)
        for name in STAGES:  # later factors at their defaults left out, as in Factors.to_dict
            stage = getattr(self, name)
            if stage is not None and isinstance(stage.factors, Factors):
                data[name]["factors"] = stage.factors.to_dict()
        return data


def blueprint_from_config(cfg) -> Blueprint:
    """A validated blueprint from a resolved `zoo` config (a DictConfig or a plain dict)."""
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(Blueprint)
    merged = OmegaConf.merge(schema, OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg)
    blueprint = OmegaConf.to_object(merged)
    for stage in (blueprint.pretrain, blueprint.finetune):
        if stage is not None:
            expand_stage(stage)  # validates every grid point now, before any training
    return blueprint


@dataclass
class Run:
    """One model's training trajectory: from scratch (`parent_id=None`) or from a parent's final checkpoint."""

    model_id: str
    stage: str
    factors: Factors
    parent_id: str | None = None

    def family(self) -> str:
        """The root of this run's lineage: the unit of sharding (a parent and its fine-tunes stay together)."""
        return self.parent_id or self.model_id


def expand_stage(stage: StageConfig) -> list[Factors]:
    """All factor combinations of one stage: the stage's factors, overridden by each grid point."""
    start = stage.factors if isinstance(stage.factors, Factors) else factors_from_dict(stage.factors)
    combos: list[Factors] = []
    for sub_grid in stage.grid or [{}]:
        _check_factor_names(sub_grid, "grid")
        names = list(sub_grid)
        values = [v if isinstance(v, (list, tuple)) else [v] for v in sub_grid.values()]
        for point in itertools.product(*values):
            factors = replace(start, **{n: _plain(v) for n, v in zip(names, point)})
            factors.validate()
            if factors not in combos:
                combos.append(factors)
    return combos


def _check_factor_names(mapping: dict, where: str) -> None:
    unknown = set(mapping) - set(FACTOR_NAMES)
    if unknown:
        raise ConfigError(f"unknown factor(s) {sorted(unknown)} in {where}; known factors: {', '.join(FACTOR_NAMES)}")


def model_id(stage: str, factors: Factors, parent_id: str | None) -> str:
    """A stable id: the same factors and parent always give the same id (so resumed and sharded builds agree)."""
    payload = json.dumps({"stage": stage, "factors": factors.to_dict(), "parent": parent_id}, sort_keys=True)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:10]
    return f"{'pt' if stage == 'pretrain' else 'ft'}-{digest}"


def expand(blueprint: Blueprint) -> list[Run]:
    """Every run of a blueprint, parents before their fine-tunes."""
    runs = [Run(model_id("pretrain", f, None), "pretrain", f) for f in expand_stage(blueprint.pretrain)]
    if blueprint.finetune is not None:
        finetune_factors = expand_stage(blueprint.finetune)
        for parent in list(runs):
            for f in finetune_factors:
                runs.append(Run(model_id("finetune", f, parent.model_id), "finetune", f, parent.model_id))
    return runs


def select_shard(runs: list[Run], index: int, count: int) -> list[Run]:
    """The runs of shard `index` of `count`: whole families, dealt round-robin in blueprint order."""
    if not 0 <= index < count:
        raise ConfigError(f"shard {index}/{count}: index must be in 0..{count - 1}")
    families = list(dict.fromkeys(run.family() for run in runs))
    mine = set(families[index::count])
    return [run for run in runs if run.family() in mine]


def parse_shard(text: str | None) -> tuple[int, int]:
    if text in (None, "", "0/1"):
        return 0, 1
    try:
        index, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ConfigError(f"shard must look like 'i/n' (e.g. 0/2), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"shard {text}: need 0 <= i < n")
    return index, count


def factors_from_dict(data: dict[str, Any]) -> Factors:
    _check_factor_names(data, "factors")
    return Factors(**data)


def _plain(value):
    """OmegaConf containers in grid values (e.g. a class subset) as plain python lists."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
