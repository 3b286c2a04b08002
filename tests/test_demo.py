"""`vitzoo demo`: every stage, one report folder, resume from the last finished stage with the same table."""

import itertools
import json

import torch
from conftest import run_cli

from vitzoo.generative.generator import load_generator
from vitzoo.zoo_builder import Zoo


def test_demo_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "demo"
    small = ["n=6", "targets=[0.5,0.9]", "per_target=2", "pool=8", "finetune_epochs=0", f"out={out}", "threads=1"]
    first = run_cli("demo", *small, timeout=900)
    for stage in ("tokenize", "generator", "sample", "evaluate", "soups", "report"):
        assert f"] {stage} (" in first.stdout
    assert "| Dirichlet mixtures (no learning) | 6 |" in first.stdout
    assert "| family diffusion, conditioned (learned) | 4 |" in first.stdout
    samples = Zoo.open(out / "samples")
    methods = {"mix", "diffusion", "pick", "kde", "latent_diffusion"}
    assert len(samples) == 36 and {e.factors["method"] for e in samples} == methods
    assert {e.factors["space"] for e in samples} == {"family", "latent"}
    assert sum(e.factors.get("target_acc") is not None for e in samples) == 12
    results = json.loads((out / "results.json").read_text())
    for method in ("pick", "diffusion", "latent_diffusion"):
        check = results["conditioning"][method]
        assert check["n"] == 4 and set(check["mean_acc_per_target"]) == {"0.5", "0.9"}
        band = check["zoo_band_acc_per_target"]  # the zoo's runs near each target on validation, on test
        assert set(band) == {"0.5", "0.9"} and band["0.9"] > band["0.5"]
    assert "Conditioning: Spearman's rho" in first.stdout
    names = [r["population"] for r in results["rows"]]
    # fine-tuning is off here (it is the slow part): no "after fine-tuning" rows
    noise = "  zoo + noise at the same distance"
    assert names == ["zoo (fine-tuned)", "random init", "Gaussian baseline",
                     "Dirichlet mixtures (no learning)", noise, "family diffusion (learned)", noise,
                     "measure-and-pick, conditioned (no learning)", noise,
                     "family diffusion, conditioned (learned)", noise,
                     "latent KDE of the hyper-representation (SANE; no learning beyond the autoencoder)", noise,
                     "latent diffusion (learned)", noise, "latent diffusion, conditioned (learned)", noise]  # fmt: skip
    for name in (
        "report.md",
        "evaluation/novelty.png",
        "evaluation/embedding.png",
        "soups/report.md",
        "generator/generator.safetensors",
    ):
        assert (out / name).stat().st_size > 0

    stages = json.loads((out / "stages.json").read_text())
    del stages["seconds"]["report"]  # as if killed during the report stage
    (out / "stages.json").write_text(json.dumps(stages))
    (out / "results.json").unlink()
    second = run_cli("demo", *small, "logger=wandb", timeout=900, wandb="offline")  # the logger may change
    assert "] report (" in second.stdout and "] soups (" not in second.stdout
    (logged,) = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert b"conditioning" in logged.read_bytes() and b"novelty" in logged.read_bytes()
    again = json.loads((out / "results.json").read_text())
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(again["rows"]) == strip(results["rows"])

    other = run_cli("demo", "n=7", f"out={out}", check=False)
    assert other.returncode == 2 and "another config" in other.stderr


def test_summary_rows_pick_the_populations_and_the_fine_tuned_accuracy():
    from vitzoo.demo import summary_rows

    def row(name, n, mean):
        return {"population": name, "n": n, "mean_acc": mean, "median_acc": mean, "max_acc": mean, "copies": 0.0,
                "median_nn_distance": 1.0, "median_relative_distance": 1.5, "median_agreement": 0.9,
                "median_span_distance": 0.5, "seconds": 2.0}  # fmt: skip

    comparison = {
        "rows": [row("zoo", 3, 0.8), row("diffusion", 2, 0.7), row("diffusion (conditioned)", 2, 0.6),
                 row("random init", 2, 0.1), row("gaussian", 2, 0.1), row("zoo + noise (diffusion)", 2, 0.5),
                 row("zoo + noise (diffusion (conditioned))", 2, 0.4)],
        "models": [{"population": "diffusion", "finetune": [0.7, 0.9]},
                   {"population": "diffusion", "finetune": [0.7, 0.8]},
                   {"population": "zoo", "finetune": [0.8, 0.1]}],
    }  # fmt: skip
    rows = summary_rows(comparison, {"diffusion": 5.0, "diffusion (conditioned)": 1.0})
    names = [r["population"] for r in rows]
    assert names == ["zoo (fine-tuned)", "random init", "Gaussian baseline", "family diffusion (learned)",
                     "  zoo + noise at the same distance", "  after 1 epoch fine-tuning",
                     "family diffusion, conditioned (learned)", "  zoo + noise at the same distance"]  # fmt: skip
    assert rows[4]["mean_acc"] == 0.5 and rows[7]["mean_acc"] == 0.4  # each population beside its own control
    assert rows[3]["seconds"] == 7.0 and rows[6]["seconds"] == 3.0  # evaluation plus its own drawing
    tuned = rows[5]
    assert tuned["n"] == 2 and abs(tuned["mean_acc"] - 0.85) < 1e-12 and tuned["max_acc"] == 0.9
    assert rows[6]["mean_acc"] == 0.6


