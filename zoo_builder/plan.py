"""What a build will cost before it spends anything: `vitzoo build zoo=<preset> plan=true`.

For every population group (the runs `build.group_populations` stacks together: they agree on `STACK_FACTORS`)
the plan gives the number of models and of populations, the memory one model takes in a training step, how many
models fit together on an accelerator, the FLOPs of a step, and the zoo's total FLOPs and wall time at a stated
throughput. Nothing is trained and no dataset is read (the split sizes below are those `data.py` carves).

Measured, not guessed: each group's model is built at full size on the meta device (no memory, no init) and one
training step (forward, loss, backward) runs there at the group's batch size:
- activations: the bytes autograd saves for the backward pass (`saved_tensors_hooks`; the weights and the input
  batch, counted apart, excluded). Meta tensors have no autocast, so for bf16 CUDA autocast's casting policy is
  applied by hand (`AutocastPolicy`): matmuls, linears and convolutions take bf16 copies of their inputs; softmax,
  layer norm and the loss run in fp32;
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` over the same step (matmuls, convolutions and attention;
  elementwise work is not counted: a few percent for a ViT).
One model's memory = weights + gradients + optimizer state (fp32; AdamW keeps two moments, SGD one momentum) +
activations + its input batch (fp32 after augmentation; two views for contrastive models). A population step
(`vmap(grad_and_value(...))`, mode=vmap) holds `VMAP_ACTIVATION_FACTOR` times the activations that autograd saves
for one `nn.Module` step: measured on the CPU (tests/test_plan.py), not yet on a GPU. vmap stacks all of it along
the models, so a population of m models holds m times that. Not counted: the evaluation pass (no_grad, at
most `population.EVAL_IMAGES_PER_STEP` images a step for the whole population), the dataset held on the device
(CIFAR: 0.7 GB; ImageNet is decoded per batch), the CUDA context and the allocator's slack: only `USABLE_SHARE` of the
accelerator's memory is taken as usable. tests/test_plan.py checks the per-model memory against a measured CPU
step of a small ViT.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from vitzoo.zoo_builder.blueprint import Blueprint, Factors, Run, expand, select_shard
from vitzoo.zoo_builder.build import group_populations
from vitzoo.zoo_builder.data import info as dataset_info
from vitzoo.zoo_builder.models import Architecture, build_vit, check_precision
from vitzoo.zoo_builder.population import info_nce, smoothed_cross_entropy, stack_key

# (train, val, test) images of each dataset's splits, as data.py carves them (val from the official train split)
SPLIT_SIZES = {
    "digits": (1295, 143, 359),
    "fashion_mnist": (55_000, 5_000, 10_000),
    "cifar10": (45_000, 5_000, 10_000),
    "cifar100": (45_000, 5_000, 10_000),
    "imagenet": (1_229_921, 51_246, 50_000),
}
USABLE_SHARE = 0.9  # of the accelerator's memory: the rest for the CUDA context, cuBLAS workspaces, allocator slack
GIB = 2**30
FP32 = 4  # bytes of weights, gradients, optimizer state and input images
OPTIMIZER_STATES = {"adamw": 2, "sgd": 1}  # fp32 tensors of optimizer state per parameter
# a vmap(grad) population step holds this many times the activations autograd saves for one nn.Module step:
# 4.07-4.13 measured on the CPU (fp32; tiny ViTs of 17-65 tokens, 1-3 blocks, batch 32-128; torch 2.14)
VMAP_ACTIVATION_FACTOR = 4.1

# CUDA autocast's policy (torch.amp docs, "CUDA Ops that can autocast to bfloat16 / float32"), for the ops a ViT uses
LOWER_PRECISION_OPS = {"linear", "matmul", "__matmul__", "mm", "bmm", "addmm", "baddbmm", "conv2d",
                       "scaled_dot_product_attention"}  # fmt: skip
FP32_OPS = {"softmax", "log_softmax", "layer_norm", "cross_entropy", "nll_loss", "normalize", "mse_loss"}


@dataclass
class Accelerator:
    """The accelerator `plan=true` plans for, the build config's `accelerator` (defaults: an H200; H100 SXM has the
    same compute and 80 GB)."""

    name: str = "H200"
    memory_gb: float = 141.0  # GiB
    tflops_bf16: float = 989.0  # peak dense TFLOP/s in bf16
    tflops_fp32: float = 67.0  # peak TFLOP/s in fp32 (PyTorch's default matmuls use no TF32)
    utilisation: float = 0.4  # share of the peak a population step sustains: an assumption, not a measurement
    count: int = 1  # accelerators the zoo is sharded over (shard=i/count each)

    def flops_per_second(self, precision: str) -> float:
        peak = self.tflops_bf16 if precision == "bf16" else self.tflops_fp32
        return peak * 1e12 * self.utilisation


@dataclass
class ModelCost:
    """One model of a population in one training step."""

    parameters: int
    weight_bytes: int  # weights, gradients and optimizer state
    saved_bytes: int  # activations autograd saves for the backward pass of one nn.Module step
    activation_bytes: int  # what a vmap population step holds of them per model (VMAP_ACTIVATION_FACTOR x saved)
    batch_bytes: int  # the input images
    step_flops: float  # forward and backward of one step
    image_forward_flops: float  # one image (one view) through the model: evaluation

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.batch_bytes


@dataclass
class GroupPlan:
    """Runs that train stacked together (they agree on every stack factor), in populations of population_size."""

    stage: str
    label: str
    models: int
    populations: int
    epochs: int
    steps_per_epoch: int
    cost: ModelCost
    fit: int  # models whose training steps fit together on the accelerator
    flops: float  # the whole group: training steps and evaluation of every model


@dataclass
class Plan:
    zoo: str
    precision: str
    population_size: int
    accelerator: Accelerator
    groups: list[GroupPlan]
    flops: float  # the whole zoo
    wall_seconds: float  # on accelerator.count accelerators, one shard each (the largest shard sets the time)

    @property
    def accelerator_hours(self) -> float:
        return self.flops / self.accelerator.flops_per_second(self.precision) / 3600

    def to_dict(self) -> dict:
        data = asdict(self)
        for group, plan in zip(data["groups"], self.groups):
            group["cost"]["total_bytes"] = plan.cost.total_bytes
        return {**data, "accelerator_hours": self.accelerator_hours}


class AutocastPolicy(TorchFunctionMode):
    """CUDA autocast's casts for tensors that have no autocast (meta): the op's floating inputs are cast before it
    runs, above autograd, so autograd saves the casted copies as it does under torch.autocast."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        dtype = self.dtype if name in LOWER_PRECISION_OPS else torch.float32 if name in FP32_OPS else None
        if dtype is not None:
            cast = lambda a: a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            args, kwargs = tree_map(cast, (args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def image_shape(architecture: Architecture, factors: Factors) -> tuple[int, int, int]:
    """(C, H, W) of the model's input: the architecture's img_size and in_chans, else the dataset's."""
    meta = dataset_info(factors.dataset)
    size = architecture.kwargs.get("img_size", meta.image_size)
    return architecture.kwargs.get("in_chans", meta.channels), size, size


def measure_model(architecture: Architecture, factors: Factors, precision: str) -> ModelCost:
    """One model's memory and FLOPs in one training step of its population (see the module docstring)."""
    check_precision(precision)
    contrastive = factors.objective == "contrastive"
    views = 2 if contrastive else 1
    with torch.device("meta"):  # structure only: nothing allocated, nothing initialised
        model = build_vit(architecture, factors.num_outputs, factors.head, factors.head_hidden, factors.dropout,
                          factors.drop_path)  # fmt: skip
    for module in model.modules():  # as PopulationTrainer runs it: the unfused attention (vmap has no fused kernel)
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    model.train()
    images = torch.empty(views * factors.batch_size, *image_shape(architecture, factors), device="meta")
    labels = torch.zeros(factors.batch_size, dtype=torch.long, device="meta")
    # storages are told apart by their C++ address (`_cdata`): meta tensors have no data pointer
    not_activations = {p.untyped_storage()._cdata for p in model.parameters()} | {images.untyped_storage()._cdata}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in not_activations:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    policy = AutocastPolicy(torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with policy:
            outputs = model(images)  # [views * b, k]
            if contrastive:
                loss, _ = info_nce(*outputs.float().chunk(2), torch.tensor(factors.temperature, device="meta"))
            else:
                loss = smoothed_cross_entropy(outputs, labels, torch.tensor(factors.label_smoothing, device="meta"))
        loss.backward()
    step_flops = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad(), policy:
        model(images[:1])
    parameters = sum(p.numel() for p in model.parameters())
    return ModelCost(
        parameters=parameters,
        weight_bytes=parameters * FP32 * (2 + OPTIMIZER_STATES[factors.optimizer]),
        saved_bytes=sum(saved.values()),
        activation_bytes=round(VMAP_ACTIVATION_FACTOR * sum(saved.values())),
        batch_bytes=images.numel() * FP32,
        step_flops=float(step_flops),
        image_forward_flops=float(counter.get_total_flops()),
    )


def split_sizes(factors: Factors) -> tuple[int, int, int]:
    """(train, val, test) images a run sees: a class subset keeps its share of each split, train_subset caps train."""
    train, val, test = SPLIT_SIZES[factors.dataset]
    if factors.classes:
        share = len(factors.classes) / dataset_info(factors.dataset).num_classes
        train, val, test = (round(n * share) for n in (train, val, test))
    if factors.train_subset:
        train = min(train, factors.train_subset)
    return train, val, test


def run_flops(run: Run, cost: ModelCost) -> float:
    """A run's training steps, and its evaluation on val and test after every epoch and before the first."""
    f = run.factors
    train, val, test = split_sizes(f)
    views = 2 if f.objective == "contrastive" else 1
    training = f.epochs * (train // f.batch_size) * cost.step_flops
    evaluation = (f.epochs + 1) * (val + test) * views * cost.image_forward_flops
    return training + evaluation


def group_label(factors: Factors) -> str:
    head = f"mlp{factors.head_hidden}" if factors.head == "mlp" else factors.head
    return f"{factors.objective} {factors.optimizer} {head} batch {factors.batch_size} {factors.dataset}"


def plan_build(blueprint: Blueprint, precision: str, population_size: int, accelerator: Accelerator) -> Plan:
    """The plan of building `blueprint` with these settings (see the module docstring)."""
    runs = expand(blueprint)
    architecture = blueprint.model_architecture
    usable = accelerator.memory_gb * GIB * USABLE_SHARE
    measured: dict[tuple, ModelCost] = {}  # the stack factors fix shapes, batch and optimizer: one per group
    for run in runs:
        if stack_key(run.factors) not in measured:
            measured[stack_key(run.factors)] = measure_model(architecture, run.factors, precision)
    cost_of = {run.model_id: measured[stack_key(run.factors)] for run in runs}
    flops_of = {run.model_id: run_flops(run, cost_of[run.model_id]) for run in runs}
    groups = []
    for stage in ("pretrain", "finetune"):
        populations = group_populations([run for run in runs if run.stage == stage], population_size)
        by_group: dict[str, list[list[Run]]] = {}
        for population in populations:  # chunks of one group follow each other: gather them again
            by_group.setdefault(json.dumps(stack_key(population[0].factors)), []).append(population)
        for chunks in by_group.values():
            members = [run for chunk in chunks for run in chunk]
            f = members[0].factors
            cost = cost_of[members[0].model_id]
            groups.append(GroupPlan(
                stage=stage, label=group_label(f), models=len(members), populations=len(chunks), epochs=f.epochs,
                steps_per_epoch=split_sizes(f)[0] // f.batch_size, cost=cost, fit=int(usable // cost.total_bytes),
                flops=sum(flops_of[run.model_id] for run in members),
            ))  # fmt: skip
    shard_flops = [sum(flops_of[run.model_id] for run in select_shard(runs, i, accelerator.count))
                   for i in range(accelerator.count)]  # fmt: skip
    return Plan(
        zoo=blueprint.name,
        precision=precision,
        population_size=population_size,
        accelerator=accelerator,
        groups=groups,
        flops=sum(flops_of.values()),
        wall_seconds=max(shard_flops) / accelerator.flops_per_second(precision),
    )


def format_plan(plan: Plan) -> str:
    """The plan as a table and a few lines of totals."""
    a = plan.accelerator
    rate = a.flops_per_second(plan.precision) / 1e12
    peak = a.tflops_bf16 if plan.precision == "bf16" else a.tflops_fp32
    header = ("stage", "group (shared factors)", "models", "pops", "epochs", "steps/ep", "params", "weights+opt",
              "activations", "batch", "GiB/model", f"fit {a.memory_gb:g} GiB", "TFLOP/step", "EFLOP")  # fmt: skip
    rows = [header]
    for g in plan.groups:
        c = g.cost
        rows.append((g.stage, g.label, str(g.models), str(g.populations), str(g.epochs), f"{g.steps_per_epoch:,}",
                     f"{c.parameters / 1e6:.1f}M", f"{c.weight_bytes / GIB:.2f}", f"{c.activation_bytes / GIB:.2f}",
                     f"{c.batch_bytes / GIB:.2f}", f"{c.total_bytes / GIB:.2f}", str(g.fit),
                     f"{c.step_flops / 1e12:.2f}", f"{g.flops / 1e18:.2f}"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    table = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    table.insert(1, "-|-".join("-" * w for w in widths))
    models = sum(g.models for g in plan.groups)
    lines = [
        f"plan: zoo {plan.zoo}, {models} models in {len(plan.groups)} population groups, precision {plan.precision}, "
        f"population_size {plan.population_size}; nothing trained",
        "",
        *table,
        "",
        "memory per model in a population step (mode=vmap): weights, gradients and optimizer state (fp32) + "
        f"activations ({VMAP_ACTIVATION_FACTOR:g} x those autograd saves for one model) + input batch (fp32); "
        "a population of m models holds m times it",
        f"fit: models per population on one {a.name} ({a.memory_gb:g} GiB, {USABLE_SHARE:.0%} usable)",
    ]
    too_big = [g for g in plan.groups if g.fit < min(plan.population_size, g.models)]
    if too_big:
        smallest = min(g.fit for g in too_big)
        advice = f"pass population_size={smallest}" if smallest else "lower the batch or use precision=bf16"
        if smallest == 1:  # see population.py: a lone model trains beside a twin whose results are dropped
            advice += " (a population of one trains beside a twin: two models' memory)"
        lines.append(f"population_size={plan.population_size} does not fit: {advice}")
    lines += [
        f"total: {plan.flops / 1e18:.2f} EFLOP = {plan.accelerator_hours:,.0f} {a.name}-hours at {rate:.0f} TFLOP/s "
        f"({a.utilisation:.0%} of {peak:g} TFLOP/s {plan.precision} peak)",
        f"wall time on {a.count} {a.name}{'s' if a.count > 1 else ''} (shard=i/{a.count} each): "
        f"{plan.wall_seconds / 3600:,.1f} h = {plan.wall_seconds / 86400:,.1f} days (the largest shard; data loading "
        "not counted: ImageNet JPEGs are decoded on the CPU)",
    ]
    return "\n".join(lines)
