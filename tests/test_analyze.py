"""Zoo diversity analysis: linear CKA, weight distances, agreement, factor tables, ordering, and `vitzoo analyze`."""

import json
import statistics

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from vitzoo.eval.analyze import (
    KINDS,
    agreement,
    agreement_by_dataset,
    analysis_order,
    cka_matrix,
    common_tensors,
    factor_table,
    family,
    flatten,
    linear_cka,
    load_in_module_order,
    own_dataset,
    pair_kinds,
    pairwise_distances,
    pre_logit_features,
    select,
    summarise,
)
from vitzoo.zoo_builder import Zoo
from vitzoo.zoo_builder.data import load_split


@pytest.fixture(scope="module")
def bundled():
    return Zoo.open("bundled")


def random_features(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_linear_cka_properties():
    x, y = random_features(64, 10), random_features(64, 6, seed=1)
    q, _ = torch.linalg.qr(random_features(10, 10, seed=2))  # orthogonal
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, y).item() == pytest.approx(linear_cka(y, x).item(), abs=1e-12)
    assert linear_cka(x @ q, 3.7 * y).item() == pytest.approx(linear_cka(x, y).item(), abs=1e-12)
    assert linear_cka(x @ q + 5.0, y).item() == pytest.approx(linear_cka(x, y).item(), abs=1e-12)  # centred
    assert 0 < linear_cka(x, y).item() < 0.5  # independent noise is far from 1
    stretched = x * torch.linspace(0.1, 10, 10, dtype=torch.float64)  # not an orthogonal map: CKA drops
    assert linear_cka(x, stretched).item() < 0.99
    # the feature-space form ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) of centred features (Kornblith et al., eq. 5)
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert linear_cka(x, y).item() == pytest.approx(expected.item(), rel=1e-12)


def test_cka_matrix_is_pairwise_linear_cka():
    features = random_features(5, 32, 8)
    features[3] = features[1] @ torch.linalg.qr(random_features(8, 8, seed=3))[0] * 2  # a rotated, scaled copy
    matrix = cka_matrix(features)
    for i in range(5):
        for j in range(5):
            assert matrix[i, j].item() == pytest.approx(linear_cka(features[i], features[j]).item(), abs=1e-12)
    assert matrix[1, 3].item() == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(matrix.diagonal(), torch.ones(5, dtype=torch.float64))


def test_pre_logit_features_are_what_the_head_reads(bundled):
    entries = list(bundled.filter(stage="finetune", epoch="last", lr=1e-3, seed=42))[:2]  # a linear and an MLP head
    images = load_split("digits", "test")[0][:16]
    features = pre_logit_features(entries, load_in_module_order(entries), images)
    assert features.shape == (2, 16, 24)
    for entry, feature in zip(entries, features):
        model = entry.model()
        with torch.no_grad():
            assert torch.allclose(model.head(feature), model(images), atol=1e-5)


def test_distances_are_symmetric_and_match_a_direct_computation(bundled):
    entries = list(bundled.filter(stage="finetune", epoch="last", optimizer="adamw", seed=42, lr=1e-3))[:3]
    entries.append(bundled.filter(model_id=entries[0].parent_id, epoch="last")[0])  # their parent
    state_dicts = load_in_module_order(entries)
    body = common_tensors(state_dicts)
    assert body[:2] == ["cls_token", "pos_embed"] and not any(name.startswith("head") for name in body)
    assert "blocks.1.mlp.fc2.weight" in body and len(body) == 30
    l2, cosine = pairwise_distances(flatten(state_dicts, body))
    assert torch.equal(l2, l2.T) and torch.equal(cosine, cosine.T)
    assert torch.all(l2.diagonal() == 0) and torch.all(cosine.diagonal() == 0)
    a, b = state_dicts[0], state_dicts[3]
    direct = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in body).sqrt()
    dot = sum((a[k].double() * b[k].double()).sum() for k in body)
    norms = [sum((sd[k].double() ** 2).sum() for k in body).sqrt() for sd in (a, b)]
    assert l2[0, 3].item() == pytest.approx(direct.item(), rel=1e-9)
    assert cosine[0, 3].item() == pytest.approx(1 - (dot / (norms[0] * norms[1])).item(), abs=1e-12)


