"""Generators: exact family bases, diffusion training with exact resume, conditioned sampling, clear errors."""

import json

import pytest
import torch
from conftest import run_cli

from vitzoo.errors import ConfigError
from vitzoo.generative.autoencoder import AutoencoderConfig, HyperAutoencoder, reconstruction_error
from vitzoo.generative.data import DeltaSet
from vitzoo.generative.diffusion import DiffusionConfig
from vitzoo.generative.family import FamilyBasis
from vitzoo.generative.generator import BUNDLED_GENERATOR, ConditionError, load_generator, sample, train_generator
from vitzoo.generative.hyper import embeddings, load_autoencoder, sample_kde, train_autoencoder
from vitzoo.zoo_builder import Zoo
from vitzoo.zoo_builder.zoo import ZooError, write_sampled

TINY = DiffusionConfig(d_model=16, depth=1, heads=2, mixtures=24, steps=12, batch_size=16)
TINY_AUTOENCODER = dict(d_model=16, depth=1, heads=2, latent=4, embedding=8, batch_size=4)


@pytest.fixture(scope="module")
def basis():
    return FamilyBasis(Zoo.open("bundled"))


def fake_measure(state_dicts):
    """Stands in for the evaluator: a deterministic number per model (the head's mean weight)."""
    return [float(sd["head.weight"].mean()) for sd in state_dicts]


def test_family_basis_decodes_every_run_exactly(basis):
    assert basis.num_families == 20 and basis.num_slots == 6 and basis.skipped == 0
    for family in (0, 7, 19):
        for slot in range(basis.num_slots):
            decoded = basis.decode(family, torch.eye(basis.num_slots)[slot])
            weights = basis.members[family][slot].state_dict()
            assert max((decoded[k] - weights[k]).abs().max().item() for k in weights) < 1e-6


def test_distances_from_the_gram_matrix_equal_weight_space_distances(basis):
    coordinates = torch.tensor([[0.5, 0.5, 0, 0, 0, 0], [0.2, 0.1, 0.3, 0.1, 0.2, 0.1]], dtype=torch.float64)
    distances = basis.distances(3, coordinates)
    for b in range(2):
        model = basis.decode(3, coordinates[b])
        for k in range(basis.num_slots):
            run = basis.decode(3, torch.eye(basis.num_slots)[k])
            direct = torch.cat([(model[key] - run[key]).double().flatten() for key in run]).norm().item()
            assert distances[b, k].item() == pytest.approx(direct, rel=1e-4, abs=1e-4)


def test_delta_tokens_decode_to_the_checkpoints():
    deltas = DeltaSet(Zoo.open("bundled"))
    assert deltas.tokens.shape == (300, 470, 25)
    for index in (0, 151, 299):
        decoded = deltas.decode(deltas.tokens[index], deltas.conditions[index].family, deltas.scales[index])
        weights = deltas.entries[index].state_dict()
        assert max((decoded[k] - weights[k]).abs().max().item() for k in weights) < 1e-6
    # every checkpoint's delta at unit scale; the scales themselves span the learning rates' range
    unit = (deltas.tokens.pow(2) * deltas.mask).sum(dim=(1, 2)) / deltas.mask.sum()
    assert torch.allclose(unit, torch.ones(len(deltas)), atol=1e-5)
    assert deltas.scales.max() > 10 * deltas.scales.min()


def test_training_resumes_to_the_same_generator(tmp_path, monkeypatch):
    zoo = Zoo.open("bundled")
    whole = train_generator(zoo, tmp_path / "whole", TINY, fake_measure, save_every=4, progress=False)

    import vitzoo.generative.generator as module

    writes = []
    original = module.save_training_state

    def crash_after_two_writes(*args):
        original(*args)
        writes.append(1)
        if len(writes) == 2:
            raise KeyboardInterrupt  # killed after step 8 was saved

    monkeypatch.setattr(module, "save_training_state", crash_after_two_writes)
    with pytest.raises(KeyboardInterrupt):
        train_generator(zoo, tmp_path / "resumed", TINY, fake_measure, save_every=4, progress=False)
    monkeypatch.setattr(module, "save_training_state", original)
    resumed = train_generator(zoo, tmp_path / "resumed", TINY, fake_measure, save_every=4, progress=False)
    assert whole.read_bytes() == resumed.read_bytes()
    with pytest.raises(ZooError, match="another config"):
        train_generator(zoo, tmp_path / "resumed", DiffusionConfig(steps=13), fake_measure, progress=False)


