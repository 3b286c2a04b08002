"""The transfer generator (fine-tunes for parents it never saw) and its leave-one-parent-out evaluation, on the
bundled zoo."""

import pytest
import torch
from conftest import run_cli
from safetensors.torch import save_file

from vitzoo.errors import ConfigError
from vitzoo.eval.evaluation import evaluate
from vitzoo.eval.finetune import FinetuneRecipe
from vitzoo.generalisation import GeneralisationSettings, leave_one_parent_out, write_generalisation
from vitzoo.generative.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from vitzoo.generative.transfer import (
    ParentError,
    TransferConfig,
    fit_heads,
    fit_transfer,
    load_transfer,
    probe_logits,
    read_parent,
    sample_transfer,
    save_transfer,
    start_for,
)
from vitzoo.zoo_builder.families import family_start, parent_states
from vitzoo.zoo_builder.zoo import Zoo

CONFIG = TransferConfig(probes=256)


@pytest.fixture(scope="module")
def zoo():
    return Zoo.open("bundled")


@pytest.fixture(scope="module")
def held_out_parent(zoo):
    return sorted({e.parent_id for e in zoo.filter(stage="finetune")})[0]


@pytest.fixture(scope="module")
def generator(zoo, held_out_parent):
    return fit_transfer(zoo, CONFIG, "linear", [held_out_parent])


def test_held_out_parent_reaches_no_training_data(zoo, generator, held_out_parent):
    assert held_out_parent not in generator.parents and generator.held_out == [held_out_parent]
    assert len(generator.parents) == 9 and sum(len(r) for r in generator.runs) == 9 * 12
    own = [e for e in zoo.filter(stage="finetune", epoch="last", head="linear") if e.parent_id == held_out_parent]
    logits = probe_logits([e.state_dict() for e in own], zoo.architecture, own[0].head, generator.probes)
    trained = torch.cat(generator.runs)  # [108, N, C]
    gaps = (logits[:, None] - trained[None]).abs().amax(dim=(2, 3))  # [12, 108]
    assert gaps.min() > 1e-3  # none of the held-out parent's fine-tunes is among the training logits


def test_start_is_the_zoo_builders_start(zoo, generator, held_out_parent):
    entry = next(e for e in zoo.filter(stage="finetune", head="linear") if e.parent_id == held_out_parent)
    exact = family_start(zoo, entry, parent_states(zoo, [entry]))
    name, parent = read_parent(held_out_parent, zoo)
    start = start_for(generator, parent, entry.factors["seed"])
    assert name == held_out_parent and all(torch.equal(start[k], exact[k]) for k in exact)


def test_samples_for_an_unseen_parent_beat_its_start(zoo, generator, held_out_parent):
    _, parent = read_parent(held_out_parent, zoo)
    samples = sample_transfer(generator, parent, held_out_parent, 6, seed=0, head_seed=42, temperature=0.0)
    start = start_for(generator, parent, 42)
    assert all(torch.equal(s[k], start[k]) for s, _, _ in samples for k in start if not k.startswith("head."))
    results = evaluate([(str(i), s) for i, (s, _, _) in enumerate(samples)] + [("w0", start)], "digits", "test",
                       num_heads=2)  # fmt: skip
    accuracies = [r.accuracy for r in results]
    assert min(accuracies[:-1]) > 0.45 > 0.2 > accuracies[-1]  # the start is at chance (10 classes)
    factors = samples[0][1]
    assert factors["method"] == "transfer" and factors["parent"] == held_out_parent and factors["head_seed"] == 42


def test_slot_condition_and_temperature(zoo, generator, held_out_parent):
    _, parent = read_parent(held_out_parent, zoo)
    fixed = sample_transfer(generator, parent, "p", 3, optimizer="sgd", lr=1e-4)
    assert {(f["optimizer"], f["lr"]) for _, f, _ in fixed} == {("sgd", 1e-4)}
    mean = sample_transfer(generator, parent, "p", 2, optimizer="sgd", lr=1e-4, temperature=0.0)
    assert torch.equal(mean[0][0]["head.weight"], mean[1][0]["head.weight"])  # temperature 0: the slot's mean
    assert not torch.equal(fixed[0][0]["head.weight"], fixed[1][0]["head.weight"])
    with pytest.raises(ConfigError, match="no slot"):
        sample_transfer(generator, parent, "p", 1, optimizer="sgd", lr=0.5)


def test_fit_heads_recovers_a_linear_layer():
    torch.manual_seed(0)
    inputs = torch.randn(200, 6, dtype=torch.float64)
    weight, bias = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    targets = (inputs @ weight.T + bias)[None]
    fitted_weight, fitted_bias = fit_heads(inputs, targets, torch.zeros(3, 6), torch.zeros(3), ridge=1e-9)
    assert torch.allclose(fitted_weight[0], weight, atol=1e-6) and torch.allclose(fitted_bias[0], bias, atol=1e-6)
    pulled, _ = fit_heads(inputs, targets, weight.float() * 0, torch.zeros(3), ridge=1e3)
    assert pulled.abs().max() < 0.05 * weight.abs().max()  # a strong pull keeps the start's (zero) head


