"""Novelty statistics, baselines and the samples-vs-zoo comparison."""

import json

import pytest
import torch
from conftest import run_cli

from vitzoo.eval.compare import compare
from vitzoo.eval.evaluation import evaluate
from vitzoo.eval.finetune import FinetuneRecipe, finetune_curves
from vitzoo.eval.novelty import (
    COPY_RATIO,
    NoveltyReference,
    agreement,
    error_iou,
    shared_keys,
    summarize,
    weight_distances,
)
from vitzoo.tokenizer.symmetries import align_to, permutable_layers, random_permutation
from vitzoo.zoo_builder import Zoo
from vitzoo.zoo_builder.baselines import gaussian, noise_around, random_init
from vitzoo.zoo_builder.data import load_split
from vitzoo.zoo_builder.families import family_starts
from vitzoo.zoo_builder.zoo import ZooError, write_sampled


@pytest.fixture(scope="module")
def fine_tunes():
    zoo = Zoo.open("bundled").filter(stage="finetune", epoch="last", head="linear")
    return [e.state_dict() for e in list(zoo)[:12]]


def test_aligned_distance_equals_distance_after_align_to(fine_tunes):
    keys = shared_keys(fine_tunes)
    layers = permutable_layers(fine_tunes[0], 2)
    aligned = weight_distances(fine_tunes[:3], fine_tunes[3:6], keys, layers)
    raw = weight_distances(fine_tunes[:3], fine_tunes[3:6], keys)
    for i in range(3):
        for j in range(3):
            moved = align_to(fine_tunes[i], fine_tunes[3 + j], layers=layers)
            direct = torch.cat([(moved[k] - fine_tunes[3 + j][k]).double().flatten() for k in keys]).norm()
            assert aligned[i, j].item() == pytest.approx(direct.item(), rel=1e-9, abs=1e-6)
            assert aligned[i, j] <= raw[i, j] + 1e-9
    symmetric = weight_distances(fine_tunes[:6], fine_tunes[:6], keys, layers)
    assert torch.allclose(symmetric[:3, 3:6], aligned, atol=1e-6)
    assert torch.equal(symmetric, symmetric.T) and symmetric.diag().abs().max() < 1e-6


def test_permuted_copy_is_flagged_and_a_new_model_is_not(fine_tunes):
    reference = NoveltyReference(fine_tunes[:10], num_heads=2)
    copy = random_permutation(fine_tunes[4], seed=3, num_heads=2)
    other_parent = Zoo.open("bundled").filter(stage="finetune", epoch="last", head="linear")[-1].state_dict()
    rows = reference.against([copy, other_parent])
    assert rows[0]["nearest"] == 4 and rows[0]["copy"] and rows[0]["aligned_distance"] < 1e-6
    assert rows[0]["distance"] > 1.0  # the raw distance does not see through the permutation
    assert not rows[1]["copy"] and rows[1]["relative_distance"] >= COPY_RATIO
    assert min(r["relative_distance"] for r in reference.rows) >= 1.0  # zoo models against each other
    raw_only = NoveltyReference(fine_tunes[:10], align=False)
    assert not raw_only.against([copy])[0]["copy"]


@pytest.fixture(scope="module")
def linear_zoo():
    """The bundled zoo's linear-head fine-tunes (last epoch), their test predictions and their families."""
    zoo = Zoo.open("bundled")
    view = zoo.filter(stage="finetune", epoch="last", head="linear")
    entries = list(view)
    state_dicts = [e.state_dict() for e in entries]
    results = evaluate([(str(i), sd) for i, sd in enumerate(state_dicts)], "digits", "test", num_heads=2)
    _, labels = load_split("digits", "test")
    families = family_starts(view, entries)
    return entries, state_dicts, torch.stack([r.predictions for r in results]), labels, families


def predictions_of(state_dicts):
    return torch.stack([r.predictions for r in evaluate([(str(i), sd) for i, sd in enumerate(state_dicts)],
                                                         "digits", "test", num_heads=2)])  # fmt: skip


