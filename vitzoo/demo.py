"""`vitzoo demo`: the whole pipeline on one zoo, resumable by stage, into one report folder.

Stages (each writes its outputs, then records itself in `<out>/stages.json`; a rerun skips recorded stages):

1. tokenize   open the zoo, tokenize its fine-tunes, check one round trip bit for bit
2. generator  copy the generator shipped beside the bundled zoo into `<out>/generator/` (or train it afresh:
              `retrain=true`, the shipped one's config)
3. sample     `n` unconditioned draws by Dirichlet mixing and by the diffusion, and `per_target` draws at each
              of `targets` accuracies by measure-and-pick and by the diffusion, into `<out>/samples/` (the zoo
              format; every entry's `.factors` holds its method, the space it was drawn in, and its condition);
              with `kde`, also `n` draws of SANE's latent KDE from the autoencoder shipped beside the bundled zoo;
              with `latent`, `n` draws and `per_target` draws per target of the shipped latent diffusion
4. evaluate   samples vs the zoo's models it was trained on vs the baselines, with `finetune_epochs` of
              fine-tuning (eval.compare), into `<out>/evaluation/`
5. soups      the model-soup experiment on the zoo (eval.soups), into `<out>/soups/`
6. report     `<out>/report.md`, `<out>/results.json` (the summary table's numbers) and the terminal table

Same config and seed, same table (times aside).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf

from vitzoo.errors import ConfigError
from vitzoo.eval.compare import GAUSSIAN, NOISE, RANDOM, ZOO, compare, write_comparison
from vitzoo.eval.finetune import FinetuneRecipe
from vitzoo.eval.html import write_report
from vitzoo.eval.soups import write_soups
from vitzoo.generative.checkpoint import read_checkpoint
from vitzoo.generative.diffusion import DiffusionConfig
from vitzoo.generative.generator import load_generator, sample, train_generator
from vitzoo.generative.hyper import BUNDLED_AUTOENCODER, load_autoencoder, sample_kde
from vitzoo.generative.latent import BUNDLED_LATENT_DIFFUSION, load_latent_diffusion, sample_latent
from vitzoo.tokenizer.spec import TokenSpec
from vitzoo.tokenizer.tokens import detokenize, tokenize
from vitzoo.zoo_builder.zoo import Zoo, ZooError, atomic_write_json, code_version, write_sampled

STAGES = ("tokenize", "generator", "sample", "evaluate", "soups", "report")
# rough seconds per stage on 2 CPU cores (bundled zoo), for the progress display's time left
EXPECTED_SECONDS = {"tokenize": 1, "generator": 1, "sample": 40, "evaluate": 180, "soups": 35, "report": 2}
RETRAIN_SECONDS = 280


def run_demo(cfg, shipped_generator: Path, measure, device: torch.device | str = "cpu") -> dict:
    """Run (or resume) every stage; returns the summary (also in results.json). `measure` gives validation
    accuracies of state dicts (it labels the generator's training mixtures); `device` runs the evaluations."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    done_path = out / "stages.json"
    done = json.loads(done_path.read_text()) if done_path.exists() else {}
    if done and done.get("config") != _config_key(cfg):
        raise ZooError(f"{out} holds a demo run with another config; choose another out=<dir>")
    done["config"] = _config_key(cfg)
    zoo = Zoo.open(cfg.path)
    expected = dict(EXPECTED_SECONDS, generator=RETRAIN_SECONDS if cfg.retrain else 1)
    started = time.perf_counter()
    for index, stage in enumerate(STAGES):
        if stage in done.get("seconds", {}):
            continue
        left = sum(expected[s] for s in STAGES[index:] if s not in done.get("seconds", {}))
        print(f"[{index + 1}/{len(STAGES)}] {stage} (about {left // 60} min {left % 60} s left)", flush=True)
        tic = time.perf_counter()
        STAGE_FUNCTIONS[stage](cfg, zoo, out, Context(shipped_generator, measure, torch.device(device)))
        done.setdefault("seconds", {})[stage] = round(time.perf_counter() - tic, 1)
        atomic_write_json(done_path, done)
    summary = json.loads((out / "results.json").read_text())
    summary["this_run_seconds"] = round(time.perf_counter() - started, 1)
    return summary


def _config_key(cfg) -> dict:
    keys = ("path", "retrain", "generator", "n", "targets", "per_target", "pool", "kde", "latent", "finetune_epochs",
            "align", "token_width", "seed")  # fmt: skip
    return {k: OmegaConf.to_container(cfg[k]) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in keys}


@dataclass
class Context:
    shipped: Path  # the generator shipped beside the bundled zoo
    measure: Callable  # state dicts -> validation accuracies
    device: torch.device


def _tokenize(cfg, zoo: Zoo, out: Path, context: Context) -> None:
    """Every fine-tune tokenized and detokenized again, one at a time (a ViT-S/16 zoo does not fit in memory)."""
    entries = list(zoo.filter(stage="finetune", epoch="last", head="linear"))
    spec = TokenSpec.from_state_dict(entries[0].state_dict(), cfg.token_width, zoo.architecture.num_heads)
    for entry in entries:
        state_dict = entry.state_dict()
        back = detokenize(tokenize(state_dict, spec).values, spec)
        if not all(torch.equal(back[k], state_dict[k]) for k in state_dict):
            raise ZooError(f"tokenizer round trip is not exact for {entry.model_id}")  # the tokenizer's tests
    spec.save(out / "token_spec.json")
    atomic_write_json(out / "tokens.json", {"models": len(entries), "tokens_per_model": spec.num_tokens,
                                           "width": spec.width, "round_trip_exact": True})  # fmt: skip


def _generator(cfg, zoo: Zoo, out: Path, context: Context) -> None:
    target = out / "generator"
    shipped = context.shipped
    if cfg.retrain:
        config = read_checkpoint(shipped)[1]["config"] if shipped.exists() else DiffusionConfig().to_dict()
        unknown = sorted(set(cfg.generator) - set(config))
        if unknown:
            raise ConfigError(f"generator: unknown DiffusionConfig field(s) {unknown}; known: {sorted(config)}")
        config = DiffusionConfig(**(config | dict(cfg.generator)))
        train_generator(zoo, target, config, context.measure, progress=cfg.progress)
        return
    if cfg.generator:
        raise ConfigError("generator settings change a generator that is trained: use them with retrain=true")
    if not shipped.exists():
        raise ZooError(f"no shipped generator at {shipped}; run with retrain=true")
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shipped, target / "generator.safetensors")
    try:
        load_generator(target / "generator.safetensors", cfg.path)
    except ZooError as error:
        raise ZooError(f"the shipped generator belongs to the bundled zoo; for {cfg.path} use retrain=true") from error


