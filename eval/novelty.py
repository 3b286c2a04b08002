"""Novelty and memorisation: how far a sampled population lies from the zoo it was trained on.

For every sample: the nearest training model in weight space (L2 over the flattened weights that every model
shares), raw and after permutation alignment (the tokenizer's symmetries: attention heads and MLP units per
block; the distance to the best-matching permuted copy, solved per block by linear assignment), the prediction
agreement with that nearest model and the IoU of their misclassified examples. The same statistics of every
training model against its nearest *other* training model give the reference scale.

Three kinds of novelty, each beside the zoo's own value:
- **weight space, relative**: a sample's distance to a zoo model divided by that model's distance to its own
  nearest neighbour (minimised over zoo models). Fine-tuning deltas differ ~50x across learning rates, so one
  absolute threshold would call an untrained start a copy of a small-learning-rate run; a zoo model's
  neighbourhood sets its own scale. Zoo models score >= 1 against each other by construction.
- **function space**: prediction agreement with the nearest zoo model, against the zoo's own nearest-neighbour
  agreement.
- **span** (with families): the distance to the nearest family's affine span w0 + span{delta_k} (its start and
  its runs' deltas), against the distance of each zoo run to the span of its family's *other* runs. A mixture
  of a family's runs lies in that span (distance 0): a model merge, not new weights.

A sample is a **copy** of a zoo model when it lies within `COPY_RATIO` of that model's nearest-neighbour
distance *and*, when predictions are given, agrees with it at least as much as the model agrees with its own
nearest neighbour: close in weight space and the same function. (A family start lies well within the
distance of a small-learning-rate run to its neighbour, yet predicts at chance where such runs average 0.44.)
Pass one checkpoint per training model (e.g. the last epoch): two epochs of one run would shrink its
nearest-neighbour distance to one epoch's step.

The aligned distance is exact without building permuted copies: ||a' - b||^2 = ||a||^2 + ||b||^2 - 2 <a', b>,
and <a', b> is the inner product of the tensors no permutation touches plus, per block, the optimal values of
the two assignment problems (`tokenizer.symmetries.head_features` / `unit_features` cover exactly the permuted
tensors).

Shapes: n samples, m references, P flattened weights, N evaluated examples, K runs of a family.
"""

from __future__ import annotations

import statistics

import torch
from scipy.optimize import linear_sum_assignment

from vitzoo.tokenizer.symmetries import BlockLayers, head_features, permutable_layers, permuted_keys, unit_features
from vitzoo.zoo_builder.zoo import ZooError

StateDict = dict[str, torch.Tensor]
COPY_RATIO = 0.5  # a copy lies closer to a zoo model than half that model's distance to its nearest neighbour


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


class FamilySpans:
    """The affine spans w0 + span{delta_k} of a zoo's families, for span novelty (see module docstring).

    `families` lists each family's start and the indices of its runs among the references."""

    def __init__(self, references: list[StateDict], families: list[tuple[StateDict, list[int]]], keys: list[str]):
        self.keys = keys
        self.starts, self.bases = [], []  # per family: its start [P] and an orthonormal basis of its deltas [P, K]
        self._references = flatten(references, keys)  # [m, P]
        self._members = [members for _, members in families]
        for start, members in families:
            origin = flatten([start], keys)[0]
            self.starts.append(origin)
            self.bases.append(_orthonormal(self._references[members] - origin))

    def distances(self, state_dicts: list[StateDict]) -> torch.Tensor:
        """[n] distance of each model to the nearest family's span."""
        flat = flatten(state_dicts, self.keys)
        return torch.stack([_residual(flat - o, q) for o, q in zip(self.starts, self.bases)]).min(0).values

    def leave_one_out(self) -> list[float | None]:
        """Per reference: its distance to the span of its family's other runs (None outside a family of two+)."""
        out: list[float | None] = [None] * len(self._references)
        for origin, members in zip(self.starts, self._members):
            if len(members) < 2:
                continue
            for j in members:
                others = _orthonormal(self._references[[i for i in members if i != j]] - origin)
                out[j] = _residual((self._references[j] - origin)[None], others).item()
        return out


def _orthonormal(deltas: torch.Tensor) -> torch.Tensor:
    """[P, r] an orthonormal basis of the rows of deltas [K, P] (rank r <= K)."""
    q, r = torch.linalg.qr(deltas.T)
    keep = r.diagonal().abs() > 1e-10 * max(r.diagonal().abs().max().item(), 1e-300)
    return q[:, keep]


