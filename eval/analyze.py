"""`vitzoo analyze`: how diverse a zoo is, in weight space and in behaviour.

Over a selection of checkpoints (by default every model's last epoch), ordered by parent and then by the
generating factors (`analysis_order`), it measures:

- weight space: pairwise L2 and cosine distances of the flattened weights, for the whole model and per tensor,
  a PCA (and t-SNE) embedding, and per-tensor weight statistics over the population. Models with different
  heads (linear vs MLP, 10 classes vs a 32-d contrastive projection) cannot share one flat vector, so the
  whole-model vector is the *body*: the tensors every selected model has with equal shapes (`common_tensors`;
  for the bundled zoo every tensor but `head.*`). The statistics table covers every tensor, per shape.
- behaviour: pairwise prediction agreement on the split (the fraction of examples on which two models predict
  the same class), each model evaluated on its own dataset (`factors["dataset"]`: pre-trained parents on
  Fashion-MNIST, fine-tunes on digits) unless one dataset is forced; pairs on different datasets and models
  whose head does not match the dataset's classes (contrastive parents) have no agreement (NaN). Linear CKA
  (Kornblith et al. 2019) between the pre-logit features (the pooled, normalised CLS token that enters the
  head) of every pair of models on one fixed batch: the first `cka_batch` images of the split of one dataset
  (the forced one, else the selection's only dataset, else the zoo's), so parents and fine-tunes compare.
- generating factors: the indexed accuracy and loss per value of every factor that varies within a stage.

Summaries split pairs by kind: siblings (fine-tunes of one parent), parent-child, across parents, and checkpoints
of the same model (with `epoch=all`). A model with non-finite weights or features gets NaN rows; summaries use
the finite pairs. Outputs (`write_analysis`): report.md, results.json, matrices.safetensors (every [m, m]
matrix in the order of results.json's `models`) and PNG plots.

Shapes: m models, P parameters, b batch, d feature width, N examples, C classes.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from vitzoo.errors import ConfigError
from vitzoo.eval.html import write_report
from vitzoo.zoo_builder.zoo import Zoo, ZooEntry

KINDS = ("same model", "siblings", "parent-child", "across parents")  # pair kinds; -1 on the diagonal
FAMILY_ORDER = ("objective", "seed")  # parents are ordered by these factors first
MODEL_ORDER = ("optimizer", "lr", "head", "seed")  # models within a parent's block by these first
QUANTILES = (0.01, 0.25, 0.5, 0.75, 0.99)
QUANTILE_VALUES = 1 << 24  # torch.quantile's input limit: larger pooled tensors are subsampled with a stride

# ------------------------------------------------------------------------------------------- selection


def select(zoo: Zoo, stage: str | None = None, epoch: str | int = "last", max_models: int | None = None) -> Zoo:
    """The checkpoints to analyse, in `analysis_order`. `max_models` keeps that many, evenly spaced over the
    zoo's order (stage, parent, model), so a cap keeps every parent's share."""
    selection = zoo.filter(stage=stage, epoch=None if epoch == "all" else epoch)
    if max_models is not None and len(selection) > max_models:
        if max_models < 1:
            raise ConfigError(f"max_models must be at least 1, got {max_models}")
        index = torch.linspace(0, len(selection) - 1, max_models).round().long().unique().tolist()
        selection = Zoo(zoo.root, zoo.meta, zoo.records, [selection[i] for i in index])
    if len(selection) == 0:
        raise ConfigError(f"no checkpoint of {zoo.root} matches stage={stage} epoch={epoch}")
    return analysis_order(selection)


def family(entry: ZooEntry) -> str:
    """The parent a model belongs to: its parent, or itself for a model without one."""
    return entry.parent_id or entry.model_id


def varying_factors(entries: list[ZooEntry]) -> list[str]:
    """The generating factors whose values differ among `entries`, sorted by name."""
    names = sorted({name for entry in entries for name in entry.factors})
    return [n for n in names if len({repr(entry.factors.get(n)) for entry in entries}) > 1]


def _sortable(value) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, "" if value is None else str(value))


def _preferred_first(names: list[str], preferred: tuple[str, ...]) -> list[str]:
    return [n for n in preferred if n in names] + [n for n in names if n not in preferred]


def analysis_order(selection: Zoo) -> Zoo:
    """The selection ordered by parent (parents by objective, seed, ...), the parent first in its block, then
    its fine-tunes by optimizer, lr, head, seed and the other varying factors, then epoch."""
    entries = list(selection)
    families = sorted({family(e) for e in entries})
    family_factors = {f: selection.records[f]["factors"] if f in selection.records else {} for f in families}
    family_names = _preferred_first(
        [n for n in sorted({n for fs in family_factors.values() for n in fs})
         if len({repr(fs.get(n)) for fs in family_factors.values()}) > 1], FAMILY_ORDER
    )  # fmt: skip
    rank = {f: i for i, f in enumerate(sorted(families, key=lambda f: (
        [_sortable(family_factors[f].get(n)) for n in family_names], f)))}  # fmt: skip
    model_names = _preferred_first(varying_factors(entries), MODEL_ORDER)

    def key(entry: ZooEntry):
        is_child = entry.model_id != family(entry)
        factors = [_sortable(entry.factors.get(n)) for n in model_names]
        return rank[family(entry)], is_child, factors, entry.model_id, entry.epoch

    return Zoo(selection.root, selection.meta, selection.records, sorted(entries, key=key))


def pair_kinds(entries: list[ZooEntry]) -> torch.Tensor:
    """[m, m] int64: the index into KINDS of every pair, -1 on the diagonal."""
    m = len(entries)
    kinds = torch.full((m, m), KINDS.index("across parents"), dtype=torch.long)
    for i, a in enumerate(entries):
        for j, b in enumerate(entries):
            if i == j:
                kinds[i, j] = -1
            elif a.model_id == b.model_id:
                kinds[i, j] = KINDS.index("same model")
            elif a.parent_id is not None and a.parent_id == b.parent_id:
                kinds[i, j] = KINDS.index("siblings")
            elif a.parent_id == b.model_id or b.parent_id == a.model_id:
                kinds[i, j] = KINDS.index("parent-child")
    return kinds


# ---------------------------------------------------------------------------------------- weight space


def module_order(entry: ZooEntry) -> list[str]:
    """The tensor names of an entry's model in the order of its modules (files store them in another order)."""
    from vitzoo.zoo_builder.models import build_vit

    with torch.device("meta"):
        model = build_vit(entry.architecture, entry.head["num_classes"], entry.head["head"], entry.head["head_hidden"])
    return list(model.state_dict())