UNCONDITIONED = ("mix", "diffusion")  # the non-learned reference first, then the learned generator
CONDITIONED = ("pick", "diffusion")  # target accuracy: measure-and-pick (no learning), then the learned generator


def _sample(cfg, zoo: Zoo, out: Path, context: Context) -> None:
    """`n` draws of every unconditioned method and `per_target` draws of every conditioned one at each target."""
    generator = load_generator(out / "generator" / "generator.safetensors", cfg.path)
    samples, parents, info = [], [], {}  # info: per population, its draw summary and seconds
    for method in UNCONDITIONED:
        tic = time.perf_counter()
        drawn, drawn_parents, info[method] = sample(generator, cfg.n, cfg.seed, method)
        info[method]["seconds"] = time.perf_counter() - tic
        samples += drawn
        parents += drawn_parents
    for i, target in enumerate(conditioning_targets(cfg.targets, generator)):
        for method in CONDITIONED:
            tic = time.perf_counter()
            drawn, drawn_parents, drawn_info = sample(
                generator,
                cfg.per_target,
                cfg.seed + 1 + i,
                method,
                target_acc=target,
                measure=context.measure,
                pool=cfg.pool,
            )
            population = info.setdefault(f"{method} (conditioned)", {"redrawn_as_copies": 0, "seconds": 0.0})
            population["redrawn_as_copies"] += drawn_info["redrawn_as_copies"]
            population["seconds"] += time.perf_counter() - tic
            samples += drawn
            parents += drawn_parents
    if cfg.kde:  # the hyper-representation shipped beside the bundled zoo: SANE's latent KDE, unconditioned
        tic = time.perf_counter()
        drawn, drawn_parents = sample_kde(load_autoencoder(BUNDLED_AUTOENCODER, cfg.path), cfg.n, cfg.seed)
        info["kde"] = {"redrawn_as_copies": 0, "seconds": time.perf_counter() - tic}
        samples += drawn
        parents += drawn_parents
    if cfg.latent:  # the latent diffusion shipped beside the bundled zoo, through the same autoencoder
        latent = load_latent_diffusion(BUNDLED_LATENT_DIFFUSION, cfg.path)
        tic = time.perf_counter()
        drawn, drawn_parents = sample_latent(latent, cfg.n, cfg.seed)
        info["latent_diffusion"] = {"redrawn_as_copies": 0, "seconds": time.perf_counter() - tic}
        samples += drawn
        parents += drawn_parents
        tic = time.perf_counter()
        for i, target in enumerate(conditioning_targets(cfg.targets, latent)):
            drawn, drawn_parents = sample_latent(latent, cfg.per_target, cfg.seed + 1 + i, target_acc=target)
            samples += drawn
            parents += drawn_parents
        info["latent_diffusion (conditioned)"] = {"redrawn_as_copies": 0, "seconds": time.perf_counter() - tic}
    if (out / "samples").exists():  # a sampling stage that was interrupted while writing
        shutil.rmtree(out / "samples")
    write_sampled(out / "samples", generator.basis.architecture, generator.basis.dataset, samples, parents)
    atomic_write_json(out / "sampling.json", info)


