"""`vitzoo` end to end: builds, sweeps with a local Hydra launcher, and one-line errors on bad input."""

import json
from pathlib import Path

import pytest
import torch
from conftest import offline_run_bytes, run_cli

from vitzoo.errors import ConfigError
from vitzoo.zoo_builder import Zoo
from vitzoo.zoo_builder.zoo import verify

FAST = [
    "threads=1",
    "progress=false",
    "zoo.pretrain.factors.train_subset=128",
    "zoo.finetune.factors.train_subset=128",
    "zoo.pretrain.factors.epochs=1",
    "zoo.finetune.factors.epochs=1",
]


def test_help_lists_commands():
    result = run_cli("--help")
    assert "build" in result.stdout and "import" in result.stdout and "verify" in result.stdout


def test_build_prints_summary_and_writes_resolved_config(tmp_path):
    out = tmp_path / "zoo"
    result = run_cli("build", "zoo=digits_tiny", f"out={out}", *FAST)
    assert "10 models" in result.stdout
    configs = list(out.glob("logs/*/resolved_config.yaml"))
    assert len(configs) == 1 and "digits_tiny" in configs[0].read_text()
    assert run_cli("verify", str(out)).returncode == 0


def test_multirun_sweep_with_local_joblib_launcher_fills_one_zoo(tmp_path):
    out = tmp_path / "swept"
    run_cli(
        "build",
        "zoo=digits_tiny",
        f"out={out}",
        *FAST,
        "zoo.finetune=null",
        "--multirun",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "zoo.pretrain.factors.lr=1e-3,3e-3",
    )
    zoo = Zoo.open(out)
    assert sorted(r["factors"]["lr"] for r in zoo.records.values()) == [1e-3, 1e-3, 3e-3, 3e-3]
    assert all(r["status"] == "done" for r in zoo.records.values())
    assert not verify(out)
    assert len(zoo.meta["blueprints"]) == 2  # each sweep point is its own blueprint, recorded in zoo.json


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["zoo=no_such_preset"], "no_such_preset"),
        (["no_such_key=1"], "no_such_key"),
        (["zoo.pretrain.factors.colour=red"], "colour"),
        (["zoo.pretrain.factors.lr=fast"], "lr"),
        (["zoo.pretrain.factors.optimizer=lamb"], "optimizer"),
        (["zoo=fmnist_blueprint", "data_root=/nonexistent"], "dataset-fashion-mnist"),
        (["shard=3/2"], "shard"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, overrides, message):
    result = run_cli("build", f"out={tmp_path / 'zoo'}", *overrides, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitzoo build: error:"), result.stderr
    assert message in lines[0]


def test_output_with_another_architecture_is_refused_and_untouched(tmp_path):
    out = tmp_path / "zoo"
    run_cli("build", "zoo=digits_tiny", f"out={out}", *FAST, "zoo.finetune=null")
    before = (out / "zoo.json").read_text()
    result = run_cli(
        "build", "zoo=digits_tiny", f"out={out}", *FAST, "zoo.architecture.kwargs.embed_dim=32", check=False
    )
    assert result.returncode == 2 and "another architecture" in result.stderr
    assert (out / "zoo.json").read_text() == before


def test_output_that_is_not_a_zoo_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run_cli("build", "zoo=digits_tiny", f"out={tmp_path}", *FAST, check=False)
    assert result.returncode == 2 and "holds no zoo" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_verify_exits_nonzero_on_a_corrupted_zoo(tmp_path):
    out = tmp_path / "zoo"
    run_cli("build", "zoo=digits_tiny", f"out={out}", *FAST, "zoo.finetune=null")
    victim = next(out.rglob("*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:-8])
    result = run_cli("verify", str(out), check=False)
    assert result.returncode == 1 and str(victim) in result.stdout


def test_paper_blueprint_preset_instantiates_and_takes_one_population_step():
    """vit_s16_imagenet_cifar100 cannot train here; build its ViT-S/16 and take one vmap step on random data."""
    from hydra import compose, initialize_config_dir

    from vitzoo.cli import CONFIG_DIR
    from vitzoo.zoo_builder.blueprint import blueprint_from_config, expand
    from vitzoo.zoo_builder.build import initial_state
    from vitzoo.zoo_builder.config import register_schemas
    from vitzoo.zoo_builder.optim import PopulationOptimizer

    register_schemas()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="build", overrides=["zoo=vit_s16_imagenet_cifar100"])
    blueprint = blueprint_from_config(cfg.zoo)
    runs = expand(blueprint)
    assert len(runs) == 10 + 10 * 24
    assert sum(r.factors.objective == "contrastive" for r in runs if r.stage == "pretrain") == 3
    run = runs[0]
    assert (run.factors.dataset, run.factors.epochs, run.factors.batch_size) == ("imagenet", 90, 256)
    state = initial_state(run, blueprint.model_architecture, None)
    assert state["patch_embed.proj.weight"].shape == (384, 3, 16, 16) and len(state) == 152
    assert sum(v.numel() for v in state.values()) == 22_050_664  # timm's ViT-S/16 with a 1000-class head

    from torch.func import functional_call, grad_and_value, vmap

    from vitzoo.zoo_builder.models import build_vit

    model = build_vit(blueprint.model_architecture, 1000)
    for module in model.modules():  # as PopulationTrainer does: vmap has no rule for the fused attention kernel
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    params = {k: v[None].clone() for k, v in state.items()}  # a population of one
    images, labels = torch.randn(1, 2, 3, 224, 224), torch.randint(0, 1000, (1, 2))

    def loss(p, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    grads, value = vmap(grad_and_value(loss))(params, images, labels)
    optimizer = PopulationOptimizer("adamw", torch.tensor([1e-3]), torch.tensor([1e-4]))
    optimizer.step(params, grads, torch.tensor([True]))
    assert torch.isfinite(value).all()
    assert not torch.equal(params["head.weight"][0], state["head.weight"])


def test_zoo_json_describes_architecture_dataset_and_code(tmp_path):
    out = tmp_path / "zoo"
    run_cli("build", "zoo=digits_tiny", f"out={out}", *FAST, "zoo.finetune=null")
    meta = json.loads((out / "zoo.json").read_text())
    assert meta["architecture"]["model_name"] == "vit_small_patch16_224"
    assert meta["dataset"] == "digits" and meta["format_version"] == 1 and meta["created_by"].startswith("vitzoo")


def test_build_help_lists_every_option_with_default_and_description():
    text = run_cli("build", "--help").stdout
    assert "usage: vitzoo build [key=value ...]" in text
    assert "zoo=digits_tiny" in text and "fmnist_blueprint" in text  # the group, its default and its presets
    line = next(line for line in text.splitlines() if "population_size=" in line)
    assert "population_size=64" in line and "most models stacked" in line
    assert "save.pretrain=" in text and "hydra" not in [line.split("=")[0].strip() for line in text.splitlines()]


@pytest.mark.parametrize("command", ["evaluate", "analyze", "soup", "train", "sample", "demo", "generalisation"])
def test_every_hydra_command_documents_each_option(command):
    """Every key of configs/<command>.yaml is in its --help, with a description."""
    from vitzoo.cli import COMMANDS, CONFIG_DIR
    from vitzoo.options import _options, hydra_help

    text = hydra_help(command, COMMANDS[command], Path(CONFIG_DIR))
    options = _options((Path(CONFIG_DIR) / f"{command}.yaml").read_text().splitlines())
    assert options and all(f"{key}={value}" in text for key, value, _ in options)
    assert [key for key, _, description in options if not description] == []


def test_plain_commands_take_key_value_options_and_show_them(tmp_path):
    from vitzoo.options import Option, Positional, parse

    text = run_cli("probe", "--help").stdout
    assert "usage: vitzoo probe <autoencoder> [key=value ...]" in text and "out=runs/probe" in text
    assert "overwrite=false" in text and "threads=null" in text
    for command in ("verify", "import", "export", "conditioning", "summary"):
        assert f"usage: vitzoo {command}" in run_cli(command, "--help").stdout
    refused = run_cli("probe", "x.safetensors", "--out", "y", check=False)
    assert refused.returncode == 2 and "options are key=value" in refused.stderr
    refused = run_cli("export", "bundled", "outt=y", check=False)
    assert refused.returncode == 2 and "unknown option outt=" in refused.stderr
    positionals = [Positional("zoo", "z"), Positional("ids", "i", "*")]
    options = {"n": Option(3, "n", int), "flag": Option(False, "f", bool), "targets": Option(None, "t", list)}
    named, values = parse("x", ["z", "a", "b", "n=5", "targets=[0.5,0.7]"], positionals, options)
    assert named == {"zoo": "z", "ids": ["a", "b"]} and values == {"n": 5, "flag": False, "targets": [0.5, 0.7]}
    with pytest.raises(ConfigError, match="expected int"):
        parse("x", ["z", "n=many"], positionals, options)
    with pytest.raises(ConfigError, match="missing <zoo>"):
        parse("x", [], positionals, options)


def test_summary_is_a_subcommand():
    text = run_cli("summary", "bundled").stdout
    assert "250 models, 650 checkpoints" in text and "| parent | objective | seed | test_acc | val_acc |" in text
    assert run_cli("summary", "bundled", "metric=val_acc").stdout.count("val_acc") > text.count("val_acc")


def test_a_build_logs_one_wandb_run_per_model_with_its_factors(tmp_path):
    import wandb
    from conftest import tiny_blueprint

    from vitzoo.zoo_builder import Zoo
    from vitzoo.zoo_builder.build import BuildSettings, build
    from vitzoo.zoo_builder.logger import LoggerConfig, make_logger

    blueprint = tiny_blueprint(pretrain={"epochs": 1, "train_subset": 64}, finetune={"epochs": 1, "train_subset": 64})
    out = tmp_path / "zoo"
    logger = make_logger(LoggerConfig(kind="wandb", mode="offline"), {"zoo": blueprint}, "test_tiny", tmp_path)
    try:
        build(blueprint, BuildSettings(out=out, device="cpu", progress=False), logger)
    finally:
        logger.finish()
    wandb.teardown()  # waits until the service wrote every run's file
    logged = [path.read_bytes() for path in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")]
    zoo = Zoo.open(out)
    assert len(logged) == 1 + len(zoo.records)  # the build's run and one per model
    for model_id, record in zoo.records.items():
        # its own run: its id and stage (a fine-tune's run names its parent's id too, but not the stage "pretrain")
        (run,) = [data for data in logged if model_id.encode() in data and record["stage"].encode() in data]
        assert b"val_acc" in run and b"epoch" in run
        assert b"head" in run and b"optimizer" in run and b"seed" in run  # its factors: the run's config
    (build_run,) = [data for data in logged if b"zoo/index" in data]
    assert b"build/epoch_seconds" in build_run
    (index,) = (tmp_path / "wandb").glob("offline-run-*/files/media/table/zoo/index_*.table.json")
    columns = json.loads(index.read_text())["columns"]
    assert {"model_id", "factors.seed", "factors.lr", "val_acc"} <= set(columns)  # factors as columns


def test_wandb_logger_logs_report_tables_and_plots(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitzoo.zoo_builder.logger import LoggerConfig, make_logger

    plt.plot([0, 1], [0, 1])
    plt.savefig(tmp_path / "accuracy.png")
    plt.close()
    logger = make_logger(LoggerConfig(kind="wandb", mode="offline"), {}, "samples", tmp_path, job_type="evaluate")
    try:
        rows = [{"population": "zoo", "mean_acc": 0.79, "finetune_mean_acc": [0.79, 0.85]}]
        logger.log_report({"summary_table": rows}, {"accuracy_plot": tmp_path / "accuracy.png"})
    finally:
        logger.finish()
    logged = offline_run_bytes(tmp_path)
    assert b"summary_table" in logged and b"accuracy_plot" in logged


def test_wandb_logger_records_zoos_as_reference_artifacts(tmp_path):
    from vitzoo.zoo_builder.logger import LoggerConfig, make_logger
    from vitzoo.zoo_builder.zoo import BUNDLED

    logger = make_logger(LoggerConfig(kind="wandb", mode="offline"), {}, "bundled", tmp_path, job_type="evaluate")
    try:
        logger.log_artifact(BUNDLED, "zoo")
    finally:
        logger.finish()
    logged = offline_run_bytes(tmp_path)
    assert b"zoo-bundled" in logged and BUNDLED.as_uri().encode() in logged  # a reference: where it lies


def test_reports_of_analyze_soup_and_generalisation_go_to_wandb(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from omegaconf import OmegaConf

    from vitzoo.cli import log_outputs, validate_overrides
    from vitzoo.zoo_builder.config import register_schemas

    register_schemas()
    plt.plot([0, 1], [0, 1])
    plt.savefig(tmp_path / "gains.png")
    plt.close()
    (tmp_path / "results.json").write_text(json.dumps({"zoo": "bundled", "soups": [{"parent": "p", "gain": 0.01}]}))
    for command in ("analyze", "soup", "generalisation"):
        [cfg] = validate_overrides(command, ["path=bundled", "logger=wandb", f"out={tmp_path}"])
        assert OmegaConf.to_object(cfg.logger).kind == "wandb"
    log_outputs(cfg, tmp_path, "soup")  # the tables found in results.json, every figure in out
    logged = offline_run_bytes(tmp_path)
    assert b"soups" in logged and b"gains" in logged


def one_line(result, command: str) -> str:
    lines = result.stderr.strip().splitlines()
    prefix = f"vitzoo {command}: error:" if command else "vitzoo: error:"
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(prefix), result
    return lines[0]


def test_bad_inputs_of_every_kind_are_one_line_and_leave_nothing_behind(tmp_path):
    assert one_line(run_cli("no_such_command", check=False), "").startswith("vitzoo: error: unknown command")
    line = one_line(run_cli("sample", "bundled", "n=abc", f"out={tmp_path / 's'}", check=False), "sample")
    assert "n:" in line and "Integer" in line
    missing = tmp_path / "zoös" / "tiny(1)"  # parentheses and non-ASCII letters reach the command verbatim
    line = one_line(run_cli("evaluate", str(missing), f"out={tmp_path / 'e'}", check=False), "evaluate")
    assert str(missing) in line
    assert not (tmp_path / "e").exists()  # no logs/ left by a failed run
    (tmp_path / "file").write_text("mine")
    for out, message in [(tmp_path / "file", "is a file"), (tmp_path / "file" / "x", "lies under the file"),
                         (tmp_path / ("a" * 300), "longer than")]:  # fmt: skip
        assert message in one_line(run_cli("soup", "bundled", f"out={out}", check=False), "soup")
    assert (tmp_path / "file").read_text() == "mine"


def test_an_existing_output_is_refused_before_any_work_unless_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("an earlier report")
    for command in ("evaluate", "analyze", "soup", "sample"):
        line = one_line(run_cli(command, "bundled", f"out={out}", "n=1" if command == "sample" else "threads=1",
                                check=False), command)  # fmt: skip
        assert "already holds report.md" in line and "overwrite=true" in line
    assert (out / "report.md").read_text() == "an earlier report" and sorted(p.name for p in out.iterdir()) == [
        "report.md"
    ]
    line = one_line(run_cli("sample", "bundled", "n=1", f"out={out}", "overwrite=true", check=False), "sample")
    assert "no vitzoo sample output" in line  # overwrite replaces only what the same command wrote
    result = run_cli("soup", "bundled", "parent=nobody", f"out={out}", "overwrite=true", check=False)
    assert "nobody" in one_line(result, "soup")  # replaced: the earlier report is gone, the new run failed on input
    assert not (out / "report.md").exists()


def test_verify_exits_2_on_a_zoo_it_cannot_open(tmp_path):
    import shutil

    bundled = Zoo.open("bundled").root
    shutil.copy(bundled / "zoo.json", tmp_path / "zoo.json")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "ft-x.json").write_text("{not json")
    assert "ft-x.json" in one_line(run_cli("verify", str(tmp_path), check=False), "verify")


def test_a_full_disk_is_one_line_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    import errno

    from vitzoo import cli
    from vitzoo.eval import soups

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "report.md"))

    monkeypatch.setattr(soups, "write_soups", full_disk)
    with pytest.raises(SystemExit) as exited:
        cli.main(["soup", "bundled", f"out={tmp_path / 'out'}"])
    assert exited.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == f"vitzoo soup: error: No space left on device: {tmp_path / 'out' / 'report.md'}"
    )
    assert not (tmp_path / "out").exists()

    def bug(*args, **kwargs):
        raise ValueError("a bug in our code")

    monkeypatch.setattr(soups, "write_soups", bug)
    with pytest.raises(BaseException) as crashed:  # Hydra prints the traceback and exits 1; no one-line error
        cli.main(["soup", "bundled", f"out={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert "error: a bug in our code" not in err and "ValueError" in err + repr(crashed.value)
    assert not isinstance(crashed.value, SystemExit) or crashed.value.code != 2
