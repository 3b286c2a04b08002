"""Model soups: exact averages, last-k epoch soups, greedy soups chosen on validation."""

import torch

from vitzoo.eval.soups import average, epoch_soups, parent_soups
from vitzoo.zoo_builder import Zoo


def test_average_is_exact_and_covers_every_tensor():
    a = {"w": torch.tensor([1.0, 2.0]), "cls_token": torch.tensor([0.0]), "b": torch.tensor([3.0])}
    b = {"w": torch.tensor([3.0, 4.0]), "cls_token": torch.tensor([2.0]), "b": torch.tensor([5.0])}
    soup = average([a, b])
    assert soup.keys() == a.keys()  # biases and embeddings too, unlike the zoo paper's helper
    assert torch.equal(soup["w"], torch.tensor([2.0, 3.0])) and torch.equal(soup["cls_token"], torch.tensor([1.0]))


def small_zoo():
    zoo = Zoo.open("bundled")
    parent = next(r for r in zoo.records.values() if r["stage"] == "pretrain")["model_id"]
    kept = {m for m, r in zoo.records.items() if r["parent_id"] == parent and r["factors"]["head"] == "linear"}
    return Zoo(zoo.root, zoo.meta, {m: zoo.records[m] for m in kept}, [e for e in zoo if e.model_id in kept])


def test_epoch_soups_average_the_last_k_checkpoints():
    zoo = small_zoo()
    soups = epoch_soups(zoo, "digits", 3, num_heads=2)
    assert len(soups) == 6  # the seed-42 fine-tunes keep their last 3 epochs
    for soup in soups:
        assert soup.epochs == [8, 9, 10]
        record = zoo.records[soup.model_id]
        assert abs(soup.final_test - record["history"][-1]["test_acc"]) < 1e-6
        assert 0 <= soup.soup_test <= 1 and soup.gain == soup.soup_test - soup.final_test


def test_greedy_soup_starts_from_the_best_model_on_validation():
    soups = parent_soups(small_zoo(), "digits", num_heads=2)
    assert len(soups) == 1 and soups[0].models == 12
    soup = soups[0]
    assert soup.greedy_size >= 1
    if soup.greedy_size == 1:
        assert soup.greedy_test == soup.best_single_test


def test_cli_soup_writes_report_results_and_plot(tmp_path):
    import json

    from conftest import run_cli

    parent = small_zoo()[0].parent_id
    out = tmp_path / "soup"
    result = run_cli("soup", "bundled", f"parent={parent}", "k=[3]", f"out={out}", "threads=1")
    assert "last 3 epochs" in result.stdout and parent in result.stdout
    data = json.loads((out / "results.json").read_text())
    assert len(data["epoch_soups"]["3"]) == 12 and len(data["parent_soups"]) == 2
    assert (out / "gains.png").stat().st_size > 1000
    failed = run_cli("soup", "bundled", "parent=nobody", f"out={out}", check=False)
    assert failed.returncode == 2 and "nobody" in failed.stderr
