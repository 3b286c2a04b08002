"""Generator training infrastructure: bf16, DDP (gloo on CPU, as under torchrun), logging that never changes
the result, autoencoder embeddings for W&B."""

import math
import os
import socket
from dataclasses import replace

import pytest
import torch
from conftest import offline_run_bytes, run_cli

from vitzoo.generative.autoencoder import AutoencoderConfig, HyperAutoencoder
from vitzoo.generative.checkpoint import read_checkpoint
from vitzoo.generative.diffusion import DiffusionConfig
from vitzoo.generative.generator import train_generator
from vitzoo.generative.hyper import (
    AutoencoderObjective,
    augmented_views,
    embedding_rows,
    load_autoencoder,
    train_autoencoder,
)
from vitzoo.generative.runtime import Runtime, close_runtime, start_runtime
from vitzoo.tokenizer.symmetries import permutable_layers
from vitzoo.tokenizer.tokens import detokenize
from vitzoo.zoo_builder import Zoo
from vitzoo.zoo_builder.zoo import ZooError

DIFFUSION = DiffusionConfig(d_model=16, depth=1, heads=2, mixtures=24, steps=12, batch_size=16)
AUTOENCODER = AutoencoderConfig(d_model=16, depth=1, heads=2, steps=4, batch_size=4)


def fake_measure(state_dicts):
    """Stands in for the evaluator: a deterministic number per model (the head's mean weight)."""
    return [float(sd["head.weight"].mean()) for sd in state_dicts]


@pytest.mark.parametrize("window", [0, 64])
def test_loss_draws_negatives_from_the_gathered_batch(window):
    """What data-parallel training relies on: NT-Xent over the gathered embeddings of every rank's share, the
    reconstruction over this share only, and the share's gradient scaled by the number of ranks."""
    from vitzoo.generative.data import DeltaSet
    from vitzoo.generative.hyper import _ScaleGradient

    data = DeltaSet(Zoo.open("bundled"))
    config = replace(AUTOENCODER, window=window, window_stride=window // 2)
    torch.manual_seed(0)
    model = HyperAutoencoder(data.spec, config)
    layers = permutable_layers(detokenize(data.tokens[0], data.spec), data.num_heads)
    views, clean, index = augmented_views(data, torch.arange(4), config, torch.Generator().manual_seed(0), layers)
    _, alone = AutoencoderObjective(model)(views, clean, index)  # one process: the model's own loss
    others = torch.randn(2, 4, config.embedding)  # another rank's share of embeddings
    _, gathered = model.loss(views, clean, index, gather=lambda e: torch.cat([e, others], dim=1))
    assert gathered["reconstruction"] == alone["reconstruction"] and gathered["contrastive"] != alone["contrastive"]
    x = torch.ones(3, requires_grad=True)
    _ScaleGradient.apply(x, 4.0).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 4.0))


def test_bf16_autoencoder_training_has_finite_losses_and_fp32_weights(tmp_path):
    logs = []
    path = train_autoencoder(Zoo.open("bundled"), tmp_path, AUTOENCODER, progress=False, log=logs.append,
                             runtime=Runtime(torch.device("cpu"), "bf16"))  # fmt: skip
    weights, metadata = read_checkpoint(path)
    assert metadata["precision"] == "bf16" and all(v.dtype == torch.float32 for v in weights.values())
    assert logs and all(math.isfinite(row["train/loss"]) for row in logs)


def test_bf16_generator_training_has_finite_losses_and_is_not_resumed_in_fp32(tmp_path):
    zoo = Zoo.open("bundled")
    logs = []
    path = train_generator(zoo, tmp_path, DIFFUSION, fake_measure, progress=False, log=logs.append,
                           runtime=Runtime(torch.device("cpu"), "bf16"))  # fmt: skip
    weights, metadata = read_checkpoint(path)
    assert metadata["precision"] == "bf16" and all(v.dtype == torch.float32 for v in weights.values())
    assert logs and all(math.isfinite(row["train/loss"]) for row in logs)
    with pytest.raises(ZooError, match="another config"):  # a bf16 training state is not continued in fp32
        train_generator(zoo, tmp_path, DIFFUSION, fake_measure, progress=False)
    with pytest.raises(ValueError, match="precision"):
        Runtime(torch.device("cpu"), "fp16")


def test_logging_receives_sample_accuracy_and_changes_nothing(tmp_path):
    zoo = Zoo.open("bundled")
    quiet = train_generator(zoo, tmp_path / "quiet", DIFFUSION, fake_measure, progress=False)
    logs = []
    measured = []

    def measure(state_dicts):
        measured.append(len(state_dicts))
        return fake_measure(state_dicts)

    logged = train_generator(zoo, tmp_path / "logged", DIFFUSION, measure, progress=False, log=logs.append,
                             sample_every=5, sample_n=3)  # fmt: skip
    assert quiet.read_bytes() == logged.read_bytes()  # sampling draws from its own generators
    samples = [row for row in logs if "sample/val_acc" in row]
    assert [row["step"] for row in samples] == [4, 9, 11]  # every 5 steps and at the end
    assert all(math.isfinite(row["sample/val_acc"]) for row in samples) and measured[-3:] == [3, 3, 3]
    losses = [row for row in logs if "train/loss" in row]
    assert losses[0]["step"] == 0 and losses[0]["train/lr"] == DIFFUSION.lr
    assert all(row["train/steps_per_second"] > 0 for row in losses)


