"""Checkpoint files of the generative models: safetensors with the metadata as JSON under one `vitzoo` key.

Two kinds per model: the final checkpoint (EMA weights; metadata with `format`, the config and what the model
decodes into) and the training state (model, EMA, optimizer state, step, extra tensors such as a measured training
set), written atomically every few steps so that a rerun continues where a killed run stopped. Both record the
versions of torch, timm and diffusers that wrote them (`"versions"`; absent from checkpoints written before).

Nothing in a checkpoint's metadata is trusted: the config must name every field with a value the config class
accepts, and the loaders check what else they read (`CheckpointError` names the file and the field).
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from vitzoo.errors import ConfigError
from vitzoo.zoo_builder.zoo import ZooError, atomic_write_bytes, library_versions


class CheckpointError(ZooError):
    """A generator or autoencoder checkpoint (or training state) that is unreadable, or whose metadata is
    incomplete or inconsistent."""


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a vitzoo checkpoint and the JSON metadata it records under the `vitzoo` key."""
    blob = Path(path).read_bytes()
    with safe_open(str(path), "pt") as handle:
        metadata = json.loads((handle.metadata() or {}).get("vitzoo", "{}"))
    return load_safetensors(blob), metadata


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Every checkpoint and training state is written here; its metadata gets the library versions that wrote it
    (`"versions"`, unless `metadata` already names them: a checkpoint rewritten keeps its record)."""
    metadata = {"versions": library_versions(), **metadata}
    blob = save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()},  # GPU states too
                            {"vitzoo": json.dumps(metadata, sort_keys=True)})  # fmt: skip
    atomic_write_bytes(path, blob)


def checkpoint_format(path: str | Path) -> str | None:
    """The `format` a vitzoo checkpoint records (generator or autoencoder), None for anything else."""
    try:
        return read_checkpoint(Path(path))[1].get("format")
    except Exception:  # not a file, not safetensors, no metadata: not ours
        return None


def open_checkpoint(
    path: str | Path, expected_format: str, config_class, legacy: dict | None = None
) -> tuple[dict, dict, object]:
    """Weights, metadata and config of a final checkpoint of `expected_format`, or a CheckpointError saying why not.

    The recorded config must hold every field of `config_class` and no other, each with a value the config
    accepts; `legacy` gives the values that checkpoints written before a field existed imply."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        weights, metadata = read_checkpoint(path)
    except Exception as error:  # safetensors raises several types for a foreign or truncated file
        raise CheckpointError(f"{path} is not a vitzoo checkpoint: {error}") from error
    if not isinstance(metadata, dict) or metadata.get("format") != expected_format:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise CheckpointError(f"{path} is not a {expected_format} checkpoint (it records format {found!r})")
    recorded = require(metadata, "config", dict, path)
    names = [f.name for f in fields(config_class)]
    unknown = sorted(set(recorded) - set(names))
    missing = [name for name in names if name not in recorded and name not in (legacy or {})]
    if unknown or missing:
        problem = f"lacks {', '.join(missing)}" if missing else f"has unknown field(s) {', '.join(unknown)}"
        raise CheckpointError(f"{path}: its config {problem}")
    try:
        config = config_class(**((legacy or {}) | recorded))
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}") from None
    return weights, metadata, config


def require(metadata: dict, key: str, kind: type, path: Path):
    """metadata[key], which must be a `kind`, or a CheckpointError naming the file and the key."""
    if not isinstance(metadata.get(key), kind):
        raise CheckpointError(f"{path}: its metadata lacks {key!r} or it is not a {kind.__name__}")
    return metadata[key]


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Load a checkpoint's weights into the model its config describes, or a CheckpointError if they do not fit."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:  # missing/unexpected keys or shapes: the metadata does not describe these weights
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise CheckpointError(f"{path}: its weights do not fit its config ({' '.join(lines[1:3])[:300]})") from None


def save_training_state(
    path: Path,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    metadata: dict,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        tensors |= {f"optim.{index}.{k}": torch.as_tensor(v) for k, v in state.items()}
    tensors |= {f"extra.{k}": v for k, v in (extra or {}).items()}
    write_checkpoint(path, tensors, metadata)


def load_training_state(
    path: Path, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer, expected: dict
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore model, EMA and optimizer in place; returns the metadata and the extra tensors. The state must
    have been written with the `expected` metadata values (the same config and data), else ZooError."""
    try:
        saved, metadata = read_checkpoint(path)
    except Exception as error:  # safetensors raises several types for a foreign or truncated file
        raise CheckpointError(f"training state {path} is unreadable ({error}); remove it to start over") from error
    if any(metadata.get(key) != value for key, value in expected.items()):
        raise ZooError(f"{path} was written by another config or zoo; use another out=<dir>")
    steps = expected["config"]["steps"]
    step = metadata.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 < step <= steps:
        raise CheckpointError(f"training state {path}: step must be an integer in [1, {steps}], got {step!r}")
    load_weights(model, {k[len("model.") :]: v for k, v in saved.items() if k.startswith("model.")}, path)
    load_weights(ema, {k[len("ema.") :]: v for k, v in saved.items() if k.startswith("ema.")}, path)
    state = optimizer.state_dict()
    for key, value in saved.items():
        if key.startswith("optim."):
            index, name = key[len("optim.") :].split(".", 1)
            state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(state)
    return metadata, {k[len("extra.") :]: v for k, v in saved.items() if k.startswith("extra.")}


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)
