"""Where a latent diffusion retrain parts from the shipped checkpoint: the machine or the code? One run.

python -m benchmarks.retrain_identity runs/latent-retrain [--against bundled]

The run folder is what `vitzoo train bundled model=latent_diffusion out=<run> threads=2` wrote. Two checks:
1. the preparation (every training checkpoint encoded by the autoencoder, the Dirichlet mixtures built and measured
   on validation) is recomputed in this process and compared bit for bit with the set the run saved in its
   train_state: equal means the preparation is deterministic on this machine;
2. the run's final checkpoint against `--against` (default: the shipped one), tensor by tensor: the standardisation
   statistics come from the preparation alone, so a difference there, with check 1 equal, was made by another
   machine's float kernels before the first training step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vitzoo.cli import measure_on
from vitzoo.generative.checkpoint import read_checkpoint
from vitzoo.generative.latent import BUNDLED_LATENT_DIFFUSION, latent_set, load_latent_diffusion
from vitzoo.zoo_builder import Zoo


def difference(a: torch.Tensor, b: torch.Tensor) -> str:
    return "identical" if torch.equal(a, b) else f"max |difference| {(a - b).abs().max().item():.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the retrain's out folder (latent_diffusion.safetensors, train_state)")
    parser.add_argument("--against", default="bundled", help="the checkpoint to compare with (default: the shipped)")
    parser.add_argument("--threads", type=int, default=2, help="the retrain's threads (float sums follow them)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = args.run / "latent_diffusion.safetensors"
    generator = load_latent_diffusion(checkpoint)
    zoo = Zoo.open("bundled")
    measure = measure_on(zoo.dataset, "val", zoo.architecture.num_heads, None)
    recomputed = latent_set(generator.bundle, generator.slots, generator.epochs, generator.config, measure)
    saved, _ = read_checkpoint(args.run / "train_state.safetensors")
    print("1. preparation recomputed here against the run's saved set:")
    for name in ("latents", "log_scale", "accuracy"):
        print(f"   {name} {tuple(saved[f'extra.{name}'].shape)}: "
              f"{difference(getattr(recomputed, name), saved[f'extra.{name}'])}")  # fmt: skip
    against = BUNDLED_LATENT_DIFFUSION if args.against == "bundled" else Path(args.against)
    ours, _ = read_checkpoint(checkpoint)
    theirs, _ = read_checkpoint(against)
    print(f"2. {checkpoint} against {against}:")
    for group in ("stats.", "model."):
        names = sorted(k for k in ours if k.startswith(group))
        differing = [k for k in names if not torch.equal(ours[k], theirs[k])]
        largest = max((ours[k] - theirs[k]).abs().max().item() for k in differing) if differing else 0.0
        print(f"   {group}*: {len(differing)} of {len(names)} tensors differ (max |difference| {largest:.3g})")
        for name in differing if group == "stats." else []:
            print(f"     {name}: {difference(ours[name], theirs[name])}")


if __name__ == "__main__":
    main()