def test_autoencoder_embeddings_are_logged_as_a_table(tmp_path):
    from vitzoo.zoo_builder.logger import LoggerConfig, make_logger

    path = train_autoencoder(Zoo.open("bundled"), tmp_path / "a", AUTOENCODER, progress=False)
    rows = embedding_rows(load_autoencoder(path))
    assert len(rows) == 300 and {"model_id", "val_acc", "pca_x", "pca_y", "e0", "e31"} <= set(rows[0])
    logger = make_logger(LoggerConfig(kind="wandb", mode="offline"), {}, "bundled", tmp_path, job_type="train")
    try:
        logger.log_report({"autoencoder/embeddings": rows}, {})
    finally:
        logger.finish()
    assert b"autoencoder/embeddings" in offline_run_bytes(tmp_path)


# ------------------------------------------------------------------------------------------------------ DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, world_size: int, port: int, zoo_root: str, out: str) -> None:
    """One rank of a CPU run, with the environment torchrun would give it."""
    from pathlib import Path

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))  # fmt: skip
    runtime = start_runtime("cpu")
    try:
        zoo = Zoo.open(zoo_root)
        train_autoencoder(zoo, Path(out) / "autoencoder", AUTOENCODER, progress=False, runtime=runtime)
        train_generator(zoo, Path(out) / "generator", DDP_DIFFUSION, fake_measure, progress=False, runtime=runtime)
    finally:
        close_runtime(runtime)


# 600 mixtures: three chunks of the measurement, shared out between the ranks
DDP_DIFFUSION = DiffusionConfig(d_model=16, depth=1, heads=2, mixtures=600, steps=6, batch_size=16)


def assert_same_weights(one, two, atol: float) -> None:
    (a, a_meta), (b, b_meta) = read_checkpoint(one), read_checkpoint(two)
    assert a_meta == b_meta and a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.mark.slow  # two fresh processes import torch, timm and diffusers: 35 s on 2 busy cores
def test_two_gloo_processes_train_what_one_process_trains(tmp_path, tiny_zoo):
    """Each rank computes half of every batch; DDP averages the gradients and the autoencoder's NT-Xent sees the
    whole batch, so two processes give one process's weights up to the order of float sums (the gradient is a
    mean of two half-batch means instead of one mean; Adam then carries the ~1e-8 difference on)."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_rank, args=(2, _free_port(), str(tiny_zoo.root), str(tmp_path / "two")), nprocs=2, join=True)
    zoo = tiny_zoo
    one_autoencoder = train_autoencoder(zoo, tmp_path / "one" / "autoencoder", AUTOENCODER, progress=False)
    one_generator = train_generator(zoo, tmp_path / "one" / "generator", DDP_DIFFUSION, fake_measure, progress=False)
    assert_same_weights(one_autoencoder, tmp_path / "two" / "autoencoder" / "autoencoder.safetensors", atol=1e-5)
    assert_same_weights(one_generator, tmp_path / "two" / "generator" / "generator.safetensors", atol=1e-5)
    # the mixtures measured by the two ranks were gathered in order: the same training set as one process measured
    one_state, _ = read_checkpoint(tmp_path / "one" / "generator" / "train_state.safetensors")
    two_state, _ = read_checkpoint(tmp_path / "two" / "generator" / "train_state.safetensors")
    assert torch.equal(one_state["extra.accuracy"], two_state["extra.accuracy"])


def test_runtime_refuses_what_it_cannot_split_or_run():
    with pytest.raises(ValueError, match="does not split evenly"):
        Runtime(torch.device("cpu"), "fp32", rank=0, world_size=3).share(16)
    assert Runtime(torch.device("cpu"), "fp32", rank=1, world_size=2).share(16) == slice(8, 16)
    with pytest.raises(ValueError, match="device must be"):
        start_runtime("tpu")


@pytest.mark.slow
def test_torchrun_cli_trains_the_autoencoder_on_two_processes(tmp_path):
    """The documented command, `torchrun --nproc_per_node=2 -m vitzoo.cli train ...`, on CPU (gloo)."""
    import subprocess
    import sys

    from conftest import REPO

    small = ["model=autoencoder", "model.steps=4", "model.batch_size=4", "model.d_model=16", "model.depth=1",
             "model.heads=2", "progress=false", "device=cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "vitzoo.cli", "train",
               "bundled", *small, f"out={tmp_path / 'two'}"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("autoencoder written to") == 1  # rank 0 alone prints
    run_cli("train", "bundled", *small, f"out={tmp_path / 'one'}")
    assert_same_weights(tmp_path / "one" / "autoencoder.safetensors", tmp_path / "two" / "autoencoder.safetensors",
                        atol=1e-5)  # fmt: skip
