"""Experiment logging: W&B (offline unless configured) or nothing.

Metrics are namespaced per model (`models/<model_id>/val_acc`) against a shared `epoch` axis, grouped
by zoo; the index is logged as a table at the end. Only the resolved config is passed to `wandb.init`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from vitzoo.errors import ConfigError


@dataclass
class LoggerConfig:
    kind: str = "none"  # none | wandb
    project: str = "vitzoo"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled


class WandbLogger:
    def __init__(self, cfg: LoggerConfig, config: dict, zoo_name: str, out: Path, job_type: str = "build"):
        try:
            import wandb
        except ImportError:
            raise ConfigError("logger=wandb needs the wandb package: pip install -e '.[wandb]'") from None

        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            mode=cfg.mode,
            group=zoo_name,
            job_type=job_type,
            config=config,
            dir=str(out),
        )
        self.run.define_metric("epoch")
        self.run.define_metric("models/*", step_metric="epoch")

    def log_epoch(self, runs, histories: dict[str, list[dict]], epoch: int, seconds: float) -> None:
        row = {"epoch": epoch, "build/epoch_seconds": seconds}
        for run in runs:
            last = histories[run.model_id][-1]
            if last["epoch"] != epoch:
                continue
            for key, value in last.items():
                if key != "epoch" and value is not None:
                    row[f"models/{run.model_id}/{key}"] = value
        self.run.log(row)

    def log_index(self, zoo_root: Path) -> None:
        rows = [json.loads(line) for line in (Path(zoo_root) / "index.jsonl").read_text().splitlines()]
        if not rows:
            return
        columns = sorted({k for row in rows for k in row if k != "factors"})
        factor_names = sorted(rows[0]["factors"])
        table = self.wandb.Table(columns=columns + factor_names)
        for row in rows:
            table.add_data(*[row.get(c) for c in columns], *[json.dumps(row["factors"][f]) for f in factor_names])
        self.run.log({"zoo/index": table})

    def log_report(self, tables: dict[str, list[dict]], images: dict[str, Path]) -> None:
        """An evaluation's tables (rows of plain values; nested values as JSON text) and PNG plots."""
        logged = {}
        for name, rows in tables.items():
            if not rows:
                continue
            columns = list(dict.fromkeys(k for row in rows for k in row))
            table = self.wandb.Table(columns=columns)
            for row in rows:
                table.add_data(*[_plain(row.get(c)) for c in columns])
            logged[name] = table
        logged.update({name: self.wandb.Image(str(path)) for name, path in images.items() if Path(path).exists()})
        self.run.log(logged)

    def log_artifact(self, path: Path, kind: str) -> None:
        """A zoo, generator checkpoint or sampled population as a W&B reference artifact: the run records where it
        lies and each file's checksum, nothing is uploaded (`kind`: zoo | generator | samples)."""
        path = Path(path).resolve()
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{kind}-{path.stem if path.is_file() else path.name}")
        artifact = self.wandb.Artifact(name, type=kind)
        artifact.add_reference(path.as_uri(), max_objects=100_000)
        self.run.log_artifact(artifact)

    def finish(self) -> None:
        self.run.finish()


def _plain(value):
    return value if value is None or isinstance(value, (int, float, str, bool)) else json.dumps(value)


def make_logger(cfg: LoggerConfig, config: dict, zoo_name: str, out: Path, job_type: str = "build"):
    if cfg.kind == "none":
        return None
    if cfg.kind == "wandb":
        return WandbLogger(cfg, config, zoo_name, out, job_type)
    raise ConfigError(f"unknown logger {cfg.kind!r}; expected none or wandb")