def test_sampling_writes_a_loadable_zoo_and_refuses_bad_conditions(tmp_path):
    zoo = Zoo.open("bundled")
    path = train_generator(zoo, tmp_path / "generator", TINY, fake_measure, progress=False)
    generator = load_generator(path)
    samples, parents, info = sample(generator, 5, seed=0, method="diffusion",
                                    target_acc=generator.stats["accuracy_max"], optimizer="adamw", lr=3e-3)  # fmt: skip
    assert len(samples) == len(parents) == 5 and info["drawn"] >= 5
    sampled = write_sampled(tmp_path / "samples", generator.basis.architecture, "digits", samples, parents)
    for entry in sampled:
        assert entry.stage == "sampled" and entry.factors["method"] == "diffusion"
        assert entry.factors["generator"] == generator.sha256 and entry.factors["optimizer"] == "adamw"
        entry.model()  # loads strictly into the timm ViT
        assert entry.parent_id in {key[0] for key in generator.basis.families}
    mixed, _, _ = sample(generator, 3)  # the default: Dirichlet mixtures, no learning
    assert all(abs(sum(factors["coordinates"]) - 1) < 1e-4 and factors["method"] == "mix" for _, factors, _ in mixed)
    assert all(factors["space"] == "family" for _, factors, _ in mixed)
    with pytest.raises(ConditionError, match="outside"):
        sample(generator, 2, target_acc=generator.stats["accuracy_max"] + 0.5)
    with pytest.raises(ConditionError, match="not a trained condition"):
        sample(generator, 2, optimizer="adamw", lr=0.5)
    with pytest.raises(ConditionError, match="positive"):
        sample(generator, 0)
    with pytest.raises(ConditionError, match="not one the generator was trained on"):
        sample(generator, 2, parent="pt-nope")
    with pytest.raises(ZooError, match="is not a vitzoo-generator-1 checkpoint"):
        load_generator(sampled[0].path)


def test_measure_and_pick_keeps_the_candidates_nearest_the_target(basis):
    generator = load_generator(BUNDLED_GENERATOR)
    seen = []

    def measure(state_dicts):  # a stand-in accuracy: the head bias's first value, one per candidate
        seen.extend(state_dicts)
        return [float(sd["head.bias"][0]) for sd in state_dicts]

    target = generator.stats["accuracy_min"]
    picked, parents, _ = sample(generator, 3, seed=0, method="pick", target_acc=target, measure=measure, pool=20)
    assert len(seen) == 20 and len(picked) == len(parents) == 3
    scores = sorted(abs(float(sd["head.bias"][0]) - target) for sd in seen)
    assert sorted(abs(f["val_acc"] - target) for _, f, _ in picked) == scores[:3]
    assert all(f["method"] == "pick" and f["target_acc"] == target and f["pool"] == 20 for _, f, _ in picked)
    with pytest.raises(ConditionError, match="needs a measure"):
        sample(generator, 3, method="pick", target_acc=target)
    with pytest.raises(ConditionError, match="target_acc only"):
        sample(generator, 3, method="pick", target_acc=target, optimizer="adamw", lr=3e-3, measure=measure)
    with pytest.raises(ConditionError, match="more"):
        sample(generator, 30, method="pick", target_acc=target, measure=measure, pool=20)


def test_cli_sample_from_the_shipped_generator(tmp_path):
    out = tmp_path / "samples"
    run_cli("sample", "bundled", "n=4", f"out={out}", "method=pick", "pool=12", "target_acc=0.9", "threads=1")
    zoo = Zoo.open(out)
    assert len(zoo) == 4 and all(e.factors["target_acc"] == 0.9 and e.factors["method"] == "pick" for e in zoo)
    again = run_cli("sample", "bundled", "n=4", f"out={tmp_path / 'again'}", "target_acc=1.5", check=False)
    assert again.returncode == 2 and "does not extrapolate" in again.stderr  # conditions are checked first
    assert not (tmp_path / "again").exists()


