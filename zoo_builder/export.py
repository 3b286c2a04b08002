"""Zoo models as timm / Hugging Face folders, for anyone with timm.

```
export.json                      what was exported: zoo, model ids, code and library versions (written last)
<model_id>/config.json           timm's Hugging Face config: architecture, num_classes, model_args, pretrained_cfg
<model_id>/model.safetensors     the weights, timm key names, fp32
```

`timm.create_model("local-dir:<out>/<model_id>", pretrained=True)` (or `hf-hub:<repo>` once uploaded) rebuilds the
model with the outputs of `entry.model()`, and `timm.data.resolve_data_config({}, model=model)` gives the
preprocessing of the model's dataset (`data.DATASETS`: channels, mean, std; bilinear resizing to the model's input
size; ImageNet's short side to 8/7 of it, then a centre crop). A linear-head model names the zoo's own timm
architecture. An MLP head is no timm head (timm's VisionTransformer has one Linear), so an MLP-head model names
`vitzoo_vit_mlp_head`, which `import vitzoo.zoo_builder` registers with timm (see `models.py`): loading it needs
vitzoo installed and imported first.

Every exported folder is loaded back through timm and compared with `entry.model()` on a random batch before the
export is put in place; the export is written beside `out` and renamed into place when complete.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import timm
import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from vitzoo.errors import VitzooError
from vitzoo.zoo_builder.data import info
from vitzoo.zoo_builder.models import HEADS, MLP_HEAD_MODEL
from vitzoo.zoo_builder.zoo import (
    Zoo,
    ZooEntry,
    atomic_write_bytes,
    atomic_write_json,
    code_version,
    library_versions,
)

CHECK_ATOL = 1e-6  # timm's rebuild runs the same operations on the same weights: outputs agree to rounding at most


class ExportError(VitzooError):
    """A model that cannot be exported as asked: unknown id, an output folder in use, a rebuild that differs."""


def export(zoo_path: str | os.PathLike, out: str | os.PathLike, model_ids: list[str] | None = None) -> list[Path]:
    """Export the last checkpoint of every model of the zoo (or sampled zoo; "bundled" for the bundled zoo), or of
    the models `model_ids`, into `out/<model_id>/`. `out` must not exist or be empty. Returns the model folders."""
    zoo = Zoo.open(zoo_path)
    entries = select(zoo, model_ids)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"out={out} exists and is not an empty folder; exports are written into a new folder only")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".tmp-{out.name}.{secrets.token_hex(8)}"
    staging.mkdir()
    source = zoo.location
    try:
        for entry in entries:
            dataset = entry.factors["dataset"] if "dataset" in entry.factors else zoo.dataset  # sampled: the zoo's
            export_model(entry, staging / entry.model_id, dataset, source)
        atomic_write_json(staging / "export.json", {
            "zoo": source,
            "models": [entry.model_id for entry in entries],
            "code_version": code_version(),
            "versions": library_versions(),
        })  # fmt: skip
        os.replace(staging, out)  # rename(2) replaces an empty folder in one step
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [out / entry.model_id for entry in entries]


def select(zoo: Zoo, model_ids: list[str] | None) -> list[ZooEntry]:
    """The last checkpoint of every model, or of each of `model_ids` in their order (an unknown id is refused)."""
    last = zoo.filter(epoch="last")
    if not last.entries:
        raise ExportError(f"{zoo.root} holds no checkpoints to export")
    if not model_ids:
        return list(last)
    by_id = {entry.model_id: entry for entry in last}
    unknown = [model_id for model_id in model_ids if model_id not in by_id]
    if unknown:
        known = ", ".join(list(by_id)[:3])
        raise ExportError(f"unknown model id(s) {', '.join(unknown)} in {zoo.root} ({len(by_id)} models: {known}, ...)")
    return [by_id[model_id] for model_id in dict.fromkeys(model_ids)]


def export_model(entry: ZooEntry, folder: Path, dataset: str, source: str) -> None:
    """Write one checkpoint as `folder/config.json` and `folder/model.safetensors`, then check that timm rebuilds
    it with the same outputs (ExportError if not)."""
    if entry.head["head"] not in HEADS:
        raise ExportError(f"{entry.model_id}: unknown head {entry.head['head']!r}; expected one of {HEADS}")
    model = entry.model()
    tensors = {name: value.detach().to("cpu", torch.float32).contiguous() for name, value in model.state_dict().items()}
    config = hf_config(entry, model, dataset)
    config["vitzoo"] = {
        "zoo": source,
        "model_id": entry.model_id,
        "epoch": entry.epoch,
        "stage": entry.stage,
        "parent_id": entry.parent_id,
        "factors": entry.factors,
        "head": entry.head,
        "metrics": entry.metrics,
        "dataset": dataset,
        "checkpoint_sha256": entry.sha256,
        "code_version": code_version(),
        "versions": library_versions(),
    }
    folder.mkdir()
    atomic_write_bytes(folder / "model.safetensors", save_safetensors(tensors, metadata={"format": "pt"}))
    atomic_write_json(folder / "config.json", config)
    check_rebuild(folder, model, entry.model_id)


def hf_config(entry: ZooEntry, model: nn.Module, dataset: str) -> dict:
    """timm's Hugging Face `config.json` for `model` (`entry.model()`): what `timm.create_model("local-dir:...")`
    reads to rebuild it (architecture, num_classes, model_args) and to preprocess its inputs (pretrained_cfg)."""
    architecture, head, num_classes = entry.architecture, entry.head["head"], entry.head["num_classes"]
    model_args = {**architecture.kwargs, "num_classes": num_classes}
    if head == "mlp":
        model_args = {"base": architecture.model_name, "head_hidden": entry.head["head_hidden"], **model_args}
    return {
        "architecture": MLP_HEAD_MODEL if head == "mlp" else architecture.model_name,
        "num_classes": num_classes,
        "num_features": model.num_features,
        "global_pool": model.global_pool,
        "model_args": model_args,
        "pretrained_cfg": {
            **preprocessing(dataset, model),
            "num_classes": num_classes,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head.2" if head == "mlp" else "head",
            "custom_load": False,
            "description": f"vitzoo zoo model {entry.model_id} (epoch {entry.epoch}, {entry.stage}, {dataset}, "
            f"{head} head)",
        },
    }


def preprocessing(dataset: str, model: nn.Module) -> dict:
    """The data entries of timm's pretrained_cfg: how `data.load_split` prepares the dataset's images for `model`."""
    meta = info(dataset)
    if meta.channels != model.in_chans:
        raise ExportError(f"the model takes {model.in_chans} channel(s), its dataset {dataset} has {meta.channels}")
    return {
        "input_size": [model.in_chans, *model.patch_embed.img_size],
        "fixed_input_size": True,
        "interpolation": "bilinear",  # digits 8 -> 28 px, CIFAR 32 -> 224 px, ImageNet's short side: all bilinear
        "crop_pct": 7 / 8 if dataset == "imagenet" else 1.0,  # data.ImageFiles: short side to 8/7 of the size, crop
        "crop_mode": "center",
        "mean": list(meta.mean),
        "std": list(meta.std),
    }


def check_rebuild(folder: Path, model: nn.Module, model_id: str) -> None:
    """Load `folder` as timm does and compare its outputs with `model`'s on a random batch of 2."""
    try:
        rebuilt = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    except RuntimeError as error:  # timm's own: an unknown architecture, weights that do not fit it
        raise ExportError(f"{model_id}: timm cannot rebuild the export: {error}") from error
    size = rebuilt.pretrained_cfg["input_size"]
    images = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model.eval()(images), rebuilt(images)
    if expected.shape != got.shape or not torch.allclose(expected, got, rtol=0, atol=CHECK_ATOL):
        raise ExportError(f"{model_id}: timm rebuilds the export with other outputs than the zoo's model; not exported")