def test_demo_on_an_imported_zoo_with_the_gpu_preset(tmp_path):
    """The ViT-S/16 preset's code path at tiny size on the CPU: an official-layout zoo (fine-tunes with their
    checkpoint_0, no validation accuracy recorded) imported, the generator trained on it, targets taken from
    its accuracy range, raw novelty distances."""
    from test_import import finetune_config, pretrain_config, results, vit, write_model

    from vitzoo.zoo_builder.importers import import_vitmodelzoo

    tiny = {"img_size": 28, "patch_size": 7, "in_chans": 1, "embed_dim": 24, "depth": 2, "num_heads": 2}
    source = tmp_path / "source" / "sl_parent"
    parent = vit(10, seed=1, **tiny).state_dict()
    write_model(source, pretrain_config(**{"dataset::name": "digits", "model::num_heads": 2}),
                {"checkpoint_2": parent}, results(2))  # fmt: skip
    for seed in (42, 6312):
        start = dict(parent) | {k: v for k, v in vit(10, seed=seed, **tiny).state_dict().items() if "head" in k}
        for index, (optimizer, lr) in enumerate(itertools.product(("AdamW", "SGD"), (3e-3, 1e-3, 1e-4))):
            torch.manual_seed(seed + index)  # each run its own direction, its size growing with the lr
            step = {k: 10 * lr * torch.randn_like(v) for k, v in start.items()}
            checkpoints = {f"checkpoint_{e}": {k: v + e * step[k] for k, v in start.items()} for e in (0, 1, 2)}
            config = finetune_config(**{"dataset::name": "digits", "model::o_dim": 10, "seed": seed,
                                        "optim::optimizer": optimizer, "optim::lr": lr})  # fmt: skip
            write_model(source / f"ft_{optimizer}_{lr}_{seed}", config, checkpoints, results(2))
    import_vitmodelzoo(tmp_path / "source", tmp_path / "zoo", progress=False)

    out = tmp_path / "demo"
    settings = ["experiment=vit_s16_cifar100", "device=cpu", "generator.mixtures=12", "+generator.steps=30", "n=4",
                "pool=8", "per_target=1", "finetune_epochs=0", f"out={out}", "threads=1", "progress=false"]  # fmt: skip
    run = run_cli("demo", str(tmp_path / "zoo"), *settings, timeout=600)
    assert "| Dirichlet mixtures (no learning) | 4 |" in run.stdout
    assert "| family diffusion, conditioned (learned) | 4 |" in run.stdout
    generator = load_generator(out / "generator" / "generator.safetensors", str(tmp_path / "zoo"))
    low, high = generator.stats["accuracy_min"], generator.stats["accuracy_max"]
    targets = sorted(e.factors["target_acc"] for e in Zoo.open(out / "samples")
                     if e.factors["target_acc"] and e.factors["method"] == "diffusion")  # fmt: skip
    assert targets == [round(low + q * (high - low), 3) for q in (0.2, 0.4, 0.6, 0.8)]
    assert json.loads((out / "tokens.json").read_text())["width"] == 385
    soups = json.loads((out / "soups" / "results.json").read_text())
    assert len(soups["epoch_soups"]["2"]) == 12 and soups["parent_soups"][0]["models"] == 12

    shipped = run_cli("demo", str(tmp_path / "zoo"), f"out={tmp_path / 'shipped'}", check=False)
    assert shipped.returncode == 2 and "retrain=true" in shipped.stderr
