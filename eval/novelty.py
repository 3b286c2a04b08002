"""Novelty and memorisation: how far a sampled population lies from the zoo it was trained on.

For every sample: the nearest training model in weight space (L2 over the flattened weights that every model
shares), raw and after permutation alignment (the tokenizer's symmetries: attention heads and MLP units per
block; the distance to the best-matching permuted copy, solved per block by linear assignment), the prediction
agreement with that nearest model and the IoU of their misclassified examples. The same statistics of every
training model against its nearest *other* training model give the reference scale. A sample is a **copy**
when it lies closer to a training model than any two training models lie to each other (the smallest pairwise
distance in the zoo, in the same metric). Pass one checkpoint per training model (e.g. the last epoch):
two epochs of one run would make that smallest distance meaningless.

The aligned distance is exact without building permuted copies: ||a' - b||^2 = ||a||^2 + ||b||^2 - 2 <a', b>,
and <a', b> is the inner product of the tensors no permutation touches plus, per block, the optimal values of
the two assignment problems (`tokenizer.symmetries.head_features` / `unit_features` cover exactly the permuted
tensors).

Shapes: n samples, m references, P flattened weights, N evaluated examples.
"""

from __future__ import annotations

import statistics

import torch
from scipy.optimize import linear_sum_assignment

from vitzoo.tokenizer.symmetries import BlockLayers, head_features, permutable_layers, permuted_keys, unit_features

StateDict = dict[str, torch.Tensor]


def shared_keys(state_dicts: list[StateDict]) -> list[str]:
    """Keys present with the same shape in every state dict (sorted): the weights all models can be compared on
    (the body, when heads differ)."""
    first = state_dicts[0]
    return sorted(k for k, v in first.items() if all(k in sd and sd[k].shape == v.shape for sd in state_dicts))


def flatten(state_dicts: list[StateDict], keys: list[str]) -> torch.Tensor:
    """[n, P] float64: the listed tensors of every state dict, concatenated in key order."""
    if not keys:
        return torch.zeros(len(state_dicts), 0, dtype=torch.float64)
    return torch.stack([torch.cat([sd[k].double().flatten() for k in keys]) for sd in state_dicts])


def weight_distances(
    a: list[StateDict], b: list[StateDict], keys: list[str], layers: list[BlockLayers] | None = None
) -> torch.Tensor:
    """[n, m] L2 distances between the flattened `keys` of a and b; with `layers`, each a[i] first permuted to
    best match b[j] (see module docstring). Passing the same state dicts as a and b computes each pair once."""
    if layers is None:
        return torch.cdist(flatten(a, keys), flatten(b, keys))
    moved = permuted_keys(layers, a[0])
    if not moved <= set(keys):
        raise ValueError("aligned distances need every permuted tensor among the compared keys")
    fixed = [k for k in keys if k not in moved]
    inner = flatten(a, fixed) @ flatten(b, fixed).T  # [n, m]
    symmetric = len(a) == len(b) and all(x is y for x, y in zip(a, b))  # the same models: each pair once
    for block in layers:
        a_features = _block_features(a, block)
        b_features = a_features if symmetric else _block_features(b, block)
        for fa, fb in zip(a_features, b_features):
            # fa [n, items, F], fb [m, items, F]: heads (items = H), then MLP units (items = U)
            for i in range(len(a)):
                similarity = torch.einsum("xf,myf->mxy", fa[i], fb).numpy()  # [m, my items, b's items]
                for j in range(i + 1 if symmetric else 0, len(b)):
                    rows, columns = linear_sum_assignment(similarity[j], maximize=True)
                    inner[i, j] += float(similarity[j][rows, columns].sum())
    if symmetric:
        upper = torch.triu(inner, diagonal=1)
        inner = upper + upper.T + torch.diag(flatten(a, keys).pow(2).sum(1))
    squared_a = flatten(a, keys).pow(2).sum(1)
    squared_b = squared_a if symmetric else flatten(b, keys).pow(2).sum(1)
    return (squared_a[:, None] + squared_b[None, :] - 2 * inner).clamp_min(0).sqrt()


