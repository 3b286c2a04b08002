"""Batched evaluation: many same-shaped ViTs measured at once with `torch.func.vmap` over stacked weights.

`evaluate(models, dataset, split=...)` takes a zoo (every entry, e.g. after `zoo.filter(...)`) or a list of
`(name, state_dict)` pairs, loads each into the timm ViT of its architecture, and returns one result per
model: loss, accuracy and the predicted class of every example of the split. Models are grouped by
architecture and evaluated in chunks of `chunk_size` (stacked parameters, one vmapped forward per batch of
images); `mode="loop"` evaluates one `nn.Module` at a time and gives the same numbers (tested). `mode="auto"`
(the default) batches on CUDA and loops on the CPU: measured on 2 CPU cores with the bundled zoo's 24-wide
ViTs, one model's full-batch activations already fit the cache and stacking models only adds memory traffic
(0.45x the loop for 64 models, 0.93x for 8; benchmarks/evaluation.py), while on a GPU the per-model kernel
launches are what batching removes. A model that
cannot be evaluated (unreadable or corrupted file, NaN/inf weights, a head whose outputs do not match the
dataset's classes) is reported with `error` set; the others are evaluated.

Shapes: m models, b batch, k classes, N examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from vitzoo.errors import ConfigError
from vitzoo.zoo_builder.data import info as dataset_info
from vitzoo.zoo_builder.data import load_split
from vitzoo.zoo_builder.zoo import Zoo, ZooEntry, ZooError


@dataclass
class Result:
    name: str
    loss: float | None = None
    accuracy: float | None = None
    predictions: torch.Tensor | None = field(default=None, repr=False)  # [N] int64
    error: str | None = None

    def to_dict(self) -> dict:
        return {"model": self.name, "loss": self.loss, "accuracy": self.accuracy, "error": self.error}


@dataclass
class _Candidate:
    name: str
    load: callable  # () -> state_dict
    build: callable  # () -> nn.Module on the meta device (only its structure is used)
    structure: tuple  # candidates with equal structure keys build the same architecture


def evaluate(
    models: Zoo | list[tuple[str, dict[str, torch.Tensor]]],
    dataset: str,
    split: str = "test",
    num_heads: int | None = None,
    mode: str = "auto",
    chunk_size: int = 64,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    data_root: str | None = None,
    progress: bool = False,
) -> list[Result]:
    """Loss, accuracy and predictions of every model on one split (see module docstring).

    Args:
        models: a zoo (its entries), or (name, state_dict) pairs of timm ViTs.
        num_heads: attention heads, for state dicts only (weights cannot tell; see zoo_builder.architecture).
        mode: "vmap" (many models per forward pass), "loop" (one model at a time) or "auto" (vmap on CUDA).
    """
    if mode not in ("auto", "vmap", "loop"):
        raise ConfigError(f"mode must be auto, vmap or loop, got {mode!r}")
    device = torch.device(device)
    if mode == "auto":
        mode = "vmap" if device.type == "cuda" else "loop"
    images, labels = load_split(dataset, split, data_root)
    images, labels = images.to(device), labels.to(device)
    classes = dataset_info(dataset).num_classes
    candidates = _candidates(models, num_heads)
    results: dict[str, Result] = {}
    groups: dict[tuple, list[tuple[_Candidate, dict]]] = {}
    architectures: dict[tuple, nn.Module | Exception] = {}  # structure -> meta model, built once
    for candidate in candidates:
        state_dict, error = _load_checked(candidate, classes, architectures)
        if error is not None:
            results[candidate.name] = Result(candidate.name, error=error)
            continue
        signature = tuple(sorted((k, tuple(v.shape)) for k, v in state_dict.items()))  # key order varies by file
        groups.setdefault(signature, []).append((candidate, state_dict))

    from tqdm.auto import tqdm

    bar = tqdm(total=len(candidates) - len(results), desc=f"evaluate on {dataset}/{split}", disable=not progress)
    for members in groups.values():
        template = members[0][0].build().to_empty(device=device).eval()
        for module in template.modules():  # vmap has no batching rule for the fused attention kernel
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
        for start in range(0, len(members), chunk_size):
            chunk = members[start : start + chunk_size]
            state_dicts = [state_dict for _, state_dict in chunk]
            if mode == "vmap":
                losses, predictions = _evaluate_stacked(template, state_dicts, images, labels, batch_size)
            else:
                losses, predictions = _evaluate_loop(template, state_dicts, images, labels, batch_size)
            for i, (candidate, _) in enumerate(chunk):
                correct = (predictions[i] == labels).float().mean().item()
                results[candidate.name] = Result(candidate.name, losses[i].item(), correct, predictions[i].cpu())
            bar.update(len(chunk))
    bar.close()
    return [results[c.name] for c in candidates]


def _candidates(models, num_heads: int | None) -> list[_Candidate]:
    if isinstance(models, Zoo):
        return [_entry_candidate(entry) for entry in models]
    from vitzoo.zoo_builder.architecture import vit_from_state_dict

    candidates = []
    for name, state_dict in models:

        def build(state_dict=state_dict):
            return vit_from_state_dict(state_dict, num_heads)

        structure = tuple(sorted((k, tuple(v.shape)) for k, v in state_dict.items()))
        candidates.append(_Candidate(name, lambda state_dict=state_dict: state_dict, build, structure))
    return candidates


def _entry_candidate(entry: ZooEntry) -> _Candidate:
    from vitzoo.zoo_builder.models import build_vit

    def build():
        with torch.device("meta"):
            return build_vit(entry.architecture, entry.head["num_classes"], entry.head["head"],
                             entry.head["head_hidden"])  # fmt: skip

    structure = (repr(entry.architecture), tuple(sorted(entry.head.items())))
    return _Candidate(f"{entry.model_id}@{entry.epoch}", entry.state_dict, build, structure)


def _load_checked(candidate: _Candidate, classes: int, architectures: dict) -> tuple[dict | None, str | None]:
    """The state dict, or the reason it cannot be evaluated."""
    try:
        state_dict = candidate.load()
    except (ZooError, OSError) as error:
        return None, str(error)
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        return None, f"non-finite weights in {bad[:3]}"
    if candidate.structure not in architectures:
        try:
            architectures[candidate.structure] = candidate.build()
        except Exception as error:  # any failure to build is this model's failure, not the run's
            architectures[candidate.structure] = error
    model = architectures[candidate.structure]
    if isinstance(model, Exception):
        return None, f"no architecture fits it: {str(model).splitlines()[0]}"
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state_dict.items()}
    if expected != given:
        wrong = sorted(set(expected) ^ set(given)) or [k for k in expected if expected[k] != given[k]]
        return None, f"does not load into its architecture (keys or shapes differ: {wrong[:3]})"
    outputs = _outputs(model)
    if outputs != classes:
        return None, f"the head has {outputs} outputs but the dataset has {classes} classes"
    return {k: v.float() for k, v in state_dict.items()}, None


def _outputs(model: nn.Module) -> int:
    head = model.get_classifier() if hasattr(model, "get_classifier") else model.head
    if isinstance(head, nn.Sequential):
        head = [m for m in head if isinstance(m, nn.Linear)][-1]
    return head.out_features


@torch.no_grad()
def _evaluate_stacked(template, state_dicts, images, labels, batch_size):
    params = {k: torch.stack([sd[k] for sd in state_dicts]).to(images.device) for k in state_dicts[0]}

    def forward(p, x):
        return functional_call(template, p, (x,))

    batched = vmap(forward, in_dims=(0, None))
    loss_sum = torch.zeros(len(state_dicts), device=images.device)
    predictions = []
    for start in range(0, len(labels), batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        logits = batched(params, x)  # [m, b, k]
        loss_sum += F.cross_entropy(logits.flatten(0, 1), y.repeat(len(state_dicts)), reduction="none").view(
            len(state_dicts), -1
        ).sum(1)  # fmt: skip
        predictions.append(logits.argmax(-1))
    return loss_sum / len(labels), torch.cat(predictions, dim=1)


@torch.no_grad()
def _evaluate_loop(template, state_dicts, images, labels, batch_size):
    losses, predictions = [], []
    for state_dict in state_dicts:
        template.load_state_dict(state_dict)
        loss_sum, predicted = 0.0, []
        for start in range(0, len(labels), batch_size):
            x, y = images[start : start + batch_size], labels[start : start + batch_size]
            logits = template(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            predicted.append(logits.argmax(-1))
        losses.append(loss_sum / len(labels))
        predictions.append(torch.cat(predicted))
    return torch.tensor(losses), torch.stack(predictions)
