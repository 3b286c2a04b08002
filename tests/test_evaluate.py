"""Batched evaluation: identical to the per-model loop, equal to the zoo's index, failures reported per model."""

import shutil

import pytest
import torch

from vitzoo.eval.evaluation import evaluate
from vitzoo.zoo_builder import Zoo
from vitzoo.zoo_builder.data import load_split


@pytest.fixture(scope="module")
def selection():
    return Zoo.open("bundled").filter(stage="finetune", epoch="last", seed=42, lr=[3e-3, 1e-4])


def test_vmap_equals_loop_and_the_indexed_accuracy(selection):
    batched = evaluate(selection, "digits", "test", mode="vmap", chunk_size=16)
    looped = evaluate(selection, "digits", "test", mode="loop")
    assert len(batched) == len(selection) == 80  # both heads, so two architectures (groups)
    for a, b, entry in zip(batched, looped, selection):
        assert a.error is None and a.name == f"{entry.model_id}@{entry.epoch}"
        assert torch.equal(a.predictions, b.predictions)
        assert abs(a.loss - b.loss) < 1e-5
        assert a.accuracy == b.accuracy
        assert abs(a.accuracy - entry.metrics["test_acc"]) < 1e-6
        assert abs(a.loss - entry.metrics["test_loss"]) < 1e-4


def test_state_dicts_evaluate_like_entries(selection):
    entries = list(selection)[:4]
    pairs = [(e.model_id, e.state_dict()) for e in entries]
    results = evaluate(pairs, "digits", "val", num_heads=2)
    for result, entry in zip(results, entries):
        assert abs(result.accuracy - entry.metrics["val_acc"]) < 1e-6


def test_failures_are_reported_and_the_rest_evaluated(tmp_path, selection):
    entries = list(selection.filter(head="linear"))[:3]
    good = (entries[0].model_id, entries[0].state_dict())
    nan = {k: v.clone() for k, v in entries[1].state_dict().items()}
    nan["blocks.0.mlp.fc1.weight"][0, 0] = torch.nan
    wrong_head = {k: v for k, v in entries[2].state_dict().items()}
    wrong_head["head.weight"], wrong_head["head.bias"] = torch.zeros(7, 24), torch.zeros(7)
    results = evaluate([good, ("nan", nan), ("seven-classes", wrong_head)], "digits", "test", num_heads=2)
    assert results[0].error is None and results[0].accuracy > 0.5
    assert "non-finite" in results[1].error and "fc1" in results[1].error
    assert "7 outputs" in results[2].error and results[2].accuracy is None


def test_a_corrupted_checkpoint_fails_alone(tmp_path):
    source = Zoo.open("bundled").filter(stage="pretrain", epoch="last")
    zoo_dir = tmp_path / "zoo"
    shutil.copytree(source.root, zoo_dir, ignore=shutil.ignore_patterns("ft-*"))
    zoo = Zoo.open(zoo_dir).filter(stage="pretrain", epoch="last", objective="supervised")
    victim = zoo[0].path
    victim.write_bytes(victim.read_bytes()[:-4])
    results = evaluate(zoo, "fashion_mnist", "val")
    assert "corrupted" in results[0].error and str(victim) in results[0].error
    assert all(r.error is None and r.accuracy > 0.7 for r in results[1:])
    images, labels = load_split("fashion_mnist", "val")
    assert len(results[1].predictions) == len(labels)


def test_cli_evaluate_writes_results_report_and_plot(tmp_path):
    import json

    from conftest import run_cli

    out = tmp_path / "eval"
    result = run_cli("evaluate", "bundled", "stage=pretrain", "split=val", f"out={out}", "threads=1", "progress=false")
    assert "pretrain on fashion_mnist | 10 |" in result.stdout  # each model on the dataset it was trained on
    data = json.loads((out / "results.json").read_text())
    assert data["split"] == "val" and len(data["results"]) == 10
    for row in data["results"]:
        assert row["dataset"] == "fashion_mnist"
        if row["factors"]["objective"] == "supervised":
            assert row["accuracy"] == pytest.approx(row["indexed_val_acc"], abs=1e-6)
    assert (out / "accuracy.png").stat().st_size > 1000 and (out / "predictions.safetensors").exists()
    assert list(out.glob("logs/*/.hydra/config.yaml"))
    failed = run_cli("evaluate", "no/such/zoo", check=False)
    assert failed.returncode == 2 and "not a zoo" in failed.stderr


def test_report_of_a_zoo_with_two_datasets_keeps_predictions_per_dataset(tmp_path):
    """Parents (Fashion-MNIST, 10,000 test images) and fine-tunes (digits, 359) in one report: no stacking across."""
    from safetensors import safe_open

    from vitzoo.eval.report import write_evaluation

    zoo = Zoo.open("bundled")
    parents = zoo.filter(stage="pretrain", epoch="last", objective="supervised")
    children = zoo.filter(stage="finetune", epoch="last", seed=42, lr=3e-3, optimizer="adamw", head="linear")
    mixed = Zoo(zoo.root, zoo.meta, zoo.records, [parents[0], parents[1], children[0]])
    write_evaluation(mixed, None, "test", tmp_path, config={}, progress=False)
    with safe_open(tmp_path / "predictions.safetensors", "pt") as f:
        assert f.get_tensor("predictions/fashion_mnist").shape == (2, 10_000)
        assert f.get_tensor("predictions/digits").shape == (1, 359)
        assert f.metadata()["models/digits"] == f"{children[0].model_id}@{children[0].epoch}"
    report = (tmp_path / "report.md").read_text()
    assert "pretrain on fashion_mnist | 2 |" in report and "finetune on digits | 1 |" in report