def load_in_module_order(entries: list[ZooEntry]) -> list[dict[str, torch.Tensor]]:
    """Every entry's state dict, keys in `module_order` (a key the model lacks goes last)."""
    orders: dict[tuple, list[str]] = {}  # head structure -> module order, built once
    state_dicts = []
    for entry in entries:
        structure = (repr(entry.architecture), tuple(sorted(entry.head.items())))
        if structure not in orders:
            orders[structure] = module_order(entry)
        state_dict = entry.state_dict()
        state_dicts.append({k: state_dict[k] for k in orders[structure] if k in state_dict} | state_dict)
    return state_dicts


def common_tensors(state_dicts: list[dict[str, torch.Tensor]]) -> list[str]:
    """The tensors every state dict has with the same shape (in the first one's key order): the shared body."""
    first = state_dicts[0]
    return [k for k, v in first.items() if all(k in sd and sd[k].shape == v.shape for sd in state_dicts[1:])]


def flatten(state_dicts: list[dict[str, torch.Tensor]], names: list[str]) -> torch.Tensor:
    """[m, P] float64: the named tensors of every model, concatenated in `names` order."""
    return torch.stack([torch.cat([sd[k].double().flatten() for k in names]) for sd in state_dicts])


def pairwise_distances(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 and cosine distances (1 - cosine similarity) between the rows of x [m, P], both [m, m] float64."""
    x = x.double()
    l2 = torch.cdist(x, x)  # matmul form (|a|^2 + |b|^2 - 2ab) in float64: ~1e-6 absolute error at worst
    l2.fill_diagonal_(0)
    norms = x.norm(dim=1)
    cosine = 1 - (x @ x.T) / (norms[:, None] * norms[None, :])
    cosine.fill_diagonal_(0)
    return l2, cosine


def layer_statistics(state_dicts: list[dict[str, torch.Tensor]]) -> list[dict]:
    """One row per (tensor, shape): mean, std and quantiles of the values pooled over every model that has it,
    and the mean and std over models of its L2 norm."""
    groups: dict[tuple[str, tuple], list[torch.Tensor]] = {}
    for sd in state_dicts:
        for name, tensor in sd.items():
            groups.setdefault((name, tuple(tensor.shape)), []).append(tensor.double().flatten())
    rows = []
    for (name, shape), tensors in groups.items():
        values = torch.cat(tensors)  # [models * numel]
        norms = torch.stack([t.norm() for t in tensors])
        sample = values[:: math.ceil(len(values) / QUANTILE_VALUES)]
        quantiles = torch.quantile(sample, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
        rows.append({
            "tensor": name, "shape": list(shape), "models": len(tensors),
            "mean": values.mean().item(), "std": values.std().item() if len(values) > 1 else 0.0,
            "norm_mean": norms.mean().item(), "norm_std": norms.std().item() if len(norms) > 1 else 0.0,
            **{f"q{round(q * 100):02d}": v for q, v in zip(QUANTILES, quantiles)},
        })  # fmt: skip
    return rows


def within_family(x: torch.Tensor, families: list[str]) -> torch.Tensor:
    """x [m, P] minus the mean row of each model's family (the models sharing its parent): the spread inside."""
    x = x.double()
    centred = torch.empty_like(x)
    for name in dict.fromkeys(families):
        index = torch.tensor([i for i, f in enumerate(families) if f == name])
        centred[index] = x[index] - x[index].mean(0, keepdim=True)
    return centred


def pca(x: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, list[float]]:
    """The first k principal coordinates of the rows of x [m, P] ([m, k]) and their explained variance ratios."""
    centred = x.double() - x.double().mean(0, keepdim=True)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)  # u [m, r], s [r]
    k = min(k, len(s))
    variance = s**2
    return u[:, :k] * s[:k], (variance[:k] / variance.sum()).tolist()


