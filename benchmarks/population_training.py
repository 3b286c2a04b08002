"""Images/s of population training (vmap over stacked parameters) vs a per-model loop, in one run.

Same models (the bundled blueprint's ViT), same factors, same batches; only the execution differs.

    python benchmarks/population_training.py                  # 16 models on the CPU, 2 threads
    python benchmarks/population_training.py --models 64 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

from vitzoo.zoo_builder.blueprint import Factors, Run
from vitzoo.zoo_builder.build import initial_state
from vitzoo.zoo_builder.models import Architecture, select_device
from vitzoo.zoo_builder.population import PopulationTrainer

ARCHITECTURE = Architecture(
    "vit_small_patch16_224",
    {"img_size": 28, "patch_size": 7, "in_chans": 1, "embed_dim": 24, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
)


def images_per_second(mode: str, factors: list[Factors], device: torch.device, precision: str) -> float:
    states = [initial_state(Run(f"m{i}", "pretrain", f), ARCHITECTURE, None) for i, f in enumerate(factors)]
    trainer = PopulationTrainer(factors, states, ARCHITECTURE, device, mode, precision)
    trainer.train_epoch(0)  # warm-up: data on the device, kernels chosen
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    trainer.train_epoch(1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    images = len(factors) * (factors[0].train_subset // factors[0].batch_size) * factors[0].batch_size
    return images / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=1280, help="training images per model per epoch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    factors = [
        Factors(
            seed=i,
            lr=1e-3 * (1 + i % 3),
            batch_size=args.batch_size,
            train_subset=args.images,
            augment=0.2,
            dataset="digits",
        )
        for i in range(args.models)
    ]
    loop = images_per_second("loop", factors, device, args.precision)
    population = images_per_second("vmap", factors, device, args.precision)
    params = sum(v.numel() for v in initial_state(Run("m", "pretrain", factors[0]), ARCHITECTURE, None).values())
    print(
        f"{args.models} ViTs ({params} params each), batch {args.batch_size}, {device.type}, {args.precision}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"per-model loop : {loop:10.0f} images/s")
    print(f"vmap population: {population:10.0f} images/s")
    print(f"ratio (population / loop): {population / loop:.2f}x")


if __name__ == "__main__":
    main()