def conditioning_targets(targets: list[float] | None, generator) -> list[float]:
    """The given target accuracies, or the points 20/40/60/80% of the way from the lowest to the highest accuracy
    the generator was trained on (null targets: a preset that fits any zoo)."""
    if targets is not None:
        return list(targets)
    low, high = generator.stats["accuracy_min"], generator.stats["accuracy_max"]
    return [round(low + q * (high - low), 3) for q in (0.2, 0.4, 0.6, 0.8)]


def _evaluate(cfg, zoo: Zoo, out: Path, context: Context) -> None:
    samples = Zoo.open(out / "samples")
    reference = zoo.filter(stage="finetune", epoch="last", head="linear")
    recipe = FinetuneRecipe(epochs=cfg.finetune_epochs, seed=cfg.seed)
    comparison = compare(samples, reference, seed=cfg.seed, align=cfg.align, finetune=recipe, device=context.device,
                         data_root=cfg.data_root, progress=cfg.progress)  # fmt: skip
    write_comparison(comparison, out / "evaluation")


def _soups(cfg, zoo: Zoo, out: Path, context: Context) -> None:
    write_soups(zoo, zoo.dataset, [2, 3], None, out / "soups", {"k": [2, 3]}, context.device, cfg.data_root)


def _report(cfg, zoo: Zoo, out: Path, context: Context) -> None:
    comparison = json.loads((out / "evaluation" / "results.json").read_text())
    soups = json.loads((out / "soups" / "results.json").read_text())
    seconds = json.loads((out / "stages.json").read_text()).get("seconds", {})
    sampling = json.loads((out / "sampling.json").read_text())
    rows = summary_rows(comparison, {name: info["seconds"] for name, info in sampling.items()})
    gains = [s["gain"] for s in soups["epoch_soups"].get("2", [])]
    soup_line = (
        f"uniform soup of each fine-tune's last 2 epochs vs its last epoch: mean test gain "
        f"{statistics.mean(gains):+.4f}, {sum(g > 0 for g in gains) / len(gains):.0%} of {len(gains)} models gain"
        if gains else "no model keeps 2 checkpoints"
    )  # fmt: skip
    conditioning = conditioning_check(comparison, Zoo.open(out / "samples"), zoo)
    summary = {
        "zoo": str(cfg.path),
        "seed": cfg.seed,
        "code_version": code_version(),
        "rows": rows,
        "conditioning": conditioning,
        "soups": soup_line,
        "stage_seconds": seconds,
        "sampling": sampling,
    }
    atomic_write_json(out / "results.json", summary)
    lines = [
        f"# vitzoo demo on {cfg.path}",
        "",
        f"Seed {cfg.seed}, code {code_version()}. {zoo.dataset} test split; the zoo row is the fine-tuned models the "
        "generator was trained on (linear heads, last epoch).",
        "",
        *table(rows),
        "",
        COLUMN_NOTES,
        "",
        conditioning_line(conditioning),
        "",
        "Redrawn by the samplers' own copy filter (novel_only; apart from the measured copies above): "
        + ", ".join(f"{method} {info['redrawn_as_copies']}" for method, info in summary["sampling"].items())
        + f". Soups: {soup_line} (details in soups/report.md).",
        "",
        "![accuracy](evaluation/accuracy.png)",
        "",
        "![novelty](evaluation/novelty.png)",
        "",
        "![weight space](evaluation/embedding.png)",
        "",
        "![fine-tuning](evaluation/finetune.png)",
        "",
        "Full comparison: evaluation/report.md; the sampled population: samples/ (zoo format).",
        "",
    ]
    write_report(out, "\n".join(lines))


