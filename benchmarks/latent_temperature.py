"""Sampling temperature of the shipped latent diffusion: accuracy against diversity, beside SANE's KDE.

The temperature scales the initial noise of DDIM sampling (1: as trained; lower draws nearer each family's most
likely latents, the usual truncation trade). For each temperature: 120 unconditioned draws (seed 0), their mean
test accuracy, the measured share of copies and median relative distance to the nearest zoo model (eval.novelty,
raw weights), and the within-family spread: the median L2 distance between two draws of the same family, as a
ratio to temperature 1's (the zoo's own: between two runs of a family). KDE's 120 draws from the same autoencoder
(the demo's sampler settings) are the non-learned reference. One run, digits test split.

python -m benchmarks.latent_temperature [--checkpoint runs/latent/latent_diffusion.safetensors]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from vitzoo.eval.evaluation import evaluate
from vitzoo.eval.novelty import NoveltyReference, flatten, shared_keys, summarize
from vitzoo.generative.hyper import BUNDLED_AUTOENCODER, load_autoencoder, sample_kde
from vitzoo.generative.latent import load_latent_diffusion, sample_latent
from vitzoo.zoo_builder import Zoo
from vitzoo.zoo_builder.data import load_split

TEMPERATURES = (1.0, 0.85, 0.7, 0.5)


def measure(samples, parents, reference: NoveltyReference) -> dict:
    states = [state for state, _, _ in samples]
    results = evaluate([(str(i), s) for i, s in enumerate(states)], "digits", "test", num_heads=2)
    novelty = summarize(reference.against(states, torch.stack([r.predictions for r in results])))
    groups: dict[tuple, list[int]] = {}
    for i, ((_, factors, _), parent) in enumerate(zip(samples, parents)):
        groups.setdefault((parent, factors.get("family_seed")), []).append(i)
    flat = flatten(states, shared_keys(states))
    within = [torch.dist(flat[i], flat[j]).item() for members in groups.values()
              for a, i in enumerate(members) for j in members[a + 1 :]]  # fmt: skip
    return {"accuracy": statistics.fmean(r.accuracy for r in results), "copies": novelty["copies"],
            "relative": novelty["median_relative_distance"], "spread": statistics.median(within)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", default="bundled", help="a latent diffusion checkpoint (default: the shipped)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zoo = Zoo.open("bundled")
    models = list(zoo.filter(stage="finetune", epoch="last", head="linear"))
    states = [m.state_dict() for m in models]
    results = evaluate([(m.model_id, s) for m, s in zip(models, states)], "digits", "test", num_heads=2)
    _, labels = load_split("digits", "test")
    reference = NoveltyReference(states, torch.stack([r.predictions for r in results]), labels, 2, align=False)
    generator = load_latent_diffusion(args.checkpoint)
    rows = [(f"latent diffusion, temperature {t}", measure(*sample_latent(generator, 120, 0, temperature=t), reference))
            for t in TEMPERATURES]  # fmt: skip
    kde = measure(*sample_kde(load_autoencoder(BUNDLED_AUTOENCODER), 120, 0, 0.2, 1.0), reference)
    base = rows[0][1]["spread"]
    zoo_groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(models):
        zoo_groups.setdefault((m.parent_id, m.factors["seed"]), []).append(i)
    flat = flatten(states, shared_keys(states))
    zoo_spread = statistics.median(torch.dist(flat[i], flat[j]).item() for members in zoo_groups.values()
                                   for a, i in enumerate(members) for j in members[a + 1 :])  # fmt: skip
    print(f"zoo runs: mean test acc {statistics.fmean(r.accuracy for r in results):.3f}, within-family spread "
          f"{zoo_spread:.3f} ({zoo_spread / base:.1f}x the latent diffusion's at temperature 1)\n")  # fmt: skip
    print("| sampler | mean test acc | copies | median relative NN distance | within-family spread (x temperature 1) |")
    print("|---|---|---|---|---|")
    for name, row in [*rows, ("latent KDE (SANE; bandwidth 0.2)", kde)]:
        print(f"| {name} | {row['accuracy']:.3f} | {row['copies']:.0%} | {row['relative']:.2f} | "
              f"{row['spread']:.3f} ({row['spread'] / base:.2f}x) |")  # fmt: skip


if __name__ == "__main__":
    main()