def test_checkpoint_round_trip_and_refusals(tmp_path, zoo, generator, held_out_parent):
    path = tmp_path / "transfer.safetensors"
    save_transfer(generator, path)
    loaded = load_transfer(path)
    _, parent = read_parent(held_out_parent, zoo)
    a = sample_transfer(generator, parent, "p", 2, seed=3, head_seed=7)
    b = sample_transfer(loaded, parent, "p", 2, seed=3, head_seed=7)
    assert all(torch.allclose(x[0][k], y[0][k], atol=1e-5) for x, y in zip(a, b) for k in x[0])
    assert loaded.held_out == [held_out_parent] and b[0][1]["generator"] == loaded.sha256
    tensors, metadata = read_checkpoint(path)
    write_checkpoint(path, {k: v for k, v in tensors.items() if k != "runs.0"}, metadata)
    with pytest.raises(CheckpointError, match="runs.0"):
        load_transfer(path)


def test_parents_of_another_architecture_are_refused(tmp_path, generator):
    other = {"patch_embed.proj.weight": torch.zeros(16, 1, 7, 7), "cls_token": torch.zeros(1, 1, 16)}
    with pytest.raises(ParentError, match=r"shapes differ: .*patch_embed.proj.weight \(16, 1, 7, 7\) vs \(24, "):
        start_for(generator, other, 0)
    with pytest.raises(ParentError, match="neither a file nor a pre-trained model"):
        read_parent("pt-nonexistent", Zoo.open("bundled"))
    with pytest.raises(ConfigError, match="not parents"):
        fit_transfer(Zoo.open("bundled"), CONFIG, "linear", ["pt-nonexistent"])


def test_cli_trains_without_a_parent_and_samples_it_from_a_file(tmp_path, zoo, held_out_parent):
    run_cli("train", "bundled", "model=transfer", "model.probes=128", f"holdout_parents=[{held_out_parent}]",
            f"out={tmp_path / 'gen'}")  # fmt: skip
    _, parent = read_parent(held_out_parent, zoo)
    save_file({k: v.contiguous() for k, v in parent.items()}, tmp_path / "parent.safetensors")
    out = tmp_path / "samples"
    generator = str(tmp_path / "gen" / "transfer.safetensors")
    printed = run_cli("sample", generator, f"parent={tmp_path / 'parent.safetensors'}", "head_seed=42", "n=3",
                      f"out={out}").stdout  # fmt: skip
    assert "3 sampled ViTs" in printed
    sampled = Zoo.open(out)
    assert len(sampled) == 3 and sampled[0].factors["parent"] == "parent"
    refused = run_cli("sample", str(tmp_path / "gen" / "transfer.safetensors"), f"parent={held_out_parent}",
                      "target_acc=0.8", f"out={tmp_path / 'x'}", check=False)  # fmt: skip
    assert refused.returncode == 2 and "target_acc" in refused.stderr
    refused = run_cli("train", "bundled", "model=diffusion", "holdout_parents=[x]", f"out={tmp_path / 'y'}",
                      check=False)  # fmt: skip
    assert refused.returncode == 2 and "holdout_parents is for model=transfer" in refused.stderr


def test_leave_one_parent_out_on_three_parents(tmp_path, zoo):
    parents = sorted({e.parent_id for e in zoo.filter(stage="finetune")})[:3]
    view = Zoo(zoo.root, zoo.meta, zoo.records, [e for e in zoo if e.model_id in parents or e.parent_id in parents])
    settings = GeneralisationSettings(sizes=[1], recipe=FinetuneRecipe(epochs=1), resamples=200)
    report = leave_one_parent_out(view, CONFIG, settings, log=lambda line: None)
    overall = report["overall"]
    assert [row["parent"] for row in report["parents"]] == parents
    assert all(row["sample"]["n"] == 12 and row["real"]["n"] == 12 for row in report["parents"])
    assert overall["sample"]["mean"] > 0.4 > 0.2 > overall["start"]["mean"]
    assert overall["mean_delta"]["mean"] < 0.2 and overall["head_delta"]["mean"] < 0.2
    assert overall["finetune_sample_1"]["mean"] > overall["finetune_start_1"]["mean"]
    assert [point["parents"] for point in report["curve"]] == [1, 2]
    assert len(report["slots"]) == 6 and all(0.2 < slot["sample"] < 1 for slot in report["slots"])
    assert report["bars"]["0.5x real fine-tunes"] and report["timing"]["fit_max"] < 60
    path = write_generalisation(report, tmp_path)
    assert "| transfer samples |" in path.read_text() and (tmp_path / "learning_curve.png").stat().st_size > 0
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()
    with pytest.raises(ConfigError, match="sizes"):
        leave_one_parent_out(view, CONFIG, GeneralisationSettings(sizes=[2]), log=lambda line: None)