def _residual(offsets: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """[n] norm of each offset [n, P] outside the span of basis [P, r]."""
    squared = offsets.pow(2).sum(1) - (offsets @ basis).pow(2).sum(1)
    return squared.clamp_min(0).sqrt()


class NoveltyReference:
    """The training models' side of the novelty statistics, computed once: their pairwise distances, each
    model's nearest other model (its scale) and agreement with it, and (with families) their spans.
    `against(samples)` measures any number of sampled populations (see module docstring).

    Predictions are [m, N] on the examples of `labels` (None: weight space only)."""

    def __init__(
        self,
        references: list[StateDict],
        predictions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_heads: int | None = None,
        align: bool = True,
        families: list[tuple[StateDict, list[int]]] | None = None,
    ):
        if len(references) < 2:
            raise ZooError("novelty needs at least two reference models (their spacing is the scale)")
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
        ranked = aligned if align else raw
        self.scale = ranked.min(1).values  # [m] each model's distance to its nearest other model
        if (self.scale <= 0).any():
            twins = int((self.scale <= 0).sum())
            raise ZooError(f"{twins} reference models have an identical twin: novelty needs distinct models")
        self.nearest_agreement = None  # [m] each model's agreement with its nearest other model
        if predictions is not None:
            self.nearest_agreement = (predictions == predictions[ranked.argmin(1)]).double().mean(1)
        self.spans = FamilySpans(references, families, self.keys) if families else None
        self.rows = self._rows(raw, aligned, predictions)
        if self.spans is not None:
            for row, distance in zip(self.rows, self.spans.leave_one_out()):
                row["span_distance"] = distance

    def against(self, samples: list[StateDict], predictions: torch.Tensor | None = None) -> list[dict]:
        """Per sample: index of the nearest reference, raw and aligned distance to it, the relative distance
        (see module docstring), copy flag, with predictions [n, N] agreement and error IoU with the nearest
        reference, and with families the distance to the nearest family's span."""
        if not samples:
            return []
        for sd in samples:
            mismatched = [k for k in self.keys if k not in sd or sd[k].shape != self.references[0][k].shape]
            if mismatched:
                raise ZooError(f"a sample lacks the zoo's tensors or their shapes: {mismatched[:3]}")
        raw = weight_distances(samples, self.references, self.keys)
        aligned = weight_distances(samples, self.references, self.keys, self.layers) if self.layers else None
        rows = self._rows(raw, aligned, predictions)
        if self.spans is not None:
            for row, distance in zip(rows, self.spans.distances(samples).tolist()):
                row["span_distance"] = distance
        return rows

    def _rows(self, raw: torch.Tensor, aligned: torch.Tensor | None, predictions: torch.Tensor | None) -> list:
        ranked = aligned if aligned is not None else raw  # the metric that picks the nearest model
        relative = ranked / self.scale  # [n, m]
        out = []
        for i in range(ranked.shape[0]):
            j = int(ranked[i].argmin())
            row = {
                "nearest": j,
                "distance": raw[i].min().item(),
                "aligned_distance": None if aligned is None else aligned[i].min().item(),
                "relative_distance": relative[i].min().item(),
            }
            close = relative[i] < COPY_RATIO  # [m] zoo models this one is close to, at their own scale
            if predictions is not None and self.predictions is not None:
                row["agreement"] = agreement(predictions[i], self.predictions[j])
                row["error_iou"] = error_iou(predictions[i], self.predictions[j], self.labels)
                agreements = (predictions[i][None] == self.predictions).double().mean(1)  # [m]
                close &= agreements >= self.nearest_agreement
            row["copy"] = bool(close.any())
            out.append(row)
        return out


def summarize(rows: list[dict]) -> dict:
    """Medians of the per-model statistics, and the share of copies."""
    if not rows:
        return {"n": 0}
    summary = {"n": len(rows), "copies": sum(r["copy"] for r in rows) / len(rows)}
    for key in ("distance", "aligned_distance", "relative_distance", "agreement", "error_iou", "span_distance"):
        values = [r[key] for r in rows if r.get(key) is not None]
        summary[f"median_{key}"] = statistics.median(values) if values else None
    return summary
