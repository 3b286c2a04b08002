"""A sampled population judged against the zoo it came from: accuracy, novelty and baselines in one table.

`compare(samples, reference)` evaluates, on one split, the reference zoo's models, every sampling method found
in the samples (`.factors["method"]`, e.g. diffusion, kde; conditioned draws form their own population) and
the baselines of `zoo_builder.baselines` built for the same head structures (random init, per-parameter Gaussian, each
sample's nearest zoo model plus noise at the sample's own distance); measures novelty (`eval.novelty`) of every
population against the zoo; and, with a fine-tuning recipe, the accuracy after 0..E epochs of fine-tuning of
samples, random init and zoo models.
`write_comparison` writes results.json, report.md and the plots. Nothing here selects models, so the test
split may be used; anything that selects uses validation (see eval.soups).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from vitzoo.eval.evaluation import evaluate
from vitzoo.eval.finetune import FinetuneRecipe, finetune_curves
from vitzoo.eval.html import write_report
from vitzoo.eval.novelty import COPY_RATIO, NoveltyReference, shared_keys, summarize
from vitzoo.zoo_builder.baselines import gaussian, noise_around, random_init
from vitzoo.zoo_builder.data import load_split
from vitzoo.zoo_builder.families import family_starts
from vitzoo.zoo_builder.zoo import Zoo, atomic_write_json, code_version

ZOO, RANDOM, GAUSSIAN, NOISE = "zoo", "random init", "gaussian", "zoo + noise"


def compare(
    samples: Zoo,
    reference: Zoo,
    dataset: str | None = None,
    split: str = "test",
    seed: int = 0,
    align: bool = True,
    baselines: bool = True,
    finetune: FinetuneRecipe | None = None,
    device: torch.device | str = "cpu",
    data_root: str | None = None,
    progress: bool = False,
    **eval_options,
) -> dict:
    """Every population's per-model numbers and summary rows (see module docstring)."""
    dataset = dataset or samples.dataset
    num_heads = reference.architecture.num_heads
    _, labels = load_split(dataset, split, data_root)
    started = time.perf_counter()
    populations: dict[str, list[dict]] = {ZOO: _members(reference, ZOO)}
    for member in _members(samples, None):
        populations.setdefault(member["population"], []).append(member)
    timings = {}

    def run(names: list[str]) -> None:
        """Evaluate the listed populations (one batched call), recording time per population."""
        for name in names:
            for member in populations[name]:
                if member.get("load_error"):
                    member.update(accuracy=None, loss=None, error=member["load_error"], predictions=None)
        pairs = [(m["name"], m["state_dict"]) for name in names for m in populations[name] if not m.get("load_error")]
        tic = time.perf_counter()
        results = evaluate(pairs, dataset, split, num_heads=num_heads, device=device, data_root=data_root,
                           progress=progress, **eval_options)  # fmt: skip
        by_name = {r.name: r for r in results}
        for name in names:
            timings[name] = timings.get(name, 0.0) + (time.perf_counter() - tic) * len(populations[name]) / len(pairs)
            for member in populations[name]:
                if member.get("load_error"):
                    continue
                result = by_name[member["name"]]
                member.update(accuracy=result.accuracy, loss=result.loss, error=result.error)
                member["predictions"] = result.predictions

    run(list(populations))
    zoo_ok = [m for m in populations[ZOO] if m["error"] is None]
    novelty = NoveltyReference(
        [m["state_dict"] for m in zoo_ok], torch.stack([m["predictions"] for m in zoo_ok]), labels, num_heads, align,
        families=family_starts(reference, [m["entry"] for m in zoo_ok]),
    )  # fmt: skip
    for member, row in zip(zoo_ok, novelty.rows):
        member["novelty"] = row | {"nearest": zoo_ok[row["nearest"]]["name"]}
    sampled = [name for name in populations if name != ZOO]
    _measure_novelty(populations, sampled, zoo_ok, novelty)
    if baselines and sampled:
        built = _baselines(populations, sampled, zoo_ok, novelty, samples, seed)
        populations.update(built)
        run(list(built))
        _measure_novelty(populations, list(built), zoo_ok, novelty)
    if finetune is not None and finetune.epochs > 0:
        tuned = [name for name in populations if name in (ZOO, RANDOM) or name in samples_methods(samples)]
        pairs = [(m["name"], m["state_dict"]) for name in tuned for m in populations[name] if m["error"] is None]
        curves = finetune_curves(pairs, samples.architecture, dataset, finetune, split, device, data_root)
        for name in tuned:
            for member in populations[name]:
                member["finetune"] = curves.get(member["name"])
    _embed(populations, [ZOO, *sampled], seed)
    rows = [_summary_row(name, members, timings.get(name)) for name, members in populations.items()]
    return {
        "samples": str(samples.root),
        "zoo": str(reference.root),
        "dataset": dataset,
        "split": split,
        "seed": seed,
        "metric": novelty.metric,
        "copy_ratio": COPY_RATIO,
        "spans": novelty.spans is not None,
        "finetune": None if finetune is None else vars(finetune),
        "code_version": code_version(),
        "seconds": time.perf_counter() - started,
        "rows": rows,
        "models": [_public(m) for members in populations.values() for m in members],
    }