# ------------------------------------------------------------------------------------------- behaviour


def agreement(predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[m, m]: the fraction of examples on which two models predict the same class, from predictions [m, N]."""
    one_hot = F.one_hot(predictions.long(), num_classes).flatten(1).float()  # [m, N*C]
    same = one_hot @ one_hot.T  # counts of equal predictions, exact in float32 below 2^24 examples
    return same.double() / predictions.shape[1]


def centred_gram(x: torch.Tensor) -> torch.Tensor:
    """H K H for the linear kernel K = X X^T of x [b, d] and the centring matrix H = I - 11^T/b; [b, b]."""
    gram = x.double() @ x.double().T
    return gram - gram.mean(0, keepdim=True) - gram.mean(1, keepdim=True) + gram.mean()


def hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741 (the paper's name)
    """The biased HSIC estimator tr(K H L H) / (b-1)^2 from two centred Gram matrices [b, b]."""
    return (k * l).sum() / (k.shape[0] - 1) ** 2  # tr(K L) = <K, L>_F for symmetric K, L


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA between representations x [b, d1] and y [b, d2] of the same b inputs (Kornblith et al. 2019):
    HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)). 1 for equal representations; invariant to orthogonal transforms
    and isotropic scaling of either; NaN when either is constant."""
    k, l = centred_gram(x), centred_gram(y)  # noqa: E741
    return hsic(k, l) / (hsic(k, k) * hsic(l, l)).sqrt()


def cka_matrix(features: torch.Tensor) -> torch.Tensor:
    """[m, m] linear CKA between every pair of representations features [m, b, d] (as `linear_cka`, batched)."""
    grams = torch.stack([centred_gram(f) for f in features]).flatten(1)  # [m, b*b]
    cross = grams @ grams.T  # HSIC up to the (b-1)^2 factor, which cancels
    scale = cross.diagonal().sqrt()
    return cross / (scale[:, None] * scale[None, :])


@torch.no_grad()
def pre_logit_features(entries: list[ZooEntry], state_dicts: list[dict], images: torch.Tensor,
                       progress: bool = False) -> torch.Tensor:  # fmt: skip
    """[m, b, d] pre-logit features (timm's `forward_head(..., pre_logits=True)`) of every model on images."""
    from tqdm.auto import tqdm

    from vitzoo.zoo_builder.models import build_vit

    templates = {}  # one module per head structure, reloaded for every model
    features = []
    for entry, state_dict in tqdm(list(zip(entries, state_dicts)), desc="features", disable=not progress):
        structure = (repr(entry.architecture), tuple(sorted(entry.head.items())))
        if structure not in templates:
            templates[structure] = build_vit(entry.architecture, entry.head["num_classes"], entry.head["head"],
                                             entry.head["head_hidden"]).eval()  # fmt: skip
        model = templates[structure]
        try:
            model.load_state_dict(state_dict)
        except RuntimeError:  # keys or shapes do not fit its architecture: no features (NaN), as evaluate reports
            features.append(torch.full((len(images), model.num_features), torch.nan))
            continue
        features.append(model.forward_head(model.forward_features(images), pre_logits=True))
    return torch.stack(features)


# ------------------------------------------------------------------------------------------- summaries


def summarise(matrix: torch.Tensor, kinds: torch.Tensor, closer: str) -> dict:
    """Mean and median over the finite pairs (i < j), the mean per pair kind, and the nearest neighbour of each
    model (`closer`: "smaller" for distances, "larger" for similarities): mean and median over models."""
    upper = torch.triu(torch.ones_like(kinds, dtype=torch.bool), diagonal=1)
    finite = torch.isfinite(matrix)
    values = matrix[upper & finite]
    if len(values) == 0:
        return {"pairs": 0}
    off_diagonal = finite & (kinds >= 0)
    sign = 1 if closer == "smaller" else -1
    nearest = torch.where(off_diagonal, sign * matrix, torch.inf).min(1).values * sign  # [m]
    nearest = nearest[off_diagonal.any(1)]
    by_kind = {}
    for index, kind in enumerate(KINDS):
        chosen = matrix[upper & finite & (kinds == index)]
        by_kind[kind] = chosen.mean().item() if len(chosen) else None
    return {
        "pairs": len(values), "mean": values.mean().item(), "median": values.median().item(),
        "nearest_mean": nearest.mean().item(), "nearest_median": nearest.median().item(), "by_kind": by_kind,
    }  # fmt: skip


def factor_table(entries: list[ZooEntry], split: str) -> list[dict]:
    """The indexed accuracy and loss on `split` per value of every factor that varies within a stage: one row per
    (stage, factor, value, metric) with n, mean, median, min, max (entries without the metric are left out)."""
    rows = []
    for stage in dict.fromkeys(e.stage for e in entries):
        mine = [e for e in entries if e.stage == stage]
        for factor in varying_factors(mine):
            groups: dict[str, tuple] = {}
            for entry in mine:
                value = entry.factors.get(factor)
                groups.setdefault(repr(value), (value, []))[1].append(entry)
            for value, members in sorted(groups.values(), key=lambda group: _sortable(group[0])):
                for metric in (f"{split}_acc", f"{split}_loss"):
                    numbers = [e.metrics[metric] for e in members if e.metrics.get(metric) is not None]
                    if not numbers:
                        continue
                    rows.append({
                        "stage": stage, "factor": factor, "value": value, "metric": metric, "n": len(numbers),
                        "mean": statistics.mean(numbers), "median": statistics.median(numbers),
                        "min": min(numbers), "max": max(numbers),
                    })  # fmt: skip
    return rows


# -------------------------------------------------------------------------------------------- the run


def layer_distances(state_dicts: list[dict], names: list[str], kinds: torch.Tensor) -> tuple[dict, list[dict]]:
    """Pairwise L2 and cosine distances per tensor: {"l2/<name>": [m, m], "cosine/<name>": [m, m]} and a row of
    summaries per tensor."""
    matrices, rows = {}, []
    for name in names:
        l2, cosine = pairwise_distances(flatten(state_dicts, [name]))
        matrices[f"l2/{name}"], matrices[f"cosine/{name}"] = l2, cosine
        rows.append({"tensor": name, "shape": list(state_dicts[0][name].shape),
                     "parameters": state_dicts[0][name].numel(), "l2": summarise(l2, kinds, "smaller"),
                     "cosine": summarise(cosine, kinds, "smaller")})  # fmt: skip
    return matrices, rows


def agreement_by_dataset(selection: Zoo, datasets: list[str], split: str, data_root: str | None = None,
                         progress: bool = False) -> tuple[torch.Tensor, list]:  # fmt: skip
    """Evaluate every entry of `selection` on its dataset (`datasets`, one per entry) and return the [m, m]
    prediction agreement (NaN across datasets and for models that could not be evaluated) and the results."""
    from vitzoo.eval.evaluation import evaluate
    from vitzoo.zoo_builder.data import info as dataset_info

    entries = list(selection)
    matrix = torch.full((len(entries), len(entries)), torch.nan, dtype=torch.float64)
    evaluation = [None] * len(entries)
    for name in dict.fromkeys(datasets):
        index = [i for i, d in enumerate(datasets) if d == name]
        group = Zoo(selection.root, selection.meta, selection.records, [entries[i] for i in index])
        results = evaluate(group, name, split, mode="loop", data_root=data_root, progress=progress)
        for i, result in zip(index, results):
            evaluation[i] = result
        good = [(i, r) for i, r in zip(index, results) if r.error is None]
        if good:
            rows = torch.tensor([i for i, _ in good])
            predictions = torch.stack([r.predictions for _, r in good])  # [k, N]
            matrix[rows[:, None], rows[None, :]] = agreement(predictions, dataset_info(name).num_classes)
    return matrix, evaluation


def own_dataset(entry: ZooEntry, fallback: str) -> str:
    """The dataset a model was trained on (its `dataset` factor; `fallback` for entries without one)."""
    return entry.factors["dataset"] if "dataset" in entry.factors else fallback


def write_analysis(
    zoo: Zoo,
    selection: Zoo,
    out: Path,
    config: dict,
    dataset: str | None = None,
    split: str = "test",
    cka_batch: int = 256,
    data_root: str | None = None,
    progress: bool = False,
) -> dict:
    """Analyse `selection` (from `select`) and write report.md, results.json, matrices.safetensors and the plots
    into `out` (see module docstring). Returns the results (as written to results.json)."""
    from safetensors.torch import save

    from vitzoo.zoo_builder.data import load_split
    from vitzoo.zoo_builder.zoo import atomic_write_bytes, atomic_write_json, code_version

    if cka_batch < 2:
        raise ConfigError(f"cka_batch must be at least 2, got {cka_batch}")
    entries = list(selection)
    names = [f"{e.model_id}@{e.epoch}" for e in entries]
    kinds = pair_kinds(entries)
    state_dicts = load_in_module_order(entries)

    # weight space: the shared body, whole and per tensor
    body = common_tensors(state_dicts)
    if not body:
        raise ValueError("the selected models share no tensor of equal shape")
    x = flatten(state_dicts, body)  # [m, P]
    l2, cosine = pairwise_distances(x)
    layer_matrices, layers = layer_distances(state_dicts, body, kinds)
    matrices = {"l2": l2, "cosine": cosine, **layer_matrices}
    excluded: dict[str, dict[str, int]] = {}  # tensor -> shape -> models
    for sd in state_dicts:
        for name, tensor in sd.items():
            if name not in body:
                shapes = excluded.setdefault(name, {})
                shapes[str(tuple(tensor.shape))] = shapes.get(str(tuple(tensor.shape)), 0) + 1
    coordinates, explained = pca(x, k=2)

    # behaviour: agreement on each model's own dataset (or the forced one), CKA on one batch of one dataset
    datasets = [dataset or own_dataset(e, zoo.dataset) for e in entries]
    matrices["agreement"], evaluation = agreement_by_dataset(selection, datasets, split, data_root, progress)
    cka_dataset = dataset or (datasets[0] if len(set(datasets)) == 1 else zoo.dataset)
    images, _ = load_split(cka_dataset, split, data_root)
    images = images[:cka_batch]  # [b, C, H, W]
    features = pre_logit_features(entries, state_dicts, images, progress)  # [m, b, d]
    matrices["cka"] = cka_matrix(features)

    out.mkdir(parents=True, exist_ok=True)
    meta = {"models": ",".join(names), "tensors": ",".join(body)}
    tensors = {k: v.float().contiguous() for k, v in matrices.items()}
    atomic_write_bytes(out / "matrices.safetensors", save(tensors, meta))
    varying = varying_factors(entries)
    stages = [e.stage for e in entries]
    results = {
        "zoo": zoo.location,
        "selection": {
            "checkpoints": len(entries), "models": len({e.model_id for e in entries}),
            "per_stage": {s: stages.count(s) for s in dict.fromkeys(stages)},
            "last_epochs_only": all(e.epoch == zoo.records[e.model_id]["checkpoints"][-1]["epoch"] for e in entries),
        },
        "split": split,
        "config": config,
        "code_version": code_version(),
        "models": [{
            "model": names[i], "model_id": e.model_id, "epoch": e.epoch, "stage": e.stage, "parent_id": e.parent_id,
            "factors": {k: e.factors.get(k) for k in varying}, "dataset": datasets[i],
            "accuracy": evaluation[i].accuracy, "loss": evaluation[i].loss, "error": evaluation[i].error,
        } for i, e in enumerate(entries)],
        "weights": {
            "tensors": body, "parameters": x.shape[1], "excluded": excluded, "pca_explained": explained,
            "l2": summarise(l2, kinds, "smaller"), "cosine": summarise(cosine, kinds, "smaller"),
            "layers": layers, "statistics": layer_statistics(state_dicts),
        },
        "agreement": {"datasets": {d: datasets.count(d) for d in dict.fromkeys(datasets)},
                      "evaluated": sum(r.error is None for r in evaluation),
                      **summarise(matrices["agreement"], kinds, "larger")},
        "cka": {"dataset": cka_dataset, "batch": len(images), "features": features.shape[2],
                **summarise(matrices["cka"], kinds, "larger")},
        "factors": factor_table(entries, split),
        "matrices": "matrices.safetensors",
    }  # fmt: skip
    atomic_write_json(out / "results.json", results)
    families = [family(e) for e in entries]
    labels = {f: _family_label(f, selection.records) for f in families}
    for key, title, cmap, log in HEATMAPS:
        _heatmap(matrices[key], families, labels, title, out / f"heatmap_{key}.png", cmap, log)
    colourings = _colourings(entries, labels)
    variance = ", ".join(f"PC{i + 1} {share:.0%}" for i, share in enumerate(explained))
    title = f"PCA of the flattened body ({x.shape[1]} parameters; {variance} of the variance)"
    _embedding(coordinates, colourings, title, out / "embedding_pca.png")
    if len(set(families)) < len(families):  # the spread inside parents' blocks, which the parents' distance hides
        within, explained_within = pca(within_family(x, families), k=2)
        variance = ", ".join(f"PC{i + 1} {share:.0%}" for i, share in enumerate(explained_within))
        title = f"PCA of the flattened body minus the mean of its parent's block ({variance} of the variance)"
        _embedding(within, colourings, title, out / "embedding_pca_within.png")
    if len(entries) >= 5:
        _embedding(tsne(x), colourings, "t-SNE of the flattened body", out / "embedding_tsne.png")
    for stage in dict.fromkeys(stages):
        _factor_plot([e for e in entries if e.stage == stage], f"{split}_acc", stage, out / f"factors_{stage}.png")
    write_report(out, _report(results, out))
    return results


HEATMAPS = (  # key, title, colour map, log scale
    ("l2", "L2 distance of the flattened body (log scale)", "viridis", True),
    ("cosine", "cosine distance of the flattened body (log scale)", "viridis", True),
    ("agreement", "prediction agreement", "magma", False),
    ("cka", "linear CKA of the pre-logit features", "magma", False),
)


def tsne(x: torch.Tensor) -> torch.Tensor:
    """[m, 2] t-SNE (scikit-learn) of the rows of x [m, P], on their first 50 principal coordinates."""
    from sklearn.manifold import TSNE

    coordinates, _ = pca(x, k=50)
    perplexity = min(30.0, (len(x) - 1) / 3)
    embedded = TSNE(2, perplexity=perplexity, init="pca", random_state=0).fit_transform(coordinates.numpy())
    return torch.from_numpy(embedded)


# --------------------------------------------------------------------------------------------- report


def headline(results: dict) -> str:
    """A few lines with the main numbers (what `vitzoo analyze` prints)."""
    selection, weights = results["selection"], results["weights"]
    stages = ", ".join(f"{n} {s}" for s, n in selection["per_stage"].items())

    def kinds(summary: dict) -> str:
        return ", ".join(f"{k} {v:.3f}" for k, v in summary.get("by_kind", {}).items() if v is not None)

    lines = [f"analyze {results['zoo']}: {selection['checkpoints']} checkpoints ({stages}), split {results['split']}"]
    for key, text in (("l2", "L2 distance"), ("cosine", "cosine distance")):
        s = weights[key]
        lines.append(f"  {text} ({weights['parameters']} shared parameters): mean {s['mean']:.4g}, nearest neighbour "
                     f"mean {s['nearest_mean']:.4g} median {s['nearest_median']:.4g}; by pair: {kinds(s)}")  # fmt: skip
    for key, text in (("agreement", "prediction agreement"), ("cka", "linear CKA")):
        s = results[key]
        if s["pairs"]:
            lines.append(f"  {text}: mean {s['mean']:.3f}, nearest neighbour mean {s['nearest_mean']:.3f}; "
                         f"by pair: {kinds(s)}")  # fmt: skip
    return "\n".join(lines)


def _number(value, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)


def _report(results: dict, out: Path) -> str:
    selection, weights = results["selection"], results["weights"]
    stages = ", ".join(f"{n} {s}" for s, n in selection["per_stage"].items())
    epochs = "each model's last epoch" if selection["last_epochs_only"] else "the selected epochs"
    rows = [("L2 distance (body)", weights["l2"]), ("cosine distance (body)", weights["cosine"]),
            ("prediction agreement", results["agreement"]), ("linear CKA (pre-logits)", results["cka"])]  # fmt: skip
    kinds = [k for k in KINDS if weights["l2"]["by_kind"][k] is not None]  # the kinds of pair this selection has
    lines = [
        f"# Diversity of {results['zoo']}",
        "",
        f"{selection['checkpoints']} checkpoints of {selection['models']} models ({stages}), {epochs}; "
        f"split {results['split']}; code {results['code_version']}.",
        "",
        "## Summary",
        "",
        "Nearest neighbour: for each model the closest other one (smallest distance, largest agreement or CKA), "
        "mean and median over models. Pairs by kind: siblings share a parent; parent-child; across parents; "
        "same model (checkpoints of one model at different epochs).",
        "",
        "| metric | pairs | mean | median | nearest (mean) | nearest (median) | " + " | ".join(kinds) + " |",
        "|---" * (6 + len(kinds)) + "|",
    ]
    for text, s in rows:
        if not s["pairs"]:
            lines.append(f"| {text} | 0 |" + " |" * (4 + len(kinds)))
            continue
        by_kind = " | ".join(_number(s["by_kind"][k], ".4g") for k in kinds)
        lines.append(f"| {text} | {s['pairs']} | {s['mean']:.4g} | {s['median']:.4g} | {s['nearest_mean']:.4g} "
                     f"| {s['nearest_median']:.4g} | {by_kind} |")  # fmt: skip
    excluded = "; ".join(f"`{name}` {', '.join(f'{shape}×{n}' for shape, n in shapes.items())}"
                         for name, shapes in weights["excluded"].items())  # fmt: skip
    lines += [
        "",
        "## Weight space",
        "",
        f"Distances and embeddings use the flattened *body*: {weights['parameters']} parameters in "
        f"{len(weights['tensors'])} tensors that every selected model has with equal shapes.",
        f"Left out (shapes differ between models): {excluded}." if excluded else "No tensor is left out.",
        "Heat maps order models by parent (white lines separate parents; a parent comes first in its block), "
        "then by optimizer, learning rate, head, seed and the other varying factors.",
        "",
        "![L2 distance](heatmap_l2.png) ![cosine distance](heatmap_cosine.png)",
        "",
        "![PCA](embedding_pca.png)",
        "",
    ]  # fmt: skip
    if (out / "embedding_pca_within.png").exists():
        lines += ["![PCA inside parents' blocks](embedding_pca_within.png)", ""]
    if (out / "embedding_tsne.png").exists():
        lines += ["![t-SNE](embedding_tsne.png)", ""]
    lines += [
        "### Pairwise distances per tensor",
        "",
        "| tensor | shape | mean L2 | nearest L2 | siblings L2 | across parents L2 | mean cosine distance |",
        "|---|---|---|---|---|---|---|",
    ]
    for layer in weights["layers"]:
        l2, cosine = layer["l2"], layer["cosine"]
        if not l2["pairs"]:
            continue
        siblings, across = (_number(l2["by_kind"][k], ".4g") for k in ("siblings", "across parents"))
        lines.append(f"| `{layer['tensor']}` | {tuple(layer['shape'])} | {l2['mean']:.4g} | {l2['nearest_mean']:.4g} "
                     f"| {siblings} | {across} | {cosine['mean']:.4g} |")  # fmt: skip
    lines += [
        "",
        "### Weight statistics per tensor (values pooled over the models that have it)",
        "",
        "| tensor | shape | models | mean | std | L2 norm (mean ± std over models) | 1% | 25% | 50% | 75% | 99% |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in weights["statistics"]:
        quantiles = " | ".join(f"{row[f'q{round(q * 100):02d}']:.3g}" for q in QUANTILES)
        norm = f"{row['norm_mean']:.3g} ± {row['norm_std']:.3g}"
        lines.append(f"| `{row['tensor']}` | {tuple(row['shape'])} | {row['models']} | {row['mean']:.3g} "
                     f"| {row['std']:.3g} | {norm} | {quantiles} |")  # fmt: skip
    agreement, cka = results["agreement"], results["cka"]
    datasets = ", ".join(f"{n} on {d}" for d, n in agreement["datasets"].items())
    errors: dict[str, int] = {}
    for model in results["models"]:
        if model["error"] is not None:
            errors[model["error"]] = errors.get(model["error"], 0) + 1
    lines += [
        "",
        "## Behaviour",
        "",
        f"Prediction agreement on the whole {results['split']} split, each model on its dataset ({datasets}); "
        f"{agreement['evaluated']} of {selection['checkpoints']} checkpoints evaluated. Pairs on different "
        "datasets have no agreement (grey).",
    ]  # fmt: skip
    lines += [f"- not evaluated ({n}): {error}" for error, n in errors.items()]
    lines += [
        "",
        f"Linear CKA between the {cka['features']}-d pre-logit features (the input of the head) of every pair, on "
        f"the first {cka['batch']} images of {cka['dataset']}/{results['split']} (every model on the same images).",
        "",
        "![agreement](heatmap_agreement.png) ![CKA](heatmap_cka.png)",
        "",
        "## Generating factors",
        "",
        f"Accuracy and loss on {results['split']} as recorded in the zoo's index (for a contrastive objective: the "
        "accuracy of finding the other view), per value of every factor that varies within a stage.",
        "",
        "| stage | factor | value | metric | n | mean | median | min | max |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in results["factors"]:
        lines.append(f"| {row['stage']} | {row['factor']} | {row['value']} | {row['metric']} | {row['n']} "
                     f"| {row['mean']:.3f} | {row['median']:.3f} | {row['min']:.3f} | {row['max']:.3f} |")  # fmt: skip
    lines.append("")
    for stage in selection["per_stage"]:
        if (out / f"factors_{stage}.png").exists():
            lines += [f"![{stage}](factors_{stage}.png)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _family_label(name: str, records: dict) -> str:
    objective = records[name]["factors"].get("objective") if name in records else None
    return f"{name} ({objective})" if objective else name


def _heatmap(matrix: torch.Tensor, families: list[str], labels: dict[str, str], title: str, path: Path,
             cmap: str, log: bool) -> None:  # fmt: skip
    """A [m, m] matrix with white lines between parents' blocks and a tick per block (when blocks help)."""
    plt = _pyplot()
    m = len(families)
    colours = plt.get_cmap(cmap).copy()
    colours.set_bad("0.5")  # NaN: no value for the pair
    figure, axis = plt.subplots(figsize=(8, 7))
    norm, shown = None, matrix
    if log:  # distances inside a parent's block are ~10x smaller than across: a log scale shows both
        from matplotlib.colors import LogNorm

        positive = matrix[torch.isfinite(matrix) & (matrix > 0)]
        if len(positive):
            norm = LogNorm(positive.min().item(), positive.max().item())
            shown = matrix.clamp(min=positive.min().item())  # the zero diagonal at the scale's bottom
    image = axis.imshow(shown.numpy(), cmap=colours, norm=norm, interpolation="nearest")
    starts = [0] + [i for i in range(1, m) if families[i] != families[i - 1]]
    if 1 < len(starts) <= 50:
        for start in starts[1:]:
            axis.axhline(start - 0.5, color="white", linewidth=0.8)
            axis.axvline(start - 0.5, color="white", linewidth=0.8)
        centres = [(s + e - 1) / 2 for s, e in zip(starts, [*starts[1:], m])]
        ticks = [labels[families[s]] for s in starts]
        axis.set_xticks(centres, ticks, rotation=90, fontsize=6)
        axis.set_yticks(centres, ticks, fontsize=6)
    else:
        axis.set_xlabel("model")
        axis.set_ylabel("model")
    axis.set_title(f"{title} ({m} models)")
    figure.colorbar(image, ax=axis, shrink=0.8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _colourings(entries: list[ZooEntry], labels: dict[str, str]) -> list[tuple[str, list]]:
    """(name, value per model) for every colouring of the embedding: parent, then the factors that vary."""
    colourings = [("parent", [labels[family(e)] for e in entries])]
    if len({e.stage for e in entries}) > 1:
        colourings.append(("stage", [e.stage for e in entries]))
    varying = varying_factors(entries)
    colourings += [(n, [e.factors.get(n) for e in entries]) for n in (*MODEL_ORDER, "objective") if n in varying]
    if len({e.model_id for e in entries}) < len(entries):  # several checkpoints of a model
        colourings.append(("epoch", [e.epoch for e in entries]))
    return colourings


def _embedding(coordinates: torch.Tensor, colourings: list[tuple[str, list]], title: str, path: Path) -> None:
    """A grid of 2-d scatter plots of coordinates [m, 2], one panel per colouring."""
    plt = _pyplot()
    columns = min(4, len(colourings))
    rows = math.ceil(len(colourings) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.8 * rows), squeeze=False)
    points = coordinates.numpy()
    second = points[:, 1] if points.shape[1] > 1 else points[:, 0] * 0
    order = torch.randperm(len(points), generator=torch.Generator().manual_seed(0)).numpy()  # no value on top
    for axis, (name, values) in zip(axes.flat, colourings):
        distinct = list({repr(v): v for v in values}.values())  # parents in the heat maps' order
        if name != "parent":
            distinct.sort(key=_sortable)
        palette = plt.get_cmap("tab10" if len(distinct) <= 10 else "tab20" if len(distinct) <= 20 else "viridis")
        colours = [palette(rank if len(distinct) <= 20 else rank / max(1, len(distinct) - 1))
                   for rank in range(len(distinct))]  # fmt: skip
        rank = {repr(value): i for i, value in enumerate(distinct)}
        point_colours = [colours[rank[repr(values[i])]] for i in order]
        axis.scatter(points[order, 0], second[order], s=12, c=point_colours, alpha=0.8)
        if len(distinct) <= 20:
            handles = [axis.scatter([], [], s=12, color=c, label=str(v)) for v, c in zip(distinct, colours)]
            axis.legend(handles=handles, fontsize=6, markerscale=0.8, loc="best")
        axis.set_title(f"coloured by {name}", fontsize=9)
        axis.tick_params(labelsize=6)
    for axis in list(axes.flat)[len(colourings) :]:
        axis.axis("off")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _factor_plot(entries: list[ZooEntry], metric: str, stage: str, path: Path) -> None:
    """Box plots with the individual models (jittered strip) of `metric` per value of every varying factor."""
    factors = varying_factors(entries)
    if not factors:
        return
    plt = _pyplot()
    columns = min(4, len(factors))
    rows = math.ceil(len(factors) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.2 * rows), squeeze=False)
    jitter = torch.Generator().manual_seed(0)
    for axis, factor in zip(axes.flat, factors):
        groups: dict[str, tuple] = {}
        for entry in entries:
            if entry.metrics.get(metric) is not None:
                value = entry.factors.get(factor)
                groups.setdefault(repr(value), (value, []))[1].append(entry.metrics[metric])
        ordered = sorted(groups.values(), key=lambda group: _sortable(group[0]))
        axis.boxplot([numbers for _, numbers in ordered], showfliers=False)
        for position, (_, numbers) in enumerate(ordered, start=1):
            offsets = (torch.rand(len(numbers), generator=jitter) - 0.5) * 0.3
            axis.scatter(position + offsets.numpy(), numbers, s=8, alpha=0.6, color="tab:blue")
        axis.set_xticks(range(1, len(ordered) + 1), [str(value) for value, _ in ordered], fontsize=7,
                        rotation=45 if len(ordered) > 4 else 0)  # fmt: skip
        axis.set_title(factor, fontsize=9)
        axis.set_ylabel(metric, fontsize=8)
        axis.tick_params(axis="y", labelsize=7)
    for axis in list(axes.flat)[len(factors) :]:
        axis.axis("off")
    figure.suptitle(f"{metric} per generating factor, {stage} ({len(entries)} checkpoints)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
