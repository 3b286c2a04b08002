"""Models/s of batched evaluation (vmap over stacked weights) vs a per-model loop, same models, one run.

python benchmarks/evaluation.py                 # 64 bundled-zoo ViTs on the digits test split, CPU
python benchmarks/evaluation.py --device cuda --models 240
"""

from __future__ import annotations

import argparse
import time

import torch

from vitzoo.eval.evaluation import evaluate
from vitzoo.zoo_builder import Zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zoo = Zoo.open("bundled").filter(stage="finetune", head="linear", epoch="last")
    zoo.entries = zoo.entries[: args.models]
    evaluate(zoo.filter(model_id=zoo[0].model_id), "digits", device=args.device)  # warm-up: data, kernels
    # (label, mode, models per vmapped forward, images per forward): the defaults, then smaller working sets
    settings = [
        ("per-model loop", "loop", 64, 500),
        ("vmap, 64 models x 500 images", "vmap", 64, 500),
        ("vmap, 16 models x 128 images", "vmap", 16, 128),
        ("vmap, 8 models x 128 images", "vmap", 8, 128),
    ]
    timings = {}
    for label, mode, chunk_size, batch_size in settings:
        started = time.perf_counter()
        results = evaluate(zoo, "digits", "test", mode=mode, chunk_size=chunk_size, batch_size=batch_size,
                           device=args.device)  # fmt: skip
        timings[label] = time.perf_counter() - started
        assert all(r.error is None for r in results)
    n = len(zoo)
    print(
        f"{n} bundled ViTs, digits test split ({len(results[0].predictions)} images), {args.device}, "
        f"{torch.get_num_threads()} threads; times include loading and checking every checkpoint"
    )
    loop = timings["per-model loop"]
    for label, seconds in timings.items():
        print(f"{label:30s}: {n / seconds:8.1f} models/s  ({loop / seconds:.2f}x the loop)")


if __name__ == "__main__":
    main()