def samples_methods(samples: Zoo) -> list[str]:
    return list(dict.fromkeys(_method(e) for e in samples))


def _method(entry) -> str:
    """The population of a sampled model: its method, and whether it was drawn under a condition."""
    method = str(entry.factors.get("method", entry.stage))
    conditioned = any(entry.factors.get(key) is not None for key in ("target_acc", "optimizer"))
    return f"{method} (conditioned)" if conditioned else method


def _members(zoo: Zoo, population: str | None) -> list[dict]:
    members = []
    for entry in zoo:
        try:
            state_dict = entry.state_dict()
        except Exception as error:  # reported as this model's failure, like the evaluator does
            state_dict, problem = {}, str(error)
        else:
            problem = None
        members.append({
            "population": population or _method(entry),
            "name": f"{entry.model_id}@{entry.epoch}" if population == ZOO else entry.model_id,
            "state_dict": state_dict,
            "head": entry.head,
            "entry": entry,
            "load_error": problem,
        })  # fmt: skip
    return members


def _measure_novelty(populations: dict, names: list[str], zoo_ok: list[dict], novelty: NoveltyReference) -> None:
    """Set `member["novelty"]` (nearest zoo model by name) for every evaluated member of the named populations."""
    for name in names:
        ok = [m for m in populations[name] if m["error"] is None]
        predictions = torch.stack([m["predictions"] for m in ok]) if ok else None
        for member, row in zip(ok, novelty.against([m["state_dict"] for m in ok], predictions)):
            member["novelty"] = row | {"nearest": zoo_ok[row["nearest"]]["name"]}


def _baselines(populations, sampled, zoo_ok, novelty, samples: Zoo, seed: int) -> dict[str, list[dict]]:
    """Random init and Gaussian with the first method's head structures, and zoo + noise per method."""
    first = [m for m in populations[sampled[0]] if m["error"] is None]
    built: dict[str, list[dict]] = {RANDOM: [], GAUSSIAN: []}
    heads = [m["head"] for m in first]
    for i, head in enumerate(heads):
        (state_dict,) = random_init(samples.architecture, head, 1, seed + i)
        built[RANDOM].append({"population": RANDOM, "name": f"random-{i:05d}", "state_dict": state_dict, "head": head})
    for key in dict.fromkeys(tuple(sorted(h.items())) for h in heads):
        same = [m["state_dict"] for m in zoo_ok if tuple(sorted(m["head"].items())) == key]
        wanted = [i for i, h in enumerate(heads) if tuple(sorted(h.items())) == key]
        if len(same) < 2:
            continue  # a Gaussian needs two zoo models of this head structure
        for i, state_dict in zip(wanted, gaussian(same, len(wanted), seed + 1)):
            built[GAUSSIAN].append({"population": GAUSSIAN, "name": f"gaussian-{i:05d}", "state_dict": state_dict,
                                    "head": dict(key)})  # fmt: skip
    for name in sampled:
        rows = [m["novelty"] for m in populations[name] if "novelty" in m]  # measured once, by _measure_novelty
        by_name = {m["name"]: m for m in zoo_ok}
        anchors = [by_name[r["nearest"]] for r in rows]
        distances = [r["aligned_distance"] if r["aligned_distance"] is not None else r["distance"] for r in rows]
        noisy = noise_around([a["state_dict"] for a in anchors], distances, novelty.keys, seed + 2)
        label = NOISE if len(sampled) == 1 else f"{NOISE} ({name})"
        built[label] = [
            {"population": label, "name": f"noise-{name}-{i:05d}", "state_dict": state_dict, "head": anchor["head"]}
            for i, (state_dict, anchor) in enumerate(zip(noisy, anchors))
        ]
    return {name: members for name, members in built.items() if members}