def _block_features(state_dicts: list[StateDict], block: BlockLayers) -> tuple[torch.Tensor, torch.Tensor]:
    heads = torch.stack([head_features(sd, block.attention, block.num_heads).double() for sd in state_dicts])
    units = torch.stack([unit_features(sd, block.mlp).double() for sd in state_dicts])
    return heads, units


def agreement(p: torch.Tensor, q: torch.Tensor) -> float:
    """Share of examples on which two models predict the same class."""
    return (p == q).double().mean().item()


def error_iou(p: torch.Tensor, q: torch.Tensor, labels: torch.Tensor) -> float:
    """|errors of p AND errors of q| / |errors of p OR errors of q| (1.0 when neither errs)."""
    wrong_p, wrong_q = p != labels, q != labels
    union = (wrong_p | wrong_q).sum().item()
    return 1.0 if union == 0 else (wrong_p & wrong_q).sum().item() / union


class NoveltyReference:
    """The training models' side of the novelty statistics, computed once: their pairwise distances, each
    model's nearest other model (the reference scale) and the copy threshold. `against(samples)` measures any
    number of sampled populations (see module docstring).

    Predictions are [m, N] on the examples of `labels` (None: weight space only)."""

    def __init__(
        self,
        references: list[StateDict],
        predictions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_heads: int | None = None,
        align: bool = True,
    ):
        if len(references) < 2:
            raise ValueError("novelty needs at least two reference models (their spacing is the scale)")
        self.references = references
        self.predictions = predictions
        self.labels = labels
        self.keys = shared_keys(references)
        self.layers = permutable_layers(references[0], num_heads) if align else None
        self.metric = "aligned" if align else "raw"
        raw = weight_distances(references, references, self.keys).fill_diagonal_(float("inf"))
        aligned = None
        if align:
            aligned = weight_distances(references, references, self.keys, self.layers).fill_diagonal_(float("inf"))
        self.copy_threshold = (aligned if align else raw).min().item()
        self.rows = self._rows(raw, aligned, predictions)
        for row in self.rows:
            row["copy"] = False  # the threshold is their own minimum: never below it

    def against(self, samples: list[StateDict], predictions: torch.Tensor | None = None) -> list[dict]:
        """Per sample: index of the nearest reference, raw and aligned distance to the nearest reference, copy
        flag, and (with predictions [n, N]) agreement and error IoU with that nearest reference."""
        if not samples:
            return []
        for sd in samples:
            mismatched = [k for k in self.keys if k not in sd or sd[k].shape != self.references[0][k].shape]
            if mismatched:
                raise ValueError(f"a sample lacks the zoo's tensors or their shapes: {mismatched[:3]}")
        raw = weight_distances(samples, self.references, self.keys)
        aligned = weight_distances(samples, self.references, self.keys, self.layers) if self.layers else None
        return self._rows(raw, aligned, predictions)

    def _rows(self, raw: torch.Tensor, aligned: torch.Tensor | None, predictions: torch.Tensor | None) -> list:
        ranked = aligned if aligned is not None else raw  # the metric that picks the nearest model
        out = []
        for i in range(ranked.shape[0]):
            j = int(ranked[i].argmin())
            row = {
                "nearest": j,
                "distance": raw[i].min().item(),
                "aligned_distance": None if aligned is None else aligned[i].min().item(),
                "copy": ranked[i, j].item() < self.copy_threshold,
            }
            if predictions is not None and self.predictions is not None:
                row["agreement"] = agreement(predictions[i], self.predictions[j])
                row["error_iou"] = error_iou(predictions[i], self.predictions[j], self.labels)
            out.append(row)
        return out


def summarize(rows: list[dict]) -> dict:
    """Medians of the per-model statistics, and the share of copies."""
    if not rows:
        return {"n": 0}
    summary = {"n": len(rows), "copies": sum(r["copy"] for r in rows) / len(rows)}
    for key in ("distance", "aligned_distance", "agreement", "error_iou"):
        values = [r[key] for r in rows if r.get(key) is not None]
        summary[f"median_{key}"] = statistics.median(values) if values else None
    return summary
