"""Leave-one-parent-out evaluation of the transfer generator (`vitzoo generalisation`), and its learning curve.

For each parent of the zoo, a generator trained without it (nothing of its fine-tunes reaches training) samples
its fine-tunes: `n` per cell of the zoo's grid (head seed x slot), from the exact start each real run had. Reported
per parent and overall (the mean over parents with a 95% bootstrap interval over parents, the unit held out):

- zero-shot test accuracy beside the references: the start w0; w0 plus the other parents' mean delta of the same
  slot and head seed; w0 plus only that delta's head part; a head fit (as the generator fits) on the probes' true
  labels, which the generator never sees; and the parent's real fine-tunes;
- test accuracy after 1..E epochs of fine-tuning from the samples and from w0 (one recipe, each model its own data
  order): how much training a sample saves;
- novelty against the training parents' fine-tunes (weight distance at their own scale, prediction agreement,
  copies), beside the same numbers for the parent's real fine-tunes.

The learning curve repeats the zero-shot measurement with generators trained on k randomly chosen other parents.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vitzoo.errors import ConfigError
from vitzoo.eval.evaluation import evaluate
from vitzoo.eval.finetune import FinetuneRecipe, finetune_curves
from vitzoo.eval.html import write_report
from vitzoo.eval.novelty import NoveltyReference, summarize
from vitzoo.generative.data import slot_of
from vitzoo.generative.transfer import (
    TransferConfig,
    fit_heads,
    fit_transfer,
    fitted_layer,
    head_inputs,
    probe_split,
    sample_transfer,
)
from vitzoo.zoo_builder.data import load_split
from vitzoo.zoo_builder.families import family_start, parent_states
from vitzoo.zoo_builder.zoo import Zoo, ZooError, atomic_write_json, code_version

StateDict = dict[str, torch.Tensor]
REFERENCES = ("start", "mean_delta", "head_delta", "labelled", "real")
LABELS = {
    "sample": "transfer samples",
    "start": "start w0",
    "mean_delta": "w0 + other parents' mean delta",
    "head_delta": "w0 + their mean head delta",
    "labelled": "head fit on labelled probes",
    "real": "the parent's real fine-tunes",
}
TRAINING_BUDGET_SECONDS = 15 * 60  # the bar for training one leave-one-parent-out generator on 2 CPU cores


@dataclass
class GeneralisationSettings:
    head: str = "linear"
    n: int = 1  # samples per (head seed, slot) cell
    sizes: list[int] = field(default_factory=lambda: [1, 3, 5])  # training parents for the learning curve
    recipe: FinetuneRecipe = field(default_factory=lambda: FinetuneRecipe(epochs=3))
    seed: int = 0
    resamples: int = 2000  # bootstrap resamples over parents
    device: str = "cpu"
    data_root: str | None = None


def leave_one_parent_out(zoo: Zoo, config: TransferConfig, settings: GeneralisationSettings, log=print) -> dict:
    """The leave-one-parent-out table and the learning curve (see module docstring) as one JSON-able dict."""
    if settings.n < 1:
        raise ConfigError(f"n must be >= 1, got {settings.n}")
    final = list(zoo.filter(stage="finetune", status="done", epoch="last", head=settings.head))
    parents = sorted({e.parent_id for e in final})
    if len(parents) < 2:
        raise ZooError(f"{zoo.root} has {len(parents)} parents of {settings.head}-head fine-tunes: holding one out "
                       "needs at least two")  # fmt: skip
    bad = [k for k in settings.sizes if not 1 <= k < len(parents) - 1]
    if bad:
        raise ConfigError(f"sizes {bad}: each must be in 1..{len(parents) - 2} (the full {len(parents) - 1} "
                          "training parents are the table itself)")  # fmt: skip
    dataset, num_heads = final[0].factors["dataset"], zoo.architecture.num_heads
    starts = parent_states(zoo, final)
    w0 = {(e.parent_id, e.factors["seed"]): family_start(zoo, e, starts) for e in final}  # one per family
    real = {e.model_id: e.state_dict() for e in final}
    _, probe_labels = probe_split(
        dataset, config.probes, config.seed, final[0].factors.get("classes"), settings.data_root
    )  # the labelled reference's; every generator has these probes
    timing = {"fit": [], "sample": 0.0, "evaluate": 0.0, "finetune": 0.0}

    log(f"leave-one-parent-out over {len(parents)} parents ({len(final)} {settings.head}-head fine-tunes)")
    models: dict[str, StateDict] = {}  # every model measured zero-shot, by name "<kind>/<parent>/<...>"
    samples_of: dict[str, list[str]] = {}
    for index, parent in enumerate(parents):
        started = time.perf_counter()
        generator = fit_transfer(zoo, config, settings.head, [parent], settings.data_root, settings.device)
        timing["fit"].append(time.perf_counter() - started)
        started = time.perf_counter()
        samples_of[parent] = _sample_cells(generator, final, parent, w0, settings, models, prefix="sample")
        _references(generator, final, parent, w0, real, probe_labels, models)
        timing["sample"] += time.perf_counter() - started
        log(f"  [{index + 1}/{len(parents)}] {parent}: generator fit in {timing['fit'][-1]:.1f} s")

    started = time.perf_counter()
    results = evaluate(list(models.items()), dataset, "test", num_heads=num_heads, device=settings.device,
                       data_root=settings.data_root)  # fmt: skip
    real_results = evaluate(list(real.items()), dataset, "test", num_heads=num_heads, device=settings.device,
                            data_root=settings.data_root)  # fmt: skip
    timing["evaluate"] += time.perf_counter() - started
    accuracy = {r.name: r.accuracy for r in results + real_results}
    predictions = {r.name: r.predictions for r in results + real_results}

    started = time.perf_counter()
    warm = [(name, models[name]) for parent in parents for name in samples_of[parent]]
    cold = [(name, state) for name, state in models.items() if name.startswith("start/")]
    log(f"fine-tuning {len(warm)} samples and {len(cold)} starts for {settings.recipe.epochs} epochs")
    curves = finetune_curves(warm + cold, zoo.architecture, dataset, settings.recipe, "test", settings.device,
                             settings.data_root)  # fmt: skip
    timing["finetune"] = time.perf_counter() - started

    _, labels = load_split(dataset, "test", settings.data_root)
    rows = []
    for parent in parents:
        own = [e.model_id for e in final if e.parent_id == parent]
        others = [e.model_id for e in final if e.parent_id != parent]
        reference = NoveltyReference([real[m] for m in others], torch.stack([predictions[m] for m in others]),
                                     labels, num_heads, align=False)  # fmt: skip
        names = samples_of[parent]
        novelty = summarize(reference.against([models[m] for m in names], torch.stack([predictions[m] for m in names])))
        real_novelty = summarize(reference.against([real[m] for m in own], torch.stack([predictions[m] for m in own])))
        row = {"parent": parent, "sample": _mean_interval([accuracy[m] for m in names])}
        for kind in REFERENCES:
            members = own if kind == "real" else [m for m in models if m.startswith(f"{kind}/{parent}/")]
            row[kind] = _mean_interval([accuracy[m] for m in members])
        starts_of = [m for m in models if m.startswith(f"start/{parent}/")]
        row["finetune"] = {
            "sample": [statistics.fmean(curves[m][e] for m in names) for e in range(settings.recipe.epochs + 1)],
            "start": [statistics.fmean(curves[m][e] for m in starts_of) for e in range(settings.recipe.epochs + 1)],
        }
        row["novelty"], row["real_novelty"] = novelty, real_novelty
        rows.append(row)

    overall = {kind: _bootstrap([r[kind]["mean"] for r in rows], settings.resamples, settings.seed)
               for kind in ("sample", *REFERENCES)}  # fmt: skip
    for which in ("sample", "start"):
        for epoch in range(1, settings.recipe.epochs + 1):
            overall[f"finetune_{which}_{epoch}"] = _bootstrap([r["finetune"][which][epoch] for r in rows],
                                                              settings.resamples, settings.seed)  # fmt: skip

    slots = []  # per slot over all parents: does a slot-conditioned sample behave like that slot's runs?
    for optimizer, lr in sorted({slot_of(e.factors) for e in final}):
        tag = f"/{optimizer}/{lr:g}/"
        drawn = [accuracy[m] for p in parents for m in samples_of[p] if tag in m]
        runs = [accuracy[e.model_id] for e in final if slot_of(e.factors) == (optimizer, lr)]
        if drawn:
            slots.append({"optimizer": optimizer, "lr": lr, "sample": statistics.fmean(drawn),
                          "real": statistics.fmean(runs)})  # fmt: skip

    curve = _learning_curve(zoo, config, final, parents, w0, settings, timing, log)
    curve.append({"parents": len(parents) - 1, **overall["sample"]})
    fits = timing.pop("fit")
    timing["fit_mean"], timing["fit_max"] = statistics.fmean(fits), max(fits)
    return {
        "zoo": str(zoo.root), "head": settings.head, "dataset": dataset, "n": settings.n,
        "config": config.to_dict(), "recipe": vars(settings.recipe), "code_version": code_version(),
        "parents": rows, "overall": overall, "slots": slots, "curve": curve, "timing": timing,
        "bars": _bars(overall, settings.recipe.epochs, timing),
    }  # fmt: skip


def _sample_cells(generator, final, parent, w0, settings, models, prefix) -> list[str]:
    """Samples of the parent's every (head seed, slot) cell, from that cell's start; returns their names."""
    names = []
    parent_state = {k: v for k, v in w0[next(key for key in w0 if key[0] == parent)].items()
                    if not k.startswith("head.")}  # fmt: skip
    cells = sorted({(e.factors["seed"], slot_of(e.factors)) for e in final if e.parent_id == parent})
    for i, (head_seed, (optimizer, lr)) in enumerate(cells):
        if (optimizer, lr) not in generator.slots:
            continue  # a slot no training parent ran
        drawn = sample_transfer(generator, parent_state, parent, settings.n, seed=settings.seed * 100003 + i,
                                head_seed=head_seed, optimizer=optimizer, lr=lr)  # fmt: skip
        for j, (state, _, _) in enumerate(drawn):
            name = f"{prefix}/{parent}/{head_seed}/{optimizer}/{lr:g}/{j}"
            models[name] = state
            names.append(name)
    return names


def _references(generator, final, parent, w0, real, probe_labels, models) -> None:
    """The non-learned references of one held-out parent (see module docstring), added to `models` by name;
    `probe_labels` [N]: the true labels of the generator's probes."""
    training = [e for e in final if e.parent_id in set(generator.parents)]
    layer = fitted_layer(generator)
    onehot = torch.nn.functional.one_hot(probe_labels, generator.num_classes).double()[None]  # [1, N, C]
    for head_seed in sorted({e.factors["seed"] for e in final if e.parent_id == parent}):
        start = w0[(parent, head_seed)]
        models[f"start/{parent}/{head_seed}"] = start
        weight, bias = fit_heads(head_inputs(generator, start, generator.probes), onehot, start[f"{layer}.weight"],
                                 start[f"{layer}.bias"], generator.config.ridge)  # fmt: skip
        models[f"labelled/{parent}/{head_seed}"] = start | {f"{layer}.weight": weight[0].float(),
                                                            f"{layer}.bias": bias[0].float()}  # fmt: skip
        for optimizer, lr in generator.slots:
            cell = [e for e in training if e.factors["seed"] == head_seed and slot_of(e.factors) == (optimizer, lr)]
            if not cell:
                continue
            delta = {k: torch.stack([real[e.model_id][k] - w0[(e.parent_id, head_seed)][k] for e in cell]).mean(0)
                     for k in start}  # fmt: skip
            models[f"mean_delta/{parent}/{head_seed}/{optimizer}/{lr:g}"] = {k: start[k] + delta[k] for k in start}
            models[f"head_delta/{parent}/{head_seed}/{optimizer}/{lr:g}"] = {
                k: start[k] + delta[k] if k.startswith("head.") else start[k] for k in start
            }


