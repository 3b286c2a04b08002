"""Typed schemas of the `vitzoo build` config (Hydra validates presets and overrides against them:
an unknown key or a value of the wrong type fails before anything runs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from zoo_builder.blueprint import Blueprint
from zoo_builder.logger import LoggerConfig


@dataclass
class SavePolicyConfig:
    keep_last: Optional[int] = None
    keep_init: bool = False


@dataclass
class SaveConfig:
    pretrain: SavePolicyConfig = field(default_factory=lambda: SavePolicyConfig(keep_init=True))
    finetune: SavePolicyConfig = field(default_factory=SavePolicyConfig)


@dataclass
class BuildConfig:
    zoo: Blueprint = field(default_factory=Blueprint)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    out: str = "zoos/zoo"
    shard: str = "0/1"
    device: str = "auto"
    precision: str = "fp32"
    mode: str = "vmap"
    population_size: int = 64
    threads: Optional[int] = None
    data_root: Optional[str] = None
    progress: bool = True
    save: SaveConfig = field(default_factory=SaveConfig)


def register_schemas() -> None:
    ConfigStore.instance().store(name="build_schema", node=BuildConfig)
