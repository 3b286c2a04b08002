"""`vitzoo evaluate` outputs: results.json, predictions.safetensors (`predictions/<dataset>` [models, N], the
models' names in the metadata under `models/<dataset>`), report.md and an accuracy histogram.

Every output says which zoo, split, selection, seed-free settings and code version produced it.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from safetensors.torch import save

from vitzoo.eval.evaluation import evaluate
from vitzoo.eval.finetune import FinetuneRecipe, finetune_curves
from vitzoo.eval.html import write_report
from vitzoo.zoo_builder.zoo import Zoo, atomic_write_bytes, atomic_write_json, code_version


def write_evaluation(
    selection: Zoo,
    dataset: str | None,
    split: str,
    out: Path,
    config: dict,
    finetune: FinetuneRecipe | None = None,
    **options,
) -> Path:
    """Evaluate every entry of `selection` and write the results into `out` (see module docstring). With
    `dataset=None` each entry is evaluated on the dataset it was trained on (pre-trained parents and their
    fine-tunes differ); with a fine-tuning recipe each model is also fine-tuned and measured after every epoch."""
    datasets = [dataset or entry.factors.get("dataset", selection.dataset) for entry in selection]
    results, curves = [None] * len(selection), {}
    for name in dict.fromkeys(datasets):
        indices = [i for i, d in enumerate(datasets) if d == name]
        part = Zoo(selection.root, selection.meta, selection.records, [selection[i] for i in indices])
        for i, result in zip(indices, evaluate(part, name, split, **options)):
            results[i] = result
        if finetune is not None and finetune.epochs > 0:
            pairs = [(results[i].name, selection[i].state_dict()) for i in indices if results[i].error is None]
            curves.update(finetune_curves(pairs, selection.architecture, name, finetune, split,
                                          options.get("device", "cpu"), options.get("data_root")))  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for entry, result, name in zip(selection, results, datasets):
        rows.append({
            **result.to_dict(),
            "model_id": entry.model_id,
            "epoch": entry.epoch,
            "stage": entry.stage,
            "parent_id": entry.parent_id,
            "dataset": name,
            "factors": entry.factors,
            f"indexed_{split}_acc": entry.metrics.get(f"{split}_acc"),
            "finetune": curves.get(result.name),
        })  # fmt: skip
    atomic_write_json(out / "results.json", {
        "zoo": str(selection.root),
        "dataset": dataset,
        "split": split,
        "finetune": None if finetune is None else vars(finetune),
        "config": config,
        "code_version": code_version(),
        "results": rows,
    })  # fmt: skip
    # one prediction matrix per dataset: a zoo's parents and fine-tunes are scored on different test sets
    tensors, metadata = {}, {}
    for name in dict.fromkeys(datasets):
        evaluated = [r for r, d in zip(results, datasets) if d == name and r.error is None]
        if evaluated:
            tensors[f"predictions/{name}"] = torch.stack([r.predictions for r in evaluated]).to(torch.int16)  # [m, N]
            metadata[f"models/{name}"] = ",".join(r.name for r in evaluated)
    if tensors:
        atomic_write_bytes(out / "predictions.safetensors", save(tensors, metadata))
    _histogram(rows, out / "accuracy.png", split)
    if curves:
        _finetune_plot(rows, out / "finetune.png", split)
    write_report(out, _report(selection, split, rows, finetune))
    return out


def _groups(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows by stage and dataset (e.g. "pretrain on fashion_mnist")."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(f"{row['stage']} on {row['dataset']}", []).append(row)
    return groups


def _report(selection: Zoo, split: str, rows: list[dict], finetune: FinetuneRecipe | None) -> str:
    epochs = finetune.epochs if finetune is not None else 0
    header = "| models | checkpoints | failed | min acc | median | mean | max |" + "".join(
        f" FT ep {e} |" for e in range(1, epochs + 1)
    )
    lines = [
        f"# Evaluation of {selection.root} ({split} split)",
        "",
        f"{len(rows)} checkpoints, code {code_version()}.",
        "",
        header,
        "|" + "---|" * (7 + epochs),
    ]
    for group, mine in _groups(rows).items():
        accuracies = [r["accuracy"] for r in mine if r["error"] is None]
        failed = len(mine) - len(accuracies)
        cells = [group, str(len(mine)), str(failed)]
        if accuracies:
            cells += [f"{min(accuracies):.3f}", f"{statistics.median(accuracies):.3f}",
                      f"{statistics.mean(accuracies):.3f}", f"{max(accuracies):.3f}"]  # fmt: skip
        else:
            cells += [""] * 4
        curves = [r["finetune"] for r in mine if r.get("finetune")]
        cells += [f"{statistics.mean(c[e] for c in curves):.3f}" if curves else "" for e in range(1, epochs + 1)]
        lines.append("| " + " | ".join(cells) + " |")
    if finetune is not None and epochs:
        lines += ["", f"FT ep e: mean {split} accuracy after e epochs of fine-tuning ({finetune.optimizer}, lr "
                      f"{finetune.lr}, batch {finetune.batch_size}, every model from its own weights)."]  # fmt: skip
    failures = [r for r in rows if r["error"] is not None]
    if failures:
        lines += ["", "## Failed", ""] + [f"- {r['model']}: {r['error']}" for r in failures]
    lines += ["", "![accuracy](accuracy.png)", ""]
    if any(r.get("finetune") for r in rows):
        lines += ["![fine-tuning](finetune.png)", ""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _histogram(rows: list[dict], path: Path, split: str) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for group, mine in _groups(rows).items():
        accuracies = [r["accuracy"] for r in mine if r["error"] is None]
        axis.hist(accuracies, bins=20, range=(0, 1), alpha=0.6, label=f"{group} ({len(accuracies)})")
    axis.set_xlabel(f"{split} accuracy")
    axis.set_ylabel("checkpoints")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _finetune_plot(rows: list[dict], path: Path, split: str) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for group, mine in _groups(rows).items():
        curves = torch.tensor([r["finetune"] for r in mine if r.get("finetune")])  # [models, epochs + 1]
        if len(curves):
            epochs = range(curves.shape[1])
            axis.plot(epochs, curves.mean(0), marker="o", label=f"{group} (mean)")
            axis.fill_between(epochs, curves.quantile(0.1, 0), curves.quantile(0.9, 0), alpha=0.2)
    axis.set_xlabel("fine-tuning epochs")
    axis.set_ylabel(f"{split} accuracy (10-90% band)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
