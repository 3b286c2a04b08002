"""Training batches of a population drawn from one shared decoded pool, read ahead of the training step.

For datasets kept on disk (`StoredImages`: ImageNet), reading is the expensive part of a step. Instead of every
model reading its own batch (m x b images a step), the epoch's images are read once, in pools of `POOL_STEPS`
batches, and every model draws its own batches from each pool: its own order inside the pool (from its own
generator), its own crop and flip (`augment.py`, unchanged). Reading costs b images a step whatever m is, and each
model still sees every image of the epoch once. The pools are read on a background thread, `PREFETCH_POOLS` ahead,
while the training step runs (on a GPU the step does not wait for the CPU; on the CPU they share the cores).

Orders (per epoch): a shared permutation of the split, from a generator that depends on the epoch only, cut into
pools; inside pool p each model takes a permutation of its images from its own data-order generator. So a model's
batches depend on its seed, the epoch, the split and the batch size, never on the population it sits in.

Shapes: m models, b batch, W images per pool (POOL_STEPS x b), C/H/W image.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from vitzoo.zoo_builder.augment import epoch_generator
from vitzoo.zoo_builder.data import StoredImages

POOL_STEPS = 4  # batches per pool: a model's batch mixes images of 4 batches' worth, in its own order
PREFETCH_POOLS = 2  # pools read ahead of the training step
SHARED_ORDER = 3  # the `purpose` of the shared order's generator (augment.epoch_generator uses 0, 1 and 2 per model)


@dataclass(frozen=True)
class PoolPlan:
    """One epoch of pooled batches: which images each pool holds and which of them each model takes per step."""

    shared: torch.Tensor  # [steps * b] image indices in reading order; pool p is shared[p * W : (p + 1) * W]
    local: torch.Tensor  # [m, steps, b] each model's images at each step, as positions in that step's pool
    batch: int

    @property
    def steps(self) -> int:
        return self.local.shape[1]

    @property
    def pool_images(self) -> int:
        return POOL_STEPS * self.batch

    def pool(self, number: int) -> torch.Tensor:
        """[W] (fewer for the last pool): the image indices of pool `number`, in reading order."""
        return self.shared[number * self.pool_images : (number + 1) * self.pool_images]

    @property
    def pools(self) -> int:
        return -(-self.steps // POOL_STEPS)

    @property
    def order(self) -> torch.Tensor:
        """[m, steps, b] image indices: what every model reads at every step."""
        step_pool = torch.arange(self.steps).div(POOL_STEPS, rounding_mode="floor")  # [steps]
        return self.shared[(step_pool * self.pool_images).view(1, -1, 1) + self.local]


def pool_plan(n: int, batch: int, seeds: list[int], epoch: int) -> PoolPlan:
    """The pooled order of an epoch over n images for models with these seeds (see module docstring)."""
    steps = n // batch
    shared = torch.randperm(n, generator=epoch_generator(0, epoch, SHARED_ORDER))[: steps * batch]
    local = []
    for seed in seeds:
        generator = epoch_generator(seed, epoch, 0)  # the model's own data-order generator
        own = []
        for start in range(0, steps, POOL_STEPS):
            images = (min(steps, start + POOL_STEPS) - start) * batch
            own.append(torch.randperm(images, generator=generator))
        local.append(torch.cat(own).view(steps, batch))
    return PoolPlan(shared, torch.stack(local), batch)


def read_ahead(function: Callable, items: Iterable, depth: int) -> Iterator:
    """`function(item)` for each item in order, computed on a background thread up to `depth` items ahead."""
    with ThreadPoolExecutor(max_workers=1) as worker:
        pending = deque()
        for item in items:
            pending.append(worker.submit(function, item))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def pooled_batches(
    images: StoredImages, labels: torch.Tensor, plan: PoolPlan, depth: int = PREFETCH_POOLS
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every step's batches: x [m, b, C, H, W] normalised (not augmented) on the images' device, y [m, b].

    Pools are read and normalised `depth` ahead on a background thread (0: in the caller's thread, when asked
    for); the step only gathers its batches from the pool."""

    def read(number: int) -> torch.Tensor:
        return images.normalise(images.pixels(plan.pool(number).tolist()))  # [W, C, H, W] float on the device

    pools = read_ahead(read, range(plan.pools), depth) if depth else map(read, range(plan.pools))
    order = plan.order.to(labels.device)
    for number, pool in enumerate(pools):
        for step in range(number * POOL_STEPS, min(plan.steps, (number + 1) * POOL_STEPS)):
            local = plan.local[:, step].to(pool.device)  # [m, b]
            yield pool[local], labels[order[:, step]]
