"""Where a generative model trains: device, precision, and its processes under torchrun or SLURM (DDP).

`vitzoo train` is the same script on one CPU core or eight GPUs. Started as several processes (`torchrun
--nproc_per_node=N`, or N SLURM tasks: `srun`, Hydra's submitit launcher; `zoo_builder.launch` reads either's
variables) `start_runtime` joins the process group (nccl on CUDA, gloo on CPU); every rank draws the
whole batch of a step from seed and step, as one process does, and computes its contiguous share of it; DDP
averages the gradients, so the result does not depend on the number of processes beyond the order of float
reductions. Rank 0 alone writes checkpoints, logs and shows progress.

Precision: "bf16" runs forward passes and losses under torch.autocast; weights, optimizer state and EMA stay fp32.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vitzoo.errors import ConfigError
from vitzoo.zoo_builder.launch import launched_process, process_device
from vitzoo.zoo_builder.models import autocast, check_precision, select_device


@dataclass
class Runtime:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"  # fp32 | bf16
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        check_precision(self.precision)

    @property
    def main(self) -> bool:
        """Whether this process writes checkpoints and logs (rank 0)."""
        return self.rank == 0

    def share(self, batch_size: int) -> slice:
        """This rank's rows of a batch: contiguous, so that gathering in rank order gives the batch back."""
        if batch_size % self.world_size:
            raise ConfigError(f"batch_size {batch_size} does not split evenly across {self.world_size} processes")
        rows = batch_size // self.world_size
        return slice(self.rank * rows, (self.rank + 1) * rows)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to call in training: DDP over the processes, or the model itself in one process."""
        if self.world_size == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def autocast(self):
        return autocast(self.device, self.precision)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Scalars averaged over the processes (for logs); every rank must call it."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return dict(zip(values, (tensor / self.world_size).tolist()))

    def gather(self, value) -> list:
        """Every rank's `value` (a picklable object), in rank order; every rank must call it."""
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def describe(self) -> dict:
        """What a checkpoint records about how it was trained. fp32 is not recorded, so that fp32 checkpoints keep
        the bytes they had before precision was a setting (the shipped generator is retrained byte for byte); the
        number of processes is not recorded, since the result does not depend on it."""
        return {} if self.precision == "fp32" else {"precision": self.precision}

    def expected(self) -> dict:
        """What a training state must record for this runtime to continue it (None: nothing recorded, fp32)."""
        return {"precision": None if self.precision == "fp32" else self.precision}


class StepClock:
    """Throughput of a training loop: optimisation steps per second, data preparation before the loop excluded.

    Readings are taken where the loop has already synchronised with the device (a `.item()` for the logs, the
    checkpoint write at the end), so the clock adds no synchronisation of its own."""

    def __init__(self, batch_size: int, preparing_since: float):
        self.batch_size = batch_size
        self.started = time.perf_counter()
        self.preparation_seconds = self.started - preparing_since
        self.steps = 0

    def tick(self) -> None:
        self.steps += 1

    def steps_per_second(self) -> float:
        return self.steps / max(time.perf_counter() - self.started, 1e-9)

    def write(self, path: Path) -> None:
        """`timing.json` beside the checkpoint (not in it: a checkpoint's bytes must not depend on the machine)."""
        seconds = time.perf_counter() - self.started
        timing = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "training_seconds": round(seconds, 2),
            "steps_per_second": round(self.steps / max(seconds, 1e-9), 3),
            "examples_per_second": round(self.steps * self.batch_size / max(seconds, 1e-9), 1),
            "preparation_seconds": round(self.preparation_seconds, 2),
        }
        Path(path).write_text(json.dumps(timing, indent=1) + "\n")


def timing_line(timing: dict) -> str:
    return (f"{timing['steps']} steps in {timing['training_seconds']:.0f} s: {timing['steps_per_second']:.2f} "
            f"steps/s, {timing['examples_per_second']:.0f} examples/s at batch {timing['batch_size']} "
            f"(data preparation before the first step {timing['preparation_seconds']:.0f} s)")  # fmt: skip


def start_runtime(device: str = "auto", precision: str = "fp32") -> Runtime:
    """The runtime of this process; one of several (torchrun's WORLD_SIZE or SLURM's SLURM_NTASKS > 1) joins the
    process group and takes the GPU of its local rank. `close_runtime` leaves it."""
    check_precision(precision)  # before joining a process group, not after
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {device!r}")
    process = launched_process()
    chosen = select_device(process_device(device, process))
    if process.world_size == 1:
        return Runtime(chosen, precision)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=process.init_method, rank=process.rank,
                                world_size=process.world_size)  # fmt: skip
    return Runtime(chosen, precision, dist.get_rank(), dist.get_world_size())


def close_runtime(runtime: Runtime) -> None:
    """Leave the process group (nothing to do in one process). The trainings end with a barrier; there is none
    here, so that a rank that failed does not leave the others waiting (torchrun or SLURM then stops them all)."""
    if runtime.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
