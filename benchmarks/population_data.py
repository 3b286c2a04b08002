"""Images/s into a population of m models from ImageNet files: the shared pool read ahead vs each model decoding its
own batch inside the step (the data path before), in one run, with a stand-in training step of fixed cost.

python benchmarks/population_data.py                        # synthetic 500 x 375 JPEGs, m = 1, 4, 16, CPU
python benchmarks/population_data.py --root <data_root>     # the first images of a real <data_root>/imagenet/train
python benchmarks/population_data.py --device cuda          # decoded by nvJPEG on the GPU

The stand-in step sleeps `--step-ms` (the CPU is free meanwhile, as while a GPU trains). "wait" is the share of the
run the step spent waiting for its batch. The baseline's rate is steady from the first step (it never reads ahead),
so it runs `--baseline-steps` steps only. "prepared" reads the same images from a memory-mapped uint8 shard
(what `vitzoo prepare imagenet` writes), decoded once before timing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.imagenet_decoding import real_jpegs, synthetic_jpegs
from vitzoo.zoo_builder.data import DATASETS, ImageFiles, StoredImages
from vitzoo.zoo_builder.pool import pool_plan, pooled_batches
from vitzoo.zoo_builder.prepared import PreparedImages


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_run(batches, steps: int, step_seconds: float, device: torch.device) -> tuple[float, float]:
    """(seconds, seconds spent waiting for batches) of `steps` steps of the stand-in training step."""
    started = time.perf_counter()
    waited = 0.0
    iterator = iter(batches)
    for _ in range(steps):
        asked = time.perf_counter()
        x, _ = next(iterator)
        synchronize(device)  # the batch is on the device: what a training step would wait for
        waited += time.perf_counter() - asked
        time.sleep(step_seconds)  # the training step: fixed cost, the CPU free
    return time.perf_counter() - started, waited


def baseline_batches(images: StoredImages, labels: torch.Tensor, order: torch.Tensor):
    """The path before: every model's batch decoded in the step, m x b images (population.py's tensor path)."""
    for step in range(order.shape[1]):
        index = order[:, step]
        yield images[index], labels[index]


def measure(images: StoredImages, models: int, batch: int, steps: int, baseline_steps: int, step_seconds: float,
            include_prepared: PreparedImages | None = None) -> dict:  # fmt: skip
    """Images/s into m models and the share of time waiting on data: the baseline, the shared pool read ahead and
    (given) the shared pool from a prepared cache."""
    labels = torch.zeros(len(images), dtype=torch.long, device=images.device)
    plan = pool_plan(len(images), batch, list(range(models)), epoch=0)
    delivered = models * batch
    seconds, waited = timed_run(baseline_batches(images, labels, plan.order), baseline_steps, step_seconds,
                                images.device)  # fmt: skip
    result = {"models": models, "baseline": delivered * baseline_steps / seconds, "baseline_wait": waited / seconds}
    seconds, waited = timed_run(pooled_batches(images, labels, plan), steps, step_seconds, images.device)
    result.update({"pooled": delivered * steps / seconds, "pooled_wait": waited / seconds})
    if include_prepared is not None:
        seconds, waited = timed_run(pooled_batches(include_prepared, labels, plan), steps, step_seconds,
                                    images.device)  # fmt: skip
        result.update({"prepared": delivered * steps / seconds, "prepared_wait": waited / seconds})
    result["ratio"] = result["pooled"] / result["baseline"]
    return result


def prepared_copy(files: ImageFiles, folder: Path) -> PreparedImages:
    """The files decoded once into one memory-mapped shard, as `vitzoo prepare` stores them."""
    shard = np.lib.format.open_memmap(folder / "shard.npy", mode="w+", dtype=np.uint8,
                                      shape=(len(files), files.size, files.size, 3))  # fmt: skip
    shard[:] = files.to("cpu").pixels(list(range(len(files)))).permute(0, 2, 3, 1).numpy()
    shard.flush()
    mapped = np.load(folder / "shard.npy", mmap_mode="r")
    labels = torch.zeros(len(files), dtype=torch.long)
    return PreparedImages([mapped], np.arange(len(files)), labels, files.size, files.mean, files.std, files.device)


def run(models: list[int], batch: int, steps: int, baseline_steps: int, step_ms: float, device: str,
        root: str | None = None, workers: int | None = None) -> dict:  # fmt: skip
    """Every measurement of the module docstring, as a dict (benchmarks/gpu_check.py records it)."""
    meta = DATASETS["imagenet"]
    with tempfile.TemporaryDirectory() as folder:
        count = steps * batch
        paths = real_jpegs(root, count) if root else synthetic_jpegs(Path(folder), count)
        files = ImageFiles(paths, meta.image_size, meta.mean, meta.std, device, workers)
        prepared = prepared_copy(files, Path(folder))  # also warms the page cache for every file
        files[0:batch]  # warm-up: threads, kernels (nvJPEG's first call)
        rows = [measure(files, m, batch, steps, baseline_steps, step_ms / 1000, prepared) for m in models]
    return {"images": count, "batch": batch, "steps": steps, "step_ms": step_ms, "device": str(files.device),
            "workers": files.workers, "source": root or "synthetic 500x375 JPEGs", "rows": rows}  # fmt: skip


def report(result: dict) -> str:
    lines = [
        f"{result['images']} JPEGs ({result['source']}) to [3, 224, 224], batch {result['batch']} per model, "
        f"{result['steps']} steps, stand-in step {result['step_ms']:.0f} ms, {result['device']}, "
        f"{result['workers']} decoding threads",
        f"{'models':>6} | {'before: images/s':>16} {'wait':>5} | {'shared pool':>11} {'wait':>5} | "
        f"{'prepared':>8} {'wait':>5} | ratio (pool / before)",
    ]
    for row in result["rows"]:
        lines.append(
            f"{row['models']:>6} | {row['baseline']:>16.0f} {row['baseline_wait']:>5.0%} | {row['pooled']:>11.0f} "
            f"{row['pooled_wait']:>5.0%} | {row.get('prepared', float('nan')):>8.0f} "
            f"{row.get('prepared_wait', float('nan')):>5.0%} | {row['ratio']:.2f}x"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--batch", type=int, default=32, help="images per model per step")
    parser.add_argument("--steps", type=int, default=16, help="steps of the shared pool (4 pools)")
    parser.add_argument("--baseline-steps", type=int, default=2)
    parser.add_argument("--step-ms", type=float, default=100.0, help="the stand-in training step's cost")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (and decoding threads)")
    parser.add_argument("--root", default=None, help="a data_root holding imagenet/train (default: synthetic)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.models, args.batch, args.steps, args.baseline_steps, args.step_ms, args.device, args.root,
                 args.threads)  # fmt: skip
    print(report(result))


if __name__ == "__main__":
    main()
