"""The bundled zoo: the paper's blueprint scaled down, shipped in the repository."""

import statistics

import pytest
import torch

from vitzoo.zoo_builder import Zoo
from vitzoo.zoo_builder.data import load_split
from vitzoo.zoo_builder.zoo import BUNDLED, verify


@pytest.fixture(scope="module")
def bundled():
    return Zoo.open("bundled")


def test_bundled_zoo_follows_the_blueprint(bundled):
    records = list(bundled.records.values())
    parents = [r for r in records if r["stage"] == "pretrain"]
    children = [r for r in records if r["stage"] == "finetune"]
    assert len(parents) == 10 and len(children) == 240
    assert sorted(r["factors"]["objective"] for r in parents) == ["contrastive"] * 3 + ["supervised"] * 7
    assert all(r["status"] == "done" for r in records)
    for parent in parents:
        mine = [r for r in children if r["parent_id"] == parent["model_id"]]
        grid = {
            (r["factors"]["head"], r["factors"]["optimizer"], r["factors"]["lr"], r["factors"]["seed"]) for r in mine
        }
        assert len(mine) == len(grid) == 24
    assert bundled.dataset == "digits"
    assert bundled.meta["datasets"] == ["digits", "fashion_mnist"]


def test_bundled_zoo_fits_its_budget_and_verifies():
    size = sum(p.stat().st_size for p in BUNDLED.rglob("*") if p.is_file())
    assert size < 40e6
    assert verify("bundled") == []


def test_every_model_has_its_final_checkpoint_and_seed_42_fine_tunes_their_last_three(bundled):
    for record in bundled.records.values():
        epochs = record["factors"]["epochs"]
        kept = [c["epoch"] for c in record["checkpoints"]]
        assert kept[-1] == epochs
        assert [h["epoch"] for h in record["history"]] == list(range(epochs + 1))
        if record["stage"] == "finetune" and record["factors"]["seed"] == 42:
            assert kept == [epochs - 2, epochs - 1, epochs]


def test_bundled_zoo_is_diverse(bundled):
    final = {r["model_id"]: r["history"][-1]["test_acc"] for r in bundled.records.values() if r["stage"] == "finetune"}
    by_setting = {}
    for model_id, accuracy in final.items():
        f = bundled.records[model_id]["factors"]
        by_setting.setdefault((f["optimizer"], f["lr"]), []).append(accuracy)
    medians = {setting: statistics.median(values) for setting, values in by_setting.items()}
    assert max(medians.values()) > 0.85, medians  # the best settings work well on digits
    assert min(medians.values()) < max(medians.values()) - 0.3, medians  # some settings are clearly weaker


def test_bundled_models_reproduce_their_indexed_test_accuracy(bundled):
    images, labels = load_split(bundled.dataset, "test")
    entries = bundled.filter(stage="finetune", epoch="last", seed=42, lr=3e-3)
    assert len(entries) == 40
    for entry in list(entries)[::8]:
        with torch.no_grad():
            accuracy = (entry.model()(images).argmax(-1) == labels).float().mean().item()
        assert abs(accuracy - entry.metrics["test_acc"]) <= 1 / len(labels) + 1e-9
