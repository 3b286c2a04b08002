"""Does a generator follow its conditions? Target accuracy and optimizer/lr, measured on the test split.

- Target accuracy: `per_target` samples at each of `targets` (spread over the validation accuracies the generator
  was trained on); Spearman correlation between the targets and the achieved test accuracies of all samples.
- Optimizer/lr: `per_slot` samples conditioned on each trained (optimizer, lr); their mean test accuracy per slot
  against the mean test accuracy of the zoo's runs in that slot (Spearman over slots: 1.0 = the zoo's ordering).

A sample that cannot be evaluated (e.g. non-finite weights) has no accuracy: it is left out and counted
(`unevaluated`), never scored.

vitzoo conditioning bundled out=runs/conditioning     # the generator shipped beside the bundled zoo
vitzoo conditioning generative/bundled/latent_diffusion.safetensors out=runs/conditioning-latent

The generator is a family diffusion or a latent diffusion checkpoint; measure-and-pick draws its mixtures from
`reference` (a family generator of the same zoo; by default the family generator itself, or the one shipped beside
the bundled zoo for a latent diffusion).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from scipy.stats import spearmanr

from vitzoo.eval.evaluation import evaluate
from vitzoo.eval.html import write_report
from vitzoo.generative.checkpoint import checkpoint_format
from vitzoo.generative.generator import GUIDANCE as FAMILY_GUIDANCE
from vitzoo.generative.generator import load_generator, sample
from vitzoo.generative.latent import FORMAT as LATENT_FORMAT
from vitzoo.generative.latent import GUIDANCE as LATENT_GUIDANCE
from vitzoo.generative.latent import TEMPERATURE as LATENT_TEMPERATURE
from vitzoo.generative.latent import load_latent_diffusion, sample_latent
from vitzoo.zoo_builder.zoo import ZooError, atomic_write_json, code_version


def conditioning(
    generator_path: str | Path,
    targets: list[float] | None = None,
    per_target: int = 10,
    per_slot: int = 10,
    guidance: float | None = None,
    seed: int = 0,
    split: str = "test",
    pool: int = 300,
    reference: str | Path | None = None,
    temperature: float | None = None,
) -> dict:
    """The generator's conditioning, and measure-and-pick's at the same targets (no learning: `pool` mixtures
    measured on validation per target) as its reference. `guidance` None: the sampler's own default;
    `temperature`: the latent diffusion's initial noise scale (None: its own; a family diffusion has none)."""
    if checkpoint_format(generator_path) == LATENT_FORMAT:  # "bundled" is the family generator
        latent = load_latent_diffusion(generator_path)
        sha256, guidance = latent.sha256, LATENT_GUIDANCE if guidance is None else guidance
        temperature = LATENT_TEMPERATURE if temperature is None else temperature
        family_generator, method, stats = load_generator(reference or "bundled"), "latent diffusion", latent.stats

        def draw(n: int, seed: int, **condition):
            return sample_latent(latent, n, seed, guidance=guidance, temperature=temperature, **condition)[0]
    else:
        if temperature is not None:
            raise ZooError("temperature applies to a latent diffusion only; a family diffusion draws at 1")
        generator = load_generator(generator_path)
        sha256, guidance = generator.sha256, FAMILY_GUIDANCE if guidance is None else guidance
        family_generator, method, stats = (
            load_generator(reference) if reference else generator,
            "diffusion",
            generator.stats,
        )

        def draw(n: int, seed: int, **condition):
            # kept as drawn: a rejection filter has no place in a measurement (and a condition that asks for a run,
            # such as a slot or the top target, would be redrawn without end); the demo measures how many are copies
            return sample(generator, n, seed, "diffusion", guidance=guidance, novel_only=False, **condition)[0]

    basis = family_generator.basis
    num_heads = basis.architecture.num_heads
    if targets is None:  # inside the range both the generator and measure-and-pick's reference were trained on
        low = max(stats["accuracy_min"], family_generator.stats["accuracy_min"])
        high = min(stats["accuracy_max"], family_generator.stats["accuracy_max"])
        targets = [round(low + (high - low) * (i + 0.5) / 8, 3) for i in range(8)]

    unevaluated = 0

    def accuracies(samples) -> list[float]:
        """The test accuracies of the samples that could be evaluated (the others are counted in `unevaluated`)."""
        nonlocal unevaluated
        pairs = [(str(i), state_dict) for i, (state_dict, _, _) in enumerate(samples)]
        results = evaluate(pairs, basis.dataset, split, num_heads=num_heads)
        unevaluated += sum(r.error is not None for r in results)
        return [r.accuracy for r in results if r.error is None]

    def on_validation(state_dicts) -> list[float | None]:
        results = evaluate(
            [(str(i), sd) for i, sd in enumerate(state_dicts)], basis.dataset, "val", num_heads=num_heads
        )
        return [r.accuracy if r.error is None else None for r in results]

    target_rows, reference_rows = [], []
    for i, target in enumerate(targets):
        target_rows += [{"target": target, "achieved": a} for a in accuracies(draw(per_target, seed + i,
                                                                                     target_acc=target))]  # fmt: skip
        picked, _, _ = sample(family_generator, per_target, seed + i, "pick", target_acc=target, measure=on_validation,
                              pool=pool)  # fmt: skip
        reference_rows += [{"target": target, "achieved": a} for a in accuracies(picked)]
    rho = spearmanr([r["target"] for r in target_rows], [r["achieved"] for r in target_rows]).statistic
    reference_rho = spearmanr([r["target"] for r in reference_rows], [r["achieved"] for r in reference_rows]).statistic

    slot_rows = []
    for k, (optimizer, lr) in enumerate(basis.slots):
        zoo = [members[k].metrics.get(f"{split}_acc") for members in basis.members]
        achieved = accuracies(draw(per_slot, seed + 100 + k, optimizer=optimizer, lr=lr))
        if not achieved:
            raise ZooError(f"no sample conditioned on {optimizer} lr={lr} could be evaluated on {split}")
        slot_rows.append({
            "optimizer": optimizer,
            "lr": lr,
            "samples_mean": statistics.mean(achieved),
            "zoo_mean": statistics.mean(a for a in zoo if a is not None),
        })  # fmt: skip
    slot_rho = spearmanr([r["samples_mean"] for r in slot_rows], [r["zoo_mean"] for r in slot_rows]).statistic
    factor_rows = []
    for factor in ("optimizer", "lr"):
        for value in dict.fromkeys(r[factor] for r in slot_rows):
            mine = [r for r in slot_rows if r[factor] == value]
            factor_rows.append({
                "factor": factor,
                "value": value,
                "samples_mean": statistics.mean(r["samples_mean"] for r in mine),
                "zoo_mean": statistics.mean(r["zoo_mean"] for r in mine),
            })  # fmt: skip
    orderings = {}
    for factor in ("optimizer", "lr"):
        mine = [r for r in factor_rows if r["factor"] == factor]
        by = lambda key: [r["value"] for r in sorted(mine, key=lambda r: r[key])]  # noqa: B023
        orderings[factor] = by("samples_mean") == by("zoo_mean")
    return {
        "generator": str(generator_path),
        "method": method,
        "generator_sha256": sha256,
        "split": split,
        "seed": seed,
        "guidance": guidance,
        "temperature": temperature,
        "code_version": code_version(),
        "unevaluated": unevaluated,
        "target_spearman": float(rho),
        "pool": pool,
        "reference_target_spearman": float(reference_rho),
        "reference_targets": reference_rows,
        "slot_spearman": float(slot_rho),
        "targets": target_rows,
        "slots": slot_rows,
        "factors": factor_rows,
        "ordering_reproduced": orderings,
    }


