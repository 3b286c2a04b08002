"""`vitzoo evaluate` outputs: results.json, predictions.safetensors, report.md and an accuracy histogram.

Every output says which zoo, split, selection, seed-free settings and code version produced it.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from safetensors.torch import save

from eval.evaluation import evaluate
from zoo_builder.zoo import Zoo, atomic_write_bytes, atomic_write_json, code_version


def write_evaluation(selection: Zoo, dataset: str, split: str, out: Path, config: dict, **options) -> Path:
    """Evaluate every entry of `selection` and write the results into `out` (see module docstring)."""
    results = evaluate(selection, dataset, split, **options)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for entry, result in zip(selection, results):
        rows.append({
            **result.to_dict(),
            "model_id": entry.model_id,
            "epoch": entry.epoch,
            "stage": entry.stage,
            "parent_id": entry.parent_id,
            "factors": entry.factors,
            f"indexed_{split}_acc": entry.metrics.get(f"{split}_acc"),
        })  # fmt: skip
    atomic_write_json(out / "results.json", {
        "zoo": str(selection.root),
        "dataset": dataset,
        "split": split,
        "config": config,
        "code_version": code_version(),
        "results": rows,
    })  # fmt: skip
    evaluated = [r for r in results if r.error is None]
    if evaluated:
        predictions = torch.stack([r.predictions for r in evaluated]).to(torch.int16)  # [models, N]
        names = ",".join(r.name for r in evaluated)
        atomic_write_bytes(out / "predictions.safetensors", save({"predictions": predictions}, {"models": names}))
    (out / "report.md").write_text(_report(selection, dataset, split, rows))
    _histogram(rows, out / "accuracy.png", f"{dataset}/{split}")
    return out


def _report(selection: Zoo, dataset: str, split: str, rows: list[dict]) -> str:
    lines = [
        f"# Evaluation of {selection.root} on {dataset}/{split}",
        "",
        f"{len(rows)} checkpoints, code {code_version()}.",
        "",
        "| stage | checkpoints | failed | min acc | median | mean | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for stage in dict.fromkeys(r["stage"] for r in rows):
        mine = [r for r in rows if r["stage"] == stage]
        accuracies = [r["accuracy"] for r in mine if r["error"] is None]
        failed = len(mine) - len(accuracies)
        if accuracies:
            lines.append(
                f"| {stage} | {len(mine)} | {failed} | {min(accuracies):.3f} | {statistics.median(accuracies):.3f} "
                f"| {statistics.mean(accuracies):.3f} | {max(accuracies):.3f} |"
            )
        else:
            lines.append(f"| {stage} | {len(mine)} | {failed} | | | | |")
    failures = [r for r in rows if r["error"] is not None]
    if failures:
        lines += ["", "## Failed", ""] + [f"- {r['model']}: {r['error']}" for r in failures]
    lines += ["", "![accuracy](accuracy.png)", ""]
    return "\n".join(lines)


def _histogram(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for stage in dict.fromkeys(r["stage"] for r in rows):
        accuracies = [r["accuracy"] for r in rows if r["stage"] == stage and r["error"] is None]
        axis.hist(accuracies, bins=20, range=(0, 1), alpha=0.6, label=f"{stage} ({len(accuracies)})")
    axis.set_xlabel("accuracy")
    axis.set_ylabel("checkpoints")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
