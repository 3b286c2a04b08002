"""`vitzoo`: one console script, one subcommand per pipeline stage.

Hydra commands take overrides after the subcommand (`vitzoo build zoo=digits_tiny out=zoos/tiny`);
`vitzoo <cmd> --help` shows the composed config. Bad input (unknown preset, key or value; a missing
dataset; an incompatible output folder) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vitzoo import configs
CONFIG_DIR = str(Path(configs.__file__).resolve().parent)

COMMANDS = {
    "demo": "the whole pipeline on the bundled zoo into one report (vitzoo demo [<zoo>] [out=<dir>])",
    "build": "train a population of ViTs into a zoo (Hydra: vitzoo build zoo=<preset> out=<dir>)",
    "evaluate": "loss, accuracy and predictions of a zoo's checkpoints (vitzoo evaluate <zoo> split=test out=<dir>)",
    "analyze": "diversity of a zoo: weight distances, agreement, CKA, factors (vitzoo analyze <zoo> out=<dir>)",
    "soup": "model soups of a zoo's fine-tunes, chosen on val (vitzoo soup <zoo> out=<dir>)",
    "train": "train a generative model over a zoo's weights (vitzoo train <zoo> model=diffusion out=<dir>)",
    "sample": "sample new ViTs from a generator into a zoo folder (vitzoo sample <generator> n=<N> out=<dir>)",
    "probe": "predict accuracy, epoch, lr, optimizer, parent from hyper-representations (vitzoo probe <autoencoder>)",
    "import": "read a foreign zoo layout into the zoo format (vitzoo import vitmodelzoo <src> <dst>)",
    "verify": "check every checkpoint of a zoo against its sha256 (vitzoo verify <zoo>)",
}


class UserError(Exception):
    """Bad input from the user: reported in one line, exit code 2."""


def fail(command: str, message: str) -> None:
    first_line = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
    print(f"vitzoo {command}: error: {first_line}", file=sys.stderr)
    sys.exit(2)


def usage() -> str:
    lines = ["usage: vitzoo <command> [args] [hydra overrides]", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        fail("", f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    if command == "demo":
        positional = rest[:1] if rest and "=" not in rest[0] and not rest[0].startswith("-") else []
        run_hydra("demo", "demo", [f"path={p}" for p in positional] + rest[len(positional) :], demo_task)
    elif command == "build":
        run_hydra("build", "build", rest, build_task)
    elif command == "evaluate":
        run_zoo_command("evaluate", rest, evaluate_task)
    elif command == "analyze":
        run_zoo_command("analyze", rest, analyze_task)
    elif command == "soup":
        run_zoo_command("soup", rest, soup_task)
    elif command == "train":
        run_zoo_command("train", rest, train_task)
    elif command == "sample":
        run_zoo_command("sample", rest, sample_task, what="generator checkpoint or 'bundled'")
    elif command == "verify":
        verify_command(rest)
    elif command == "probe":
        probe_command(rest)
    elif command == "import":
        import_command(rest)


# ------------------------------------------------------------------------------------------- hydra


def run_zoo_command(command: str, rest: list[str], task, what: str = "zoo folder or 'bundled'") -> None:
    """A Hydra command whose first argument is the zoo (passed on as the `path` override)."""
    if rest and "=" not in rest[0] and not rest[0].startswith("-"):
        run_hydra(command, command, [f"path={rest[0]}", *rest[1:]], task)
        return
    if not any(flag in rest for flag in ("--help", "-h", "--cfg", "-c")):
        fail(command, f"the first argument is the {what.split(' or ')[0]}: vitzoo {command} <{what}> [overrides]")
    run_hydra(command, command, rest, task)


def validate_overrides(config_name: str, overrides: list[str]) -> None:
    """Compose the config for every job of a (multi)run now, so bad input fails in one line before any work."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain = [o for o in overrides if not o.startswith("hydra/") and not o.startswith("hydra.")]
    parsed = OverridesParser.create().parse_overrides(plain)
    jobs = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0] if parsed else [[]]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for job in jobs:
            cfg = compose(config_name=config_name, overrides=list(job))
            if config_name == "build":
                from vitzoo.zoo_builder.blueprint import blueprint_from_config

                blueprint_from_config(cfg.zoo)
    GlobalHydra.instance().clear()