def unevaluated_note(result: dict) -> str:
    count = result.get("unevaluated", 0)  # results written before it was recorded had none
    return f" ({count} sample(s) could not be evaluated and are left out)" if count else ""


def write_conditioning(result: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", result)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    method = result.get("method", "diffusion")  # results written before it was recorded: the family diffusion
    for rows, label in ((result["targets"], method), (result["reference_targets"], "measure-and-pick")):
        targets = torch.tensor([r["target"] for r in rows])
        achieved = torch.tensor([r["achieved"] for r in rows])
        left.scatter(targets + 0.004 * torch.randn(len(targets)), achieved, s=12, alpha=0.6, label=label)
    left.legend(fontsize=8)
    left.plot([0, 1], [0, 1], "k:", linewidth=1)
    left.set_xlabel("target validation accuracy")
    left.set_ylabel(f"achieved {result['split']} accuracy")
    left.set_title(
        f"Spearman {result['target_spearman']:.2f} (measure-and-pick {result['reference_target_spearman']:.2f})"
    )
    names = [f"{r['optimizer']} {r['lr']:g}" for r in result["slots"]]
    x = torch.arange(len(names)).float()
    right.bar(x - 0.2, [r["zoo_mean"] for r in result["slots"]], 0.4, label="zoo runs")
    right.bar(x + 0.2, [r["samples_mean"] for r in result["slots"]], 0.4, label="conditioned samples")
    right.set_xticks(x, names, rotation=30, fontsize=8)
    right.set_ylabel(f"mean {result['split']} accuracy")
    right.set_title(f"per optimizer/lr: Spearman {result['slot_spearman']:.2f}")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "conditioning.png", dpi=100)
    plt.close(figure)
    lines = [
        f"# Conditioning of {result['generator']}",
        "",
        f"{result['split']} split, guidance {result['guidance']}, temperature {result.get('temperature')}, "
        f"seed {result['seed']}, code {result['code_version']}.",
        "",
        f"Target accuracy: Spearman {result['target_spearman']:.3f} over {len(result['targets'])} {method} samples;"
        f" measure-and-pick (no learning: {result['pool']} Dirichlet mixtures measured on validation per target, the"
        f" nearest kept) {result['reference_target_spearman']:.3f} over {len(result['reference_targets'])}"
        f"{unevaluated_note(result)}.",
        "",
        f"| target (val) | n | {method}: achieved mean | min | max | measure-and-pick: achieved mean |",
        "|---|---|---|---|---|---|",
    ]
    for target in dict.fromkeys(r["target"] for r in result["targets"]):
        values = [r["achieved"] for r in result["targets"] if r["target"] == target]
        picked = [r["achieved"] for r in result["reference_targets"] if r["target"] == target]
        lines.append(f"| {target:.3f} | {len(values)} | {statistics.mean(values):.3f} | {min(values):.3f} | "
                     f"{max(values):.3f} | {statistics.mean(picked):.3f} |")  # fmt: skip
    lines += [
        "",
        f"Optimizer/lr: Spearman {result['slot_spearman']:.3f} between the samples' and the zoo's per-slot means.",
        "",
        "| optimizer | lr | zoo runs | conditioned samples |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['optimizer']} | {r['lr']:g} | {r['zoo_mean']:.3f} | {r['samples_mean']:.3f} |"
              for r in result["slots"]]  # fmt: skip
    lines += ["", "| factor | value | zoo runs | conditioned samples |", "|---|---|---|---|"]
    lines += [f"| {r['factor']} | {r['value']:g} | {r['zoo_mean']:.3f} | {r['samples_mean']:.3f} |"
              if isinstance(r["value"], float) else
              f"| {r['factor']} | {r['value']} | {r['zoo_mean']:.3f} | {r['samples_mean']:.3f} |"
              for r in result["factors"]]  # fmt: skip
    reproduced = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in result["ordering_reproduced"].items())
    lines += ["", f"Per-factor ordering of the zoo reproduced by the conditioned samples: {reproduced}."]
    lines += ["", "![conditioning](conditioning.png)", ""]
    write_report(out, "\n".join(lines))
    return out


def main() -> None:
    """`python -m` runs `vitzoo conditioning` (same arguments)."""
    import sys

    from vitzoo.cli import main as cli_main

    cli_main(["conditioning", *sys.argv[1:]])


if __name__ == "__main__":
    main()
