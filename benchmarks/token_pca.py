"""How many numbers per token a hyper-representation needs: per-position PCA of the bundled zoo's delta tokens.

For every token position, the principal components of the 300 linear-head fine-tuned checkpoints' unit-scale delta
tokens (`generative.data.DeltaSet`); each checkpoint projected onto the top k and decoded. Prints, per k, the median
relative token error and the digits test accuracy of the last checkpoints' projections against the models'
own, overall and as the median per-model ratio of each fine-tuning slot (a linear per-position code: the ceiling
an autoencoder with k-d token latents and no cross-token help has; the token width is 25).

python -m benchmarks.token_pca
"""

from __future__ import annotations

import argparse

import torch

from vitzoo.eval.evaluation import evaluate
from vitzoo.generative.data import DeltaSet, slot_of
from vitzoo.zoo_builder import Zoo


def accuracies(state_dicts: list[dict]) -> torch.Tensor:
    results = evaluate([(str(i), sd) for i, sd in enumerate(state_dicts)], "digits", "test", num_heads=2)
    return torch.tensor([r.accuracy for r in results])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = DeltaSet(Zoo.open("bundled"), "linear")
    tokens = data.tokens  # [n, T, d], each checkpoint at unit RMS
    last = {e.model_id: i for i, e in enumerate(data.entries)}  # entries are sorted by epoch within a model
    indices = sorted(last.values())
    slots = [slot_of(data.entries[i].factors) for i in indices]

    def decoded(values: torch.Tensor) -> list[dict]:
        return [data.decode(values[i], data.conditions[i].family, data.scales[i]) for i in indices]

    truth = accuracies(decoded(tokens))
    mean = tokens.mean(dim=0)  # [T, d]
    centred = tokens - mean
    print(f"{len(indices)} models (last checkpoints), zoo mean test accuracy {truth.mean():.3f}")
    directions = [torch.linalg.svd(centred[:, t], full_matrices=False)[2] for t in range(tokens.shape[1])]  # [d, d]
    for k in (4, 8, 12, 16, 20, 24):
        projected = torch.empty_like(tokens)
        for t in range(tokens.shape[1]):  # the top k directions of position t, rows ordered by variance
            projected[:, t] = mean[t] + (centred[:, t] @ directions[t][:k].T) @ directions[t][:k]
        error = ((projected - tokens).pow(2) * data.mask).sum(dim=(1, 2)).sqrt()  # unit RMS: relative to the delta
        error = error / (tokens.pow(2) * data.mask).sum(dim=(1, 2)).sqrt()
        got = accuracies(decoded(projected))
        ratio = got / truth
        per_slot = ", ".join(
            f"{optimizer} {lr:g} {ratio[[s == (optimizer, lr) for s in slots]].median():.3f}"
            for optimizer, lr in sorted(set(slots))
        )
        print(
            f"k={k:2d}: median relative token error {error[indices].median():.3f}, mean accuracy {got.mean():.3f} "
            f"({got.mean() / truth.mean():.3f}x the models), median per-model ratio {ratio.median():.3f}; "
            f"per slot: {per_slot}"
        )


if __name__ == "__main__":
    main()
