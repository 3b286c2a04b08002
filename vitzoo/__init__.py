"""vitzoo: generative modelling of Vision Transformer weights, with a bundled zoo.

The Python API mirrors the `vitzoo` CLI: one function per command, taking that command's options
(`vitzoo <command> --help`) as keyword arguments and running the same code. Nested options use `__`
(`model__probes=256` is `model.probes=256`); bad input raises `vitzoo.errors.VitzooError`, which the CLI prints
as one line.

    import vitzoo

    zoo = vitzoo.Zoo.open("bundled")
    checkpoint = vitzoo.train("bundled", model="transfer", holdout_parents=["pt-2aa5c45043"], out="runs/transfer")
    samples = vitzoo.sample(checkpoint, parent="pt-2aa5c45043", head_seed=42, n=12, out="runs/new-parent")
    report = vitzoo.evaluate(samples.root, reference="bundled", out="runs/eval-new-parent")

Importing `vitzoo` is cheap: torch and the rest load when a function runs.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["Zoo", "analyze", "build", "demo", "evaluate", "generalisation", "sample", "soup", "train"]


def build(**options) -> Path:
    """`vitzoo build`: train a population of ViTs into a zoo; returns the zoo's folder."""
    return _run("build", options)


def evaluate(zoo: str | Path, **options) -> Path:
    """`vitzoo evaluate <zoo>`: accuracy (with `reference=`: novelty, baselines); returns report.md's path."""
    return _run("evaluate", {"path": str(zoo), **options})


def analyze(zoo: str | Path, **options) -> Path:
    """`vitzoo analyze <zoo>`: diversity of a zoo; returns report.md's path."""
    return _run("analyze", {"path": str(zoo), **options})


def soup(zoo: str | Path, **options) -> Path:
    """`vitzoo soup <zoo>`: model soups of a zoo's fine-tunes; returns report.md's path."""
    return _run("soup", {"path": str(zoo), **options})


def train(zoo: str | Path, **options) -> Path:
    """`vitzoo train <zoo> model=...`: train a generative model; returns its checkpoint's path."""
    return _run("train", {"path": str(zoo), **options})


def sample(checkpoint: str | Path, **options):
    """`vitzoo sample <checkpoint>`: sample ViTs into a new zoo folder; returns that `Zoo`."""
    return _run("sample", {"path": str(checkpoint), **options})


def generalisation(zoo: str | Path, **options) -> dict:
    """`vitzoo generalisation <zoo>`: the leave-one-parent-out report (also written to `out`)."""
    return _run("generalisation", {"path": str(zoo), **options})


def demo(zoo: str | Path = "bundled", **options) -> dict:
    """`vitzoo demo`: the whole pipeline; returns the summary (rows, conditioning, soups)."""
    return _run("demo", {"path": str(zoo), **options})


def _run(command: str, options: dict):
    from vitzoo.cli import run_api

    return run_api(command, options)


def __getattr__(name: str):
    if name == "Zoo":  # lazily: importing vitzoo stays cheap
        from vitzoo.zoo_builder.zoo import Zoo

        return Zoo
    raise AttributeError(f"module 'vitzoo' has no attribute {name!r}")
