"""Importers: foreign zoo layouts read into the zoo format (`vitzoo import <layout> <src> <dst>`).

`vitmodelzoo` reads the official ViT Model Zoo (Falk et al. 2025, github.com/ModelZoos/ViTModelZoo):

```
<model>/config.json                   flat config, `::`-separated keys (`optim::lr`, `model::head::mlp`, ...)
<model>/result.json                   one JSON object per Ray Tune result (train_loss, test_acc, ...)
<model>/checkpoint_<N>/checkpoints    torch state_dict, keys `vit.<timm key>`; N of any width (89, 0049, 000049)
```

Conventions (the importer's, stated once here):
- A *model directory* is any directory holding `config.json` or a `checkpoint_<N>` folder. A model is
  fine-tuned when it sits inside another model directory (its parent) or when its config names a
  pre-trained model (`pretraining::model`, `pretraining::model::path`): then the parent is the pre-trained
  model directory of that name, which also reads the published split layout
  `pretraining/<name>/` + `finetuning/<name>/<model>/`. Everything else is pre-trained.
- Epochs follow Ray Tune's training iterations, which the zoo's trainer starts at 0 with an evaluation of
  the initial weights: `checkpoint_<N>` holds the weights after N training epochs (epoch N; 0 is the
  initialisation), and a result line's epoch is its `training_iteration`, else its `epoch`, else its
  1-based line number (line i -> epoch i + 1). Only `train_*`/`val_*`/`test_*` numbers are kept as metrics.
- Model ids are `pt-`/`ft-` + the sanitised directory name (at most 48 characters) + 8 hex digits of the
  sha256 of the directory's path relative to `src`: readable, unique, and the same on every re-import.
- The architecture is read from the weights' shapes (`num_heads` from `model::num_heads` in the config or
  the parent's config, else `embed_dim // 64`, which gives ViT-S's 6); kwargs hold only what differs from
  timm's `vit_small_patch16_224`, so the published zoo imports with `kwargs == {}`. A zoo holds one
  architecture: a model of another one is refused.
- Factors: `seed`, `optim::optimizer` (lowercased), `optim::lr`, `optim::wd`, `training::batchsize` and
  `training::epochs_train` are required; `training::mode` (`sl`/`cl`, absent in fine-tuning configs:
  supervised), `training::label_smoothing`, `training::temperature` (contrastive only), `model::init_type`
  and `dataset::name` are mapped when present; head and head_hidden come from the weights (cross-checked
  with `model::head::mlp`); the dataset defaults to imagenet (pre-trained) / cifar100 (fine-tuned); every
  other factor keeps its `Factors` default. The whole config is kept in the record as `source_config`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from vitzoo.errors import VitzooError
from vitzoo.zoo_builder.architecture import ArchitectureError, head_from_state_dict, vit_kwargs_from_state_dict
from vitzoo.zoo_builder.blueprint import OPTIMIZERS, Factors
from vitzoo.zoo_builder.data import DATASETS
from vitzoo.zoo_builder.data import info as dataset_info
from vitzoo.zoo_builder.models import INIT_SCHEMES, Architecture, build_vit
from vitzoo.zoo_builder.zoo import Zoo, ZooError, ZooWriter, code_version, finite_or_none, library_versions


class ImportErrorBadInput(VitzooError, ValueError):
    """A source that is missing or does not follow its layout (the CLI reports it in one line, exit code 2)."""


# ------------------------------------------------------------------------------------------- the layout

CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)")
METRIC = re.compile(r"(train|val|test)_\w+")
MODEL_NAME = "vit_small_patch16_224"
# timm's vit_small_patch16_224 constructor defaults; an imported architecture stores only what differs
VIT_SMALL = {
    "img_size": 224,
    "patch_size": 16,
    "in_chans": 3,
    "embed_dim": 384,
    "depth": 12,
    "num_heads": 6,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
}
# config key -> (factor, type); required in every config.json
REQUIRED = {
    "seed": ("seed", int),
    "optim::optimizer": ("optimizer", str),
    "optim::lr": ("lr", float),
    "optim::wd": ("weight_decay", float),
    "training::batchsize": ("batch_size", int),
    "training::epochs_train": ("epochs", int),
}
OBJECTIVES = {"sl": "supervised", "cl": "contrastive"}
# `dataset::name`, lowercased without punctuation -> our dataset name (the zoo's own, plus what we can load)
DATASET_NAMES = {re.sub(r"[^a-z0-9]", "", name): name for name in DATASETS} | {"imagenet1k": "imagenet"}
STAGE_DATASET = {"pretrain": "imagenet", "finetune": "cifar100"}


@dataclass
class SourceModel:
    """One model directory of the source, read (weights excepted) and linked to its parent."""

    directory: Path
    relpath: str  # posix path relative to src ("." when src is itself a model directory)
    config: dict
    history: list[dict]
    checkpoints: list[tuple[int, Path]]  # (epoch, state_dict file), ascending epochs
    parent: SourceModel | None = None
    parent_epoch: int | None = None

    @property
    def stage(self) -> str:
        return "pretrain" if self.parent is None else "finetune"

    @property
    def config_path(self) -> Path:
        return self.directory / "config.json"

    @property
    def model_id(self) -> str:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", self.directory.name).strip("._-")[:48] or "model"
        digest = hashlib.sha256(self.relpath.encode()).hexdigest()[:8]
        return f"{'pt' if self.stage == 'pretrain' else 'ft'}-{name}-{digest}"


def import_vitmodelzoo(src: Path, dst: Path, progress: bool = True) -> Zoo:
    """Read an official ViT Model Zoo folder into a zoo at `dst` (created, or joined if it holds the same
    architecture and dataset). Re-importing rewrites the same model ids.

    Args:
        src: the downloaded zoo (or any folder of its model directories).
        dst: the zoo folder to write.
        progress: show a progress bar over models.

    Returns:
        The imported zoo, opened.

    Raises:
        ImportErrorBadInput: `src` is missing, holds no model directory, or a file does not follow the layout
            (the message names the file); also when `dst` cannot hold this zoo.
    """
    from tqdm.auto import tqdm

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ImportErrorBadInput(f"source {src} does not exist or is not a directory")
    models = discover(src)
    final_stage = "finetune" if any(m.stage == "finetune" for m in models) else "pretrain"
    datasets = {m.model_id: source_dataset(m) for m in models}
    final = sorted({datasets[m.model_id] for m in models if m.stage == final_stage})
    if len(final) != 1:
        raise ImportErrorBadInput(f"{src}: the {final_stage} models use several datasets {final}; import them apart")
    first = models[0]
    architecture = infer_architecture(
        load_vit_state_dict(first.checkpoints[0][1]), num_heads_of(first), first.checkpoints[0][1]
    )
    try:
        writer = ZooWriter.create_or_open(dst, architecture, final[0], sorted(set(datasets.values())), None)
    except ZooError as error:
        raise ImportErrorBadInput(str(error)) from error
    for model in tqdm(models, desc=f"import {src.name or src}", unit="model", disable=not progress):
        import_model(writer, model, architecture, datasets[model.model_id])
    writer.write_index()
    return Zoo.open(dst)


IMPORTERS = {"vitmodelzoo": import_vitmodelzoo}


# ------------------------------------------------------------------------------------------- discovery


def discover(src: Path) -> list[SourceModel]:
    """Every model directory under `src`, read and linked to its parent: pre-trained models first."""
    models = []
    for directory, subdirs, files in os.walk(src):
        checkpoint_dirs = [d for d in subdirs if CHECKPOINT_DIR.fullmatch(d)]
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d not in checkpoint_dirs)
        if "config.json" in files or checkpoint_dirs:
            models.append(read_model(Path(directory), src, checkpoint_dirs))
    if not models:
        raise ImportErrorBadInput(f"no model directories (config.json, checkpoint_<N>/checkpoints) under {src}")
    link_parents(models)
    return sorted(models, key=lambda m: (m.stage != "pretrain", m.relpath))


def read_model(directory: Path, src: Path, checkpoint_dirs: list[str]) -> SourceModel:
    config_path, result_path = directory / "config.json", directory / "result.json"
    for path in (config_path, result_path):
        if not path.is_file():
            raise ImportErrorBadInput(f"{directory}: model directory without {path.name}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ImportErrorBadInput(f"{config_path}: not JSON ({error})") from error
    if not isinstance(config, dict):
        raise ImportErrorBadInput(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    checkpoints: dict[int, Path] = {}
    for name in checkpoint_dirs:
        epoch, path = int(CHECKPOINT_DIR.fullmatch(name).group(1)), directory / name / "checkpoints"
        if not path.is_file():
            raise ImportErrorBadInput(f"{directory / name}: no 'checkpoints' file (the state_dict)")
        if epoch in checkpoints:
            raise ImportErrorBadInput(f"{path}: checkpoint number {epoch} also given by {checkpoints[epoch]}")
        checkpoints[epoch] = path
    if not checkpoints:
        raise ImportErrorBadInput(f"{directory}: model directory without checkpoint_<N>/checkpoints")
    return SourceModel(
        directory=directory,
        relpath=directory.relative_to(src).as_posix(),
        config=config,
        history=read_history(result_path),
        checkpoints=sorted(checkpoints.items()),
    )


def read_history(path: Path) -> list[dict]:
    """Per-epoch metrics from a result.json (one JSON object per line); a repeated epoch keeps its last line."""
    rows: dict[int, dict] = {}
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    for index, (number, line) in enumerate(lines):
        try:
            result = json.loads(line)
        except json.JSONDecodeError as error:
            raise ImportErrorBadInput(f"{path}:{number}: not JSON ({error})") from error
        if not isinstance(result, dict):
            raise ImportErrorBadInput(f"{path}:{number}: expected a JSON object per line")
        epoch = result.get("training_iteration", result.get("epoch", index + 1))
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ImportErrorBadInput(f"{path}:{number}: epoch/training_iteration must be an integer >= 0")
        metrics = {
            k: finite_or_none(float(v))
            for k, v in result.items()
            if METRIC.fullmatch(k) and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        rows[epoch] = {"epoch": epoch, **metrics}
    return [rows[epoch] for epoch in sorted(rows)]


def link_parents(models: list[SourceModel]) -> None:
    """Set each fine-tuned model's parent: the enclosing model directory, else the pre-trained model named in
    its config (by directory name); also `parent_epoch` from the named checkpoint path, when there is one."""
    by_directory = {m.directory: m for m in models}
    enclosing = {
        m.relpath: next((by_directory[p] for p in m.directory.parents if p in by_directory), None) for m in models
    }
    pretrained = [m for m in models if enclosing[m.relpath] is None and not parent_names(m.config)]
    for model in models:
        names = parent_names(model.config)
        parent = enclosing[model.relpath]
        if parent is None and names:
            candidates = [m for m in pretrained if m.directory.name in names]
            if len(candidates) != 1:
                found = "none" if not candidates else ", ".join(str(m.directory) for m in candidates)
                raise ImportErrorBadInput(
                    f"{model.config_path}: names pre-trained model {sorted(names)}; "
                    f"expected one such model directory in the source, found {found}"
                )
            parent = candidates[0]
        if parent is not None and (enclosing[parent.relpath] is not None or parent_names(parent.config)):
            raise ImportErrorBadInput(
                f"{model.directory}: fine-tuned from a fine-tuned model ({parent.directory}); "
                "only pre-trained parents are supported"
            )
        model.parent = parent
        path = model.config.get("pretraining::model::path")
        numbers = [CHECKPOINT_DIR.fullmatch(p) for p in PurePosixPath(path).parts] if isinstance(path, str) else []
        numbers = [int(m.group(1)) for m in numbers if m]
        model.parent_epoch = numbers[-1] if parent is not None and numbers else None


def parent_names(config: dict) -> set[str]:
    """The pre-trained model a fine-tuning config names: `pretraining::model`, and the directory above the
    checkpoint folder in `pretraining::model::path` (`.../<name>/checkpoint_89/checkpoints`)."""
    names = set()
    if isinstance(config.get("pretraining::model"), str):
        names.add(config["pretraining::model"])
    path = config.get("pretraining::model::path")
    if isinstance(path, str):
        parts = PurePosixPath(path).parts
        positions = [i for i, part in enumerate(parts) if CHECKPOINT_DIR.fullmatch(part)]
        if positions and positions[-1] > 0:
            names.add(parts[positions[-1] - 1])
    return names


def source_dataset(model: SourceModel) -> str:
    name = model.config.get("dataset::name")
    if name is None:
        return STAGE_DATASET[model.stage]
    key = re.sub(r"[^a-z0-9]", "", str(name).lower())
    if key not in DATASET_NAMES:
        raise ImportErrorBadInput(f"{model.config_path}: dataset::name {name!r} is not one of {sorted(DATASET_NAMES)}")
    return DATASET_NAMES[key]


def num_heads_of(model: SourceModel) -> int | None:
    """`model::num_heads` from the model's config, else from its parent's (a fine-tune keeps the body)."""
    for config in (model.config, model.parent.config if model.parent else {}):
        if config.get("model::num_heads") is not None:
            return int(config["model::num_heads"])
    return None


# ------------------------------------------------------------------------------------------ weights


def load_vit_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's state_dict with the `vit.` prefix stripped (timm key names). Never unpickles objects."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # the weights-only unpickler refused: say what, not how to force it
        raise ImportErrorBadInput(f"{path}: refused to unpickle {_refused(error)}") from None
    except Exception as error:  # a truncated or foreign file
        text = str(error).strip().split("\n")[0][:200] or type(error).__name__
        raise ImportErrorBadInput(f"{path}: not a readable torch checkpoint ({text})") from None
    if not isinstance(state, dict) or not state:
        raise ImportErrorBadInput(f"{path}: not a state_dict (expected a dict of tensors, got {type(state).__name__})")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ImportErrorBadInput(f"{path}: not a state_dict ({bad[0]!r} is {type(state[bad[0]]).__name__})")
    unprefixed = [k for k in state if not k.startswith("vit.")]
    if unprefixed:
        raise ImportErrorBadInput(f"{path}: keys must be prefixed 'vit.' (found {unprefixed[0]!r})")
    return {k.removeprefix("vit."): v for k, v in state.items()}


def _refused(error: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused (the Python global a pickle tried to load, or its own reason),
    without torch's advice to disable the check: a checkpoint here is tensors in plain containers, nothing else."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"the Python object {found.group(1)} (only tensors in plain containers are read: objects can run code)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reasons = [line for line in lines if "weights_only" not in line and "Weights only load failed" not in line
               and "torch.load" not in line and "safe_globals" not in line]  # fmt: skip
    return f"its content ({reasons[0][:200] if reasons else 'an object the weights-only unpickler does not allow'})"


def infer_architecture(state: dict[str, torch.Tensor], num_heads: int | None, path: Path) -> Architecture:
    """The timm ViT whose parameters have these shapes (`zoo_builder.architecture`; kwargs: only what differs from
    ViT-S/16, of the settings a published zoo varies)."""
    try:
        found = vit_kwargs_from_state_dict(state, num_heads)
    except ArchitectureError as error:
        raise ImportErrorBadInput(f"{path}: {error}") from None
    if not found["class_token"] or found["no_embed_class"]:
        raise ImportErrorBadInput(f"{path}: pos_embed must hold 1 class token + a square grid, as timm's ViT-S/16")
    heads, width = found["num_heads"], found["embed_dim"]
    if heads < 1 or width % heads:
        raise ImportErrorBadInput(f"{path}: num_heads {heads} does not divide embed_dim {width}")
    square = {"img_size": found["img_size"][0], "patch_size": found["patch_size"][0]}  # timm's ViT-S/16 takes ints
    values = {key: square.get(key, found[key]) for key in VIT_SMALL}
    return Architecture(MODEL_NAME, {k: v for k, v in values.items() if v != VIT_SMALL[k]})


def infer_head(state: dict[str, torch.Tensor], path: Path) -> dict:
    """{"head", "head_hidden", "num_classes"} from the head's shapes (`zoo_builder.architecture`)."""
    try:
        return head_from_state_dict(state)
    except ArchitectureError as error:
        raise ImportErrorBadInput(f"{path}: {error}") from None