def test_baselines_sample_like_the_generator(basis):
    generator = load_generator("bundled")
    noisy, parents, _ = sample(generator, 3, seed=1, method="noise", distance=1.5)
    for (state_dict, factors, head), parent in zip(noisy, parents):
        assert (
            factors["method"] == "noise" and head["num_classes"] == 10 and parent in {key[0] for key in basis.families}
        )
        runs = [basis.decode(f, torch.eye(basis.num_slots)[k]) for f in range(basis.num_families)
                for k in range(basis.num_slots)]  # fmt: skip
        nearest = min(torch.sqrt(sum((state_dict[k].double() - r[k].double()).pow(2).sum() for k in r)) for r in runs)
        assert abs(nearest.item() - 1.5) < 1e-3  # the noise has exactly the asked norm
    gaussian, _, _ = sample(generator, 2, method="gaussian")
    random, _, _ = sample(generator, 2, method="random")
    assert not torch.equal(gaussian[0][0]["head.weight"], random[0][0]["head.weight"])
    with pytest.raises(ConditionError, match="distance"):
        sample(generator, 2, method="noise")
    with pytest.raises(ConditionError, match="baseline"):
        sample(generator, 2, method="gaussian", target_acc=0.5)


def test_cli_trains_both_models_and_samples_and_probes_the_autoencoder(tmp_path):
    diffusion = tmp_path / "diffusion"
    trained = run_cli("train", "bundled", "model=diffusion", "model.steps=4", "model.mixtures=12", "model.d_model=16",
                      "model.depth=1", "model.batch_size=8", f"out={diffusion}", "progress=false")  # fmt: skip
    timing = json.loads((diffusion / "timing.json").read_text())
    assert timing["steps"] == 4 and timing["batch_size"] == 8 and timing["steps_per_second"] > 0
    assert "4 steps in" in trained.stdout and "examples/s at batch 8" in trained.stdout
    assert load_generator(diffusion / "generator.safetensors").basis.num_families == 20
    autoencoder = tmp_path / "autoencoder"
    run_cli("train", "bundled", "model=autoencoder", "model.steps=3", "model.batch_size=4", "model.d_model=16",
            f"out={autoencoder}", "progress=false")  # fmt: skip
    checkpoint = autoencoder / "autoencoder.safetensors"
    run_cli("sample", str(checkpoint), "method=kde", "n=3", f"out={tmp_path / 'kde'}")
    sampled = Zoo.open(tmp_path / "kde")
    assert len(sampled) == 3 and all(e.factors["method"] == "kde" for e in sampled)
    sampled[0].model()
    run_cli("sample", str(checkpoint), "n=2", f"out={tmp_path / 'kde-default'}")  # an autoencoder's own: kde
    assert {e.factors["method"] for e in Zoo.open(tmp_path / "kde-default")} == {"kde"}
    wrong = run_cli("sample", str(checkpoint), "method=mix", "n=3", f"out={tmp_path / 'x'}", check=False)
    assert wrong.returncode == 2 and "method=kde" in wrong.stderr
    probe = run_cli("probe", str(checkpoint), f"out={tmp_path / 'probe'}", "logger=wandb")  # W&B disabled in tests
    assert "| test accuracy | R2 |" in probe.stdout and (tmp_path / "probe" / "results.json").exists()
    assert (tmp_path / "probe" / "probes.png").stat().st_size > 0 and (tmp_path / "probe" / "report.html").exists()
    bad = run_cli("train", "bundled", "model=autoencoder", "+model.bogus=1", f"out={tmp_path / 'y'}", check=False)
    assert bad.returncode == 2 and "bogus" in bad.stderr


@pytest.fixture(scope="module")
def deltas():
    return DeltaSet(Zoo.open("bundled"))


def tiny_autoencoder(spec, **overrides) -> HyperAutoencoder:
    torch.manual_seed(0)
    return HyperAutoencoder(spec, AutoencoderConfig(**TINY_AUTOENCODER, **overrides)).eval()


def test_autoencoder_decodes_whole_models_from_overlapping_windows(deltas):
    model = tiny_autoencoder(deltas.spec, window=100, window_stride=60)
    windows = model.windows()  # starts 0, 60, ..., 360 and 370 (the last window ends on token 469)
    assert windows.shape == (8, 100) and windows[-1, -1] == 469 and windows[-1, 0] == 370
    tokens = deltas.tokens[:3]  # [3, 470, 25]
    with torch.no_grad():
        latents = model.encode_model(tokens)
        decoded = model.decode_model(latents)
        assert latents.shape == (3, 8, 100, 4) and decoded.shape == tokens.shape
        # token 70 lies in the windows starting at 0 and 60: the mean of their two reconstructions
        first, second = model.decode(latents[:, 0], windows[0]), model.decode(latents[:, 1], windows[1])
        torch.testing.assert_close(decoded[:, 70], (first[:, 70] + second[:, 10]) / 2, rtol=0, atol=0)
        assert (decoded[:, ~deltas.mask.any(dim=1)] == 0).all() and (decoded != 0).any(dim=2).all()
        error = reconstruction_error(model, tokens)
        every_value = ((decoded - tokens).pow(2) * deltas.mask).sum(dim=(1, 2)) / deltas.mask.sum()
        torch.testing.assert_close(error, every_value)
        changed = tokens.clone()
        changed[:, -1] += 1.0  # the last token: only the last window holds it
        assert (reconstruction_error(model, changed) != error).all()
        per_window = torch.stack([model.embed(model.encode(tokens[:, w], w)) for w in windows], dim=1)
        torch.testing.assert_close(model.embed_model(tokens), per_window.mean(dim=1))


