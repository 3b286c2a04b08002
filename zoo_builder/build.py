"""Building a zoo: expand a blueprint into runs, group them into populations, train, write checkpoints.

`build(cfg)` is a plain function (the CLI's `vitzoo build` calls it; tests call it directly). It is
resumable and shardable:
- a finished run (record status `done`, `diverged` or `skipped`) is never trained again;
- after every epoch a population writes its full training state (`_state/<population>.safetensors`:
  weights, optimizer state, metrics) *before* its checkpoints and records, so a build killed at any
  point continues from the last finished epoch and re-creates whatever that epoch had not yet written;
- `shard=i/n` trains whole families (a parent and its fine-tunes) of every n-th lineage, so several
  builders can fill one zoo without touching each other's runs; a build started as one of w processes
  (torchrun, or w SLURM tasks: `srun`, Hydra's submitit launcher) builds its own w-th of that shard
  (`launch.process_shard`) on the GPU of its local rank, so the tasks of one job fill one zoo together;
- a resumed run continues the same training or is refused: every unfinished record names the training it
  belongs to (its population, and the shard, population size, mode and precision that made it), and a
  build that would train it in another population or another way stops with the reason instead of mixing
  two trainings in one record.
Parents are read through the zoo's checked reader (`read_checkpoint`: sha256, size, path inside the zoo).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save

from vitzoo.zoo_builder.blueprint import Blueprint, Run, blueprint_from_config, expand, parse_shard, select_shard
from vitzoo.zoo_builder.launch import launched_process, process_device, process_shard
from vitzoo.zoo_builder.models import (
    Architecture,
    build_vit,
    init_linear_layers,
    initialize_weights,
    new_head,
    select_device,
)
from vitzoo.zoo_builder.population import PopulationTrainer, stack_key
from vitzoo.zoo_builder.zoo import (
    FINISHED,
    ZooError,
    ZooWriter,
    atomic_write_bytes,
    code_version,
    finite_or_none,
    library_versions,
    locked,
    read_bounded,
    read_checkpoint,
    sha256_bytes,
)

# the parts of a run's training that must not change when it is resumed (the rest of `training_of` is shown
# in the refusal so the user can rerun with the same arguments)
SAME_TRAINING = ("population", "mode", "precision")


@dataclass
class SavePolicy:
    """Which epochs keep their weights on disk (metrics are recorded for every epoch regardless)."""

    keep_last: int | None = None  # the last k epochs; None keeps every epoch
    keep_init: bool = False  # also keep epoch 0 (the initialisation, or parent + fresh head)
    extra_seeds: tuple[int, ...] = ()  # models with one of these seeds keep `extra_keep_last` epochs instead
    extra_keep_last: int | None = None

    def keeps(self, epoch: int, epochs: int, seed: int) -> bool:
        if epoch == 0:
            return self.keep_init
        keep_last = self.extra_keep_last if seed in self.extra_seeds else self.keep_last
        return keep_last is None or epoch > epochs - keep_last


@dataclass
class BuildSettings:
    out: Path
    shard: str = "0/1"
    device: str = "auto"
    precision: str = "fp32"
    mode: str = "vmap"
    population_size: int = 64
    data_root: str | None = None
    save_pretrain: SavePolicy | None = None  # None: SavePolicy() (every epoch)
    save_finetune: SavePolicy | None = None
    progress: bool = True


def build(blueprint_cfg, settings: BuildSettings, logger=None) -> Path:
    """Train every run of the blueprint (this shard's part) into the zoo at `settings.out`."""
    blueprint: Blueprint = blueprint_from_config(blueprint_cfg)
    process = launched_process()  # one of several processes started together takes its own part of the shard
    settings = replace(settings, shard=process_shard(settings.shard, process),
                       device=process_device(settings.device, process))  # fmt: skip
    index, count = parse_shard(settings.shard)
    runs = select_shard(expand(blueprint), index, count)
    device = select_device(settings.device)
    writer = ZooWriter.create_or_open(
        settings.out, blueprint.model_architecture, blueprint.final_dataset, blueprint.datasets(), blueprint.to_dict()
    )
    policies = {
        "pretrain": settings.save_pretrain or SavePolicy(),
        "finetune": settings.save_finetune or SavePolicy(),
    }
    for stage in ("pretrain", "finetune"):
        stage_runs = [run for run in runs if run.stage == stage]
        populations = group_populations(stage_runs, settings.population_size)
        for number, population in enumerate(populations, 1):
            label = f"{stage} {number}/{len(populations)}"
            train_population(
                writer, blueprint.model_architecture, population, policies[stage], device, settings, label, logger
            )
    writer.write_index()
    if logger is not None:
        logger.log_index(settings.out)
    return Path(settings.out)


def group_populations(runs: list[Run], population_size: int) -> list[list[Run]]:
    """Runs that can be stacked (same `stack_key`), in chunks of at most `population_size`, in blueprint order."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(stack_key(run.factors), []).append(run)
    return [group[i : i + population_size] for group in groups.values() for i in range(0, len(group), population_size)]


def population_id(runs: list[Run]) -> str:
    return sha256_bytes(json.dumps(sorted(r.model_id for r in runs)).encode())[:16]


def training_of(runs: list[Run], settings: BuildSettings) -> dict:
    """What makes one training of a population: the same runs trained together the same way give the same
    weights bit for bit (a population of other runs sums floats in another order)."""
    return {
        "population": population_id(runs),
        "shard": settings.shard,
        "population_size": settings.population_size,
        "mode": settings.mode,
        "precision": settings.precision,
    }


def check_same_training(records: dict[str, dict], training: dict, state_path: Path) -> None:
    """Refuses to continue a run that an interrupted build trained in another population or another way."""
    for model_id, record in records.items():
        if record["status"] in FINISHED:
            continue
        before = record.get("training")
        if before is not None and all(before.get(k) == training[k] for k in SAME_TRAINING):
            continue
        if before is None:
            was = "an older vitzoo that did not record its training"
        else:
            was = ", ".join(f"{k}={before.get(k)}" for k in ("shard", "population_size", "mode", "precision"))
            was += f" (population {before.get('population')})"
        now = ", ".join(f"{k}={training[k]}" for k in ("shard", "population_size", "mode", "precision"))
        raise ZooError(
            f"run {model_id} was being trained by an interrupted build with {was}; this build would train it "
            f"with {now} (population {training['population']}), which gives other weights than its checkpoints. "
            f"Resume with the same arguments, or remove runs/{model_id}.json, checkpoints/{model_id}/ and "
            f"{state_path.parent}/{before.get('population') if before else '<population>'}.safetensors to "
            "train it again from the start"
        )


def new_record(run: Run, training: dict) -> dict:
    return {
        "model_id": run.model_id,
        "stage": run.stage,
        "parent_id": run.parent_id,
        "factors": run.factors.to_dict(),
        "head": {
            "head": run.factors.head,
            "head_hidden": run.factors.head_hidden,
            "num_classes": run.factors.num_outputs,
        },
        "status": "training",
        "training": training,
        "history": [],
        "checkpoints": [],
        "code_version": code_version(),
        "versions": library_versions(),
    }


def initial_state(run: Run, architecture: Architecture, parent_state: dict[str, torch.Tensor] | None):
    """The starting weights of a run: a seeded from-scratch init, or the parent's body with a fresh seeded head."""
    f = run.factors
    torch.manual_seed(f.seed)
    model = build_vit(architecture, f.num_outputs, f.head, f.head_hidden)
    if parent_state is None:
        initialize_weights(model, f.init)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    body = {k: v for k, v in parent_state.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(body, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise RuntimeError(
            f"parent {run.parent_id} does not fit the architecture: missing {missing}, extra {unexpected}"
        )
    torch.manual_seed(f.seed)
    model.head = new_head(model, f.num_outputs, f.head, f.head_hidden)
    init_linear_layers(model.head, f.init)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_population(
    writer: ZooWriter,
    architecture: Architecture,
    runs: list[Run],
    policy: SavePolicy,
    device: torch.device,
    settings: BuildSettings,
    label: str,
    logger=None,
) -> None:
    root = writer.root
    training = training_of(runs, settings)
    state_path = root / "_state" / f"{training['population']}.safetensors"
    with locked(root / "_state" / f"{training['population']}.lock"):
        records = {run.model_id: writer.read_record(run.model_id) or new_record(run, training) for run in runs}
        if all(r["status"] in FINISHED for r in records.values()) and not state_path.exists():
            return
        check_same_training(records, training, state_path)
        saved, meta = _read_state(root, state_path) if state_path.exists() else (None, None)
        # a resumed population keeps the members it started with (a diverged one stays in it, frozen)
        members = _members_with_parents(writer, runs, records, keep=set(meta["model_ids"]) if meta else set())
        if not members:
            return
        runs = [run for run, _ in members]
        epochs = runs[0].factors.epochs
        init_states = [initial_state(run, architecture, parent) for run, parent in members]
        trainer = PopulationTrainer(
            [r.factors for r in runs], init_states, architecture, device, settings.mode, settings.precision,
            settings.data_root,
        )  # fmt: skip
        if saved is not None:
            same = all((meta.get("training") or {}).get(k) == training[k] for k in SAME_TRAINING)
            if meta["model_ids"] != [r.model_id for r in runs] or not same:
                raise ZooError(f"resume state {state_path} belongs to another training; remove it to start over")
            trainer.load_resume_state(saved)
            start_epoch = meta["epoch"]
            histories = meta["histories"]
            # the state is written before the epoch's checkpoints: re-create whatever they had not written yet
            _write_epoch(writer, runs, records, trainer, histories, start_epoch, epochs, policy)
        else:
            start_epoch = 0
            histories = {run.model_id: [] for run in runs}
            metrics = _evaluate(trainer)
            for i, run in enumerate(runs):
                histories[run.model_id].append({"epoch": 0, **{k: finite_or_none(v[i]) for k, v in metrics.items()}})
            _write_epoch(writer, runs, records, trainer, histories, 0, epochs, policy)

        progress = _progress(settings, label, runs, epochs, start_epoch, trainer)
        for epoch in range(start_epoch + 1, epochs + 1):
            started = time.perf_counter()
            was_active = trainer.active.clone()
            train_metrics = trainer.train_epoch(epoch, progress).values
            metrics = {**train_metrics, **_evaluate(trainer)}
            for i, run in enumerate(runs):
                if not was_active[i]:
                    continue
                row = {"epoch": epoch, **{k: finite_or_none(v[i]) for k, v in metrics.items()}}
                if not trainer.active[i]:
                    row["diverged"] = True
                histories[run.model_id].append(row)
            state = trainer.resume_state()
            build_meta = {
                "epoch": epoch,
                "model_ids": [r.model_id for r in runs],
                "histories": histories,
                "training": training,
            }
            atomic_write_bytes(state_path, save(state, metadata={"build": json.dumps(build_meta)}))
            _write_epoch(writer, runs, records, trainer, histories, epoch, epochs, policy)
            if logger is not None:
                logger.log_epoch(runs, histories, epoch, time.perf_counter() - started)
        if progress is not None:
            progress.close()
        if logger is not None:
            logger.finish_models(records)
        state_path.unlink(missing_ok=True)


def _members_with_parents(writer: ZooWriter, runs: list[Run], records: dict[str, dict], keep: set[str]):
    """(run, parent_state) for every unfinished run (or one in `keep`) whose parent, if any, finished; runs whose
    parent did not finish are recorded as skipped."""
    members = []
    for run in runs:
        record = records[run.model_id]
        if record["status"] in FINISHED and run.model_id not in keep:
            continue
        parent_state = None
        if run.parent_id is not None:
            parent = writer.read_record(run.parent_id)
            if parent is None or parent["status"] != "done" or not parent["checkpoints"]:
                reason = "parent missing" if parent is None else f"parent {parent['status']}"
                record.update(status="skipped", reason=reason)
                writer.write_record(record)
                continue
            checkpoint = parent["checkpoints"][-1]
            parent_state = read_checkpoint(writer.root, run.parent_id, checkpoint)
            record["parent_epoch"] = checkpoint["epoch"]
        members.append((run, parent_state))
    return members


def _evaluate(trainer: PopulationTrainer) -> dict[str, list[float]]:
    return {**trainer.evaluate("val").values, **trainer.evaluate("test").values}


def _write_epoch(writer, runs, records, trainer, histories, epoch, epochs, policy) -> None:
    """Checkpoints (per the save policy) and records of every model after `epoch`."""
    states = trainer.state_dicts()
    for i, run in enumerate(runs):
        record = records[run.model_id]
        if record["status"] in FINISHED:
            continue
        record["history"] = histories[run.model_id]
        diverged = not bool(trainer.active[i])
        if (
            not diverged
            and policy.keeps(epoch, epochs, run.factors.seed)
            and not any(c["epoch"] == epoch for c in record["checkpoints"])
        ):
            writer.write_checkpoint(record, epoch, states[i])
        if diverged:
            record.update(status="diverged", diverged_epoch=record["history"][-1]["epoch"])
        elif epoch == epochs:
            record["status"] = "done"
        writer.write_record(record)


def _progress(settings: BuildSettings, label: str, runs, epochs: int, start_epoch: int, trainer):
    if not settings.progress:
        return None
    from tqdm.auto import tqdm

    images = len(trainer.split("train")[1])
    steps = images // runs[0].factors.batch_size
    return tqdm(
        total=steps * (epochs - start_epoch), desc=f"{label}: {len(runs)} models", unit="step", initial=0, leave=False
    )


def _read_state(root: Path, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A population's resume state (tensors, build metadata), read with the zoo's bounds (inside the zoo, a
    regular file). A state that does not parse is refused: remove it to restart the population's epoch 0."""
    data = read_bounded(root, path, None, f"resume state {path.name}")
    try:
        header_size = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8 : 8 + header_size])["__metadata__"]["build"])
        return load_safetensors(data), meta
    except (ValueError, KeyError, TypeError) as error:
        raise ZooError(f"resume state {path} unreadable ({error}); remove it to start its population over") from error
