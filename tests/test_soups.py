"""Model soups: exact averages, last-k epoch soups, greedy soups chosen on validation."""

from dataclasses import dataclass, field

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
    failed = run_cli("soup", "bundled", "parent=nobody", f"out={tmp_path / 'other'}", check=False)
    assert failed.returncode == 2 and "nobody" in failed.stderr


def vit_s16_zoo(tmp_path):
    """An imported official zoo in memory: ViT-S/16 stored as `kwargs == {}` (timm's defaults: 6 heads), one parent,
    two fine-tunes with two checkpoints each; the weights live on the meta device (shapes only, no memory)."""
    from vitzoo.zoo_builder.models import Architecture, build_vit

    architecture = Architecture("vit_small_patch16_224", {})
    with torch.device("meta"):
        state = build_vit(architecture, 100).state_dict()

    @dataclass
    class MetaEntry:  # what the soups read of a zoo entry
        model_id: str
        epoch: int
        stage: str = "finetune"
        parent_id: str = "pt"
        factors: dict = field(default_factory=lambda: {"head": "linear"})
        metrics: dict = field(default_factory=dict)

        def state_dict(self):
            return dict(state)

    records, entries = {}, []
    for model_id in ("ft-a", "ft-b"):
        records[model_id] = {"model_id": model_id, "stage": "finetune", "status": "done", "parent_id": "pt",
                             "factors": {"head": "linear"}, "checkpoints": [{"epoch": 1}, {"epoch": 2}]}  # fmt: skip
        entries += [MetaEntry(model_id, epoch) for epoch in (1, 2)]
    meta = {"architecture": architecture.to_dict(), "dataset": "cifar100"}
    return Zoo(tmp_path, meta, records, entries)


def test_soups_of_an_imported_vit_s16_zoo_use_timms_heads_and_leave_out_what_cannot_be_evaluated(tmp_path, monkeypatch):
    import json

    from vitzoo.eval import soups
    from vitzoo.eval.evaluation import Result
    from vitzoo.zoo_builder.architecture import vit_from_state_dict
    from vitzoo.zoo_builder.models import Architecture

    assert Architecture("vit_small_patch16_224", {}).num_heads == 6
    assert Architecture("vit_small_patch16_224", {"embed_dim": 768}).num_heads == 6  # not embed_dim // 64
    assert Architecture("vit_small_patch16_224", {"num_heads": 2}).num_heads == 2
    heads = []

    def fake_evaluate(pairs, dataset, split, num_heads, **_):
        heads.append(num_heads)
        results = []
        for name, state_dict in pairs:
            with torch.device("meta"):
                vit_from_state_dict(state_dict, num_heads)  # the heads must fit the weights' shapes
            failed = name.startswith("ft-b")  # ft-b cannot be evaluated (e.g. NaN weights)
            results.append(Result(name, error="non-finite weights") if failed else Result(name, 1.0, 0.5))
        return results

    monkeypatch.setattr(soups, "evaluate", fake_evaluate)
    monkeypatch.setattr(soups, "_gains_plot", lambda gains, path: None)
    soups.write_soups(vit_s16_zoo(tmp_path / "zoo"), "cifar100", [2], None, tmp_path / "out", {})
    assert heads and set(heads) == {6}
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [s["model_id"] for s in data["epoch_soups"]["2"]] == ["ft-a"] and data["epoch_soups"]["2"][0]["gain"] == 0
    assert [s["model_id"] for s in data["unevaluated"]["2"]] == ["ft-b"]
    assert data["parent_soups"][0]["models"] == 1 and data["parent_soups"][0]["unevaluated"] == 1
    assert "1 model(s) could not be evaluated" in (tmp_path / "out" / "report.md").read_text()
