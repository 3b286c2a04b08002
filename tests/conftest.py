import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Two cores: with pytest-xdist's two workers (pyproject's addopts) each worker gets one torch thread; run alone
# (-n 0), a test process gets both. CLI tests run their subprocess with one thread either way (run_cli).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

REPO = Path(__file__).resolve().parent.parent


def tiny_blueprint(**stage_overrides) -> dict:
    """A blueprint of 2 parents x 2 fine-tunes of a very small ViT on a slice of digits (a few seconds)."""
    blueprint = {
        "name": "test_tiny",
        "architecture": {
            "model_name": "vit_small_patch16_224",
            "kwargs": {
                "img_size": 28,
                "patch_size": 7,
                "in_chans": 1,
                "embed_dim": 16,
                "depth": 1,
                "num_heads": 2,
                "mlp_ratio": 2.0,
            },
        },
        "pretrain": {
            "factors": {"dataset": "digits", "epochs": 2, "batch_size": 32, "train_subset": 256, "lr": 3e-3},
            "grid": [{"seed": [0, 1]}],
        },
        "finetune": {
            "factors": {"dataset": "digits", "epochs": 3, "batch_size": 32, "train_subset": 256, "head_hidden": 8},
            "grid": [{"head": ["linear", "mlp"], "seed": [42]}],
        },
    }
    for stage, factors in stage_overrides.items():
        blueprint[stage]["factors"].update(factors)
    return blueprint


def run_cli(
    *args: str, check: bool = True, timeout: float = 300, wandb: str = "disabled"
) -> subprocess.CompletedProcess:
    """`vitzoo ...` in a subprocess (one torch thread, so it never fights the test process for cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": wandb}
    result = subprocess.run(
        [sys.executable, "-m", "vitzoo.cli", *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO
    )
    if check and result.returncode != 0:
        raise AssertionError(f"vitzoo {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def offline_run_bytes(directory: Path) -> bytes:
    """The record of the one offline W&B run under `directory`.

    `run.finish()` returns before W&B's service process has necessarily flushed the run's file; `wandb.teardown()`
    waits for the service to write everything (a busy machine showed a header-only file without it).
    """
    import wandb

    wandb.teardown()
    (run,) = list((Path(directory) / "wandb").glob("offline-run-*/run-*.wandb"))
    return run.read_bytes()


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    from vitzoo.zoo_builder import Zoo
    from vitzoo.zoo_builder.build import BuildSettings, SavePolicy, build

    out = tmp_path_factory.mktemp("zoo") / "tiny"
    settings = BuildSettings(
        out=out,
        device="cpu",
        progress=False,
        save_pretrain=SavePolicy(keep_init=True),
        save_finetune=SavePolicy(keep_last=2),
    )
    build(tiny_blueprint(), settings)
    return Zoo.open(out)