def test_agreement_with_itself_is_one_and_matches_a_hand_count():
    predictions = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 0, 3, 0], [1, 1, 2, 3, 4]])
    matrix = agreement(predictions, num_classes=5)
    assert torch.all(matrix.diagonal() == 1)
    assert matrix[0, 1].item() == pytest.approx(3 / 5) and matrix[1, 0].item() == pytest.approx(3 / 5)
    assert matrix[0, 2].item() == pytest.approx(4 / 5)
    assert matrix[1, 2].item() == pytest.approx(2 / 5)


def test_agreement_on_each_models_own_dataset(bundled):
    supervised = bundled.filter(stage="pretrain", epoch="last", objective="supervised")[0]
    contrastive = bundled.filter(stage="pretrain", epoch="last", objective="contrastive")[0]
    children = list(bundled.filter(epoch="last", parent_id=supervised.model_id, lr=1e-3, seed=42))[:2]
    entries = [supervised, *children, contrastive]
    selection = Zoo(bundled.root, bundled.meta, bundled.records, entries)
    datasets = [own_dataset(e, bundled.dataset) for e in entries]
    assert datasets == ["fashion_mnist", "digits", "digits", "fashion_mnist"]
    matrix, results = agreement_by_dataset(selection, datasets, "test")
    assert results[0].accuracy == pytest.approx(supervised.metrics["test_acc"], abs=1e-6)
    assert "32 outputs" in results[3].error and torch.isnan(matrix[3]).all()  # a contrastive head: no classes
    assert torch.isnan(matrix[0, 1:]).all() and matrix[0, 0] == 1  # fashion_mnist vs digits: no common examples
    same = (results[1].predictions == results[2].predictions).float().mean().item()
    assert matrix[1, 2].item() == pytest.approx(same) and 0.5 < same < 1


def test_summary_by_pair_kind_and_nearest_neighbour():
    kinds = torch.tensor([[-1, 1, 3], [1, -1, 3], [3, 3, -1]])  # models 0 and 1 are siblings
    distances = torch.tensor([[0.0, 1.0, 4.0], [1.0, 0.0, 6.0], [4.0, 6.0, 0.0]], dtype=torch.float64)
    summary = summarise(distances, kinds, "smaller")
    assert summary["pairs"] == 3 and summary["mean"] == pytest.approx(11 / 3)
    assert summary["by_kind"]["siblings"] == 1.0 and summary["by_kind"]["across parents"] == 5.0
    assert summary["by_kind"]["same model"] is None
    assert summary["nearest_mean"] == pytest.approx((1 + 1 + 4) / 3)
    similarity = summarise(-distances, kinds, "larger")
    assert similarity["nearest_mean"] == pytest.approx(-(1 + 1 + 4) / 3)
    with_nan = distances.clone()
    with_nan[2, :2] = with_nan[:2, 2] = torch.nan  # e.g. a model that could not be evaluated
    assert summarise(with_nan, kinds, "smaller")["pairs"] == 1


def test_factor_table_counts_match_the_selection(bundled):
    selection = list(bundled.filter(epoch="last", parent_id="pt-5eb901f4c2")) + list(
        bundled.filter(stage="pretrain", epoch="last")
    )
    rows = factor_table(selection, "test")
    finetune = [r for r in rows if r["stage"] == "finetune" and r["metric"] == "test_acc"]
    assert {r["factor"] for r in finetune} == {"head", "lr", "optimizer", "seed"}
    for factor in ("head", "lr", "optimizer", "seed"):
        assert sum(r["n"] for r in finetune if r["factor"] == factor) == 24
    assert {r["value"]: r["n"] for r in finetune if r["factor"] == "lr"} == {1e-4: 8, 1e-3: 8, 3e-3: 8}
    adamw = [e.metrics["test_acc"] for e in selection if e.stage == "finetune" and e.factors["optimizer"] == "adamw"]
    row = next(r for r in finetune if r["factor"] == "optimizer" and r["value"] == "adamw")
    assert row["mean"] == pytest.approx(statistics.mean(adamw)) and row["max"] == max(adamw)
    objective = {r["value"]: r["n"] for r in rows if r["factor"] == "objective" and r["metric"] == "test_loss"}
    assert objective == {"contrastive": 3, "supervised": 7}
    assert not any(r["factor"] == "dataset" for r in rows)  # constant within each stage