def _learning_curve(zoo, config, final, parents, w0, settings, timing, log) -> list[dict]:
    """Zero-shot accuracy on each held-out parent of generators trained on k random other parents."""
    curve = []
    for k in settings.sizes:
        models: dict[str, StateDict] = {}
        names_of = {}
        for parent in parents:
            others = [p for p in parents if p != parent]
            chosen = random.Random(f"{settings.seed}/{parent}/{k}").sample(others, k)
            started = time.perf_counter()
            generator = fit_transfer(zoo, config, settings.head, [p for p in parents if p not in chosen],
                                     settings.data_root, settings.device)  # fmt: skip
            timing["fit"].append(time.perf_counter() - started)
            names_of[parent] = _sample_cells(generator, final, parent, w0, settings, models, prefix=f"k{k}")
        started = time.perf_counter()
        results = evaluate(list(models.items()), final[0].factors["dataset"], "test",
                           num_heads=zoo.architecture.num_heads, device=settings.device,
                           data_root=settings.data_root)  # fmt: skip
        timing["evaluate"] += time.perf_counter() - started
        accuracy = {r.name: r.accuracy for r in results}
        means = [statistics.fmean(accuracy[m] for m in names_of[p]) for p in parents]
        curve.append({"parents": k, **_bootstrap(means, settings.resamples, settings.seed)})
        log(f"learning curve: {k} training parents -> {curve[-1]['mean']:.3f}")
    return curve