BAND = 0.05  # the zoo runs a target is compared with: validation accuracy within this of it


def conditioning_check(comparison: dict, samples: Zoo, zoo: Zoo | None = None) -> dict[str, dict]:
    """Per conditioned method, how well its samples follow their target validation accuracy: Spearman's rho
    between target and achieved test accuracy, and the mean achieved accuracy per target; with `zoo`, beside each
    target the mean test accuracy of the zoo's runs (the comparison's zoo rows) whose validation accuracy lies
    within BAND of it (None where none does)."""
    from scipy.stats import spearmanr

    band: dict[float, float | None] = {}
    if zoo is not None:
        tested = {m["name"]: m["accuracy"] for m in comparison["models"] if m["population"] == "zoo" and
                  m["error"] is None}  # fmt: skip
        validation = {f"{e.model_id}@{e.epoch}": e.metrics.get("val_acc") for e in zoo}
        for target in {e.factors.get("target_acc") for e in samples} - {None}:
            near = [a for name, a in tested.items() if validation.get(name) is not None and
                    abs(validation[name] - target) <= BAND]  # fmt: skip
            band[target] = statistics.mean(near) if near else None

    target = {e.model_id: (e.factors.get("method"), e.factors.get("target_acc")) for e in samples}
    checks = {}
    for method in dict.fromkeys(m for m, t in target.values() if t is not None):
        pairs = [(target[m["name"]][1], m["accuracy"]) for m in comparison["models"]
                 if target.get(m["name"], (None, None)) [0] == method and target[m["name"]][1] is not None
                 and m["error"] is None]  # fmt: skip
        if len({t for t, _ in pairs}) < 2:
            continue
        means = {t: statistics.mean(a for u, a in pairs if u == t) for t in sorted({t for t, _ in pairs})}
        rho = spearmanr([t for t, _ in pairs], [a for _, a in pairs]).statistic
        checks[method] = {"n": len(pairs), "spearman": float(rho),
                          "mean_acc_per_target": {str(t): a for t, a in means.items()},
                          "zoo_band_acc_per_target": {str(t): band.get(t) for t in means}}  # fmt: skip
    return checks


def conditioning_line(conditioning: dict[str, dict]) -> str:
    if not conditioning:
        return "Conditioning: fewer than two targets sampled."
    parts = []
    for method, check in conditioning.items():
        zoo = check.get("zoo_band_acc_per_target", {})
        means = ", ".join(f"{t} -> {a:.3f}" + (f" (zoo {zoo[t]:.3f})" if zoo.get(t) is not None else "")
                          for t, a in check["mean_acc_per_target"].items())  # fmt: skip
        parts.append(f"{method} {check['spearman']:.3f} over {check['n']} samples (mean per target: {means})")
    return (
        "Conditioning: Spearman's rho between target validation accuracy and achieved test accuracy, and the mean "
        f"achieved test accuracy per target beside that of the zoo's runs within {BAND} of it on validation: "
        + "; ".join(parts)
        + "."
    )


STAGE_FUNCTIONS = {
    "tokenize": _tokenize,
    "generator": _generator,
    "sample": _sample,
    "evaluate": _evaluate,
    "soups": _soups,
    "report": _report,
}