def run_hydra(command: str, config_name: str, overrides: list[str], task) -> None:
    import hydra

    from vitzoo.zoo_builder.config import register_schemas

    register_schemas()
    if not any(flag in overrides for flag in ("--help", "-h", "--hydra-help", "--info", "--cfg", "-c")):
        sweep_flags = {"--multirun", "-m"}
        try:
            validate_overrides(config_name, [o for o in overrides if o not in sweep_flags])
        except Exception as error:  # Hydra and OmegaConf raise many types; all mean bad input here
            fail(command, _config_error(error))
    # Hydra's parser wants its flags before the overrides (`vitzoo build out=x --multirun a=1,2` is fine here)
    flags = [o for o in overrides if o.startswith("-")]
    sys.argv = [f"vitzoo {command}", *flags, *[o for o in overrides if not o.startswith("-")]]
    hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)(task)()


def _config_error(error: Exception) -> str:
    text = str(error).strip()
    if "In 'build': Could not find" in text or "Could not find '" in text:
        return text.splitlines()[0] + " (presets live in configs/<group>/<name>.yaml)"
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("full_key")]
    return " ".join(lines[:2]) if lines else type(error).__name__


def build_task(cfg) -> None:
    import torch
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from vitzoo.zoo_builder.build import BuildSettings, build
    from vitzoo.zoo_builder.data import DatasetError
    from vitzoo.zoo_builder.logger import make_logger
    from vitzoo.zoo_builder.zoo import Zoo, ZooError

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    (run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(resolved))
    settings = BuildSettings(
        out=out,
        shard=cfg.shard,
        device=cfg.device,
        precision=cfg.precision,
        mode=cfg.mode,
        population_size=cfg.population_size,
        data_root=cfg.data_root,
        progress=cfg.progress,
        save_pretrain=save_policy(cfg.save.pretrain),
        save_finetune=save_policy(cfg.save.finetune),
    )
    logger = None
    try:
        logger = make_logger(OmegaConf.to_object(cfg.logger), resolved, cfg.zoo.name, out)
        build(cfg.zoo, settings, logger)
    except (ZooError, DatasetError, ValueError) as error:
        fail("build", str(error))
    finally:
        if logger is not None:
            logger.finish()
    print(Zoo.open(out).summary())


def save_policy(cfg):
    from vitzoo.zoo_builder.build import SavePolicy

    return SavePolicy(cfg.keep_last, cfg.keep_init, tuple(cfg.extra_seeds), cfg.extra_keep_last)


def evaluate_task(cfg) -> None:
    import torch
    from omegaconf import OmegaConf

    from vitzoo.eval.compare import compare, write_comparison
    from vitzoo.eval.finetune import FinetuneRecipe
    from vitzoo.eval.report import write_evaluation
    from vitzoo.zoo_builder.data import DatasetError
    from vitzoo.zoo_builder.logger import make_logger
    from vitzoo.zoo_builder.models import select_device
    from vitzoo.zoo_builder.zoo import Zoo, ZooError

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    epochs = cfg.finetune.epochs if cfg.finetune_epochs is None else cfg.finetune_epochs
    recipe = FinetuneRecipe(epochs, cfg.finetune.optimizer, cfg.finetune.lr, cfg.finetune.weight_decay,
                            cfg.finetune.batch_size, cfg.seed)  # fmt: skip
    logger = None
    try:
        if cfg.split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {cfg.split!r}")
        zoo = Zoo.open(cfg.path)
        epoch = cfg.epoch if cfg.epoch in ("last", "all") else int(cfg.epoch)
        selection = zoo.filter(stage=cfg.stage, epoch=None if epoch == "all" else epoch)
        if len(selection) == 0:
            raise ValueError(f"no checkpoint of {cfg.path} matches stage={cfg.stage} epoch={cfg.epoch}")
        device = select_device(cfg.device)
        logger = make_logger(OmegaConf.to_object(cfg.logger), resolved, str(cfg.path), out, job_type="evaluate")
        if cfg.reference:
            wanted = {} if cfg.reference_head is None else {"head": cfg.reference_head}
            reference = Zoo.open(cfg.reference).filter(stage=cfg.reference_stage, epoch="last", **wanted)
            if len(reference) < 2:
                raise ValueError(f"the reference {cfg.reference} has fewer than two {cfg.reference_stage} models")
            comparison = compare(
                selection, reference, cfg.dataset, cfg.split, cfg.seed, cfg.align, cfg.baselines,
                recipe if epochs else None, device, cfg.data_root, cfg.progress, mode=cfg.mode,
                chunk_size=cfg.chunk_size,
            )  # fmt: skip
            write_comparison(comparison, out, resolved)
            tables = {"summary": comparison["rows"], "models": comparison["models"]}
            images = {name: out / f"{name}.png" for name in ("accuracy", "novelty", "finetune")}
        else:
            write_evaluation(
                selection, cfg.dataset, cfg.split, out, resolved, recipe if epochs else None, mode=cfg.mode,
                chunk_size=cfg.chunk_size, device=device, data_root=cfg.data_root, progress=cfg.progress,
            )  # fmt: skip
            tables = {"models": json.loads((out / "results.json").read_text())["results"]}
            images = {name: out / f"{name}.png" for name in ("accuracy", "finetune")}
        if logger is not None:
            logger.log_report(tables, images)
    except (ZooError, DatasetError, ValueError) as error:
        fail("evaluate", str(error))
    finally:
        if logger is not None:
            logger.finish()
    print((out / "report.md").read_text())