def _mean_interval(values: list[float]) -> dict:
    """Mean and a normal 95% interval over the values (one parent's models)."""
    mean = statistics.fmean(values)
    half = 1.96 * statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(values)}


def _bootstrap(values: list[float], resamples: int, seed: int) -> dict:
    """Mean and the 95% percentile bootstrap interval of the mean (resampling the values: one per parent)."""
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    low, high = means[int(0.025 * resamples)], means[min(int(0.975 * resamples), resamples - 1)]
    return {"mean": statistics.fmean(values), "low": low, "high": high, "n": len(values)}


def _bars(overall: dict, epochs: int, timing: dict) -> dict:
    """The issue's bars, each with whether the measurement meets it."""
    sample = overall["sample"]
    bars = {f"above {kind}": sample["low"] > overall[kind]["high"] for kind in ("start", "mean_delta", "head_delta")}
    bars["0.5x real fine-tunes"] = sample["mean"] >= 0.5 * overall["real"]["mean"]
    if epochs >= 1:
        bars["1 epoch: above w0's"] = overall["finetune_sample_1"]["low"] > overall["finetune_start_1"]["high"]
    bars["generator trains within 15 min"] = timing["fit_max"] <= TRAINING_BUDGET_SECONDS
    return bars


def write_generalisation(report: dict, out: Path) -> Path:
    """report.json, report.md (the tables) and learning_curve.png into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", report)
    _plot(report, out / "learning_curve.png")
    return write_report(out, "\n".join(report_lines(report)) + "\n")


def report_lines(report: dict) -> list[str]:
    overall, epochs = report["overall"], report["recipe"]["epochs"]
    ratio = overall["sample"]["mean"] / overall["real"]["mean"]
    lines = [
        f"# Leave-one-parent-out: {report['head']}-head fine-tunes of {report['zoo']} ({report['dataset']} test)",
        "",
        f"{len(report['parents'])} parents, each held out of its own generator; {report['n']} sample(s) per "
        f"(head seed, slot) cell. Overall: mean over parents [95% bootstrap interval over parents]. Samples reach "
        f"{ratio:.2f}x the held-out parents' real fine-tunes.",
        "",
        "| start for a held-out parent's fine-tune | zero-shot test acc |",
        "|---|---|",
    ]
    lines += [f"| {LABELS[kind]} | {_fmt(overall[kind])} |" for kind in ("sample", *REFERENCES)]
    lines += ["", f"Fine-tuning from the samples and from w0 ({_recipe(report['recipe'])}), test accuracy:", "",
              "| epochs | from samples | from w0 |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {e} | {_fmt(overall[f'finetune_sample_{e}'])} | {_fmt(overall[f'finetune_start_{e}'])} |"
              for e in range(1, epochs + 1)]  # fmt: skip
    lines += ["", "Per fine-tuning slot (mean over all held-out parents; the samples of a slot fit that slot's mean "
              "probe logits):", "", "| optimizer | lr | samples | real fine-tunes |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {s['optimizer']} | {s['lr']:g} | {s['sample']:.3f} | {s['real']:.3f} |" for s in report["slots"]]
    lines += ["", "Per parent (mean [95% interval over its samples]); novelty against the other parents' fine-tunes: "
              "median relative distance, median prediction agreement with the nearest, copies (real fine-tunes of the "
              "parent in brackets):", "",
              "| parent | samples | w0 | mean delta | labelled probes | real | rel. distance | agreement | copies |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in report["parents"]:
        novelty, real = row["novelty"], row["real_novelty"]
        lines.append(
            f"| {row['parent']} | {_fmt(row['sample'])} | {row['start']['mean']:.3f} | {row['mean_delta']['mean']:.3f} "
            f"| {row['labelled']['mean']:.3f} | {row['real']['mean']:.3f} | {novelty['median_relative_distance']:.2f} "
            f"({real['median_relative_distance']:.2f}) | {novelty['median_agreement']:.2f} "
            f"({real['median_agreement']:.2f}) | {novelty['copies']:.0%} ({real['copies']:.0%}) |"
        )
    lines += ["", "Learning curve (zero-shot on the held-out parent; generators trained on k other parents):", "",
              "| training parents | zero-shot test acc |", "|---|---|"]  # fmt: skip
    lines += [f"| {point['parents']} | {_fmt(point)} |" for point in report["curve"]]
    timing = report["timing"]
    lines += ["", "Bars: " + "; ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in report["bars"].items()),
              "", f"Time: a generator trains in {timing['fit_mean']:.1f} s (at most {timing['fit_max']:.1f} s); "
              f"sampling and references {timing['sample']:.0f} s, evaluation {timing['evaluate']:.0f} s, fine-tuning "
              f"{timing['finetune']:.0f} s. Code {report['code_version']}.", "",
              "![learning curve](learning_curve.png)"]  # fmt: skip
    return lines


def _fmt(stat: dict) -> str:
    return f"{stat['mean']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]"


def _recipe(recipe: dict) -> str:
    return f"{recipe['optimizer']} lr {recipe['lr']:g}, batch {recipe['batch_size']}"


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curve_axis, parent_axis) = plt.subplots(1, 2, figsize=(11, 4))
    points = report["curve"]
    ks = [p["parents"] for p in points]
    errors = [[p["mean"] - p["low"] for p in points], [p["high"] - p["mean"] for p in points]]
    curve_axis.errorbar(ks, [p["mean"] for p in points], yerr=errors, marker="o", capsize=3, label=LABELS["sample"])
    for kind, style in (("real", "-"), ("labelled", "--"), ("start", ":")):
        curve_axis.axhline(report["overall"][kind]["mean"], linestyle=style, color="grey", label=LABELS[kind])
    curve_axis.set(xlabel="training parents", ylabel="zero-shot test accuracy", title="held-out parent", ylim=(0, 1))
    curve_axis.legend(fontsize=7)
    rows = report["parents"]
    x = range(len(rows))
    parent_axis.bar([i - 0.2 for i in x], [r["sample"]["mean"] for r in rows], 0.4, label=LABELS["sample"])
    parent_axis.bar([i + 0.2 for i in x], [r["real"]["mean"] for r in rows], 0.4, label=LABELS["real"])
    parent_axis.set_xticks(list(x), [r["parent"][-6:] for r in rows], rotation=45, fontsize=7)
    parent_axis.set(ylabel="zero-shot test accuracy", title="per held-out parent", ylim=(0, 1))
    parent_axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
