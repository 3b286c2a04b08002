"""Model soups over a zoo: weight averages chosen on validation, judged on test.

- Epoch soups: the uniform average of a fine-tuned model's last k checkpoints vs its last checkpoint (the ViT
  Model Zoo's finding: small but consistent gains). Every tensor is averaged (the zoo paper's helper averaged
  only keys containing "weight", leaving biases and embeddings out).
- Parent soups: per parent and head type, a uniform soup of all its fine-tunes and a greedy soup (Wortsman
  et al. 2022: models sorted by validation accuracy, each kept only if the soup's validation accuracy does not
  drop), both against the best single model picked on validation.
Selection uses the validation split only; test numbers are reported for what was picked. A model that cannot be
evaluated (NaN weights, an unreadable checkpoint) has no accuracy: it is left out of every soup and table, and the
reports count it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from vitzoo.errors import ConfigError
from vitzoo.eval.evaluation import evaluate
from vitzoo.eval.html import write_report
from vitzoo.zoo_builder.zoo import Zoo


def average(state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average of every tensor (float64 accumulation, float32 result)."""
    if not state_dicts:
        raise ValueError("nothing to average")
    return {k: torch.stack([sd[k].double() for sd in state_dicts]).mean(0).float() for k in state_dicts[0]}


@dataclass
class EpochSoup:
    model_id: str
    epochs: list[int]
    final_val: float | None  # None: could not be evaluated (`error` says why)
    final_test: float | None
    soup_val: float | None
    soup_test: float | None
    error: str | None = None

    @property
    def gain(self) -> float | None:
        return None if self.error is not None else self.soup_test - self.final_test


def epoch_soups(
    zoo: Zoo,
    dataset: str,
    k: int,
    num_heads: int,
    stage: str = "finetune",
    device: torch.device | str = "cpu",
    data_root: str | None = None,
    block: int = 32,
) -> list[EpochSoup]:
    """For every model of `stage` with at least k checkpoints: its last-k soup vs its last checkpoint
    (evaluated `block` models at a time, so a zoo of big models never sits in memory whole). A model whose last
    checkpoint or soup could not be evaluated keeps None accuracies and the evaluator's `error`."""
    candidates = []
    for model_id, record in zoo.records.items():
        epochs = [c["epoch"] for c in record["checkpoints"]][-k:]
        if record["stage"] == stage and record["status"] == "done" and len(epochs) == k:
            candidates.append((model_id, epochs))
    scores: dict[str, dict[str, float | None]] = {"val": {}, "test": {}}
    errors: dict[str, str] = {}
    for start in range(0, len(candidates), block):
        pairs = []
        for model_id, epochs in candidates[start : start + block]:
            entries = [zoo.filter(model_id=model_id, epoch=e)[0] for e in epochs]
            pairs.append((f"{model_id}:final", entries[-1].state_dict()))
            pairs.append((f"{model_id}:soup", average([e.state_dict() for e in entries])))
        for split in scores:
            results = evaluate(pairs, dataset, split, num_heads=num_heads, device=device, data_root=data_root)
            scores[split] |= {r.name: r.accuracy for r in results}
            errors |= {r.name.rsplit(":", 1)[0]: f"{r.name}: {r.error}" for r in results if r.error is not None}
    return [
        EpochSoup(
            model_id,
            epochs,
            scores["val"][f"{model_id}:final"],
            scores["test"][f"{model_id}:final"],
            scores["val"][f"{model_id}:soup"],
            scores["test"][f"{model_id}:soup"],
            errors.get(model_id),
        )  # fmt: skip
        for model_id, epochs in candidates
    ]


@dataclass
class ParentSoup:
    parent_id: str
    head: str
    models: int  # fine-tunes souped: those that could be evaluated on val
    best_single_test: float | None  # the fine-tune with the best validation accuracy; None: not evaluable on test
    uniform_test: float | None
    greedy_test: float | None
    greedy_size: int
    unevaluated: int = 0  # fine-tunes left out: they could not be evaluated


def parent_soups(
    zoo: Zoo, dataset: str, num_heads: int, device: torch.device | str = "cpu", data_root: str | None = None
) -> list[ParentSoup]:
    """Uniform and greedy soups of every parent's fine-tunes (per head type), vs the best single model on val.
    Fine-tunes without a validation accuracy (recorded or measured) are left out and counted."""
    last = zoo.filter(stage="finetune", epoch="last", status="done")
    groups: dict[tuple[str, str], list] = {}
    for entry in last:
        groups.setdefault((entry.parent_id, entry.factors["head"]), []).append(entry)
    soups = []
    for (parent_id, head), entries in groups.items():
        states = {e.model_id: e.state_dict() for e in entries}
        val = {e.model_id: e.metrics.get("val_acc") for e in entries}
        unrecorded = [m for m, accuracy in val.items() if accuracy is None]  # e.g. imported zoos: measure them
        if unrecorded:
            results = evaluate([(m, states[m]) for m in unrecorded], dataset, "val", num_heads=num_heads,
                               device=device, data_root=data_root)  # fmt: skip
            val |= {r.name: r.accuracy for r in results}
        entries = [e for e in entries if val[e.model_id] is not None]
        unevaluated = len(states) - len(entries)
        if not entries:
            soups.append(ParentSoup(parent_id, head, 0, None, None, None, 0, unevaluated))
            continue
        states = {e.model_id: states[e.model_id] for e in entries}
        ranked = sorted(entries, key=lambda e: val[e.model_id], reverse=True)
        greedy = [ranked[0].model_id]
        greedy_val = val[ranked[0].model_id]
        for entry in ranked[1:]:
            trial = average([states[m] for m in [*greedy, entry.model_id]])
            accuracy = evaluate([("trial", trial)], dataset, "val", num_heads=num_heads, device=device,
                                data_root=data_root)[0].accuracy  # fmt: skip
            if accuracy is not None and accuracy >= greedy_val:  # a soup that cannot be evaluated is not kept
                greedy, greedy_val = [*greedy, entry.model_id], accuracy
        pairs = [
            ("best", states[ranked[0].model_id]),
            ("uniform", average(list(states.values()))),
            ("greedy", average([states[m] for m in greedy])),
        ]
        results = evaluate(pairs, dataset, "test", num_heads=num_heads, device=device, data_root=data_root)
        test = {r.name: r.accuracy for r in results}
        soups.append(ParentSoup(parent_id, head, len(entries), test["best"], test["uniform"], test["greedy"],
                                len(greedy), unevaluated))  # fmt: skip
    return soups