def check_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        details = " ".join(line.strip() for line in str(error).splitlines()[1:])[:300]
        raise ImportErrorBadInput(f"{path}: weights do not fit {what}: {details}") from None


# ------------------------------------------------------------------------------------------- records


def source_factors(model: SourceModel, head: dict, dataset: str) -> Factors:
    """The model's factors from its config (see the module docstring for the mapping)."""
    config, path = model.config, model.config_path
    missing = [key for key in REQUIRED if config.get(key) is None]
    if missing:
        raise ImportErrorBadInput(f"{path}: missing or null key(s) {missing}")
    values = {}
    for key, (factor, kind) in REQUIRED.items():
        try:
            values[factor] = kind(config[key])
        except (TypeError, ValueError):
            raise ImportErrorBadInput(f"{path}: {key}={config[key]!r} is not a {kind.__name__}") from None
    values["optimizer"] = values["optimizer"].lower()
    if values["optimizer"] not in OPTIMIZERS:
        raise ImportErrorBadInput(f"{path}: optim::optimizer {config['optim::optimizer']!r} is not one of {OPTIMIZERS}")
    mode = config.get("training::mode") or "sl"  # fine-tuning configs have no mode: always supervised
    if mode not in OBJECTIVES:
        raise ImportErrorBadInput(f"{path}: training::mode {mode!r} is not one of {sorted(OBJECTIVES)}")
    values["objective"] = OBJECTIVES[mode]
    if values["objective"] == "contrastive":
        values["projection_dim"] = head["num_classes"]
        if config.get("training::temperature"):
            values["temperature"] = float(config["training::temperature"])
    values["label_smoothing"] = float(config.get("training::label_smoothing") or 0.0)
    init = config.get("model::init_type")
    if init is not None:
        if init not in INIT_SCHEMES:
            raise ImportErrorBadInput(f"{path}: model::init_type {init!r} is not one of {INIT_SCHEMES}")
        values["init"] = init
    mlp = config.get("model::head::mlp")
    if mlp is not None and bool(mlp) != (head["head"] == "mlp"):
        raise ImportErrorBadInput(f"{path}: model::head::mlp is {mlp} but the weights hold a {head['head']} head")
    factors = Factors(**values, head=head["head"], head_hidden=head["head_hidden"], dataset=dataset)
    try:
        factors.validate()
    except ValueError as error:
        raise ImportErrorBadInput(f"{path}: {error}") from error
    if factors.num_outputs != head["num_classes"]:
        raise ImportErrorBadInput(
            f"{path}: the head has {head['num_classes']} outputs but {dataset} has "
            f"{dataset_info(dataset).num_classes} classes"
        )
    return factors


