"""Why the generator works in family bases: midpoints of runs vs isotropic noise at the same distance.

For every family of the bundled zoo's linear-head fine-tunes (same parent and head seed: one start) and every
pair of its AdamW runs: the validation accuracy of the midpoint, of the two runs (mean), and of the first run
plus isotropic noise whose norm is the midpoint's distance to it. Then the same midpoints across the two head
seeds of one parent and condition. One run, digits validation split.

python -m benchmarks.family_interpolation
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from vitzoo.eval.evaluation import evaluate
from vitzoo.eval.novelty import shared_keys
from vitzoo.generative.family import FamilyBasis
from vitzoo.zoo_builder import Zoo
from vitzoo.zoo_builder.baselines import noise_around


def mean_accuracy(state_dicts: list[dict], num_heads: int) -> float:
    results = evaluate([(str(i), sd) for i, sd in enumerate(state_dicts)], "digits", "val", num_heads=num_heads)
    return statistics.mean(r.accuracy for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    basis = FamilyBasis(Zoo.open("bundled"), head="linear")
    num_heads = basis.architecture.num_heads
    adamw = [k for k, (optimizer, _) in enumerate(basis.slots) if optimizer == "adamw"]
    midpoints, anchors, distances, ends = [], [], [], []
    for family in range(basis.num_families):
        for a, b in itertools.combinations(adamw, 2):
            coordinates = torch.zeros(basis.num_slots)
            coordinates[[a, b]] = 0.5
            midpoints.append(basis.decode(family, coordinates))
            anchors.append(basis.decode(family, torch.eye(basis.num_slots)[a]))
            distances.append(basis.distances(family, coordinates[None])[0, a].item())
            ends.append((basis.val_acc[family, a] + basis.val_acc[family, b]).item() / 2)
    keys = shared_keys(anchors)
    noisy = noise_around(anchors, distances, keys, seed=0)
    across, across_ends = [], []
    for f, g in itertools.combinations(range(basis.num_families), 2):
        if basis.families[f][0] != basis.families[g][0]:
            continue  # other parent
        for k in range(basis.num_slots):
            one, two = basis.decode(f, torch.eye(basis.num_slots)[k]), basis.decode(g, torch.eye(basis.num_slots)[k])
            across.append({key: (one[key] + two[key]) / 2 for key in one})
            across_ends.append((basis.val_acc[f, k] + basis.val_acc[g, k]).item() / 2)
    midpoint, noise = mean_accuracy(midpoints, num_heads), mean_accuracy(noisy, num_heads)
    print(f"{len(midpoints)} midpoints of two AdamW runs of one family (digits val, mean accuracy):")
    print(f"  the two runs          {statistics.mean(ends):.3f}")
    print(f"  their midpoint        {midpoint:.3f}   (median distance to a run {statistics.median(distances):.2f})")
    print(f"  run + isotropic noise {noise:.3f}   (same distance)")
    print(f"  ratio midpoint / noise: {midpoint / noise:.2f}x")
    print(f"{len(across)} midpoints of the two head seeds of one parent and condition:")
    print(f"  the two runs {statistics.mean(across_ends):.3f}, their midpoint {mean_accuracy(across, num_heads):.3f}")


if __name__ == "__main__":
    main()
