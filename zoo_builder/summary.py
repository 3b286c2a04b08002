"""Accuracy spread of a zoo's final models, per parent and per generating factor, as Markdown tables.

vitzoo summary bundled          # prints the tables (the bundled zoo's SUMMARY.md)
"""

from __future__ import annotations

import statistics

from vitzoo.zoo_builder.zoo import Zoo

FACTORS = ("head", "optimizer", "lr", "seed")


def final_accuracies(zoo: Zoo, stage: str, metric: str = "test_acc") -> dict[str, float]:
    """model_id -> the metric at the model's last recorded epoch, for finished models of one stage."""
    values = {}
    for model_id, record in zoo.records.items():
        if record["stage"] == stage and record["status"] == "done" and record["history"]:
            value = record["history"][-1].get(metric)
            if value is not None:
                values[model_id] = value
    return values


def _row(label: str, values: list[float]) -> str:
    return (
        f"| {label} | {len(values)} | {min(values):.3f} | {statistics.median(values):.3f} | {max(values):.3f} "
        f"| {statistics.mean(values):.3f} |"
    )


def spread_tables(zoo: Zoo, metric: str = "test_acc") -> str:
    """Markdown: the pre-trained parents, then fine-tuned accuracy per parent and per factor value."""
    header = f"| group | models | min {metric} | median | max | mean |\n|---|---|---|---|---|---|"
    lines = []
    parents = final_accuracies(zoo, "pretrain", metric)
    contrastive_metric = "val_acc" if metric == "test_acc" else metric
    if parents:
        lines += [
            "### Pre-trained parents",
            "",
            "| parent | objective | seed | test_acc | val_acc |",
            "|---|---|---|---|---|",
        ]
        for model_id, record in zoo.records.items():
            if record["stage"] == "pretrain" and record["history"]:
                last = record["history"][-1]
                lines.append(
                    f"| {model_id} | {record['factors']['objective']} | {record['factors']['seed']} "
                    f"| {last.get('test_acc', float('nan')):.3f} | {last.get(contrastive_metric, float('nan')):.3f} |"
                )
        lines.append("")
        lines.append("(contrastive parents: accuracy of finding the other view of an image among the batch)")
        lines.append("")
    children = final_accuracies(zoo, "finetune", metric)
    if not children:
        return "\n".join(lines)
    lines += ["### Fine-tuned models per parent", "", header]
    lines.append(_row("all", list(children.values())))
    for parent_id in dict.fromkeys(zoo.records[m]["parent_id"] for m in children):
        objective = zoo.records[parent_id]["factors"]["objective"] if parent_id in zoo.records else "?"
        values = [v for m, v in children.items() if zoo.records[m]["parent_id"] == parent_id]
        lines.append(_row(f"{parent_id} ({objective})", values))
    lines += ["", "### Fine-tuned models per factor", "", header]
    for factor in FACTORS:
        for value in sorted({zoo.records[m]["factors"][factor] for m in children}, key=str):
            values = [v for m, v in children.items() if zoo.records[m]["factors"][factor] == value]
            lines.append(_row(f"{factor}={value}", values))
    for optimizer in sorted({zoo.records[m]["factors"]["optimizer"] for m in children}):
        for lr in sorted({zoo.records[m]["factors"]["lr"] for m in children}):
            values = [
                v
                for m, v in children.items()
                if zoo.records[m]["factors"]["optimizer"] == optimizer and zoo.records[m]["factors"]["lr"] == lr
            ]
            if values:
                lines.append(_row(f"{optimizer}, lr={lr}", values))
    return "\n".join(lines)