def test_copies_are_judged_at_each_zoo_models_own_scale(linear_zoo):
    """Both ways: a zoo model plus noise at 10% of its nearest-neighbour distance is a copy; the family start (an
    untrained head, well within a small-learning-rate run's scale of it) and a run of another condition
    held out of the reference are not."""
    entries, state_dicts, predictions, labels, families = linear_zoo
    held_out = next(i for i, e in enumerate(entries) if e.factors["optimizer"] == "adamw" and e.factors["lr"] == 3e-3)
    kept = [i for i in range(len(entries)) if i != held_out]
    reference = NoveltyReference([state_dicts[i] for i in kept], predictions[kept], labels, num_heads=2, align=False)
    slow = [i for i, e in enumerate(entries) if e.factors["optimizer"] == "sgd" and e.factors["lr"] == 1e-4][:3]
    scale = {i: reference.scale[kept.index(i)].item() for i in slow}
    noisy = noise_around([state_dicts[i] for i in slow], [0.1 * scale[i] for i in slow], reference.keys, seed=0)
    starts = [start for start, members in families if any(m in slow for m in members)]
    candidates = [*noisy, *starts, state_dicts[held_out]]
    rows = reference.against(candidates, predictions_of(candidates))
    assert [r["copy"] for r in rows] == [True] * len(noisy) + [False] * len(starts) + [False]
    assert all(r["relative_distance"] == pytest.approx(0.1, rel=1e-6) for r in rows[: len(noisy)])
    # the starts are close in weight space (a slow run barely moves), but predict at chance where the runs do not
    assert all(COPY_RATIO * 0.5 < r["relative_distance"] < 1 for r in rows[len(noisy) : -1])
    assert all(r["agreement"] < 0.5 for r in rows[len(noisy) : -1])
    assert summarize(rows)["copies"] == pytest.approx(len(noisy) / len(rows))


def test_span_novelty_sees_mixtures_of_a_family_and_new_runs(linear_zoo):
    entries, state_dicts, _, _, families = linear_zoo
    reference = NoveltyReference(state_dicts, num_heads=2, align=False, families=families)
    start, members = families[0]
    weights = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.05], dtype=torch.float64)[: len(members)]
    mixture = {k: (v.double() + sum(w * (state_dicts[m][k].double() - v.double()) for w, m in zip(weights, members)))
               .float() for k, v in start.items()}  # fmt: skip
    rows = reference.against([mixture, start, state_dicts[members[0]]])
    assert max(r["span_distance"] for r in rows) < 1e-3  # a merge of the family, its start, its own run
    loo = [r["span_distance"] for r in reference.rows]
    assert all(d is not None and d > 0.1 for d in loo)  # a run is not a mix of its family's other runs
    # the leave-one-out distance is exactly the distance to the span of the family's other runs
    j = members[0]
    others = NoveltyReference(
        [state_dicts[i] for i in range(len(entries)) if i != j], num_heads=2, align=False,
        families=[(start, [i - (i > j) for i in members if i != j])],
    )  # fmt: skip
    assert others.against([state_dicts[j]])[0]["span_distance"] == pytest.approx(loo[j], rel=1e-6)


def test_agreement_and_error_iou_count_by_hand():
    labels = torch.tensor([0, 1, 2, 3])
    p, q = torch.tensor([0, 1, 0, 0]), torch.tensor([0, 2, 0, 3])
    assert agreement(p, q) == 0.5
    assert error_iou(p, q, labels) == pytest.approx(1 / 3)  # errors p: {2, 3}, q: {1, 2}
    assert error_iou(labels, labels, labels) == 1.0


def test_baselines(fine_tunes):
    keys = shared_keys(fine_tunes)
    noisy = noise_around(fine_tunes[:3], [0.5, 2.0, 7.0], keys, seed=0)
    distances = weight_distances(noisy, fine_tunes[:3], keys).diag()
    assert torch.allclose(distances, torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64), atol=1e-4)
    draws = gaussian(fine_tunes, 400, seed=0)
    fitted = torch.stack([sd["head.bias"] for sd in fine_tunes])
    drawn = torch.stack([sd["head.bias"] for sd in draws])
    assert torch.allclose(drawn.mean(0), fitted.mean(0), atol=4 * fitted.std(0).max() / 20)
    assert torch.allclose(drawn.std(0), fitted.std(0), rtol=0.25)
    reordered = [dict(reversed(list(sd.items()))) for sd in fine_tunes]  # key order differs between processes
    again = gaussian(reordered, 2, seed=0)
    assert all(torch.equal(again[i][k], draws[i][k]) for i in range(2) for k in draws[0])
    zoo = Zoo.open("bundled")
    first, second = random_init(zoo.architecture, zoo[-1].head, 2, seed=0)
    assert first.keys() == fine_tunes[0].keys() and not torch.equal(first["head.weight"], second["head.weight"])


