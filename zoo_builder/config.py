"""Typed schemas of the `vitzoo build` config (Hydra validates presets and overrides against them:
an unknown key or a value of the wrong type fails before anything runs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from vitzoo.zoo_builder.blueprint import Blueprint
from vitzoo.zoo_builder.logger import LoggerConfig
from vitzoo.zoo_builder.plan import Accelerator


@dataclass
class SavePolicyConfig:
    keep_last: Optional[int] = None  # the last k epochs keep their weights; null keeps every epoch
    keep_init: bool = False  # also keep epoch 0
    extra_seeds: List[int] = field(default_factory=list)  # models with these seeds keep extra_keep_last epochs
    extra_keep_last: Optional[int] = None


@dataclass
class SaveConfig:
    pretrain: SavePolicyConfig = field(default_factory=lambda: SavePolicyConfig(keep_init=True))
    finetune: SavePolicyConfig = field(default_factory=SavePolicyConfig)


@dataclass
class BuildConfig:
    zoo: Blueprint = field(default_factory=Blueprint)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    out: str = "zoos/zoo"
    overwrite: bool = False  # replace the zoo in out (else a rerun resumes it)
    shard: str = "0/1"
    device: str = "auto"
    precision: str = "fp32"
    mode: str = "vmap"
    population_size: int = 64
    threads: Optional[int] = None
    data_root: Optional[str] = None
    progress: bool = True
    save: SaveConfig = field(default_factory=SaveConfig)
    plan: bool = False  # print what the build would cost (zoo_builder/plan.py) and train nothing
    accelerator: Accelerator = field(default_factory=Accelerator)


@dataclass
class FinetuneConfig:
    epochs: int = 0
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 32


@dataclass
class EvaluateConfig:
    path: str = "???"  # the zoo
    dataset: Optional[str] = None
    split: str = "test"
    stage: Optional[str] = None
    epoch: str = "last"
    reference: Optional[str] = None  # the zoo the samples came from: adds novelty and baselines
    reference_stage: Optional[str] = "finetune"
    reference_head: Optional[str] = None  # only reference models with this head (linear | mlp)
    align: bool = True
    baselines: bool = True
    seed: int = 0
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    finetune_epochs: Optional[int] = None  # shorthand for finetune.epochs
    out: str = "runs/evaluate"
    overwrite: bool = False  # replace an earlier report in out (else a non-empty out is refused)
    mode: str = "auto"
    chunk_size: int = 64
    device: str = "auto"
    threads: Optional[int] = None
    data_root: Optional[str] = None
    progress: bool = True
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class AnalyzeConfig:
    path: str = "???"  # the zoo
    dataset: Optional[str] = None  # None: each entry's own dataset
    split: str = "test"
    stage: Optional[str] = None
    epoch: str = "last"
    max_models: Optional[int] = None
    cka_batch: int = 256
    out: str = "runs/analyze"
    overwrite: bool = False
    threads: Optional[int] = None
    data_root: Optional[str] = None
    progress: bool = True
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class SoupConfig:
    path: str = "???"  # the zoo
    dataset: Optional[str] = None
    k: List[int] = field(default_factory=lambda: [2, 3])
    parent: Optional[str] = None
    out: str = "runs/soup"
    overwrite: bool = False
    device: str = "auto"
    data_root: Optional[str] = None
    threads: Optional[int] = None
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class TrainConfig:
    path: str = "???"  # the zoo
    model: Any = None  # configs/model/<name>.yaml: {name: diffusion, ...its config fields}
    head: str = "linear"  # which fine-tunes: linear | mlp | all (both head types; the autoencoder: their bodies)
    holdout_parents: List[str] = field(default_factory=list)  # model=transfer: parents none of whose fine-tunes train
    out: str = "runs/generator"
    overwrite: bool = False  # train afresh into out (else a rerun resumes it)
    save_every: int = 500
    device: str = "auto"  # auto | cpu | cuda (under torchrun each rank takes the GPU of its LOCAL_RANK)
    precision: str = "fp32"  # fp32 | bf16 (autocast for forward and loss; weights, optimizer and EMA stay fp32)
    sample_every: int = 500  # diffusion, logger on: steps between sample/val_acc measurements (0: never)
    sample_n: int = 16  # models drawn for each of them
    threads: Optional[int] = None
    data_root: Optional[str] = None
    progress: bool = True
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class SampleConfig:
    path: str = "???"  # the generator checkpoint; "bundled" = the one shipped beside the bundled zoo
    n: int = 100
    # null: the checkpoint's own (generator: mix; autoencoder: kde; latent diffusion: latent_diffusion);
    # generators also take pick | diffusion | random | gaussian | noise
    method: Optional[str] = None
    pool: int = 300  # pick: mixtures measured on validation per call
    data_root: Optional[str] = None  # pick: where the zoo's dataset lives, when not installed
    bandwidth: float = 0.2  # kde: noise in units of the anchors' latent std
    top: float = 1.0  # kde: anchors are this fraction of models, best by validation accuracy
    out: str = "runs/samples"
    overwrite: bool = False
    seed: int = 0
    parent: Optional[str] = None
    target_acc: Optional[float] = None
    optimizer: Optional[str] = None
    lr: Optional[float] = None
    guidance: Optional[float] = None  # null: the sampler's own (family diffusion 2.0, latent diffusion 1.0)
    steps: int = 50
    novel_only: bool = True
    distance: Optional[float] = None  # method=noise: the noise's L2 norm
    head: Optional[str] = None  # linear | mlp: only families of this head type (a generator trained with head=all)
    zoo: Optional[str] = None  # where the generator's zoo is, when it moved
    head_seed: Optional[int] = None  # transfer: the seed of the new parent's fresh head (null: 0)
    temperature: Optional[float] = None  # transfer: logits' spread; latent diffusion: initial noise scale (null: own)
    epoch: Optional[int] = None  # latent diffusion: the checkpoint epoch asked for (null: the last trained on)
    threads: Optional[int] = None


@dataclass
class GeneralisationConfig:
    path: str = "???"  # the zoo
    model: Any = None  # configs/model/transfer.yaml
    head: str = "linear"
    n: int = 1  # samples per (head seed, slot) cell of each held-out parent
    sizes: List[int] = field(default_factory=lambda: [1, 3, 5])  # learning curve: training parents
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(epochs=3))
    seed: int = 0
    resamples: int = 2000
    out: str = "runs/generalisation"
    overwrite: bool = False
    device: str = "auto"
    data_root: Optional[str] = None
    threads: Optional[int] = None
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class DemoConfig:
    path: str = "bundled"  # the zoo
    out: str = "runs/demo"
    overwrite: bool = False  # run afresh into out (else a rerun resumes it)
    retrain: bool = False  # train the generator afresh instead of using the shipped one
    generator: Dict[str, Any] = field(default_factory=dict)  # DiffusionConfig fields that differ, for retrain
    n: int = 120  # unconditioned samples per method (Dirichlet mixing, diffusion)
    # conditioned samples: target val accuracies; null: 20/40/60/80% of the way across the trained range
    targets: Optional[List[float]] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.9])
    per_target: int = 10  # per target and method (measure-and-pick, diffusion)
    pool: int = 300  # measure-and-pick: mixtures measured on validation per target
    kde: bool = True  # also SANE's latent KDE from the autoencoder shipped beside the bundled zoo
    latent: bool = True  # also the latent diffusion shipped beside the bundled zoo (unconditioned and per target)
    finetune_epochs: int = 1
    align: bool = True  # novelty after aligning heads and MLP units (one assignment problem per block and pair)
    token_width: int = 25  # the tokenize stage's token width (25: the bundled ViT's rows plus bias)
    seed: int = 0
    device: str = "auto"
    data_root: Optional[str] = None
    threads: Optional[int] = None
    progress: bool = False
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def register_schemas() -> None:
    store = ConfigStore.instance()
    store.store(name="soup_schema", node=SoupConfig)
    store.store(name="build_schema", node=BuildConfig)
    store.store(name="evaluate_schema", node=EvaluateConfig)
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="sample_schema", node=SampleConfig)
    store.store(name="demo_schema", node=DemoConfig)
    store.store(name="analyze_schema", node=AnalyzeConfig)
    store.store(name="generalisation_schema", node=GeneralisationConfig)