def analyze_task(cfg) -> None:
    import torch
    from omegaconf import OmegaConf

    from vitzoo.eval.analyze import headline, select, write_analysis
    from vitzoo.zoo_builder.data import DatasetError
    from vitzoo.zoo_builder.zoo import Zoo, ZooError

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        zoo = Zoo.open(cfg.path)
        epoch = cfg.epoch if cfg.epoch in ("last", "all") else int(cfg.epoch)
        selection = select(zoo, cfg.stage, epoch, cfg.max_models)
        results = write_analysis(
            zoo, selection, Path(cfg.out), OmegaConf.to_container(cfg, resolve=True), dataset=cfg.dataset,
            split=cfg.split, cka_batch=cfg.cka_batch, data_root=cfg.data_root, progress=cfg.progress,
        )  # fmt: skip
    except (ZooError, DatasetError, ValueError) as error:
        fail("analyze", str(error))
    print(headline(results))
    print(f"  report: {Path(cfg.out) / 'report.md'}")


def soup_task(cfg) -> None:
    import torch
    from omegaconf import OmegaConf

    from vitzoo.eval.soups import write_soups
    from vitzoo.zoo_builder.data import DatasetError
    from vitzoo.zoo_builder.models import select_device
    from vitzoo.zoo_builder.zoo import Zoo, ZooError

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        zoo = Zoo.open(cfg.path)
        out = write_soups(zoo, cfg.dataset or zoo.dataset, list(cfg.k), cfg.parent, Path(cfg.out),
                          OmegaConf.to_container(cfg, resolve=True), select_device(cfg.device),
                          cfg.data_root)  # fmt: skip
    except (ZooError, DatasetError, ValueError) as error:
        fail("soup", str(error))
    print((out / "report.md").read_text())


def measure_on(dataset: str, split: str, num_heads: int | None, data_root: str | None, device="cpu"):
    """A callback giving the accuracy of state dicts on one split (the batched evaluator, for generators)."""
    from vitzoo.eval.evaluation import evaluate

    def measure(state_dicts):
        pairs = [(str(i), state_dict) for i, state_dict in enumerate(state_dicts)]
        results = evaluate(pairs, dataset, split, num_heads=num_heads, device=device, data_root=data_root)
        return [r.accuracy if r.error is None else 0.0 for r in results]

    return measure