@pytest.mark.parametrize("pooling", ["mean", "moments"])
def test_autoencoder_window_zero_is_the_whole_sequence(deltas, pooling):
    """Bit for bit with shared projections; per-position projections gather their weights for a window, which
    changes the kernel's summation order (test_per_position_projections_read_each_tokens_own_weights)."""
    whole = tiny_autoencoder(deltas.spec, pooling=pooling, projections="shared")
    one_window = tiny_autoencoder(deltas.spec, pooling=pooling, projections="shared", window=470, window_stride=470)
    one_window.load_state_dict(whole.state_dict())
    tokens = deltas.tokens[:4]
    with torch.no_grad():
        latents = whole.encode(tokens)  # the unwindowed encoder and decoder
        assert torch.equal(whole.encode_model(tokens), latents[:, None])
        assert torch.equal(whole.decode_model(latents[:, None]), whole.decode(latents))
        assert torch.equal(whole.embed_model(tokens), whole.embed(latents))
        assert torch.equal(one_window.encode_model(tokens), latents[:, None])
        assert torch.equal(one_window.decode_model(latents[:, None]), whole.decode(latents))
        assert torch.equal(reconstruction_error(one_window, tokens), reconstruction_error(whole, tokens))
        views = torch.stack([tokens, tokens.flip(0)])
        index = torch.arange(470).expand(4, 470)
        assert torch.equal(whole.loss(views, views)[0], one_window.loss(views, views, index)[0])


def test_per_position_projections_read_each_tokens_own_weights(deltas):
    model = tiny_autoencoder(deltas.spec)  # per_position: the default
    layer = model.encoder_in
    tokens = deltas.tokens[:3]  # [B, T, d]
    out = layer(tokens)
    for t in (0, 17, 469):
        torch.testing.assert_close(out[:, t], tokens[:, t] @ layer.weight[t] + layer.bias[t])
    window = torch.arange(100, 164)
    torch.testing.assert_close(layer(tokens[:, window], window), out[:, window])
    per_model = torch.stack([window, window + 5, window + 10])  # [B, n]: a window of its own for every model
    got = layer(torch.stack([tokens[b, per_model[b]] for b in range(3)]), per_model)
    torch.testing.assert_close(got, torch.stack([out[b, per_model[b]] for b in range(3)]))


def test_windowed_autoencoder_training_resumes_exactly(tmp_path, monkeypatch):
    zoo = Zoo.open("bundled")
    config = AutoencoderConfig(**TINY_AUTOENCODER, steps=4, window=64, window_stride=32)
    whole = train_autoencoder(zoo, tmp_path / "whole", config, save_every=2, progress=False)

    import vitzoo.generative.hyper as module

    original = module.save_training_state

    def crash_after_one_write(*args):
        original(*args)
        raise KeyboardInterrupt  # killed after step 2 was saved

    monkeypatch.setattr(module, "save_training_state", crash_after_one_write)
    with pytest.raises(KeyboardInterrupt):
        train_autoencoder(zoo, tmp_path / "resumed", config, save_every=2, progress=False)
    monkeypatch.setattr(module, "save_training_state", original)
    resumed = train_autoencoder(zoo, tmp_path / "resumed", config, save_every=2, progress=False)
    assert whole.read_bytes() == resumed.read_bytes()
    bundle = load_autoencoder(whole)
    assert bundle.model.windows().shape == (14, 64) and embeddings(bundle).shape == (300, 8 + 1)  # + log scale


def test_autoencoder_config_refuses_bad_windows_and_poolings(deltas):
    for bad in ({"window": -1}, {"window_stride": 4}, {"window": 8}, {"window": 8, "window_stride": 9},
                {"pooling": "max"}):  # fmt: skip
        with pytest.raises(ValueError):
            AutoencoderConfig(**bad)
    with pytest.raises(ValueError, match="longer than the 470 tokens"):
        HyperAutoencoder(deltas.spec, AutoencoderConfig(window=471, window_stride=1))


