"""The GPU checks in one unattended run: training, evaluation and decoding throughput, written to one JSON.

python -m benchmarks.gpu_check                            # one CUDA GPU, under 10 minutes: out gpu_check.json
python -m benchmarks.gpu_check --device cpu --tiny        # the same code paths on the CPU at tiny sizes, seconds

Checks (each one's numbers under its key of the JSON; a check that fails is recorded under "failures" with its
error, the others still run, and the exit status is 1):
  training    population (vmap) vs per-model loop training of ViT-S/16 at 224 in bf16: images/s, model-steps/s,
              ratio (--tiny: a 2-block 24-wide ViT at 28 in fp32); every loss must be finite
  evaluation  batched (vmap) vs looped evaluation of the bundled zoo's fine-tunes on digits: models/s, ratio;
              the two must give the same accuracies (within 1%)
  decoding    ImageFiles decoding images/s on the device (nvJPEG on CUDA) vs Pillow on the CPU, their pixels'
              agreement, and images/s into populations of m models, shared pool vs before
              (benchmarks/population_data.py)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks import population_data
from benchmarks.imagenet_decoding import synthetic_jpegs
from vitzoo.zoo_builder.blueprint import Factors, Run
from vitzoo.zoo_builder.build import initial_state
from vitzoo.zoo_builder.data import DATASETS, ImageFiles
from vitzoo.zoo_builder.models import Architecture
from vitzoo.zoo_builder.population import PopulationTrainer

VIT_S16 = Architecture("vit_small_patch16_224", {"img_size": 224, "patch_size": 16, "in_chans": 1})
TINY_VIT = Architecture(
    "vit_small_patch16_224",
    {"img_size": 28, "patch_size": 7, "in_chans": 1, "embed_dim": 24, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
)
# sizes of each check: the full run (one GPU, minutes) and --tiny (CPU, seconds)
SIZES = {
    "full": {
        "train_models": 16, "train_batch": 64, "train_steps": 4, "precision": "bf16",
        "eval_models": 240,
        "jpegs": 1024, "decode_batch": 256,
        "pool_models": [1, 4, 16], "pool_batch": 64, "pool_steps": 16, "pool_step_ms": 100.0,
    },
    "tiny": {
        "train_models": 2, "train_batch": 16, "train_steps": 2, "precision": "fp32",
        "eval_models": 4,
        "jpegs": 32, "decode_batch": 16,
        "pool_models": [1, 4], "pool_batch": 4, "pool_steps": 8, "pool_step_ms": 10.0,
    },
}  # fmt: skip


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_training(device: torch.device, tiny: bool, sizes: dict) -> dict:
    """Population vs loop training: the same models, factors and batches; only the execution differs."""
    architecture = TINY_VIT if tiny else VIT_S16
    models, batch, steps = sizes["train_models"], sizes["train_batch"], sizes["train_steps"]
    factors = [Factors(seed=i, lr=1e-3 * (1 + i % 3), batch_size=batch, train_subset=batch * steps, augment=0.2,
                       dataset="digits") for i in range(models)]  # fmt: skip
    states = [initial_state(Run(f"m{i}", "pretrain", f), architecture, None) for i, f in enumerate(factors)]
    result = {"architecture": architecture.kwargs, "models": models, "batch": batch, "steps": steps,
              "precision": sizes["precision"]}  # fmt: skip
    for mode in ("loop", "vmap"):
        trainer = PopulationTrainer(factors, states, architecture, device, mode, sizes["precision"])
        trainer.train_epoch(0)  # warm-up: data on the device, kernels chosen
        synchronize(device)
        started = time.perf_counter()
        losses = trainer.train_epoch(1).values["train_loss"]
        synchronize(device)
        seconds = time.perf_counter() - started
        if not all(torch.isfinite(torch.tensor(losses))):
            raise RuntimeError(f"{mode} training gave non-finite losses: {losses}")
        result[mode] = {
            "seconds": seconds,
            "images_per_s": models * steps * batch / seconds,
            "model_steps_per_s": models * steps / seconds,
            "mean_loss": sum(losses) / len(losses),
        }
        del trainer
    result["ratio"] = result["vmap"]["images_per_s"] / result["loop"]["images_per_s"]
    return result


def check_evaluation(device: torch.device, sizes: dict) -> dict:
    """Batched vs looped evaluation of the bundled zoo's fine-tunes (benchmarks/evaluation.py)."""
    from vitzoo.eval.evaluation import evaluate
    from vitzoo.zoo_builder import Zoo

    zoo = Zoo.open("bundled").filter(stage="finetune", epoch="last")
    zoo.entries = zoo.entries[: sizes["eval_models"]]
    evaluate(zoo.filter(model_id=zoo[0].model_id), "digits", device=device)  # warm-up: data, kernels
    result = {"models": len(zoo), "dataset": "digits/test"}
    accuracies = {}
    for mode in ("loop", "vmap"):
        synchronize(device)
        started = time.perf_counter()
        results = evaluate(zoo, "digits", "test", mode=mode, device=device)
        synchronize(device)
        seconds = time.perf_counter() - started
        errors = [r.error for r in results if r.error is not None]
        if errors:
            raise RuntimeError(f"{mode} evaluation failed for {len(errors)} models: {errors[0]}")
        accuracies[mode] = torch.tensor([r.accuracy for r in results])
        result[mode] = {"seconds": seconds, "models_per_s": len(zoo) / seconds}
    result["ratio"] = result["vmap"]["models_per_s"] / result["loop"]["models_per_s"]
    result["max_accuracy_difference"] = float((accuracies["vmap"] - accuracies["loop"]).abs().max())
    if result["max_accuracy_difference"] > 0.01:
        raise RuntimeError(f"batched and looped accuracies differ by {result['max_accuracy_difference']:.4f}")
    return result


