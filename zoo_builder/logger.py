"""Experiment logging: W&B (offline unless configured) or nothing.

A build logs one W&B run per model: its config is the model's factors, stage and parent, its group the zoo, its job
type the stage (pretrain | finetune), its curves are its metrics against `epoch`. W&B's run table, group-by,
parallel coordinates and per-factor panels then work on the zoo as they do on any sweep (one run per zoo with a
metric key per model gave ~1,500 panels and no factor to group by). Beside them one run of job type `build` holds the
resolved config, the seconds per epoch, the index as a table (factors as columns) and the zoo as an artifact.
A model's run is opened when its population starts training and closed when it ends; a resumed build opens a new
run per model that logs the whole history again. Reports (evaluate, analyze, demo, ...) log one run of their own.
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
        self.cfg, self.group, self.out = cfg, zoo_name, out
        self.run = self._init(job_type=job_type, config=config)
        self.model_runs = {}  # model_id -> its open W&B run (the models of the population training now)

    def _init(self, **settings):
        # "create_new": several runs open at once in one process (the build run and a population's models)
        return self.wandb.init(
            project=self.cfg.project, entity=self.cfg.entity, mode=self.cfg.mode, group=self.group,
            dir=str(self.out), reinit="create_new", **settings,
        )  # fmt: skip

    def log_epoch(self, runs, histories: dict[str, list[dict]], epoch: int, seconds: float) -> None:
        """Each model's new history rows into its own run (opened at its first epoch), the epoch time into the
        build's run."""
        for run in runs:
            model_run = self.model_runs.get(run.model_id)
            if model_run is None:
                model_run = self.model_runs[run.model_id] = self._init(
                    job_type=run.stage,
                    name=run.model_id,
                    config={"model_id": run.model_id, "stage": run.stage, "parent_id": run.parent_id,
                            **run.factors.to_dict()},
                )  # fmt: skip
                model_run.define_metric("epoch")
                model_run.define_metric("*", step_metric="epoch")
                new_rows = histories[run.model_id]  # from epoch 0 (the models' start), or all of a resumed run
            else:
                new_rows = [row for row in histories[run.model_id] if row["epoch"] == epoch]
            for row in new_rows:
                model_run.log({k: v for k, v in row.items() if v is not None})
        self.run.log({"build/epoch": epoch, "build/epoch_seconds": seconds, "build/models": len(runs)})

    def finish_models(self, records: dict[str, dict]) -> None:
        """Close the runs of a population that ended, with each model's final status in its summary."""
        for model_id, record in records.items():
            model_run = self.model_runs.pop(model_id, None)
            if model_run is not None:
                model_run.summary["status"] = record["status"]
                model_run.finish()

    def log_index(self, zoo_root: Path) -> None:
        """The zoo's index as one table: a row per checkpoint, each factor a column of plain values."""
        rows = [json.loads(line) for line in (Path(zoo_root) / "index.jsonl").read_text().splitlines()]
        self.run.log({"zoo/index": self._table([flat(row) for row in rows])} if rows else {})

    def log_report(self, tables: dict[str, list[dict]], images: dict[str, Path]) -> None:
        """An evaluation's tables (a nested mapping such as `factors` becomes one column per key, other nested
        values JSON text) and PNG plots."""
        logged = {name: self._table([flat(row) for row in rows]) for name, rows in tables.items() if rows}
        logged.update({name: self.wandb.Image(str(path)) for name, path in images.items() if Path(path).exists()})
        self.run.log(logged)

    def _table(self, rows: list[dict]):
        columns = list(dict.fromkeys(k for row in rows for k in row))
        table = self.wandb.Table(columns=columns)
        for row in rows:
            table.add_data(*[_plain(row.get(c)) for c in columns])
        return table

    def log_artifact(self, path: Path, kind: str) -> None:
        """A zoo, generator checkpoint or sampled population as a W&B reference artifact: the run records where it
        lies and each file's checksum, nothing is uploaded (`kind`: zoo | generator | samples)."""
        path = Path(path).resolve()
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{kind}-{path.stem if path.is_file() else path.name}")
        artifact = self.wandb.Artifact(name, type=kind)
        artifact.add_reference(path.as_uri(), max_objects=100_000)
        self.run.log_artifact(artifact)

    def finish(self) -> None:
        for model_run in self.model_runs.values():  # a build that stopped inside a population
            model_run.finish()
        self.model_runs.clear()
        self.run.finish()


def flat(row: dict) -> dict:
    """A table row with each nested mapping spread into `<name>.<key>` columns (factors become columns)."""
    spread = {}
    for key, value in row.items():
        if isinstance(value, dict):
            spread.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            spread[key] = value
    return spread


def _plain(value):
    return value if value is None or isinstance(value, (int, float, str, bool)) else json.dumps(value)


def make_logger(cfg: LoggerConfig, config: dict, zoo_name: str, out: Path, job_type: str = "build"):
    if cfg.kind == "none":
        return None
    if cfg.kind == "wandb":
        return WandbLogger(cfg, config, zoo_name, out, job_type)
    raise ConfigError(f"unknown logger {cfg.kind!r}; expected none or wandb")
