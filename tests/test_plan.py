"""`vitzoo build plan=true`: the cost of a build before it runs, measured on the meta device and checked here
against a measured CPU step."""

import json
import warnings

import pytest
import torch
from conftest import run_cli

from vitzoo.zoo_builder.blueprint import Factors
from vitzoo.zoo_builder.data import load_split
from vitzoo.zoo_builder.models import Architecture, build_vit
from vitzoo.zoo_builder.plan import SPLIT_SIZES, measure_model
from vitzoo.zoo_builder.population import PopulationTrainer

SMALL_VIT = Architecture("vit_small_patch16_224", {"img_size": 32, "patch_size": 4, "in_chans": 3, "embed_dim": 64,
                                                   "depth": 2, "num_heads": 4})  # fmt: skip


def test_plan_of_the_vit_s16_preset_needs_no_data(tmp_path):
    result = run_cli("build", "zoo=vit_s16_imagenet_cifar100", "plan=true", "accelerator.memory_gb=80",
                     f"out={tmp_path / 'zoo'}")  # fmt: skip
    assert "250 models in 6 population groups" in result.stdout and "fit 80 GiB" in result.stdout
    [path] = (tmp_path / "zoo" / "logs").glob("*/plan.json")
    plan = json.loads(path.read_text())
    assert [g["models"] for g in plan["groups"]] == [7, 3, 60, 60, 60, 60]
    assert {g["stage"] for g in plan["groups"]} == {"pretrain", "finetune"}
    assert not (tmp_path / "zoo" / "zoo.json").exists()  # nothing built


def test_vit_s16_flops_are_timms():
    """ViT-S/16 at 224: 4.6 GMACs a forward pass (timm's model card), 3x that for a training step."""
    cost = measure_model(Architecture("vit_small_patch16_224", {}), Factors(dataset="imagenet", batch_size=2), "fp32")
    assert cost.image_forward_flops / 2 == pytest.approx(4.6e9, rel=0.02)
    assert cost.step_flops == pytest.approx(3 * 2 * cost.image_forward_flops, rel=0.02)
    assert cost.parameters == pytest.approx(22.05e6, rel=0.01)


def test_split_sizes_are_what_data_carves():
    assert tuple(len(load_split("digits", split)[1]) for split in ("train", "val", "test")) == SPLIT_SIZES["digits"]


def measured_peak_bytes(step, folder) -> float:
    """The most CPU memory live during `step()` (torch profiler's memory timeline), after one warm-up call."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # marked deprecated in favour of CUDA-only snapshots: CPU has no other
        prof.export_memory_timeline(str(folder / "memory.json"), device="cpu")
    _, sizes = json.loads((folder / "memory.json").read_text())  # [times, [bytes by category] per time]
    return max(sum(at_time) for at_time in sizes)


@pytest.mark.parametrize("objective", ["supervised", "contrastive"])
def test_memory_per_model_matches_a_measured_population_step(objective, tmp_path):
    """The plan's memory per model (weights, gradients, AdamW state, activations, batch), against the peak of a
    real vmap population step of 3 small ViTs on the CPU (the plan measures one model on the meta device). The
    tolerance, 15%, covers the spread of the vmap factor (4.07-4.13) and the optimizer's transient copies."""
    factors = Factors(dataset="cifar10", batch_size=64, objective=objective, optimizer="adamw")
    models = 3
    torch.manual_seed(0)
    states = [build_vit(SMALL_VIT, factors.num_outputs).state_dict() for _ in range(models)]
    trainer = PopulationTrainer([factors] * models, states, SMALL_VIT, torch.device("cpu"), "vmap", "fp32")
    views = (2,) if objective == "contrastive" else ()
    x = torch.randn(models, *views, 64, 3, 32, 32)  # [m, (views,) b, C, H, W]
    y = torch.randint(0, 10, (models, 64))
    measured = measured_peak_bytes(lambda: trainer._train_step(x, y, None), tmp_path) / models
    planned = measure_model(SMALL_VIT, factors, "fp32").total_bytes
    assert planned == pytest.approx(measured, rel=0.15)