def check_decoding(device: torch.device, sizes: dict) -> dict:
    """ImageFiles on the device vs Pillow on the CPU, then images/s into populations (population_data)."""
    meta = DATASETS["imagenet"]
    batch = sizes["decode_batch"]
    result = {}
    with tempfile.TemporaryDirectory() as folder:
        paths = synthetic_jpegs(Path(folder), sizes["jpegs"])
        on_cpu = ImageFiles(paths, meta.image_size, meta.mean, meta.std)
        on_device = on_cpu.to(device)
        on_cpu[0:batch], on_device[0:batch]  # warm-up: page cache, threads, nvJPEG
        for label, files in (("cpu_pillow", on_cpu), ("device", on_device)):
            synchronize(device)
            started = time.perf_counter()
            for start in range(0, len(files), batch):
                files.pixels(list(range(start, min(len(files), start + batch))))
            synchronize(device)
            result[f"{label}_images_per_s"] = len(files) / (time.perf_counter() - started)
        rows = list(range(min(64, len(paths))))
        if device.type == "cuda" and on_device.decode_torchvision(rows) is None:
            raise RuntimeError("nvJPEG refused the synthetic JPEGs: ImageFiles fell back to Pillow")
        difference = (on_device.pixels(rows).cpu().float() - on_cpu.pixels(rows).float()).abs()
        result["pixel_mean_abs_difference"] = float(difference.mean())  # uint8 units: nvJPEG + resize vs Pillow
        if result["pixel_mean_abs_difference"] > 3:
            raise RuntimeError(f"device decoding differs from Pillow by {result['pixel_mean_abs_difference']:.2f}")
    result["device_vs_cpu"] = result["device_images_per_s"] / result["cpu_pillow_images_per_s"]
    result["population"] = population_data.run(
        sizes["pool_models"], sizes["pool_batch"], sizes["pool_steps"], 2, sizes["pool_step_ms"], str(device)
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: every code path in seconds on the CPU")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--only", nargs="+", choices=["training", "evaluation", "decoding"], default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    sizes = SIZES["tiny" if args.tiny else "full"]
    report = {"device": str(device), "tiny": args.tiny, "torch": torch.__version__, "python": platform.python_version(),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "sizes": sizes,
              "failures": {}}  # fmt: skip
    checks = {
        "training": lambda: check_training(device, args.tiny, sizes),
        "evaluation": lambda: check_evaluation(device, sizes),
        "decoding": lambda: check_decoding(device, sizes),
    }
    for name, check in checks.items():
        if args.only and name not in args.only:
            continue
        check_started = time.perf_counter()
        try:
            report[name] = check()
        except Exception as error:  # recorded, and the run goes on to the other checks; exit status 1 below
            traceback.print_exc()
            report["failures"][name] = f"{type(error).__name__}: {error}"
        print(f"{name}: {time.perf_counter() - check_started:.1f} s", json.dumps(report.get(name), default=str)[:2000])
    report["seconds"] = time.perf_counter() - started
    report["ok"] = not report["failures"]
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'ok' if report['ok'] else 'FAILED: ' + ', '.join(report['failures'])}; {args.out} "
          f"({report['seconds']:.0f} s)")  # fmt: skip
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