def import_model(writer: ZooWriter, model: SourceModel, architecture: Architecture, dataset: str) -> None:
    """Check and write every checkpoint of one model, then its record."""
    first_path = model.checkpoints[0][1]
    first = load_vit_state_dict(first_path)
    found = infer_architecture(first, num_heads_of(model), first_path)
    if found != architecture:
        raise ImportErrorBadInput(
            f"{first_path}: architecture {found.to_dict()} differs from the zoo's "
            f"{architecture.to_dict()}; a zoo holds one architecture, import these apart"
        )
    head = infer_head(first, first_path)
    factors = source_factors(model, head, dataset)
    network = build_vit(architecture, head["num_classes"], head["head"], head["head_hidden"])
    what = f"{architecture.model_name} {architecture.kwargs} with a {head['head']} head"
    record = {
        "model_id": model.model_id,
        "stage": model.stage,
        "parent_id": model.parent.model_id if model.parent else None,
        "factors": factors.to_dict(),
        "head": head,
        "status": "done",
        "history": model.history,
        "checkpoints": [],
        "code_version": code_version(),
        "versions": library_versions(),
        "source": str(model.directory.resolve()),
        "source_config": model.config,
    }
    if model.parent_epoch is not None:
        record["parent_epoch"] = model.parent_epoch
    for epoch, path in model.checkpoints:
        state = first if path == first_path else load_vit_state_dict(path)
        check_fits(network, state, path, what)
        writer.write_checkpoint(record, epoch, state)
    writer.write_record(record)