def test_a_generator_over_both_head_types_samples_the_head_it_is_asked_for(tmp_path):
    def measure(state_dicts):  # both head structures: the mean of every head tensor
        return [float(sum(v.mean() for k, v in sd.items() if k.startswith("head"))) for sd in state_dicts]

    zoo = Zoo.open("bundled")
    path = train_generator(zoo, tmp_path, TINY, measure, head="all", progress=False)
    generator = load_generator(path)
    assert generator.basis.num_families == 40 and generator.basis.head == "all"
    mlp, _, _ = sample(generator, 4, seed=0, head="mlp", novel_only=False)
    assert all(head["head"] == "mlp" and "head.2.weight" in state_dict for state_dict, _, head in mlp)
    either, _, _ = sample(generator, 12, seed=0, novel_only=False)
    assert {head["head"] for _, _, head in either} == {"linear", "mlp"}
    random, _, _ = sample(generator, 2, method="random", head="mlp")
    assert all(head["head_hidden"] == 16 for _, _, head in random)
    with pytest.raises(ConditionError, match="head=mlp is not one the generator was trained on"):
        sample(load_generator("bundled"), 2, head="mlp")
    with pytest.raises(ValueError, match="head must be one of"):
        FamilyBasis(zoo, head="conv")
    with pytest.raises(ValueError, match="head must be one of"):
        DeltaSet(zoo, head="conv")


def test_an_autoencoder_over_both_head_types_embeds_bodies_and_probes_head_type(tmp_path):
    from vitzoo.generative.probe import plot_probes, probe

    zoo = Zoo.open("bundled")
    both = DeltaSet(zoo, head="all")
    assert both.tokens.shape == (600, 460, 25)  # the linear head's 10 tokens (the MLP head's 26) left out
    entry = both.entries[0]
    decoded = both.decode(both.tokens[0], both.conditions[0].family, both.scales[0])
    weights = entry.state_dict()
    assert not any(k.startswith("head.") for k in decoded)
    assert max((decoded[k] - weights[k]).abs().max().item() for k in decoded) < 1e-6
    config = AutoencoderConfig(**TINY_AUTOENCODER, steps=2)
    bundle = load_autoencoder(train_autoencoder(zoo, tmp_path, config, head="all", progress=False))
    rows = {row["property"]: row for row in probe(bundle)}
    assert 0.0 <= rows["head type"]["embedding"] <= 1.0 and rows["head type"]["weight_statistics"] > 0.6  # chance: 0.5
    accuracy = rows["test accuracy"]  # held-out predictions beside the truth, one per checkpoint, for the figure
    assert len(accuracy["true"]) == len(accuracy["predicted"]) == len(accuracy["baseline_predicted"]) == len(both)
    assert set(rows["head type"]["predicted"]) <= {"linear", "mlp"}
    plot_probes(list(rows.values()), tmp_path / "probes.png")
    assert (tmp_path / "probes.png").stat().st_size > 0
    with pytest.raises(ConditionError, match="bodies of both head types"):
        sample_kde(bundle, 2)


def test_training_set_leaves_out_what_could_not_be_evaluated(basis):
    from vitzoo.generative.generator import training_set

    calls = []

    def measure(state_dicts):  # every third model cannot be evaluated
        calls.append(len(state_dicts))
        return [None if i % 3 == 0 else 0.5 for i in range(len(state_dicts))]

    config = DiffusionConfig(d_model=16, depth=1, heads=2, mixtures=12, steps=1, batch_size=16)
    data = training_set(basis, config, measure)
    runs = basis.num_families * basis.num_slots
    assert calls == [12] and data.unmeasured == 4  # mixtures 0, 3, 6, 9
    assert len(data.accuracy) == runs + 8 and not data.accuracy.isnan().any()
    assert not (data.accuracy == 0).any()  # a failed evaluation is never a label


def test_measure_on_reports_a_model_it_cannot_evaluate_as_none():
    from vitzoo.cli import measure_on

    zoo = Zoo.open("bundled")
    good = zoo.filter(stage="finetune", epoch="last")[0].state_dict()
    broken = {k: torch.full_like(v, float("nan")) for k, v in good.items()}
    accuracies = measure_on(zoo.dataset, "val", zoo.architecture.num_heads, None)([good, broken])
    assert 0 < accuracies[0] <= 1 and accuracies[1] is None


