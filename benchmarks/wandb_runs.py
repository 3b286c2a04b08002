"""What one W&B run per model costs a build: the same zoo built with `logger=none` and with W&B runs, in one run.

python benchmarks/wandb_runs.py                 # zoo=digits_tiny (10 models), W&B offline
python benchmarks/wandb_runs.py --seeds 5       # more models: parents x 4 fine-tunes each

Each build writes into a fresh folder; the W&B runs are offline (nothing leaves the machine). The figure that
scales is the seconds per model run (open, log its epochs, close), against the build's own time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from vitzoo.configs import __file__ as configs_file
from vitzoo.zoo_builder.build import BuildSettings, build
from vitzoo.zoo_builder.logger import LoggerConfig, make_logger


def timed_build(blueprint: dict, out: Path, with_wandb: bool) -> tuple[float, int]:
    """Seconds to build `blueprint` into `out`, and the number of W&B runs written."""
    logger = None
    if with_wandb:
        logger = make_logger(LoggerConfig(kind="wandb", mode="offline"), {"zoo": blueprint}, "bench", out.parent)
    started = time.perf_counter()
    try:
        build(blueprint, BuildSettings(out=out, device="cpu", progress=False), logger)
    finally:
        if logger is not None:
            logger.finish()
            logger.wandb.teardown()  # waits until every run's file is written
    seconds = time.perf_counter() - started
    return seconds, len(list((out.parent / "wandb").glob("offline-run-*")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2, help="pre-trained parents (each gets 4 fine-tunes)")
    args = parser.parse_args()
    preset = Path(configs_file).parent / "zoo" / "digits_tiny.yaml"
    blueprint = OmegaConf.to_container(OmegaConf.load(preset))
    blueprint["pretrain"]["grid"] = [{"seed": list(range(args.seeds))}]
    models = args.seeds * 5
    with tempfile.TemporaryDirectory() as folder:
        plain, _ = timed_build(blueprint, Path(folder) / "none" / "zoo", with_wandb=False)
        logged, runs = timed_build(blueprint, Path(folder) / "wandb" / "zoo", with_wandb=True)
    print(f"zoo=digits_tiny with {models} models (2 epochs each), CPU, W&B offline")
    print(f"  logger=none : {plain:6.1f} s")
    print(f"  logger=wandb: {logged:6.1f} s   {runs} W&B runs (1 build + {runs - 1} models)")
    print(f"  ratio       : {logged / plain:.2f}x the build's time; {(logged - plain) / models:.2f} s per model run")


if __name__ == "__main__":
    main()
