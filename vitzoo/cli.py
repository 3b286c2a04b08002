"""`vitzoo`: one console script, one subcommand per pipeline stage.

Hydra commands take overrides after the subcommand (`vitzoo build zoo=digits_tiny out=zoos/tiny`);
`vitzoo <cmd> --help` shows the composed config. Bad input (unknown preset, key or value; a missing or
malformed file; an output folder that cannot be written; a full disk), that is every `VitzooError`, ends with one
line on stderr and exit code 2, and the failed run leaves no `logs/` behind; anything else is a bug and ends with
its traceback.

Every command that writes follows one policy for its output folder (`prepare_out`): it must not exist or be empty
(its `logs/` aside), or hold a run the command resumes (build, train, demo; import joins a zoo of the same
architecture); `overwrite=true` replaces an earlier output of the same command.

Every command takes `key=value` options and lists them, each with its default and what it does, under
`vitzoo <command> --help` (`vitzoo.options`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from vitzoo import configs
from vitzoo.errors import ConfigError, VitzooError
from vitzoo.options import Option, Positional, hydra_help, parse, plain_help

CONFIG_DIR = str(Path(configs.__file__).resolve().parent)

COMMANDS = {
    "demo": "the whole pipeline on the bundled zoo into one report (vitzoo demo [<zoo>] [out=<dir>])",
    "build": "train a population of ViTs into a zoo (Hydra: vitzoo build zoo=<preset> out=<dir>)",
    "evaluate": "loss, accuracy and predictions of a zoo's checkpoints (vitzoo evaluate <zoo> split=test out=<dir>)",
    "analyze": "diversity of a zoo: weight distances, agreement, CKA, factors (vitzoo analyze <zoo> out=<dir>)",
    "soup": "model soups of a zoo's fine-tunes, chosen on val (vitzoo soup <zoo> out=<dir>)",
    "train": "train a generative model over a zoo's weights (vitzoo train <zoo> model=diffusion out=<dir>)",
    "sample": "sample new ViTs from a generator into a zoo folder (vitzoo sample <generator> n=<N> out=<dir>)",
    "generalisation": "fine-tunes for parents a generator never saw, left out one by one (vitzoo generalisation <zoo>)",
    "conditioning": "does a generator follow its conditions? (vitzoo conditioning <generator> out=<dir>)",
    "probe": "predict accuracy, epoch, lr, optimizer, parent from hyper-representations (vitzoo probe <autoencoder>)",
    "import": "read a foreign zoo layout into the zoo format (vitzoo import vitmodelzoo <src> <dst>)",
    "verify": "check every checkpoint of a zoo against its sha256 (vitzoo verify <zoo>)",
    "export": "zoo models as timm / Hugging Face folders (vitzoo export <zoo> [model ids] out=<dir>)",
    "summary": "a zoo's models and their accuracy spread per parent and factor (vitzoo summary <zoo>)",
    "prepare": "decode ImageNet once into memory-mapped shards that builds read (vitzoo prepare imagenet data_root=…)",
}


# a file that every output of the command holds (finished, or resumable): what overwrite=true may replace
OUTPUT_MARKERS = {
    "build": ("zoo.json",),
    "import": ("zoo.json",),
    "sample": ("zoo.json",),
    "evaluate": ("report.md",),
    "analyze": ("report.md",),
    "soup": ("report.md",),
    "probe": ("report.md",),
    "generalisation": ("report.md",),
    "conditioning": ("report.md",),
    "train": ("train_state.safetensors", "generator.safetensors", "autoencoder.safetensors", "transfer.safetensors"),
    "demo": ("stages.json",),
    "export": ("export.json",),
    "prepare": ("prepared.json",),
}
# they check themselves that an existing out is the same run
RESUMABLE = ("build", "train", "demo", "import", "prepare")
# errors of the file system that mean bad input or a full disk, not a bug
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG,
               errno.ENOTDIR, errno.EISDIR}  # fmt: skip


def fail(command: str, message: str) -> None:
    first_line = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
    print(f"vitzoo{f' {command}' if command else ''}: error: {first_line}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def one_line_errors(command: str, cleanup=lambda: None):
    """Bad input (a VitzooError, or a full disk or unwritable path) as one line and exit code 2; anything else
    keeps its traceback. `cleanup` runs first whenever the command fails."""
    try:
        yield
    except VitzooError as error:
        cleanup()
        fail(command, str(error))
    except OSError as error:
        cleanup()
        if error.errno not in USER_ERRNOS:
            raise
        fail(command, f"{error.strerror}: {error.filename}" if error.filename else error.strerror)
    except Exception:
        cleanup()
        raise


def prepare_out(command: str, out: Path, overwrite: bool) -> None:
    """Check `out` against the policy of the module docstring before anything runs (ConfigError saying why not);
    with `overwrite`, remove the earlier output (its `logs/` stay)."""
    name_max = 255
    if any(len(part.encode()) > name_max for part in out.parts) or len(str(out.absolute()).encode()) >= 4096:
        raise ConfigError(f"out={out}: a name in it is longer than the file system allows ({name_max} bytes)")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == out else f"lies under the file {existing}"
        raise ConfigError(f"out={out} {where}; out must be a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"out={out}: {existing} is not writable")
    entries = sorted(p.name for p in out.iterdir() if p.name != "logs") if out.is_dir() else []
    if not entries:
        return
    markers = OUTPUT_MARKERS[command]
    if overwrite:
        if not any((out / marker).exists() for marker in markers):
            raise ConfigError(f"out={out} holds {entries[0]} but no vitzoo {command} output ({markers[0]}); "
                              "overwrite=true replaces only those: choose another out")  # fmt: skip
        for name in entries:
            path = out / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        return
    if command not in RESUMABLE:
        raise occupied(out, entries)


def occupied(out: Path, entries: list[str]) -> ConfigError:
    """The refusal of an `out` that holds `entries` (its `logs/` aside) for a command that cannot resume them."""
    return ConfigError(f"out={out} already holds {', '.join(entries[:3])}{' ...' if len(entries) > 3 else ''}: "
                       "pass overwrite=true to replace it, or choose another out")  # fmt: skip


def remove_run_logs(run_dir: Path, created: list[Path]) -> None:
    """Remove a failed run's log folder, and the folders above it that the run created, when they are empty."""
    shutil.rmtree(run_dir, ignore_errors=True)
    for folder in sorted(created, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty


def hydra_value(text: str) -> str:
    """A positional argument as a quoted Hydra override value: any path, with parentheses, spaces or non-ASCII
    letters, is read verbatim (Hydra's grammar would otherwise parse `tiny(1)` as a function call)."""
    # Hydra's escapes: a quote is \\', and the backslashes right before a quote or the closing quote are doubled
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return f"'{escaped}'"


def usage() -> str:
    lines = ["usage: vitzoo <command> [args] [hydra overrides]", "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        fail("", f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    if command not in PLAIN_COMMANDS and ("--help" in rest or "-h" in rest):
        print(hydra_help(command, COMMANDS[command], Path(CONFIG_DIR)))
        return
    if command == "demo":
        positional = rest[:1] if rest and "=" not in rest[0] and not rest[0].startswith("-") else []
        run_hydra("demo", "demo", [f"path={hydra_value(p)}" for p in positional] + rest[len(positional) :], demo_task)
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
    elif command == "generalisation":
        run_zoo_command("generalisation", rest, generalisation_task)
    elif command in PLAIN_COMMANDS:
        {"verify": verify_command, "probe": probe_command, "import": import_command, "export": export_command,
         "conditioning": conditioning_command, "summary": summary_command,
         "prepare": prepare_command}[command](rest)  # fmt: skip


# ------------------------------------------------------------------------------------------- hydra


def run_zoo_command(command: str, rest: list[str], task, what: str = "zoo folder or 'bundled'") -> None:
    """A Hydra command whose first argument is the zoo (passed on as the `path` override)."""
    if rest and "=" not in rest[0] and not rest[0].startswith("-"):
        run_hydra(command, command, [f"path={hydra_value(rest[0])}", *rest[1:]], task)
        return
    if not any(flag in rest for flag in ("--help", "-h", "--cfg", "-c")):
        fail(command, f"the first argument is the {what.split(' or ')[0]}: vitzoo {command} <{what}> [overrides]")
    run_hydra(command, command, rest, task)


def validate_overrides(config_name: str, overrides: list[str]) -> list:
    """Compose the config for every job of a (multi)run now, so bad input fails in one line before any work;
    returns the composed configs."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain = [o for o in overrides if not o.startswith("hydra/") and not o.startswith("hydra.")]
    parsed = OverridesParser.create().parse_overrides(plain)
    jobs = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0] if parsed else [[]]
    GlobalHydra.instance().clear()
    composed = []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for job in jobs:
            cfg = compose(config_name=config_name, overrides=list(job))
            if config_name == "build":
                from vitzoo.zoo_builder.blueprint import blueprint_from_config

                blueprint_from_config(cfg.zoo)
            composed.append(cfg)
    GlobalHydra.instance().clear()
    return composed


def run_hydra(command: str, config_name: str, overrides: list[str], task) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from vitzoo.zoo_builder.config import register_schemas

    register_schemas()
    created: list[Path] = []  # folders this run creates for its logs: removed again if it fails
    if not any(flag in overrides for flag in ("--help", "-h", "--hydra-help", "--info", "--cfg", "-c")):
        sweep_flags = {"--multirun", "-m"}
        try:
            jobs = validate_overrides(config_name, [o for o in overrides if o not in sweep_flags])
        except (HydraException, OmegaConfBaseException, VitzooError) as error:  # bad input: keys, values, presets
            fail(command, _config_error(error))
        with one_line_errors(command):
            for out in dict.fromkeys(Path(cfg.out) for cfg in jobs):
                prepare_out(command, out, jobs[0].overwrite)
                created += [folder for folder in (out, out / "logs") if not folder.exists()]

    def guarded(cfg) -> None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        with one_line_errors(command, cleanup=lambda: remove_run_logs(run_dir, created)):
            task(cfg)

    # Hydra's parser wants its flags before the overrides (`vitzoo build out=x --multirun a=1,2` is fine here)
    flags = [o for o in overrides if o.startswith("-")]
    sys.argv = [f"vitzoo {command}", *flags, *[o for o in overrides if not o.startswith("-")]]
    hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)(guarded)()


def log_outputs(cfg, out: Path, job_type: str, tables: dict[str, list[dict]] | None = None) -> None:
    """With `logger=wandb`: the report's tables (given, or every list of rows in out/results.json) and every figure
    in `out`, as one run of `job_type` grouped by the zoo; nothing with `logger=none`."""
    from omegaconf import OmegaConf

    log_report_folder(OmegaConf.to_object(cfg.logger), OmegaConf.to_container(cfg, resolve=True), str(cfg.path), out,
                      job_type, tables)  # fmt: skip


def log_report_folder(logger_config, config: dict, group: str, out: Path, job_type: str, tables=None) -> None:
    """`log_outputs` for any command: a LoggerConfig, the run's config, the W&B group (the zoo or generator)."""
    from vitzoo.zoo_builder.logger import make_logger

    logger = make_logger(logger_config, config, group, out, job_type=job_type)
    if logger is None:
        return
    try:
        if tables is None:
            results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
            tables = {key: rows for key, rows in results.items()
                      if isinstance(rows, list) and rows and all(isinstance(row, dict) for row in rows)}  # fmt: skip
        logger.log_report(tables, {path.stem: path for path in sorted(out.glob("*.png"))})
    finally:
        logger.finish()


def run_dir_of(cfg) -> Path:
    """This run's log folder: Hydra's (a CLI run), or `<out>/logs/<time>` (a run from the Python API)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    folder = Path(cfg.out) / "logs" / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_api(command: str, options: dict):
    """A Hydra command from Python (`vitzoo.<command>(**options)`): the config composed from the options as the
    CLI composes it from `key=value` overrides, the same output policy and the same task; bad input raises a
    `VitzooError` instead of exiting. Returns what the task returns."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from vitzoo.zoo_builder.config import register_schemas

    register_schemas()
    overrides = [f"{key.replace('__', '.')}={api_value(value)}" for key, value in options.items()]
    try:
        [cfg] = validate_overrides(command, overrides)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(_config_error(error).splitlines()[0]) from None
    prepare_out(command, Path(cfg.out), cfg.overwrite)
    return HYDRA_TASKS[command](cfg)


def api_value(value) -> str:
    """A Python value as a Hydra override value: plain words as they are, any other string quoted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(api_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{api_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    return text if re.fullmatch(r"[A-Za-z_][\w.-]*", text) else hydra_value(text)


def _config_error(error: Exception) -> str:
    from omegaconf.errors import OmegaConfBaseException

    text = str(error).strip()
    if "In 'build': Could not find" in text or "Could not find '" in text:
        return text.splitlines()[0] + " (presets live in configs/<group>/<name>.yaml)"
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):  # a value of the wrong type
        return f"{cause.full_key}: {cause.msg}"
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("full_key")]
    return " ".join(lines[:2]) if lines else type(error).__name__


def build_task(cfg) -> Path:
    import torch
    from omegaconf import OmegaConf

    from vitzoo.zoo_builder.build import BuildSettings, build
    from vitzoo.zoo_builder.logger import make_logger
    from vitzoo.zoo_builder.zoo import Zoo

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (run_dir_of(cfg) / "resolved_config.yaml").write_text(OmegaConf.to_yaml(resolved))
    if cfg.plan:
        return plan_task(cfg)
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
        if logger is not None and (out / "index.jsonl").exists():  # the whole zoo (not a shard still training)
            logger.log_artifact(out, "zoo")
    finally:
        if logger is not None:
            logger.finish()
    print(Zoo.open(out, allow_unfinished=True).summary())  # other shards may still be training
    return out


def plan_task(cfg) -> Path:
    """`vitzoo build plan=true`: the build's cost, printed and written as plan.json beside the resolved config."""
    from omegaconf import OmegaConf

    from vitzoo.zoo_builder.blueprint import blueprint_from_config
    from vitzoo.zoo_builder.plan import format_plan, plan_build

    accelerator = OmegaConf.to_object(cfg.accelerator)
    plan = plan_build(blueprint_from_config(cfg.zoo), cfg.precision, cfg.population_size, accelerator)
    print(format_plan(plan))
    path = run_dir_of(cfg) / "plan.json"
    path.write_text(json.dumps(plan.to_dict(), indent=1) + "\n")
    print(f"plan written to {path}")
    return path


def epoch_setting(epoch: str) -> str | int:
    """The `epoch` setting: last, all or an epoch number."""
    if epoch in ("last", "all"):
        return epoch
    try:
        return int(epoch)
    except ValueError:
        raise ConfigError(f"epoch must be last, all or an epoch number, got {epoch!r}") from None


def save_policy(cfg):
    from vitzoo.zoo_builder.build import SavePolicy

    return SavePolicy(cfg.keep_last, cfg.keep_init, tuple(cfg.extra_seeds), cfg.extra_keep_last)


def evaluate_task(cfg) -> Path:
    import torch
    from omegaconf import OmegaConf

    from vitzoo.eval.compare import compare, write_comparison
    from vitzoo.eval.finetune import FinetuneRecipe
    from vitzoo.eval.report import write_evaluation
    from vitzoo.zoo_builder.logger import make_logger
    from vitzoo.zoo_builder.models import select_device
    from vitzoo.zoo_builder.zoo import Zoo

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
            raise ConfigError(f"split must be train, val or test, got {cfg.split!r}")
        zoo = Zoo.open(cfg.path)
        epoch = epoch_setting(cfg.epoch)
        selection = zoo.filter(stage=cfg.stage, epoch=None if epoch == "all" else epoch)
        if len(selection) == 0:
            raise ConfigError(f"no checkpoint of {cfg.path} matches stage={cfg.stage} epoch={cfg.epoch}")
        device = select_device(cfg.device)
        logger = make_logger(OmegaConf.to_object(cfg.logger), resolved, str(cfg.path), out, job_type="evaluate")
        if cfg.reference:
            wanted = {} if cfg.reference_head is None else {"head": cfg.reference_head}
            reference = Zoo.open(cfg.reference).filter(stage=cfg.reference_stage, epoch="last", **wanted)
            if len(reference) < 2:
                raise ConfigError(f"the reference {cfg.reference} has fewer than two {cfg.reference_stage} models")
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
            logger.log_artifact(zoo.root, "samples" if cfg.reference else "zoo")
    finally:
        if logger is not None:
            logger.finish()
    print((out / "report.md").read_text())
    return out / "report.md"


def analyze_task(cfg) -> Path:
    import torch
    from omegaconf import OmegaConf

    from vitzoo.eval.analyze import headline, select, write_analysis
    from vitzoo.zoo_builder.zoo import Zoo

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    zoo = Zoo.open(cfg.path)
    selection = select(zoo, cfg.stage, epoch_setting(cfg.epoch), cfg.max_models)
    results = write_analysis(
        zoo, selection, Path(cfg.out), OmegaConf.to_container(cfg, resolve=True), dataset=cfg.dataset,
        split=cfg.split, cka_batch=cfg.cka_batch, data_root=cfg.data_root, progress=cfg.progress,
    )  # fmt: skip
    log_outputs(cfg, Path(cfg.out), "analyze")
    print(headline(results))
    print(f"  report: {Path(cfg.out) / 'report.md'}")
    return Path(cfg.out) / "report.md"


def soup_task(cfg) -> Path:
    import torch
    from omegaconf import OmegaConf

    from vitzoo.eval.soups import write_soups
    from vitzoo.zoo_builder.models import select_device
    from vitzoo.zoo_builder.zoo import Zoo

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    zoo = Zoo.open(cfg.path)
    out = write_soups(zoo, cfg.dataset or zoo.dataset, list(cfg.k), cfg.parent, Path(cfg.out),
                      OmegaConf.to_container(cfg, resolve=True), select_device(cfg.device), cfg.data_root)  # fmt: skip
    log_outputs(cfg, out, "soup")
    print((out / "report.md").read_text())
    return out / "report.md"


def measure_on(dataset: str, split: str, num_heads: int, data_root: str | None, device="cpu"):
    """A callback giving the accuracy of state dicts on one split (the batched evaluator, for generators); None
    for a model that could not be evaluated (the generator leaves it out of its training labels and counts it)."""
    from vitzoo.eval.evaluation import evaluate

    def measure(state_dicts):
        pairs = [(str(i), state_dict) for i, state_dict in enumerate(state_dicts)]
        results = evaluate(pairs, dataset, split, num_heads=num_heads, device=device, data_root=data_root)
        return [r.accuracy if r.error is None else None for r in results]

    return measure


def train_task(cfg) -> Path:
    """One process, or one rank of `torchrun --nproc_per_node=N -m vitzoo.cli train ...` (WORLD_SIZE > 1 in the
    environment): every rank trains its share of each batch; rank 0 alone logs, writes and prints."""
    import torch
    from omegaconf import OmegaConf

    from vitzoo.generative.autoencoder import AutoencoderConfig
    from vitzoo.generative.diffusion import DiffusionConfig
    from vitzoo.generative.latent import LatentDiffusionConfig
    from vitzoo.generative.runtime import close_runtime, start_runtime
    from vitzoo.generative.transfer import TransferConfig
    from vitzoo.zoo_builder.logger import make_logger
    from vitzoo.zoo_builder.zoo import Zoo

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    model = dict(resolved["model"] or {})
    logger = runtime = None
    try:
        configs = {"diffusion": DiffusionConfig, "autoencoder": AutoencoderConfig,
                   "latent_diffusion": LatentDiffusionConfig, "transfer": TransferConfig}  # fmt: skip
        name, config = model_config(model, configs)
        if cfg.holdout_parents and name != "transfer":
            raise ConfigError(f"model={name} samples within the families it trained on: holdout_parents is for "
                              "model=transfer (fine-tunes for parents it never saw)")  # fmt: skip
        zoo = Zoo.open(cfg.path)
        if name == "transfer":
            return train_transfer_task(cfg, zoo, config, out)
        runtime = start_runtime(cfg.device, cfg.precision)
        if runtime.main:
            logger = make_logger(OmegaConf.to_object(cfg.logger), resolved, str(cfg.path), out, job_type="train")
        log = logger.run.log if logger is not None else None
        if name == "diffusion":
            from vitzoo.generative.generator import train_generator

            measure = measure_on(zoo.dataset, "val", zoo.architecture.num_heads, cfg.data_root,
                                 runtime.device)  # fmt: skip
            path = train_generator(zoo, out, config, measure, cfg.head, cfg.save_every, cfg.progress, log, runtime,
                                   cfg.sample_every, cfg.sample_n)  # fmt: skip
        elif name == "latent_diffusion":
            from vitzoo.generative.latent import train_latent_diffusion

            measure = measure_on(zoo.dataset, "val", zoo.architecture.num_heads, cfg.data_root,
                                 runtime.device)  # fmt: skip
            path = train_latent_diffusion(out, config, measure, str(cfg.path), cfg.head, cfg.save_every,
                                          cfg.progress, log, runtime)  # fmt: skip
        else:
            from vitzoo.generative.hyper import embedding_rows, load_autoencoder, train_autoencoder

            path = train_autoencoder(zoo, out, config, cfg.head, cfg.save_every, cfg.progress, log, runtime)
            if logger is not None:
                logger.log_report({"autoencoder/embeddings": embedding_rows(load_autoencoder(path))}, {})
        if logger is not None:
            logger.log_artifact(path, "generator")
    finally:
        if logger is not None:
            logger.finish()
        if runtime is not None:
            close_runtime(runtime)
    if runtime.main:
        from vitzoo.generative.checkpoint import read_checkpoint
        from vitzoo.generative.runtime import timing_line

        unmeasured = read_checkpoint(path)[1].get("unmeasured", 0)  # recorded only when some could not be evaluated
        print(f"{name} written to {path} ({path.stat().st_size / 1e6:.2f} MB)")
        if unmeasured:
            print(f"{unmeasured} models could not be evaluated on val: left out of the training labels")
        print(timing_line(json.loads((out / "timing.json").read_text())))
    return path


def model_config(model: dict, configs: dict[str, type]) -> tuple[str, object]:
    """The `model=` group's name and its config object (a ConfigError for an unknown model or field)."""
    fields = dict(model)
    name = fields.pop("name", None)
    if name not in configs:
        raise ConfigError(f"model={name} is not available; models: {', '.join(configs)}")
    try:
        return name, configs[name](**fields)
    except TypeError as error:  # an unknown field
        raise ConfigError(f"bad model config: {error}") from None


def train_transfer_task(cfg, zoo, config, out: Path) -> Path:
    """model=transfer: no gradient steps (probe logits of the training fine-tunes), so one process, no logger, and
    nothing to resume: an out that holds anything (but logs) is refused unless overwrite=true emptied it."""
    from vitzoo.generative.transfer import fit_transfer, save_transfer
    from vitzoo.zoo_builder.models import select_device

    entries = sorted(p.name for p in out.iterdir() if p.name != "logs") if out.is_dir() else []
    if entries:  # prepare_out let it through: train resumes the other models
        raise occupied(out, entries)
    started = time.perf_counter()
    generator = fit_transfer(zoo, config, cfg.head, list(cfg.holdout_parents), cfg.data_root,
                             select_device(cfg.device))  # fmt: skip
    seconds = time.perf_counter() - started
    path = out / "transfer.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    save_transfer(generator, path, {"training_seconds": seconds})
    runs = sum(len(r) for r in generator.runs)
    held = f", held out: {', '.join(generator.held_out)}" if generator.held_out else ""
    print(f"transfer written to {path} ({path.stat().st_size / 1e6:.2f} MB): {runs} fine-tunes of "
          f"{len(generator.parents)} parents{held}; {seconds:.1f} s")  # fmt: skip
    return path


def generalisation_task(cfg) -> dict:
    import torch
    from omegaconf import OmegaConf

    from vitzoo.eval.finetune import FinetuneRecipe
    from vitzoo.generalisation import (
        GeneralisationSettings,
        leave_one_parent_out,
        report_lines,
        write_generalisation,
    )
    from vitzoo.generative.transfer import TransferConfig
    from vitzoo.zoo_builder.models import select_device
    from vitzoo.zoo_builder.zoo import Zoo

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = dict(OmegaConf.to_container(cfg.model, resolve=True) or {})
    if model.get("name") != "transfer":
        raise ConfigError("generalisation measures model=transfer, the generator that conditions on a new parent")
    _, config = model_config(model, {"transfer": TransferConfig})
    recipe = FinetuneRecipe(**OmegaConf.to_container(cfg.finetune), seed=cfg.seed)
    settings = GeneralisationSettings(cfg.head, cfg.n, list(cfg.sizes), recipe, cfg.seed, cfg.resamples,
                                      str(select_device(cfg.device)), cfg.data_root)  # fmt: skip
    report = leave_one_parent_out(Zoo.open(cfg.path), config, settings)
    path = write_generalisation(report, Path(cfg.out))
    log_outputs(cfg, Path(cfg.out), "generalisation",
                {"parents": report["parents"], "slots": report["slots"], "curve": report["curve"],
                 "overall": [{"start": kind, **stat} for kind, stat in report["overall"].items()]})  # fmt: skip
    print("\n".join(report_lines(report)[4:12]))
    print(f"report: {path}")
    return report


def demo_task(cfg) -> dict:
    import torch
    from omegaconf import OmegaConf

    from vitzoo.demo import conditioning_line, run_demo, table
    from vitzoo.zoo_builder.logger import make_logger
    from vitzoo.zoo_builder.models import select_device
    from vitzoo.zoo_builder.zoo import Zoo

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (run_dir_of(cfg) / "resolved_config.yaml").write_text(OmegaConf.to_yaml(resolved))
    zoo = Zoo.open(cfg.path)
    device = select_device(cfg.device)
    measure = measure_on(zoo.dataset, "val", zoo.architecture.num_heads, cfg.data_root, device)
    from vitzoo.generative.generator import BUNDLED_GENERATOR

    summary = run_demo(cfg, BUNDLED_GENERATOR, measure, device)
    logger = make_logger(OmegaConf.to_object(cfg.logger), resolved, str(cfg.path), Path(cfg.out), job_type="demo")
    if logger is not None:
        out = Path(cfg.out)
        plots = {"accuracy": "evaluation/accuracy.png", "novelty": "evaluation/novelty.png",
                 "embedding": "evaluation/embedding.png",
                 "finetune": "evaluation/finetune.png", "soup_gains": "soups/gains.png"}  # fmt: skip
        logger.log_report(
            {"summary": summary["rows"], "conditioning": [summary["conditioning"] or {}]},
            {name: out / path for name, path in plots.items()},
        )
        logger.log_artifact(out / "samples", "samples")
        logger.finish()
    print("\n".join(table(summary["rows"])))
    print(f"\n{conditioning_line(summary['conditioning'])}")
    print(f"{summary['soups']}")
    print(f"report: {Path(cfg.out) / 'report.md'} (this run: {summary['this_run_seconds']:.0f} s)")
    return summary


def sample_task(cfg):
    import torch

    from vitzoo.generative.checkpoint import checkpoint_format
    from vitzoo.generative.generator import BUNDLED_GENERATOR, ConditionError, load_generator, sample
    from vitzoo.generative.generator import GUIDANCE as FAMILY_GUIDANCE
    from vitzoo.generative.hyper import FORMAT as AUTOENCODER_FORMAT
    from vitzoo.generative.hyper import load_autoencoder, sample_kde
    from vitzoo.generative.latent import FORMAT as LATENT_FORMAT
    from vitzoo.generative.latent import GUIDANCE as LATENT_GUIDANCE
    from vitzoo.generative.latent import TEMPERATURE as LATENT_TEMPERATURE
    from vitzoo.generative.latent import load_latent_diffusion, sample_latent
    from vitzoo.generative.transfer import FORMAT as TRANSFER_FORMAT
    from vitzoo.zoo_builder.zoo import Zoo, write_sampled

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    path = BUNDLED_GENERATOR if cfg.path == "bundled" else cfg.path  # read its format before loading
    kind = checkpoint_format(path)
    if cfg.epoch is not None and kind != LATENT_FORMAT:
        raise ConditionError("epoch= is a latent diffusion's condition; this checkpoint samples finished fine-tunes")
    if kind == TRANSFER_FORMAT:
        samples, parents, architecture, dataset = sample_transfer_task(cfg, path)
        note = ""
    elif kind == LATENT_FORMAT:
        if cfg.method not in (None, "latent_diffusion"):
            raise ConditionError(f"{path} is a latent diffusion: sample it with method=latent_diffusion (or none)")
        if cfg.head is not None:
            raise ConditionError("a latent diffusion samples its autoencoder's own head type: drop head=")
        generator = load_latent_diffusion(path, cfg.zoo)
        guidance = LATENT_GUIDANCE if cfg.guidance is None else cfg.guidance
        temperature = LATENT_TEMPERATURE if cfg.temperature is None else cfg.temperature
        samples, parents = sample_latent(generator, cfg.n, cfg.seed, cfg.parent, cfg.target_acc, cfg.optimizer,
                                         cfg.lr, guidance, cfg.steps, temperature, cfg.epoch)  # fmt: skip
        data = generator.bundle.data
        architecture, dataset, note = data.architecture, Zoo.open(cfg.zoo or data.zoo_root).dataset, ""
    elif kind == AUTOENCODER_FORMAT:
        if cfg.method not in (None, "kde"):
            raise ConditionError(f"{path} is an autoencoder: sample it with method=kde")
        if cfg.head is not None:
            raise ConditionError("method=kde samples the autoencoder's own head type: drop head=")
        bundle = load_autoencoder(path, cfg.zoo)
        samples, parents = sample_kde(bundle, cfg.n, cfg.seed, cfg.bandwidth, cfg.top)
        architecture, dataset, note = bundle.data.architecture, Zoo.open(bundle.data.zoo_root).dataset, ""
    else:
        generator = load_generator(path, cfg.zoo)
        basis = generator.basis
        measure = measure_on(basis.dataset, "val", basis.architecture.num_heads, cfg.data_root)  # method=pick
        guidance = FAMILY_GUIDANCE if cfg.guidance is None else cfg.guidance
        samples, parents, info = sample(
            generator, cfg.n, cfg.seed, cfg.method or "mix", cfg.parent, cfg.target_acc, cfg.optimizer, cfg.lr,
            guidance, cfg.steps, novel_only=cfg.novel_only, distance=cfg.distance, head=cfg.head,
            measure=measure, pool=cfg.pool,
        )  # fmt: skip
        architecture, dataset = generator.basis.architecture, generator.basis.dataset
        note = f" ({info['redrawn_as_copies']} draws redrawn as copies)"
    zoo = write_sampled(cfg.out, architecture, dataset, samples, parents)
    print(f"{len(zoo.records)} sampled ViTs written to {cfg.out}{note}")
    return zoo


def sample_transfer_task(cfg, path):
    """Fine-tunes of `parent=` (a model of the generator's zoo, or a state dict's path) from a transfer generator."""
    from vitzoo.generative.generator import ConditionError
    from vitzoo.generative.transfer import load_transfer, read_parent, sample_transfer
    from vitzoo.zoo_builder.zoo import Zoo

    if cfg.method not in (None, "transfer"):
        raise ConditionError(f"{path} is a transfer generator: sample it with method=transfer (or none)")
    generator = load_transfer(path)
    if cfg.parent is None:
        raise ConditionError("a transfer generator samples fine-tunes of one parent: give parent=<model id or path>")
    if cfg.target_acc is not None:
        raise ConditionError("a transfer generator conditions on optimizer/lr, not target_acc: how good its samples "
                             "are depends on the new parent's features, which no zoo run measured")  # fmt: skip
    if cfg.head not in (None, generator.start["head"]):
        raise ConditionError(f"this transfer generator fits {generator.start['head']} heads: drop head= or train "
                             f"one with head={cfg.head}")  # fmt: skip
    zoo = None
    if not Path(cfg.parent).is_file():
        zoo = Zoo.open(cfg.zoo or generator.zoo_root)
    name, state = read_parent(cfg.parent, zoo)
    samples = sample_transfer(generator, state, name, cfg.n, cfg.seed, cfg.head_seed or 0, cfg.optimizer, cfg.lr,
                              cfg.temperature)  # fmt: skip
    dataset = generator.start["dataset"]
    return samples, [name if zoo is not None else None] * len(samples), generator.architecture, dataset


HYDRA_TASKS = {"build": build_task, "evaluate": evaluate_task, "analyze": analyze_task, "soup": soup_task,
               "train": train_task, "sample": sample_task, "generalisation": generalisation_task,
               "demo": demo_task}  # fmt: skip


# -------------------------------------------------------------------------------------- plain commands


PLAIN_COMMANDS = {  # commands without Hydra: their arguments and key=value options (vitzoo.options)
    "verify": ([Positional("zoo", "zoo folder, or 'bundled'")], {}),
    "probe": (
        [Positional("autoencoder", "autoencoder checkpoint (vitzoo train <zoo> model=autoencoder)")],
        {
            "zoo": Option(None, "its zoo, if it moved since training"),
            "out": Option("runs/probe", "report.md and results.json"),
            "overwrite": Option(False, "replace the report of an earlier probe in out", bool),
            "threads": Option(None, "torch.set_num_threads; null leaves torch's default", int),
            "logger": Option("none", "none | wandb: the report's tables and figures to W&B (offline by default)"),
        },
    ),
    "import": (
        [
            Positional("layout", "the foreign layout: vitmodelzoo"),
            Positional("src", "folder of the foreign zoo"),
            Positional("dst", "zoo folder to write (or a zoo of the same architecture to join)"),
        ],
        {"overwrite": Option(False, "replace the zoo in dst instead of joining it", bool)},
    ),
    "export": (
        [
            Positional("zoo", "zoo or sampled-zoo folder, or 'bundled'"),
            Positional("models", "model ids (default: every model), each at its last epoch", "*"),
        ],
        {
            "out": Option("runs/export", "one timm / Hugging Face folder per model"),
            "overwrite": Option(False, "replace an earlier export in out", bool),
        },
    ),
    "conditioning": (
        [Positional("generator", "family or latent diffusion checkpoint, or 'bundled'")],
        {
            "reference": Option(
                None,
                "family generator for measure-and-pick (default: the generator itself, or the "
                "shipped one for a latent diffusion)",
            ),
            "targets": Option(
                None, "target val accuracies, e.g. [0.5,0.7,0.9] (null: spread over the trained range)", list
            ),
            "per_target": Option(10, "samples per target", int),
            "per_slot": Option(10, "samples per optimizer/lr", int),
            "guidance": Option(None, "classifier-free guidance scale (null: the sampler's own)", float),
            "temperature": Option(None, "initial noise scale of a latent diffusion's draws (null: its own)", float),
            "seed": Option(0, "of the draws", int),
            "out": Option("runs/conditioning", "report.md, results.json, plot"),
            "overwrite": Option(False, "replace an earlier report in out", bool),
            "threads": Option(None, "torch.set_num_threads; null leaves torch's default", int),
            "logger": Option("none", "none | wandb: the report's tables and figures to W&B (offline by default)"),
        },
    ),
    "summary": (
        [Positional("zoo", "zoo folder, or 'bundled'")],
        {"metric": Option("test_acc", "the metric spread over parents and factors")},
    ),
    "prepare": (
        [Positional("dataset", "the dataset to prepare: imagenet")],
        {
            "data_root": Option(None, "folder holding imagenet/train/<wnid>/ and imagenet/val/<wnid>/"),
            "out": Option(None, "the cache; null: <data_root>/imagenet_prepared, where builds look for it"),
            "size": Option(None, "side of the stored images; null: 224, the pixels of a JPEG decode", int),
            "workers": Option(None, "decoding threads; null: one per core", int),
            "overwrite": Option(False, "replace an earlier cache in out (else a rerun resumes it)", bool),
        },
    ),
}


def plain_arguments(command: str, args: list[str]) -> tuple[dict, dict]:
    """The arguments and options of a plain command; --help prints them and exits."""
    positionals, options = PLAIN_COMMANDS[command]
    if "--help" in args or "-h" in args:
        print(plain_help(command, COMMANDS[command], positionals, options))
        sys.exit(0)
    with one_line_errors(command):
        return parse(command, args, positionals, options)


def verify_command(args: list[str]) -> None:
    from vitzoo.zoo_builder.zoo import Zoo, verify

    named, _ = plain_arguments("verify", args)
    zoo = named["zoo"]
    with one_line_errors("verify"):
        Zoo.open(zoo)  # a zoo that cannot be opened is bad input (exit 2), not a problem found (exit 1)
    problems = verify(zoo)
    for problem in problems:
        print(problem)
    if problems:
        print(f"vitzoo verify: {len(problems)} problem(s) in {zoo}", file=sys.stderr)
        sys.exit(1)
    print(f"{zoo}: every checkpoint matches its sha256")


def probe_command(args: list[str]) -> None:
    import torch

    from vitzoo.eval.html import write_report
    from vitzoo.generative.hyper import held_out_bundle, load_autoencoder, reconstruction_rows
    from vitzoo.generative.probe import plot_probes, probe
    from vitzoo.zoo_builder.logger import LoggerConfig
    from vitzoo.zoo_builder.zoo import Zoo, atomic_write_json, code_version

    named, options = plain_arguments("probe", args)
    checkpoint = named["autoencoder"]
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    out = Path(options["out"])
    with one_line_errors("probe"):
        prepare_out("probe", out, options["overwrite"])
        bundle = load_autoencoder(checkpoint, options["zoo"])
        rows = probe(bundle)
        dataset = Zoo.open(options["zoo"] or bundle.data.zoo_root).dataset
        measure = measure_on(dataset, "test", bundle.data.num_heads, None)
        reconstruction = {"training models": reconstruction_rows(bundle, measure)}
        held = held_out_bundle(bundle, options["zoo"])
        if held is not None:
            reconstruction[f"models held out of training (holdout={bundle.config.holdout})"] = reconstruction_rows(
                held, measure
            )
        out.mkdir(parents=True, exist_ok=True)
        plot_probes(rows, out / "probes.png")
        atomic_write_json(out / "results.json", {"autoencoder": checkpoint, "sha256": bundle.sha256,
                                                 "code_version": code_version(), "rows": rows,
                                                 "reconstruction": reconstruction})  # fmt: skip
    lines = [
        f"# Property probes of {checkpoint}",
        "",
        f"{len(bundle.data)} checkpoints, 5-fold cross-validation grouped by model, code {code_version()}.",
        "",
        "| property | metric | model embedding | weight statistics (baseline) |",
        "|---|---|---|---|",
        *[f"| {r['property']} | {r['metric']} | {r['embedding']:.3f} | {r['weight_statistics']:.3f} |" for r in rows],
        "",
        "![held-out predictions against the truth](probes.png)",
        "",
    ]
    for which, table in reconstruction.items():
        lines += [
            f"## Reconstruction of its {which} ({dataset} test split, last checkpoints)",
            "",
            "Encode -> decode without noise, beside the model plus isotropic noise at the reconstruction's own "
            "distance.",
            "",
            "| slot | models | model acc | reconstruction | ratio (means) | ratio (median) | noise at same distance "
            "| relative weight error |",
            "|---|---|---|---|---|---|---|---|",
            *[f"| {r['slot']} | {r['models']} | {r['model_acc']:.3f} | {r['reconstruction_acc']:.3f} | "
              f"{r['ratio_of_means']:.3f} | {r['median_ratio']:.3f} | {r['control_acc']:.3f} | "
              f"{r['median_relative_error']:.3f} |" for r in table],
            "",
        ]  # fmt: skip
    with one_line_errors("probe"):
        write_report(out, "\n".join(lines))
        log_report_folder(LoggerConfig(kind=options["logger"]), {"autoencoder": checkpoint, **options},
                          options["zoo"] or bundle.data.zoo_root, out, "probe")  # fmt: skip
    print((out / "report.md").read_text())


def import_command(args: list[str]) -> None:
    from vitzoo.zoo_builder.importers import IMPORTERS

    named, options = plain_arguments("import", args)
    with one_line_errors("import"):
        if named["layout"] not in IMPORTERS:
            raise ConfigError(f"unknown layout {named['layout']!r}; layouts: {', '.join(sorted(IMPORTERS))}")
        prepare_out("import", Path(named["dst"]), options["overwrite"])
        zoo = IMPORTERS[named["layout"]](Path(named["src"]), Path(named["dst"]))
    print(zoo.summary())


def export_command(args: list[str]) -> None:
    named, options = plain_arguments("export", args)
    out = Path(options["out"])
    with one_line_errors("export"):
        prepare_out("export", out, options["overwrite"])
        from vitzoo.zoo_builder.export import export  # torch and timm: after the cheap checks

        folders = export(named["zoo"], out, named["models"])
    print(f"{len(folders)} models exported to {out}; load one with timm.create_model('local-dir:{folders[0]}', "
          "pretrained=True) (MLP heads: after import vitzoo.zoo_builder)")  # fmt: skip


def conditioning_command(args: list[str]) -> None:
    import torch

    from vitzoo.zoo_builder.logger import LoggerConfig

    named, options = plain_arguments("conditioning", args)
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    out = Path(options["out"])
    with one_line_errors("conditioning"):
        prepare_out("conditioning", out, options["overwrite"])
        from vitzoo.conditioning import conditioning, write_conditioning

        result = conditioning(named["generator"], options["targets"], options["per_target"], options["per_slot"],
                              options["guidance"], options["seed"], reference=options["reference"],
                              temperature=options["temperature"])  # fmt: skip
        write_conditioning(result, out)
        log_report_folder(LoggerConfig(kind=options["logger"]), {"generator": named["generator"], **options},
                          named["generator"], out, "conditioning")  # fmt: skip
    print((out / "report.md").read_text())


def summary_command(args: list[str]) -> None:
    named, options = plain_arguments("summary", args)
    with one_line_errors("summary"):
        from vitzoo.zoo_builder.summary import spread_tables
        from vitzoo.zoo_builder.zoo import Zoo

        zoo = Zoo.open(named["zoo"])
        print(zoo.summary())
        print()
        print(spread_tables(zoo, options["metric"]))


def prepare_command(args: list[str]) -> None:
    named, options = plain_arguments("prepare", args)
    with one_line_errors("prepare"):
        if named["dataset"] != "imagenet":
            raise ConfigError(f"prepare knows imagenet only (the others fit in memory), not {named['dataset']!r}")
        if options["data_root"] is None:
            raise ConfigError("prepare needs data_root=<path> holding imagenet/train/<wnid>/ and imagenet/val/<wnid>/")
        out = Path(options["out"] or Path(options["data_root"]) / "imagenet_prepared")
        prepare_out("prepare", out, options["overwrite"])
        from vitzoo.zoo_builder.prepared import prepare_imagenet  # torch and Pillow: after the cheap checks

        folder = prepare_imagenet(options["data_root"], str(out), options["size"], options["workers"])
    print(f"imagenet prepared in {folder}; builds read it from <data_root>/imagenet_prepared")


if __name__ == "__main__":
    main()