@pytest.mark.parametrize(
    "field, value",
    [("timesteps", 2e9), ("timesteps", 0), ("steps", 0), ("lr", 0), ("ema", 1.0), ("condition_dropout", -0.1),
     ("schedule", "cosine"), ("d_model", 15), ("batch_size", True)],
)  # fmt: skip
def test_diffusion_config_refuses_bad_fields(field, value):
    from vitzoo.errors import ConfigError

    with pytest.raises(ConfigError, match=field):
        DiffusionConfig(**{field: value})


@pytest.mark.parametrize("field, value", [("steps", 0), ("temperature", 0), ("mask_fraction", 1.0), ("heads", 3)])
def test_autoencoder_config_refuses_bad_fields(field, value):
    from vitzoo.errors import ConfigError

    with pytest.raises(ConfigError, match=field):
        AutoencoderConfig(**{field: value})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["config"].update(timesteps=2e9), "timesteps must be an integer"),
        (lambda m: m["config"].pop("steps"), "config lacks steps"),
        (lambda m: m["config"].update(colour="red"), "unknown field"),
        (lambda m: m["stats"].update(copy_threshold=0), "copy_threshold must be a number > 0"),
        (lambda m: m["stats"].pop("accuracy_std"), "stats must hold exactly"),
        (lambda m: m["stats"].update(coordinate_mean=[0.1]), "coordinate_mean must list"),
        (lambda m: m.pop("basis"), "lacks 'basis'"),
    ],
)
def test_generator_checkpoint_metadata_is_checked_on_load(tmp_path, edit, message):
    from vitzoo.generative.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
    from vitzoo.generative.generator import BUNDLED_GENERATOR

    weights, metadata = read_checkpoint(BUNDLED_GENERATOR)
    edit(metadata)
    write_checkpoint(tmp_path / "generator.safetensors", weights, metadata)
    with pytest.raises(CheckpointError, match=message):
        load_generator(tmp_path / "generator.safetensors")


def test_autoencoder_reconstructs_its_training_models_on_a_small_zoo(tmp_path):
    """The hyper-representation's bar on a small zoo: encode -> decode keeps >= 0.95x of the models' test accuracy
    on the median and >= 0.9x on the mean in every slot (per-position projections, unit-scale deltas)."""
    from conftest import tiny_blueprint

    from vitzoo.cli import measure_on
    from vitzoo.generative.hyper import reconstruction_rows
    from vitzoo.zoo_builder.build import BuildSettings, build

    blueprint = tiny_blueprint(pretrain={"epochs": 4, "train_subset": 1024},
                               finetune={"epochs": 4, "train_subset": 1024, "head": "linear"})  # fmt: skip
    blueprint["finetune"]["grid"] = [{"lr": [3e-3, 1e-3], "seed": [42]}]
    build(blueprint, BuildSettings(out=tmp_path / "zoo", device="cpu", progress=False))
    zoo = Zoo.open(tmp_path / "zoo")
    config = AutoencoderConfig(d_model=32, depth=1, heads=2, latent=16, embedding=8, batch_size=4, steps=1200,
                               noise=0.0, mask_fraction=0.0)  # fmt: skip
    bundle = load_autoencoder(train_autoencoder(zoo, tmp_path / "autoencoder", config, progress=False))
    rows = reconstruction_rows(bundle, measure_on("digits", "test", 2, None))
    assert [r["slot"] for r in rows] == ["adamw 0.001", "adamw 0.003", "all"] and rows[-1]["models"] == 4
    assert rows[-1]["model_acc"] > 0.3  # models worth reconstructing (chance: 0.1)
    # the median bar over all models; per slot (two models, 359 test images each: one image moves a ratio by
    # ~0.006) the mean bar, which holds with a margin on any machine's float order
    assert rows[-1]["median_ratio"] >= 0.95 and rows[-1]["ratio_of_means"] >= 0.95, rows[-1]
    for row in rows:
        assert row["ratio_of_means"] >= 0.9 and row["median_relative_error"] < 0.3, row


TINY_LATENT = dict(
    d_model=16, depth=1, heads=2, components=16, group=4, steps=6, batch_size=4, mixtures=6, timesteps=50
)