def train_task(cfg) -> None:
    """One process, or one rank of `torchrun --nproc_per_node=N -m vitzoo.cli train ...` (WORLD_SIZE > 1 in the
    environment): every rank trains its share of each batch; rank 0 alone logs, writes and prints."""
    import torch
    from omegaconf import OmegaConf

    from vitzoo.generative.autoencoder import AutoencoderConfig
    from vitzoo.generative.diffusion import DiffusionConfig
    from vitzoo.generative.runtime import close_runtime, start_runtime
    from vitzoo.zoo_builder.data import DatasetError
    from vitzoo.zoo_builder.logger import make_logger
    from vitzoo.zoo_builder.zoo import Zoo, ZooError

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    model = dict(resolved["model"] or {})
    logger = runtime = None
    try:
        name = model.pop("name", None)
        if name not in ("diffusion", "autoencoder"):
            raise ValueError(f"model={name} is not available; models: diffusion, autoencoder")
        try:
            config = DiffusionConfig(**model) if name == "diffusion" else AutoencoderConfig(**model)
        except TypeError as error:
            raise ValueError(f"bad model config: {error}") from None
        zoo = Zoo.open(cfg.path)
        runtime = start_runtime(cfg.device, cfg.precision)
        if runtime.main:
            logger = make_logger(OmegaConf.to_object(cfg.logger), resolved, str(cfg.path), out, job_type="train")
        log = logger.run.log if logger is not None else None
        if name == "diffusion":
            from vitzoo.generative.generator import train_generator

            measure = measure_on(zoo.dataset, "val", zoo.architecture.kwargs.get("num_heads"), cfg.data_root,
                                 runtime.device)  # fmt: skip
            path = train_generator(zoo, out, config, measure, cfg.head, cfg.save_every, cfg.progress, log, runtime,
                                   cfg.sample_every, cfg.sample_n)  # fmt: skip
        else:
            from vitzoo.generative.hyper import embedding_rows, load_autoencoder, train_autoencoder

            path = train_autoencoder(zoo, out, config, cfg.head, cfg.save_every, cfg.progress, log, runtime)
            if logger is not None:
                logger.log_report({"autoencoder/embeddings": embedding_rows(load_autoencoder(path))}, {})
    except (ZooError, DatasetError, ValueError) as error:
        fail("train", str(error))
    finally:
        if logger is not None:
            logger.finish()
        if runtime is not None:
            close_runtime(runtime)
    if runtime.main:
        from vitzoo.generative.runtime import timing_line

        print(f"{name} written to {path} ({path.stat().st_size / 1e6:.2f} MB)")
        print(timing_line(json.loads((out / "timing.json").read_text())))


def demo_task(cfg) -> None:
    import torch
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from vitzoo.demo import conditioning_line, run_demo, table
    from vitzoo.zoo_builder.data import DatasetError
    from vitzoo.zoo_builder.logger import make_logger
    from vitzoo.zoo_builder.models import select_device
    from vitzoo.zoo_builder.zoo import Zoo, ZooError

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(resolved))
    try:
        zoo = Zoo.open(cfg.path)
        device = select_device(cfg.device)
        measure = measure_on(zoo.dataset, "val", zoo.architecture.kwargs.get("num_heads"), cfg.data_root, device)
        from vitzoo.generative.generator import BUNDLED_GENERATOR

        summary = run_demo(cfg, BUNDLED_GENERATOR, measure, device)
        logger = make_logger(OmegaConf.to_object(cfg.logger), resolved, str(cfg.path), Path(cfg.out), job_type="demo")
        if logger is not None:
            out = Path(cfg.out)
            plots = {"accuracy": "evaluation/accuracy.png", "novelty": "evaluation/novelty.png",
                     "finetune": "evaluation/finetune.png", "soup_gains": "soups/gains.png"}  # fmt: skip
            logger.log_report(
                {"summary": summary["rows"], "conditioning": [summary["conditioning"] or {}]},
                {name: out / path for name, path in plots.items()},
            )
            logger.finish()
    except (ZooError, DatasetError, ValueError) as error:
        fail("demo", str(error))
    print("\n".join(table(summary["rows"])))
    print(f"\n{conditioning_line(summary['conditioning'])}")
    print(f"{summary['soups']}")
    print(f"report: {Path(cfg.out) / 'report.md'} (this run: {summary['this_run_seconds']:.0f} s)")


