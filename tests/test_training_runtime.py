"""Generator training infrastructure: bf16, DDP (gloo on CPU, as under torchrun or SLURM), logging that never
changes the result, autoencoder embeddings for W&B; builds started as several SLURM tasks."""

import math
import os
import socket
from dataclasses import replace

import pytest
import torch
from conftest import offline_run_bytes, run_cli, tiny_blueprint

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
from vitzoo.zoo_builder.blueprint import blueprint_from_config, expand, select_shard
from vitzoo.zoo_builder.build import BuildSettings, build
from vitzoo.zoo_builder.launch import LaunchedProcess, first_host, launched_process, process_shard, slurm_port
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


TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launcher_environment(launcher: str, rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables a launcher gives rank `rank` of `world_size` processes on one node."""
    if launcher == "torchrun":
        return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size)}  # fmt: skip
    # srun (submitit too) sets no MASTER_*: the rendezvous is the job's first node, the port drawn from the job id
    return {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": str(world_size),
            "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_JOB_ID": str(port), "SLURM_NODEID": "0"}  # fmt: skip


def _start_as(launcher: str, rank: int, world_size: int, port: int):
    """This process as rank `rank` of a launch: the launcher's variables only, none left over from another."""
    torch.set_num_threads(1)
    for name in TORCHRUN_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(launcher_environment(launcher, rank, world_size, port))
    return start_runtime("cpu")


def _ddp_rank(rank: int, world_size: int, port: int, zoo_root: str, out: str, launcher: str = "torchrun") -> None:
    """One rank of a CPU run, with the environment torchrun (or srun) would give it."""
    from pathlib import Path

    runtime = _start_as(launcher, rank, world_size, port)
    try:
        zoo = Zoo.open(zoo_root)
        train_autoencoder(zoo, Path(out) / "autoencoder", AUTOENCODER, progress=False, runtime=runtime)
        train_generator(zoo, Path(out) / "generator", DDP_DIFFUSION, fake_measure, progress=False, runtime=runtime)
    finally:
        close_runtime(runtime)


def _slurm_job_id_with_free_port() -> str:
    """A SLURM job id whose drawn rendezvous port is free here."""
    for job_id in range(1000, 2000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", slurm_port(str(job_id))))
            except OSError:
                continue
        return str(job_id)
    raise RuntimeError("no free port")


# 600 mixtures: three chunks of the measurement, shared out between the ranks
DDP_DIFFUSION = DiffusionConfig(d_model=16, depth=1, heads=2, mixtures=600, steps=6, batch_size=16)


def assert_same_weights(one, two, atol: float) -> None:
    (a, a_meta), (b, b_meta) = read_checkpoint(one), read_checkpoint(two)
    assert a_meta == b_meta and a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.mark.slow  # two fresh processes import torch, timm and diffusers: 35 s on 2 busy cores
@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_two_gloo_processes_train_what_one_process_trains(tmp_path, tiny_zoo, launcher):
    """Each rank computes half of every batch; DDP averages the gradients and the autoencoder's NT-Xent sees the
    whole batch, so two processes give one process's weights up to the order of float sums (the gradient is a
    mean of two half-batch means instead of one mean; Adam then carries the ~1e-8 difference on). Started as
    torchrun starts them, or as srun starts two SLURM tasks."""
    import torch.multiprocessing as mp

    port = _free_port() if launcher == "torchrun" else int(_slurm_job_id_with_free_port())
    args = (2, port, str(tiny_zoo.root), str(tmp_path / "two"), launcher)
    mp.spawn(_ddp_rank, args=args, nprocs=2, join=True)
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


# ------------------------------------------------------------------------------------------------- launchers


def test_launched_process_reads_torchrun_and_slurm_alike():
    assert launched_process({}) == LaunchedProcess()
    torchrun = launched_process(launcher_environment("torchrun", 1, 2, 29400))
    slurm = launched_process({**launcher_environment("slurm", 1, 2, 0), "SLURM_JOB_NODELIST": "gpu[007-008]",
                              "SLURM_JOB_ID": "4242"})  # fmt: skip
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.init_method) == (1, 2, 1, "env://")
    assert (slurm.rank, slurm.world_size, slurm.local_rank) == (1, 2, 1)
    assert slurm.init_method == f"tcp://gpu007:{slurm_port('4242')}"
    # a one-task SLURM job is one process; torchrun inside a SLURM allocation is torchrun's
    assert launched_process({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).world_size == 1
    both = launched_process({**launcher_environment("slurm", 0, 2, 7), **launcher_environment("torchrun", 3, 8, 1)})
    assert (both.launcher, both.rank, both.world_size) == ("torchrun", 3, 8)
    explicit = launched_process({**launcher_environment("slurm", 0, 2, 7), "MASTER_ADDR": "head", "MASTER_PORT": "1"})
    assert explicit.init_method == "tcp://head:1"


def test_slurm_node_lists_and_ports_match_submitit():
    assert first_host("gpu[003-005,010],cpu01") == "gpu003"
    assert first_host("rack[1-2]-n[07-08]") == "rack1-n07"
    assert first_host("node12,node13") == "node12"
    submitit = pytest.importorskip("submitit.helpers")
    environment = {**launcher_environment("slurm", 0, 2, 0), "SLURM_JOB_ID": "123456", "SLURM_JOB_NUM_NODES": "1",
                   "SLURM_JOB_NODELIST": "gpu[003-004]", "SUBMITIT_EXECUTOR": "slurm"}  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        for name in TORCHRUN_VARIABLES:
            patch.delenv(name, raising=False)
        for name, value in environment.items():
            patch.setenv(name, value)
        theirs = submitit.TorchDistributedEnvironment()
    ours = launched_process(environment)
    assert (ours.master_addr, ours.master_port, ours.rank, ours.world_size) == (
        theirs.master_addr, theirs.master_port, theirs.rank, theirs.world_size)  # fmt: skip


def _slurm_task(rank: int, world_size: int, job_id: str, results: str) -> None:
    """One SLURM task: joins the others at the job's first node and sums the ranks."""
    from pathlib import Path

    runtime = _start_as("slurm", rank, world_size, int(job_id))
    try:
        total = runtime.mean({"rank": float(runtime.rank)})["rank"] * runtime.world_size
        Path(results, f"{rank}.txt").write_text(f"{runtime.rank} {runtime.world_size} {total:.0f} {runtime.device}")
    finally:
        close_runtime(runtime)


def test_two_slurm_tasks_join_one_process_group(tmp_path):
    """Two processes started as srun starts two tasks (variables set by hand, gloo): each knows its rank from
    SLURM_PROCID, and they meet without MASTER_ADDR or MASTER_PORT."""
    import torch.multiprocessing as mp

    mp.spawn(_slurm_task, args=(2, _slurm_job_id_with_free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"{rank}.txt").read_text() for rank in (0, 1)] == ["0 2 1 cpu", "1 2 1 cpu"]


def test_a_build_started_as_slurm_tasks_splits_the_zoo_between_them(tmp_path, monkeypatch):
    """Two SLURM tasks running the same `vitzoo build` (same out, no shard given) each build their half, whole
    families apiece, and together the whole zoo; with shard=i/n given, each builds its half of that shard."""
    blueprint = tiny_blueprint(pretrain={"epochs": 1}, finetune={"epochs": 1})
    runs = expand(blueprint_from_config(blueprint))
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    built = []
    for rank in (0, 1):
        for name, value in launcher_environment("slurm", rank, 2, 0).items():
            monkeypatch.setenv(name, value)
        build(blueprint, BuildSettings(out=tmp_path / "zoo", device="cpu", progress=False))
        zoo = Zoo.open(tmp_path / "zoo", allow_unfinished=True)
        built.append({entry.model_id for entry in zoo} - set().union(*built))
    assert built == [{run.model_id for run in select_shard(runs, rank, 2)} for rank in (0, 1)]
    assert set().union(*built) == {run.model_id for run in runs}
    # shard i/n split w ways: every family of shard i/n in exactly one process's share (7 families)
    many = tiny_blueprint()
    many["pretrain"]["grid"] = [{"seed": list(range(7))}]
    runs = expand(blueprint_from_config(many))
    families_of = lambda shard: {run.family() for run in select_shard(runs, *map(int, shard.split("/")))}
    for shard in ("0/1", "0/2", "1/2", "2/3"):
        shares = [families_of(process_shard(shard, LaunchedProcess("slurm", rank, 2))) for rank in (0, 1)]
        assert not shares[0] & shares[1] and shares[0] | shares[1] == families_of(shard), shard


def test_the_slurm_launcher_preset_gives_one_task_per_gpu():
    """configs/hydra/launcher/slurm_gpus.yaml composes on top of Hydra's submitit launcher."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from vitzoo.cli import CONFIG_DIR
    from vitzoo.zoo_builder.config import register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            overrides = ["hydra/launcher=slurm_gpus", "hydra.launcher.gpus_per_node=4"]
            cfg = compose(config_name="build", overrides=overrides, return_hydra_config=True)
            launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    finally:
        GlobalHydra.instance().clear()
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == 4