def test_latent_diffusion_resumes_and_retrains_to_the_same_bytes(tmp_path, monkeypatch):
    from vitzoo.generative import latent

    config = latent.LatentDiffusionConfig(**TINY_LATENT)
    whole = latent.train_latent_diffusion(tmp_path / "whole", config, fake_measure, save_every=3, progress=False)
    again = latent.train_latent_diffusion(tmp_path / "again", config, fake_measure, save_every=3, progress=False)
    assert whole.read_bytes() == again.read_bytes()
    original = latent.save_training_state

    def crash_after_first_write(*args):
        original(*args)
        raise KeyboardInterrupt  # killed after step 3 was saved

    monkeypatch.setattr(latent, "save_training_state", crash_after_first_write)
    with pytest.raises(KeyboardInterrupt):
        latent.train_latent_diffusion(tmp_path / "resumed", config, fake_measure, save_every=3, progress=False)
    monkeypatch.setattr(latent, "save_training_state", original)
    resumed = latent.train_latent_diffusion(tmp_path / "resumed", config, fake_measure, save_every=3, progress=False)
    assert whole.read_bytes() == resumed.read_bytes()
    with pytest.raises(ConfigError, match="mlp"):
        latent.train_latent_diffusion(tmp_path / "mlp", config, fake_measure, head="mlp", progress=False)


@pytest.mark.parametrize("components", [16, 0])  # principal coefficients, or the raw token latents
def test_latent_diffusion_samples_whole_models_for_its_conditions(tmp_path, components):
    from vitzoo.generative import latent

    config = latent.LatentDiffusionConfig(**(TINY_LATENT | {"components": components, "group": 10}))
    path = latent.train_latent_diffusion(tmp_path / "ld", config, fake_measure, progress=False)
    generator = latent.load_latent_diffusion(path)
    data = generator.bundle.data
    # the training set: 300 checkpoints + 6 mixtures, so the accuracy range is the mixtures' and the runs' together
    low, high = generator.stats["accuracy_min"], generator.stats["accuracy_max"]
    assert low <= min(c.val_acc for c in data.conditions) and high >= max(c.val_acc for c in data.conditions)
    parent = data.parents[3]
    samples, parents = latent.sample_latent(generator, 3, seed=1, parent=parent, target_acc=(low + high) / 2,
                                            optimizer="sgd", lr=1e-3, steps=4)  # fmt: skip
    assert parents == [parent] * 3
    first = data.entries[0].state_dict()
    for state_dict, factors, head in samples:
        assert sorted(state_dict) == sorted(first) and all(state_dict[k].shape == first[k].shape for k in first)
        assert all(torch.isfinite(v).all() for v in state_dict.values())
        assert (
            factors["method"] == "latent_diffusion" and factors["space"] == "latent" and factors["optimizer"] == "sgd"
        )
        assert head["head"] == "linear"
    again, _ = latent.sample_latent(generator, 3, seed=1, parent=parent, target_acc=(low + high) / 2,
                                    optimizer="sgd", lr=1e-3, steps=4)  # fmt: skip
    assert all(torch.equal(a[0][k], b[0][k]) for a, b in zip(samples, again) for k in first)
    # temperature 0: no initial noise, so draws of one family under one condition are the same model
    cold, _ = latent.sample_latent(generator, 8, seed=2, parent=parent, steps=4, temperature=0.0)
    by_family: dict = {}
    for state_dict, factors, _ in cold:
        by_family.setdefault(factors["family_seed"], []).append(state_dict)
    assert any(len(members) > 1 for members in by_family.values())
    assert all(torch.equal(m[0][k], other[k]) for m in by_family.values() for other in m[1:] for k in first)
    assert cold[0][1]["temperature"] == 0.0
    # the epoch condition: the last trained epoch unless asked (the zoo's fine-tunes keep epochs 8, 9 and 10)
    assert generator.epochs == sorted({e.epoch for e in data.entries}) and len(generator.epochs) > 1
    assert samples[0][1]["target_epoch"] == generator.epochs[-1]
    early, _ = latent.sample_latent(generator, 3, seed=1, parent=parent, target_acc=(low + high) / 2,
                                    optimizer="sgd", lr=1e-3, steps=4, epoch=generator.epochs[0])  # fmt: skip
    assert early[0][1]["target_epoch"] == generator.epochs[0]
    assert not all(torch.equal(a[0][k], b[0][k]) for a, b in zip(samples, early) for k in first)
    write_sampled(tmp_path / "samples", data.architecture, "digits", samples, parents)
    Zoo.open(tmp_path / "samples")[0].model()
    refused = (
        ({"target_acc": high + 0.1}, "outside"),
        ({"optimizer": "sgd"}, "together"),
        ({"steps": 51}, "steps"),
        ({"optimizer": "lion", "lr": 1e-3}, "not a trained condition"),
        ({"parent": "nobody"}, "parent"),
        ({"temperature": -1.0}, "temperature"),
        ({"epoch": 99}, "not a trained condition"),
    )
    for bad, message in refused:
        with pytest.raises(ConditionError, match=message):
            latent.sample_latent(generator, 1, **bad)