def sample_task(cfg) -> None:
    import torch

    from vitzoo.generative.checkpoint import checkpoint_format
    from vitzoo.generative.generator import BUNDLED_GENERATOR, ConditionError, load_generator, sample
    from vitzoo.generative.hyper import FORMAT as AUTOENCODER_FORMAT
    from vitzoo.generative.hyper import load_autoencoder, sample_kde
    from vitzoo.zoo_builder.zoo import Zoo, ZooError, write_sampled

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    path = BUNDLED_GENERATOR if cfg.path == "bundled" else cfg.path  # read its format before loading
    try:
        if checkpoint_format(path) == AUTOENCODER_FORMAT:
            if cfg.method != "kde":
                raise ConditionError(f"{path} is an autoencoder: sample it with method=kde")
            if cfg.head is not None:
                raise ConditionError("method=kde samples the autoencoder's own head type: drop head=")
            bundle = load_autoencoder(path, cfg.zoo)
            samples, parents = sample_kde(bundle, cfg.n, cfg.seed, cfg.bandwidth, cfg.top)
            architecture, dataset, note = bundle.data.architecture, Zoo.open(bundle.data.zoo_root).dataset, ""
        else:
            generator = load_generator(path, cfg.zoo)
            samples, parents, info = sample(
                generator, cfg.n, cfg.seed, cfg.method, cfg.parent, cfg.target_acc, cfg.optimizer, cfg.lr,
                cfg.guidance, cfg.steps, novel_only=cfg.novel_only, distance=cfg.distance, head=cfg.head,
            )  # fmt: skip
            architecture, dataset = generator.basis.architecture, generator.basis.dataset
            note = f" ({info['redrawn_as_copies']} draws redrawn as copies)"
        zoo = write_sampled(cfg.out, architecture, dataset, samples, parents)
    except (ZooError, ConditionError) as error:
        fail("sample", str(error))
    print(f"{len(zoo.records)} sampled ViTs written to {cfg.out}{note}")


# -------------------------------------------------------------------------------------- plain commands


def verify_command(args: list[str]) -> None:
    from vitzoo.zoo_builder.zoo import verify

    parser = argparse.ArgumentParser(prog="vitzoo verify", description=COMMANDS["verify"])
    parser.add_argument("zoo", help="zoo directory, or 'bundled'")
    options = parser.parse_args(args)
    problems = verify(options.zoo)
    for problem in problems:
        print(problem)
    if problems:
        print(f"vitzoo verify: {len(problems)} problem(s) in {options.zoo}", file=sys.stderr)
        sys.exit(1)
    print(f"{options.zoo}: every checkpoint matches its sha256")


def probe_command(args: list[str]) -> None:
    import torch

    from vitzoo.generative.hyper import load_autoencoder
    from vitzoo.generative.probe import probe
    from vitzoo.zoo_builder.zoo import ZooError, atomic_write_json, code_version

    parser = argparse.ArgumentParser(prog="vitzoo probe", description=COMMANDS["probe"])
    parser.add_argument("autoencoder", help="autoencoder checkpoint (vitzoo train <zoo> model=autoencoder)")
    parser.add_argument("zoo", nargs="?", default=None, help="its zoo, if it moved since training")
    parser.add_argument("--out", default="runs/probe")
    parser.add_argument("--threads", type=int, default=None)
    options = parser.parse_args(args)
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        bundle = load_autoencoder(options.autoencoder, options.zoo)
    except ZooError as error:
        fail("probe", str(error))
    rows = probe(bundle)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", {"autoencoder": options.autoencoder, "sha256": bundle.sha256,
                                             "code_version": code_version(), "rows": rows})  # fmt: skip
    lines = [
        f"# Property probes of {options.autoencoder}",
        "",
        f"{len(bundle.data)} checkpoints, 5-fold cross-validation grouped by model, code {code_version()}.",
        "",
        "| property | metric | model embedding | weight statistics (baseline) |",
        "|---|---|---|---|",
        *[f"| {r['property']} | {r['metric']} | {r['embedding']:.3f} | {r['weight_statistics']:.3f} |" for r in rows],
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    print((out / "report.md").read_text())


def import_command(args: list[str]) -> None:
    from vitzoo.zoo_builder.importers import IMPORTERS, ImportErrorBadInput

    parser = argparse.ArgumentParser(prog="vitzoo import", description=COMMANDS["import"])
    parser.add_argument("layout", choices=sorted(IMPORTERS), help="the foreign layout")
    parser.add_argument("src", help="folder of the foreign zoo")
    parser.add_argument("dst", help="zoo folder to write")
    options = parser.parse_args(args)
    try:
        zoo = IMPORTERS[options.layout](Path(options.src), Path(options.dst))
    except ImportErrorBadInput as error:
        fail("import", str(error))
    print(zoo.summary())


if __name__ == "__main__":
    main()