def test_finetune_curves_start_at_the_evaluated_accuracy_and_improve_random_init():
    zoo = Zoo.open("bundled")
    entry = zoo.filter(stage="finetune", epoch="last", head="linear")[0]
    models = [("zoo", entry.state_dict()), ("random", random_init(zoo.architecture, entry.head, 1, seed=0)[0])]
    curves = finetune_curves(models, zoo.architecture, "digits", FinetuneRecipe(epochs=2, lr=3e-3), "val")
    before = {r.name: r.accuracy for r in evaluate(models, "digits", "val", num_heads=2)}
    assert len(curves["zoo"]) == len(curves["random"]) == 3
    assert curves["zoo"][0] == pytest.approx(before["zoo"], abs=1e-6)
    assert curves["random"][0] == pytest.approx(before["random"], abs=1e-6)
    assert curves["random"][2] > curves["random"][0] + 0.1


def test_finetune_curves_are_the_same_in_populations_of_any_size(monkeypatch):
    """Fine-tuning trains at most POPULATION models together (memory); a model's curve does not depend on it."""
    import vitzoo.eval.finetune as finetune

    zoo = Zoo.open("bundled")
    entries = zoo.filter(stage="finetune", epoch="last", head="linear")
    models = [(e.model_id, e.state_dict()) for e in list(entries)[:5]]
    recipe = FinetuneRecipe(epochs=1, lr=3e-3)
    together = finetune_curves(models, zoo.architecture, "digits", recipe, "val")
    monkeypatch.setattr(finetune, "POPULATION", 2)  # populations of 2, 2 and 1
    assert finetune_curves(models, zoo.architecture, "digits", recipe, "val") == together


def test_compare_samples_against_the_zoo(tmp_path):
    zoo = Zoo.open("bundled")
    reference = zoo.filter(stage="finetune", epoch="last", seed=42, lr=[3e-3, 1e-3])
    source = list(reference)[:4]
    samples = [(random_permutation(e.state_dict(), seed=i, num_heads=2), {"method": "copy"}, e.head)
               for i, e in enumerate(source)]  # fmt: skip
    sampled = write_sampled(tmp_path / "samples", zoo.architecture, "digits", samples)
    with pytest.raises(ZooError, match="already holds a zoo"):
        write_sampled(tmp_path / "samples", zoo.architecture, "digits", samples)
    result = compare(sampled, reference)
    rows = {r["population"]: r for r in result["rows"]}
    assert set(rows) == {"zoo", "copy", "random init", "gaussian", "zoo + noise"}
    assert rows["copy"]["copies"] == 1.0 and rows["copy"]["median_agreement"] == 1.0
    indexed = statistics_mean([e.metrics["test_acc"] for e in source])
    assert rows["copy"]["mean_acc"] == pytest.approx(indexed, abs=1e-6)  # a permutation keeps the function
    assert rows["zoo + noise"]["median_nn_distance"] == pytest.approx(0.0, abs=1e-3)
    assert rows["random init"]["mean_acc"] < 0.2 and rows["random init"]["copies"] == 0.0
    assert rows["zoo"]["n"] == len(reference) and rows["zoo"]["copies"] == 0.0


def statistics_mean(values):
    return sum(values) / len(values)


def test_cli_evaluate_samples_with_reference_and_finetuning(tmp_path, tiny_zoo):
    reference = tiny_zoo.filter(stage="finetune", epoch="last")
    noisy = [({k: v + 0.02 * torch.randn_like(v) for k, v in e.state_dict().items()}, {"method": "noisy"}, e.head)
             for e in reference]  # fmt: skip
    write_sampled(tmp_path / "samples", tiny_zoo.architecture, "digits", noisy)
    out = tmp_path / "report"
    run_cli("evaluate", str(tmp_path / "samples"), f"reference={tiny_zoo.root}", "finetune_epochs=1", f"out={out}",
            "threads=1", "progress=false", "baselines=false")  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    rows = {r["population"]: r for r in results["rows"]}
    assert set(rows) == {"zoo", "noisy"} and rows["noisy"]["n"] == len(reference) == 4
    assert len(rows["noisy"]["finetune_mean_acc"]) == 2
    assert (out / "novelty.png").stat().st_size > 0 and (out / "finetune.png").stat().st_size > 0
    assert "| noisy | 4 |" in (out / "report.md").read_text()
    # one weight-space PCA of zoo and samples together: centred principal coordinates, PC 1 the wider
    points = torch.tensor([m["embedding"] for m in results["models"]])  # [8, 2]
    assert points.shape == (8, 2) and (out / "embedding.png").stat().st_size > 0
    assert points.mean(dim=0).abs().max() < 1e-6 * points.abs().max()
    assert points[:, 0].var() >= points[:, 1].var() > 0
    tsne = torch.tensor([m["tsne"] for m in results["models"]])  # and a t-SNE of the same models
    assert tsne.shape == (8, 2) and torch.isfinite(tsne).all() and tsne.std(dim=0).min() > 0
    assert "data:image/png;base64," in (out / "report.html").read_text()
