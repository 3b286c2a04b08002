"""Where the latent diffusion loses what the zoo has, in one run (digits test split):

1. spread: the median distance between two real runs of one family, against the same distance between their
   autoencoder reconstructions (encode -> decode, no noise). If the reconstructions keep the spread, the
   autoencoder is not what crowds the latent diffusion's draws of a family together.
2. slot scales: for draws conditioned on a slot (optimizer, lr), the generated delta scale against the scale of
   the real run of that family and slot, and the draws' accuracy with the generated scale and with the real run's
   (a diagnostic only: taking the real scale copies a number from the zoo).

python -m benchmarks.latent_diagnostics [--checkpoint runs/latent/latent_diffusion.safetensors] [--n 20]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from vitzoo.eval.evaluation import evaluate
from vitzoo.eval.novelty import flatten, shared_keys
from vitzoo.generative.hyper import reconstruct
from vitzoo.generative.latent import load_latent_diffusion, sample_latent


def within_family_spread(states: list[dict], families: list[int]) -> float:
    flat = flatten(states, shared_keys(states))
    groups: dict[int, list[int]] = {}
    for i, family in enumerate(families):
        groups.setdefault(family, []).append(i)
    return statistics.median(torch.dist(flat[i], flat[j]).item() for members in groups.values()
                             for a, i in enumerate(members) for j in members[a + 1 :])  # fmt: skip


def mean_accuracy(states: list[dict]) -> float:
    results = evaluate([(str(i), s) for i, s in enumerate(states)], "digits", "test", num_heads=2)
    return statistics.fmean(r.accuracy for r in results if r.error is None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="bundled", help="a latent diffusion checkpoint (default: the shipped)")
    parser.add_argument("--n", type=int, default=20, help="draws per slot")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = load_latent_diffusion(args.checkpoint)
    data = generator.bundle.data
    last = {}  # model id -> index of its last checkpoint; (family, optimizer, lr) -> the same
    for i, entry in enumerate(data.entries):
        last[entry.model_id] = i  # entries are sorted by epoch within a model
    runs = sorted(last.values())
    of_slot = {(data.conditions[i].family, data.entries[i].factors["optimizer"], data.entries[i].factors["lr"]): i
               for i in runs}  # fmt: skip

    families = [data.conditions[i].family for i in runs]
    real = [data.entries[i].state_dict() for i in runs]
    rebuilt = reconstruct(generator.bundle, runs)
    print(f"within-family spread: the {len(runs)} real runs {within_family_spread(real, families):.3f}, "
          f"their reconstructions {within_family_spread(rebuilt, families):.3f}\n")  # fmt: skip

    print(
        "| slot | generated scale / real run's: median [min, max] | acc, generated scale | acc, real run's scale "
        "| real runs |"
    )
    print("|---|---|---|---|---|")
    drawn = []  # (tokens, family, scale) of every decode: what the sampler generated
    decode = data.decode
    data.decode = lambda tokens, family, scale: (
        drawn.append((tokens, family, float(scale))) or decode(tokens, family, scale)
    )
    for optimizer, lr in generator.slots:
        drawn.clear()
        samples, _ = sample_latent(generator, args.n, seed=7, optimizer=optimizer, lr=lr)
        matching = [of_slot[(family, optimizer, lr)] for _, family, _ in drawn]
        ratios = [scale / float(data.scales[i]) for (_, _, scale), i in zip(drawn, matching)]
        rescaled = [decode(tokens, family, data.scales[i]) for (tokens, family, _), i in zip(drawn, matching)]
        zoo = statistics.fmean(data.entries[i].metrics["test_acc"] for i in matching)
        print(
            f"| {optimizer} {lr:g} | {statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}] | "
            f"{mean_accuracy([s for s, _, _ in samples]):.3f} | {mean_accuracy(rescaled):.3f} | {zoo:.3f} |"
        )
    data.decode = decode


if __name__ == "__main__":
    main()