def test_selection_is_ordered_by_parent_then_factors(bundled):
    selection = select(bundled, epoch="last")
    entries = list(selection)
    families = [family(e) for e in entries]
    blocks = list(dict.fromkeys(families))
    assert len(entries) == 250 and len(blocks) == 10
    assert families == sorted(families, key=blocks.index)  # each parent's models are contiguous
    for name in blocks:
        assert entries[families.index(name)].model_id == name  # the parent opens its block
    children = [e for e in entries if e.parent_id == blocks[0]]
    keys = [(e.factors["optimizer"], e.factors["lr"], e.factors["head"], e.factors["seed"]) for e in children]
    assert keys == sorted(keys)
    kinds = pair_kinds(entries[:3])
    assert kinds[0, 1] == KINDS.index("parent-child") and kinds[1, 2] == KINDS.index("siblings")
    capped = select(bundled, stage="finetune", max_models=12)
    assert len(capped) == 12 and len({e.parent_id for e in capped}) >= 8  # spread over the parents
    assert len(analysis_order(capped)) == 12
    with pytest.raises(ValueError, match="no checkpoint"):
        select(bundled, stage="sampled")


def test_cli_writes_report_results_matrices_and_plots(tmp_path):
    out = tmp_path / "analyze"
    result = run_cli("analyze", "bundled", "stage=finetune", "max_models=12", "cka_batch=64", f"out={out}",
                     "threads=1", "progress=false")  # fmt: skip
    assert "12 checkpoints" in result.stdout and "linear CKA" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["selection"]["checkpoints"] == 12 and results["split"] == "test"
    assert results["agreement"]["evaluated"] == 12 and results["cka"]["batch"] == 64
    assert results["weights"]["parameters"] == 11424 and "head.weight" in results["weights"]["excluded"]
    matrices = load_file(out / "matrices.safetensors")
    for key in ("l2", "cosine", "agreement", "cka", "l2/blocks.0.attn.qkv.weight"):
        assert matrices[key].shape == (12, 12) and torch.allclose(matrices[key], matrices[key].T)
    assert torch.all(matrices["agreement"].diagonal() == 1)
    models = [m["model"] for m in results["models"]]
    assert all(abs(m["accuracy"] - m_acc) < 1e-6 for m, m_acc in zip(results["models"], _indexed(models)))
    report = (out / "report.md").read_text()
    pngs = ["heatmap_l2", "heatmap_cosine", "heatmap_agreement", "heatmap_cka", "embedding_pca",
            "embedding_tsne", "factors_finetune"]  # fmt: skip
    for name in pngs:
        assert (out / f"{name}.png").stat().st_size > 10_000 and f"({name}.png)" in report
    assert "| finetune | lr | 0.001 | test_acc |" in report


def _indexed(models: list[str]) -> list[float]:
    zoo = Zoo.open("bundled")
    accuracy = {f"{e.model_id}@{e.epoch}": e.metrics["test_acc"] for e in zoo}
    return [accuracy[m] for m in models]


@pytest.mark.parametrize(
    "args, message",
    [(["/nonexistent/zoo"], "not a zoo"), (["epoch=last"], "the first argument is the zoo")],
)
def test_cli_bad_input_is_one_line(tmp_path, args, message):
    result = run_cli("analyze", *args, f"out={tmp_path / 'out'}", check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitzoo analyze: error:") and message in lines[0], result.stderr