def _summary_row(name: str, members: list[dict], seconds: float | None) -> dict:
    accuracies = [m["accuracy"] for m in members if m.get("error") is None and m.get("accuracy") is not None]
    novelty = summarize([m["novelty"] for m in members if "novelty" in m])
    row = {
        "population": name,
        "n": len(members),
        "failed": len(members) - len(accuracies),
        "mean_acc": statistics.mean(accuracies) if accuracies else None,
        "median_acc": statistics.median(accuracies) if accuracies else None,
        "max_acc": max(accuracies) if accuracies else None,
        "copies": novelty.get("copies"),
        "median_nn_distance": novelty.get("median_aligned_distance") or novelty.get("median_distance"),
        "median_raw_distance": novelty.get("median_distance"),
        "median_relative_distance": novelty.get("median_relative_distance"),
        "median_agreement": novelty.get("median_agreement"),
        "median_error_iou": novelty.get("median_error_iou"),
        "median_span_distance": novelty.get("median_span_distance"),
        "seconds": seconds,
    }
    curves = [m["finetune"] for m in members if m.get("finetune")]
    if curves:
        row["finetune_mean_acc"] = [statistics.mean(c[e] for c in curves) for e in range(len(curves[0]))]
    return row


EMBEDDING_COORDINATES = 100_000  # weights per model the embedding reads (a fixed random subset of larger models)


def _embed(populations: dict, names: list[str], seed: int) -> None:
    """Set `member["embedding"]` = [x, y] for every evaluated member of the named populations: their first two
    principal components, fitted jointly on all of them (the zoo and every sampled population; the random-init
    and Gaussian baselines lie ~15x farther away and would squash the picture). Raw weights, no alignment. Also
    `member["tsne"]`: scikit-learn's t-SNE of their top 50 principal components (neighbourhoods, not distances)."""
    members = [m for name in names for m in populations[name] if m.get("error") is None]
    keys = shared_keys([m["state_dict"] for m in members])
    size = sum(members[0]["state_dict"][k].numel() for k in keys)
    chosen = None
    if size > EMBEDDING_COORDINATES:
        chosen = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:EMBEDDING_COORDINATES]
    rows = []
    for member in members:
        flat = torch.cat([member["state_dict"][k].double().flatten() for k in keys])
        rows.append(flat if chosen is None else flat[chosen])
    weights = torch.stack(rows)  # [models, P]
    centred = weights - weights.mean(dim=0)
    _, _, directions = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ directions[:50].T  # [models, <=50]
    for member, point in zip(members, projected[:, :2].tolist()):
        member["embedding"] = point
    if len(members) >= 5:
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (len(members) - 1) / 3)
        tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(projected.numpy())
        for member, point in zip(members, tsne.tolist()):
            member["tsne"] = point


def _public(member: dict) -> dict:
    return {k: v for k, v in member.items() if k not in ("state_dict", "predictions", "entry", "load_error")}


# --------------------------------------------------------------------------------------------- report

COLUMNS = [
    ("n", "n", "{}"),
    ("failed", "failed", "{}"),
    ("mean_acc", "mean acc", "{:.3f}"),
    ("median_acc", "median", "{:.3f}"),
    ("max_acc", "max", "{:.3f}"),
    ("copies", "copies", "{:.0%}"),
    ("median_nn_distance", "median NN dist", "{:.2f}"),
    ("median_relative_distance", "NN dist / NN's own", "{:.2f}"),
    ("median_agreement", "agreement w/ NN", "{:.3f}"),
    ("median_error_iou", "error IoU w/ NN", "{:.3f}"),
    ("median_span_distance", "span dist", "{:.2f}"),
]


