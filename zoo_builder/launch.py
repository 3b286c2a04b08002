"""Which process this is among those started together: alone, by torchrun, or by SLURM (srun, submitit).

Every command that runs as several processes asks `launched_process()` and nothing else: `vitzoo train` joins a
process group with it (DDP, `generative.runtime`), `vitzoo build` takes its shard of the zoo with it
(`process_shard`). Launchers name the same things differently:

- torchrun (and any `env://` launcher): WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
- SLURM, one process per task (`srun`, or Hydra's submitit launcher with `tasks_per_node`): SLURM_NTASKS,
  SLURM_PROCID, SLURM_LOCALID, SLURM_JOB_NODELIST. The first node of the job is the rendezvous host and the port
  is drawn from the job id as submitit's `TorchDistributedEnvironment` draws it, so every task agrees without
  talking; MASTER_ADDR / MASTER_PORT, when set, win.

torchrun's variables win over SLURM's: torchrun started inside a SLURM allocation (one `srun` task per node, torchrun
spawning the GPUs' processes) sets them for its own children. An sbatch script with `--ntasks=N` must start
vitzoo through `srun`: run directly in the batch step it would take itself for one of N tasks.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass

import torch

from vitzoo.errors import ConfigError
from vitzoo.zoo_builder.blueprint import parse_shard

# submitit's TorchDistributedEnvironment draws the port in this range, seeded by the job id
SLURM_PORT_RANGE = (20000, 60000)


@dataclass(frozen=True)
class LaunchedProcess:
    """This process's place among the processes launched together (rank 0 of 1 when started alone)."""

    launcher: str = "single"  # single | torchrun | slurm
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the rank among the processes of this node: which GPU of the node it takes
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def init_method(self) -> str:
        """How `torch.distributed.init_process_group` finds the others. Under torchrun it must be env:// (torchrun's
        agent already serves its store on MASTER_PORT and its children join it as clients)."""
        return "env://" if self.launcher == "torchrun" else f"tcp://{self.master_addr}:{self.master_port}"


def launched_process(environ: dict[str, str] | None = None) -> LaunchedProcess:
    """This process's rank, world size and rendezvous, from torchrun's or SLURM's environment variables."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        return LaunchedProcess(
            launcher="torchrun",
            rank=_integer(env, "RANK", "0"),
            world_size=_integer(env, "WORLD_SIZE"),
            local_rank=_integer(env, "LOCAL_RANK", "0"),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_integer(env, "MASTER_PORT", "29500"),
        )
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and _integer(env, "SLURM_NTASKS") > 1:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        job_id = env.get("SLURM_JOB_ID", "0")
        return LaunchedProcess(
            launcher="slurm",
            rank=_integer(env, "SLURM_PROCID"),
            world_size=_integer(env, "SLURM_NTASKS"),
            local_rank=_integer(env, "SLURM_LOCALID", "0"),
            master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
            master_port=int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else slurm_port(job_id),
        )
    return LaunchedProcess()


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `gpu[003-005,010],cpu01` -> `gpu003`, `rack[1-2]-n[07-08]` ->
    `rack1-n07` (every bracket gives its first number, zero padding kept)."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]  # split at commas outside brackets
    return re.sub(r"\[([^\]]*)\]", lambda match: re.split(r"[-,]", match.group(1))[0], first)


def slurm_port(job_id: str) -> int:
    """The rendezvous port of a SLURM job: drawn from its id, as submitit's TorchDistributedEnvironment does."""
    return random.Random(job_id).randint(*SLURM_PORT_RANGE)


def process_shard(shard: str, process: LaunchedProcess) -> str:
    """The shard of the zoo this process builds. Alone: `shard` itself. As process r of w: its share of `shard`,
    so that w processes started together never train the same run, and no process is left out: shard i/n split w
    ways is shard (i + n*r)/(n*w), since shards deal families round-robin (every (n*w)-th family from i + n*r is
    every w-th family, from the r-th, of every n-th family from i)."""
    if process.world_size == 1:
        return shard
    index, count = parse_shard(shard)
    return f"{index + count * process.rank}/{count * process.world_size}"


def process_device(device: str, process: LaunchedProcess) -> str:
    """The device this process trains on: one of several processes with device auto or cuda[:i] takes the GPU of its
    local rank (modulo the GPUs it sees, for launchers that give each task one GPU of its own)."""
    wants_cuda = device == "auto" or device.startswith("cuda")
    if process.world_size == 1 or not wants_cuda or not torch.cuda.is_available():
        return device
    return f"cuda:{process.local_rank % torch.cuda.device_count()}"


def _integer(env, name: str, default: str | None = None) -> int:
    value = env.get(name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None
