"""Property prediction from hyper-representations: what do the model embeddings know about a model?

For every checkpoint the autoencoder was trained on: linear probes from its model-level embedding to test
accuracy, epoch and log10 learning rate (ridge regression, R^2) and to optimizer and parent (logistic
regression, accuracy), on held-out models (5-fold cross-validation grouped by model, so no model's other epochs
are seen in training). The baseline is the same probes on per-tensor weight statistics of the full weights
(mean, std, L2 norm and the 1/25/50/75/99% quantiles of every tensor), which SANE found about as predictive.
Head type is probed when the autoencoder holds both (`head=all`, bodies only); the baseline's statistics then
cover the same body tensors.

Shapes: n checkpoints, e embedding width.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from vitzoo.generative.data import body
from vitzoo.generative.hyper import AutoencoderBundle, embeddings

QUANTILES = torch.tensor([0.01, 0.25, 0.5, 0.75, 0.99], dtype=torch.float64)


def weight_statistics(state_dict: dict[str, torch.Tensor]) -> torch.Tensor:
    """[8 x tensors] per-tensor mean, std, norm and quantiles."""
    features = []
    for key in sorted(state_dict):
        values = state_dict[key].double().flatten()
        std = values.std() if values.numel() > 1 else torch.zeros((), dtype=torch.float64)
        features += [values.mean()[None], std[None], values.norm()[None], torch.quantile(values, QUANTILES)]
    return torch.cat(features)


def targets(bundle: AutoencoderBundle) -> dict[str, tuple[str, np.ndarray]]:
    entries = bundle.data.entries
    properties = {
        "test accuracy": ("regression", np.array([e.metrics.get("test_acc") or 0.0 for e in entries])),
        "epoch": ("regression", np.array([e.epoch for e in entries], dtype=float)),
        "log10 lr": ("regression", np.array([math.log10(e.factors["lr"]) for e in entries])),
        "optimizer": ("classification", np.array([e.factors["optimizer"] for e in entries])),
        "parent": ("classification", np.array([e.parent_id for e in entries])),
    }
    heads = np.array([e.factors["head"] for e in entries])
    if len(set(heads)) > 1:
        properties["head type"] = ("classification", heads)
    return properties


def cross_validated(features: np.ndarray, kind: str, y: np.ndarray, groups: np.ndarray) -> tuple[float, np.ndarray]:
    """The held-out score (R2 or accuracy) and every checkpoint's held-out prediction."""
    predictions = np.empty(len(y), dtype=y.dtype if kind == "classification" else float)
    for train, test in GroupKFold(n_splits=5).split(features, y, groups):
        if kind == "regression":
            model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
        else:
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        model.fit(features[train], y[train])
        predictions[test] = model.predict(features[test])
    return (r2_score(y, predictions) if kind == "regression" else accuracy_score(y, predictions)), predictions


def probe(bundle: AutoencoderBundle) -> list[dict]:
    """One row per property: the embedding's and the weight-statistics baseline's held-out score, and the true
    values with both probes' held-out predictions (for `plot_probes`)."""
    embedded = embeddings(bundle).double().numpy()
    seen = body if bundle.data.head == "all" else dict  # the autoencoder saw bodies alone; so does the baseline
    statistics = torch.stack([weight_statistics(seen(e.state_dict())) for e in bundle.data.entries]).numpy()
    groups = np.array([e.model_id for e in bundle.data.entries])
    rows = []
    for name, (kind, y) in targets(bundle).items():
        score, predicted = cross_validated(embedded, kind, y, groups)
        baseline, baseline_predicted = cross_validated(statistics, kind, y, groups)
        rows.append({
            "property": name,
            "metric": "R2" if kind == "regression" else "accuracy",
            "embedding": score,
            "weight_statistics": baseline,
            "true": y.tolist(),
            "predicted": predicted.tolist(),
            "baseline_predicted": baseline_predicted.tolist(),
        })  # fmt: skip
    return rows


def plot_probes(rows: list[dict], path) -> None:
    """One panel per property: held-out prediction against the truth (regression: the embedding's probe, the
    baseline's in grey, the diagonal dashed), or the embedding probe's confusion matrix (classification)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    figure, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 4), squeeze=False)
    for axis, row in zip(axes[0], rows):
        if row["metric"] == "R2":
            axis.scatter(row["true"], row["baseline_predicted"], s=6, color="0.7", label="weight statistics")
            axis.scatter(row["true"], row["predicted"], s=6, label="model embedding")
            low, high = min(row["true"]), max(row["true"])
            axis.plot([low, high], [low, high], "k--", linewidth=1)
            axis.set(xlabel=f"true {row['property']}", ylabel="predicted (held out)")
            axis.legend(fontsize=7)
        else:
            labels = sorted(set(row["true"]))
            matrix = confusion_matrix(row["true"], row["predicted"], labels=labels)
            axis.imshow(matrix, cmap="Blues")
            ticks = [str(label)[-6:] for label in labels]
            axis.set_xticks(range(len(labels)), ticks, rotation=90, fontsize=6)
            axis.set_yticks(range(len(labels)), ticks, fontsize=6)
            axis.set(xlabel="predicted (held out)", ylabel="true")
        axis.set_title(f"{row['property']}: {row['metric']} {row['embedding']:.3f}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