COLUMN_NOTES = """\
n: models; mean/median/max: test accuracy; copies: share within half a zoo model's own nearest-neighbour distance \
of it and agreeing with it at least as much as its nearest neighbour does (measured, never filtered); NN distance: \
median L2 distance to the nearest zoo model after aligning heads and MLP units (for the zoo: to the nearest other \
one); NN/own: that distance over the zoo model's own nearest-neighbour distance (>= 1 within the zoo); agreement: \
median share of test predictions equal to the nearest zoo model's; span: median distance to the nearest family's \
affine span w0 + span{delta_k} (for the zoo: each run to the span of its family's other runs; 0 for a merge of a \
family's runs); time: seconds to generate and evaluate the population in this run (the zoo row: evaluating it)."""

NOVELTY = ("copies", "median_nn_distance", "median_relative_distance", "median_agreement", "median_span_distance")


LABELS = {  # the table's rows, in order: each non-learned reference before the learned generator it judges
    "mix": "Dirichlet mixtures (no learning)",
    "diffusion": "family diffusion (learned)",
    "pick (conditioned)": "measure-and-pick, conditioned (no learning)",
    "diffusion (conditioned)": "family diffusion, conditioned (learned)",
    "kde": "latent KDE of the hyper-representation (SANE; no learning beyond the autoencoder)",
    "latent_diffusion": "latent diffusion (learned)",
    "latent_diffusion (conditioned)": "latent diffusion, conditioned (learned)",
}


def summary_rows(comparison: dict, sampling_seconds: dict[str, float]) -> list[dict]:
    """The demo's table: the zoo and the floors, then every sampled population (zero-shot), followed by the zoo +
    noise control at its own distance and, where fine-tuned, its accuracy after fine-tuning. `sampling_seconds`:
    the seconds each sampled population took to draw (added to its evaluation time)."""
    by_name = {r["population"]: r for r in comparison["rows"]}
    rows = [_row(label, by_name[name], 0.0)
            for name, label in ((ZOO, "zoo (fine-tuned)"), (RANDOM, "random init"), (GAUSSIAN, "Gaussian baseline"))
            if name in by_name]  # fmt: skip
    sampled = [name for name in by_name if name not in (ZOO, RANDOM, GAUSSIAN) and not name.startswith(NOISE)]
    order = list(LABELS)
    sampled.sort(key=lambda name: order.index(name) if name in order else len(order))  # the table's fixed order
    for name in sampled:
        rows.append(_row(LABELS.get(name, name), by_name[name], sampling_seconds.get(name, 0.0)))
        noise = f"{NOISE} ({name})" if f"{NOISE} ({name})" in by_name else NOISE
        if noise in by_name:
            rows.append(_row("  zoo + noise at the same distance", by_name[noise], 0.0))
        tuned = [m["finetune"] for m in comparison["models"] if m["population"] == name and m.get("finetune")]
        if tuned and "conditioned" not in name:
            accuracies = [curve[-1] for curve in tuned]
            rows.append({
                "population": f"  after {len(tuned[0]) - 1} epoch fine-tuning",
                "n": len(accuracies), "mean_acc": statistics.mean(accuracies),
                "median_acc": statistics.median(accuracies), "max_acc": max(accuracies),
                **dict.fromkeys(NOVELTY), "seconds": None,
            })  # fmt: skip
    return rows


def _row(label: str, row: dict, drawing_seconds: float) -> dict:
    return {
        "population": label,
        "n": row["n"],
        "mean_acc": row["mean_acc"],
        "median_acc": row["median_acc"],
        "max_acc": row["max_acc"],
        **{key: row[key] for key in NOVELTY},
        "seconds": (row["seconds"] or 0) + drawing_seconds,
    }


def table(rows: list[dict]) -> list[str]:
    header = (
        "| population | n | mean acc | median | max | copies | NN distance | NN/own | agreement | span | time (s) |"
    )
    lines = [header, "|" + "---|" * 11]
    for r in rows:
        cells = [
            r["population"],
            str(r["n"]),
            *[f"{r[k]:.3f}" if r[k] is not None else "" for k in ("mean_acc", "median_acc", "max_acc")],
            f"{r['copies']:.0%}" if r["copies"] is not None else "",
            *[f"{r[k]:.2f}" if r.get(k) is not None else "" for k in NOVELTY[1:3]],
            f"{r['median_agreement']:.3f}" if r.get("median_agreement") is not None else "",
            f"{r['median_span_distance']:.2f}" if r.get("median_span_distance") is not None else "",
            f"{r['seconds']:.0f}" if r["seconds"] is not None else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