def epoch_soup_table(soups: list[EpochSoup]) -> str:
    gains = [s.gain for s in soups if s.error is None]
    failed = len(soups) - len(gains)
    note = [f"\n{failed} model(s) could not be evaluated and are left out."] if failed else []
    if not gains:
        return f"No model could be evaluated ({failed} tried)."
    wins = sum(g > 0 for g in gains)
    ties = sum(g == 0 for g in gains)
    return "\n".join([
        "| models | mean gain (test acc) | median gain | models that gain | unchanged | lose |",
        "|---|---|---|---|---|---|",
        f"| {len(gains)} | {statistics.mean(gains):+.4f} | {statistics.median(gains):+.4f} | {wins / len(gains):.0%} "
        f"| {ties / len(gains):.0%} | {(len(gains) - wins - ties) / len(gains):.0%} |",
        *note,
    ])  # fmt: skip


def parent_soup_table(soups: list[ParentSoup]) -> str:
    def accuracy(value: float | None) -> str:
        return "not evaluable" if value is None else f"{value:.3f}"

    lines = ["| parent | head | models | best single (picked on val) | uniform soup | greedy soup (size) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for s in soups:
        left_out = f" ({s.unevaluated} not evaluable, left out)" if s.unevaluated else ""
        lines.append(f"| {s.parent_id} | {s.head} | {s.models}{left_out} | {accuracy(s.best_single_test)} "
                     f"| {accuracy(s.uniform_test)} | {accuracy(s.greedy_test)} ({s.greedy_size}) |")  # fmt: skip
    return "\n".join(lines)


def write_soups(
    zoo: Zoo,
    dataset: str,
    ks: list[int],
    parent: str | None,
    out,
    config: dict,
    device: torch.device | str = "cpu",
    data_root: str | None = None,
):
    """Run the epoch and parent soups and write results.json, report.md and gains.png into `out`."""
    from pathlib import Path

    from vitzoo.zoo_builder.zoo import atomic_write_json, code_version

    if parent is not None:
        if parent not in zoo.records:
            raise ConfigError(f"parent={parent}: no model {parent!r} in {zoo.root}")
        kept = {m for m, r in zoo.records.items() if r["parent_id"] == parent}
        zoo = Zoo(zoo.root, zoo.meta, {m: zoo.records[m] for m in kept}, [e for e in zoo if e.model_id in kept])
    num_heads = zoo.architecture.num_heads
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    epochs = {k: epoch_soups(zoo, dataset, k, num_heads, device=device, data_root=data_root) for k in ks}
    parents = parent_soups(zoo, dataset, num_heads, device, data_root)
    atomic_write_json(out / "results.json", {
        "zoo": str(zoo.root), "dataset": dataset, "config": config, "code_version": code_version(),
        "epoch_soups": {str(k): [vars(s) | {"gain": s.gain} for s in soups if s.error is None]
                        for k, soups in epochs.items()},
        "unevaluated": {str(k): [{"model_id": s.model_id, "error": s.error} for s in soups if s.error is not None]
                        for k, soups in epochs.items()},
        "parent_soups": [vars(s) for s in parents],
    })  # fmt: skip
    lines = [f"# Model soups of {zoo.root} on {dataset} (picked on val, reported on test)", ""]
    for k, soups in epochs.items():
        lines += [f"## Uniform soup of the last {k} epochs vs the last epoch", ""]
        lines += [epoch_soup_table(soups) if soups else f"(no model keeps {k} checkpoints)", ""]
    lines += ["## Soups of each parent's fine-tunes (per head type)", "", parent_soup_table(parents), "",
              "![gains](gains.png)", ""]  # fmt: skip
    gains = {k: [s.gain for s in soups if s.error is None] for k, soups in epochs.items()}
    _gains_plot({k: values for k, values in gains.items() if values}, out / "gains.png")
    write_report(out, "\n".join(lines))
    return out


def _gains_plot(gains: dict[int, list[float]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for k, values in gains.items():
        axis.hist(values, bins=30, alpha=0.6, label=f"last {k} epochs ({len(values)} models)")
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_xlabel("test accuracy gain of the epoch soup over the last epoch")
    axis.set_ylabel("models")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