def test_latent_diffusion_draws_its_checkpoint_share_from_the_real_checkpoints(tmp_path, monkeypatch):
    from vitzoo.generative import latent

    slots_seen = []
    original = latent.latent_loss

    def recording(model, scheduler, x0, s0, family, accuracy, slot, *rest):
        slots_seen.append(slot)  # before the dropout: mixtures carry the "no slot" index
        return original(model, scheduler, x0, s0, family, accuracy, slot, *rest)

    monkeypatch.setattr(latent, "latent_loss", recording)
    for share, real in ((1.0, 4), (0.5, 2)):
        slots_seen.clear()
        settings = {"mixtures": 60, "steps": 20, "checkpoint_share": share}
        config = latent.LatentDiffusionConfig(**(TINY_LATENT | settings))
        latent.train_latent_diffusion(tmp_path / f"share-{share}", config, fake_measure, progress=False)
        six = 6  # the bundled zoo's slots; index 6 = a mixture
        assert all((batch[:real] < six).all() for batch in slots_seen)
        if share < 1:  # the rest drawn uniformly: 300 of 360 are checkpoints, so 20 steps x 2 draw some mixture
            assert any((batch[real:] == six).any() for batch in slots_seen)


def test_cli_trains_and_samples_a_latent_diffusion(tmp_path):
    tiny = [f"model.{k}={v}" for k, v in TINY_LATENT.items()]  # its 6 mixtures measured by the evaluator
    run_cli("train", "bundled", "model=latent_diffusion", *tiny, f"out={tmp_path / 'ld'}", "progress=false")
    checkpoint = tmp_path / "ld" / "latent_diffusion.safetensors"
    run_cli("sample", str(checkpoint), "n=2", "steps=3", f"out={tmp_path / 'samples'}")
    sampled = Zoo.open(tmp_path / "samples")
    assert len(sampled) == 2 and all(e.factors["method"] == "latent_diffusion" for e in sampled)
    wrong = run_cli("sample", str(checkpoint), "method=mix", "n=2", f"out={tmp_path / 'x'}", check=False)
    assert wrong.returncode == 2 and "latent diffusion" in wrong.stderr


def test_holdout_keeps_one_run_per_family_or_whole_families_out_of_training(tmp_path):
    from collections import Counter

    from vitzoo.generative.data import held_out
    from vitzoo.generative.hyper import held_out_bundle

    entries = list(Zoo.open("bundled").filter(stage="finetune", status="done", epoch="last", head="linear"))
    runs = held_out(entries, "run")
    by_id = {e.model_id: e for e in entries}
    families = Counter((by_id[m].parent_id, by_id[m].factors["seed"]) for m in runs)
    slots = Counter((by_id[m].factors["optimizer"], by_id[m].factors["lr"]) for m in runs)
    assert len(runs) == 20 and set(families.values()) == {1} and len(slots) == 6  # one per family, every slot
    assert len(held_out(entries, "family")) == 4 * 6 and held_out(entries, "none") == set()
    with pytest.raises(ConfigError, match="holdout"):
        held_out(entries, "parent")
    config = AutoencoderConfig(**TINY_AUTOENCODER, steps=2, holdout="run")
    bundle = load_autoencoder(train_autoencoder(Zoo.open("bundled"), tmp_path / "ae", config, progress=False))
    assert not {e.model_id for e in bundle.data.entries} & runs
    held = held_out_bundle(bundle)
    assert {e.model_id for e in held.data.entries} == runs and held.data.normalizer is bundle.data.normalizer


@pytest.mark.parametrize("name", ["diffusion", "autoencoder", "latent_diffusion", "transfer"])
def test_every_model_config_file_lists_every_field_with_its_default(name):
    """configs/model/<name>.yaml is what `model.<field>=` overrides can reach: every field, at the code's default."""
    from dataclasses import fields
    from pathlib import Path

    import yaml

    from vitzoo.configs import __file__ as configs_init
    from vitzoo.generative.latent import LatentDiffusionConfig
    from vitzoo.generative.transfer import TransferConfig

    config_class = {"diffusion": DiffusionConfig, "autoencoder": AutoencoderConfig,
                    "latent_diffusion": LatentDiffusionConfig, "transfer": TransferConfig}[name]  # fmt: skip
    written = yaml.safe_load((Path(configs_init).parent / "model" / f"{name}.yaml").read_text())
    assert written.pop("name") == name
    assert written == {f.name: getattr(config_class(), f.name) for f in fields(config_class)}
