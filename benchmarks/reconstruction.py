"""How well a hyper-representation reconstructs the models it was trained on, per fine-tuning slot.

Every training model's last checkpoint is encoded and decoded (no augmentation, no noise) and evaluated on the
digits test split, beside the model itself and beside the non-learned control at the same error: the model plus
isotropic noise at exactly the reconstruction's distance from it. Per slot (optimizer, lr): mean accuracy of the
zoo, of the reconstructions and of the control; the ratio reconstruction / zoo on the mean and the median of the
per-model ratios; the median relative weight error ||reconstruction - w|| / ||w - w0||. The bars of the
hyper-representation: >= 0.95x on the median and >= 0.9x on the mean in every slot.

python -m benchmarks.reconstruction runs/autoencoder/autoencoder.safetensors
"""

from __future__ import annotations

import argparse
import statistics

import torch

from vitzoo.eval.evaluation import evaluate
from vitzoo.generative.hyper import load_autoencoder, reconstruct
from vitzoo.zoo_builder.baselines import noise_around


def accuracies(state_dicts: list[dict], num_heads: int) -> list[float]:
    results = evaluate([(str(i), sd) for i, sd in enumerate(state_dicts)], "digits", "test", num_heads=num_heads)
    return [r.accuracy for r in results]


def flat(state_dict: dict, keys: list[str]) -> torch.Tensor:
    return torch.cat([state_dict[k].double().flatten() for k in keys])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("autoencoder")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_autoencoder(args.autoencoder)
    data = bundle.data
    last = {}
    for i, entry in enumerate(data.entries):
        last[entry.model_id] = i  # entries are sorted by epoch within a model
    indices = sorted(last.values())
    originals = [data.entries[i].state_dict() for i in indices]
    rebuilt = reconstruct(bundle, indices)
    keys = sorted(originals[0])
    distances = [(flat(r, keys) - flat(o, keys)).norm().item() for r, o in zip(rebuilt, originals)]
    sizes = [(flat(o, keys) - flat(data.inits[data.conditions[i].family], keys)).norm().item()
             for o, i in zip(originals, indices)]  # fmt: skip
    control = noise_around(originals, distances, keys, seed=0)
    num_heads = data.architecture.num_heads
    zoo, rec, noise = (accuracies(x, num_heads) for x in (originals, rebuilt, control))
    slots = {}
    for n, i in enumerate(indices):
        factors = data.entries[i].factors
        slots.setdefault((factors["optimizer"], factors["lr"]), []).append(n)
    print(f"{args.autoencoder}: {len(indices)} training models (last checkpoints), digits test split")
    print("| slot | zoo | reconstruction | ratio (mean) | ratio (median) | noise at same distance | relative error |")
    print("|---|---|---|---|---|---|---|")
    for (optimizer, lr), members in [*sorted(slots.items()), (("all", ""), list(range(len(indices))))]:
        z, r, c = ([values[n] for n in members] for values in (zoo, rec, noise))
        ratios = [b / a for a, b in zip(z, r)]
        errors = [distances[n] / sizes[n] for n in members]
        print(f"| {optimizer} {lr} | {statistics.mean(z):.3f} | {statistics.mean(r):.3f} | "
              f"{statistics.mean(r) / statistics.mean(z):.3f} | {statistics.median(ratios):.3f} | "
              f"{statistics.mean(c):.3f} | {statistics.median(errors):.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