def table(rows: list[dict]) -> list[str]:
    """The summary as markdown table lines."""
    epochs = max((len(r.get("finetune_mean_acc") or []) for r in rows), default=0)
    header = ["population", *[title for _, title, _ in COLUMNS], *[f"FT ep {e}" for e in range(1, epochs)]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["population"]]
        cells += ["" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in COLUMNS]
        curve = row.get("finetune_mean_acc") or []
        cells += [f"{curve[e]:.3f}" if e < len(curve) else "" for e in range(1, epochs)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_comparison(comparison: dict, out: Path, config: dict | None = None) -> Path:
    """results.json, report.md, accuracy.png, novelty.png, embedding.png (and finetune.png) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", {**comparison, "config": config})
    _plots(comparison, out)
    metric = comparison["metric"]
    lines = [
        f"# Samples {comparison['samples']} against zoo {comparison['zoo']}",
        "",
        f"Split {comparison['dataset']}/{comparison['split']}, seed {comparison['seed']}, code "
        f"{comparison['code_version']}, {comparison['seconds']:.0f} s.",
        "",
        *table(comparison["rows"]),
        "",
        f"Distances: L2 over the flattened weights every zoo model shares, {metric} "
        f"({'after permuting heads and MLP units to the nearest model' if metric == 'aligned' else 'no alignment'}"
        f"). NN: the nearest zoo model (for zoo models: the nearest other one). NN dist / NN's own: the distance "
        f"to a zoo model over that model's distance to its own nearest neighbour (minimum over zoo models; >= 1 "
        f"for the zoo itself). A copy lies below {comparison['copy_ratio']} of that scale from a zoo model and "
        f"agrees with it at least as much as that model agrees with its own nearest neighbour. Agreement: share "
        f"of {comparison['split']} examples with the same prediction as the NN; error IoU: overlap of their "
        f"misclassified examples. Span dist: distance to the nearest family's affine span (its start plus any "
        f"combination of its runs' deltas; for zoo runs: the span of their family's other runs)"
        f"{'' if comparison['spans'] else ', not available (a family start is unknown)'}. Baselines: random "
        f"init (timm), per-parameter Gaussian fitted to the zoo, and each sample's NN plus isotropic noise at "
        f"the sample's own NN distance.",
        "",
        "![accuracy](accuracy.png)",
        "",
        "![novelty](novelty.png)",
        "",
        "![weight space](embedding.png)",
        "",
    ]
    if comparison["finetune"]:
        recipe = comparison["finetune"]
        lines += [
            f"Fine-tuning: {recipe['epochs']} epoch(s), {recipe['optimizer']} lr {recipe['lr']}, batch "
            f"{recipe['batch_size']}, every model from its own weights with the same recipe.",
            "",
            "![fine-tuning](finetune.png)",
            "",
        ]
    failures = [m for m in comparison["models"] if m.get("error")]
    if failures:
        lines += ["## Failed", ""] + [f"- {m['population']} {m['name']}: {m['error']}" for m in failures] + [""]
    write_report(out, "\n".join(lines))
    return out


def _plots(comparison: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["population"] for r in comparison["rows"]]
    by_population = {name: [m for m in comparison["models"] if m["population"] == name] for name in names}
    figure, axis = plt.subplots(figsize=(7, 3.8))
    for name in names:
        accuracies = [m["accuracy"] for m in by_population[name] if m.get("accuracy") is not None]
        if accuracies:
            axis.hist(accuracies, bins=25, range=(0, 1), alpha=0.5, label=f"{name} ({len(accuracies)})")
    axis.set_xlabel(f"{comparison['split']} accuracy")
    axis.set_ylabel("models")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "accuracy.png", dpi=100)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4))
    for name in names:
        points = [(m["novelty"]["relative_distance"], m["accuracy"])
                  for m in by_population[name] if m.get("novelty") and m.get("accuracy") is not None]  # fmt: skip
        if points:
            axis.scatter(*zip(*points), s=12, alpha=0.7, label=name)
    axis.axvline(comparison["copy_ratio"], color="k", linestyle=":", linewidth=1, label="copy scale")
    axis.set_xscale("log")
    axis.set_xlabel(f"distance to a zoo model / its distance to its nearest neighbour ({comparison['metric']})")
    axis.set_ylabel(f"{comparison['split']} accuracy")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "novelty.png", dpi=100)
    plt.close(figure)

    embedded = {name: [m for m in by_population[name] if m.get("embedding")] for name in names}
    if any(embedded.values()):
        views = [("embedding", "weight-space PCA", "PC")] + [("tsne", "t-SNE of the weights", "t-SNE")] * any(
            m.get("tsne") for members in embedded.values() for m in members
        )
        figure, axes = plt.subplots(len(views), 2, figsize=(12, 5 * len(views)), squeeze=False)
        for (key, view, axis_name), (left, right) in zip(views, axes):
            for name, members in embedded.items():
                if members:
                    x, y = zip(*(m[key] for m in members))
                    left.scatter(x, y, s=30 if name == ZOO else 10, alpha=0.8 if name == ZOO else 0.5, label=name,
                                 marker="s" if name == ZOO else "o", color="k" if name == ZOO else None)  # fmt: skip
            everyone = [m for members in embedded.values() for m in members if m.get("accuracy") is not None]
            x, y = zip(*(m[key] for m in everyone))
            points = right.scatter(x, y, s=10, c=[m["accuracy"] for m in everyone], cmap="viridis", vmin=0, vmax=1)
            figure.colorbar(points, ax=right, label=f"{comparison['split']} accuracy")
            for axis, title in ((left, "population"), (right, "accuracy")):
                axis.set_xlabel(f"{axis_name} 1")
                axis.set_ylabel(f"{axis_name} 2")
                axis.set_title(f"zoo and samples in one {view}, by {title}")
            left.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out / "embedding.png", dpi=100)
        plt.close(figure)

    curves = {r["population"]: r["finetune_mean_acc"] for r in comparison["rows"] if r.get("finetune_mean_acc")}
    if curves:
        figure, axis = plt.subplots(figsize=(6, 3.8))
        for name, curve in curves.items():
            axis.plot(range(len(curve)), curve, marker="o", label=name)
        axis.set_xlabel("fine-tuning epochs")
        axis.set_ylabel(f"mean {comparison['split']} accuracy")
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(out / "finetune.png", dpi=100)
        plt.close(figure)
