"""Building zoos: the format, the entry API, resumption after kill -9, shards, divergence, verification."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, tiny_blueprint
from safetensors.torch import load_file

from vitzoo.zoo_builder import Zoo, ZooError
from vitzoo.zoo_builder.blueprint import blueprint_from_config, expand
from vitzoo.zoo_builder.build import BuildSettings, SavePolicy, build
from vitzoo.zoo_builder.data import load_split
from vitzoo.zoo_builder.zoo import verify


def test_tiny_zoo_has_every_run_with_lineage_and_policy(tiny_zoo):
    records = tiny_zoo.records
    assert len(records) == 2 + 2 * 2
    parents = {mid for mid, r in records.items() if r["stage"] == "pretrain"}
    for record in records.values():
        assert record["status"] == "done"
        assert [h["epoch"] for h in record["history"]] == list(range(record["factors"]["epochs"] + 1))
        assert {"train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"} <= set(record["history"][-1])
        if record["stage"] == "finetune":
            assert record["parent_id"] in parents
            assert [c["epoch"] for c in record["checkpoints"]] == [2, 3]  # keep_last=2
        else:
            assert record["parent_id"] is None
            assert [c["epoch"] for c in record["checkpoints"]] == [0, 1, 2]  # keep_init + every epoch
    assert len(tiny_zoo) == 2 * 3 + 4 * 2
    assert tiny_zoo.dataset == "digits"
    assert not list(tiny_zoo.root.rglob(".tmp-*")), "no temp file may remain"
    assert not list((tiny_zoo.root / "_state").glob("*.safetensors")), "resume states are removed when done"


def test_index_lists_every_checkpoint_with_sha256(tiny_zoo):
    rows = [json.loads(line) for line in (tiny_zoo.root / "index.jsonl").read_text().splitlines()]
    assert len(rows) == len(tiny_zoo)
    for row in rows:
        assert (tiny_zoo.root / row["path"]).exists()
        assert len(row["sha256"]) == 64
        assert {"model_id", "stage", "parent_id", "epoch", "factors", "test_acc", "val_acc"} <= set(row)


def test_entry_model_reproduces_indexed_test_accuracy(tiny_zoo):
    images, labels = load_split(tiny_zoo.dataset, "test")
    for entry in tiny_zoo.filter(stage="finetune", epoch="last"):
        model = entry.model()
        assert not model.training
        with torch.no_grad():
            accuracy = (model(images).argmax(-1) == labels).float().mean().item()
        assert abs(accuracy - entry.metrics["test_acc"]) <= 1 / len(labels) + 1e-9, entry.model_id


def test_checkpoints_are_safetensors_with_timm_keys(tiny_zoo):
    entry = tiny_zoo.filter(stage="finetune", head="mlp", epoch="last")[0]
    weights = load_file(entry.path)
    assert {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "head.0.weight",
        "head.2.weight",
    } <= set(weights)
    assert set(weights) == set(entry.model().state_dict())


def test_finetune_starts_from_parent_body_with_fresh_head(tmp_path):
    out = tmp_path / "zoo"
    build(
        tiny_blueprint(),
        BuildSettings(
            out=out, device="cpu", progress=False, save_pretrain=SavePolicy(), save_finetune=SavePolicy(keep_init=True)
        ),
    )
    zoo = Zoo.open(out)
    child = zoo.filter(stage="finetune", head="linear", epoch=0)[0]
    parent = zoo.filter(model_id=child.parent_id, epoch="last")[0]
    child_weights, parent_weights = child.state_dict(), parent.state_dict()
    for key, value in parent_weights.items():
        if not key.startswith("head"):
            assert torch.equal(child_weights[key], value), key
    assert not torch.equal(child_weights["head.weight"], parent_weights["head.weight"])


def test_filter_by_factors_stage_epoch(tiny_zoo):
    assert len(tiny_zoo.filter(stage="pretrain")) == 6
    assert len(tiny_zoo.filter(stage="finetune", head="mlp", epoch="last")) == 2
    assert len(tiny_zoo.filter(seed=[0, 1], stage="pretrain", epoch=2)) == 2
    with pytest.raises(KeyError, match="unknown factor"):
        tiny_zoo.filter(colour="red")


def test_rebuild_is_a_no_op(tiny_zoo):
    before = {p: p.stat().st_mtime_ns for p in tiny_zoo.root.rglob("*.safetensors")}
    started = time.perf_counter()
    build(
        tiny_blueprint(),
        BuildSettings(
            out=tiny_zoo.root,
            device="cpu",
            progress=False,
            save_pretrain=SavePolicy(keep_init=True),
            save_finetune=SavePolicy(keep_last=2),
        ),
    )
    assert time.perf_counter() - started < 10
    assert {p: p.stat().st_mtime_ns for p in tiny_zoo.root.rglob("*.safetensors")} == before


def test_diverging_model_is_recorded_and_population_continues(tmp_path):
    blueprint = tiny_blueprint(pretrain={"optimizer": "sgd"})
    blueprint["pretrain"]["grid"] = [{"lr": [1e-2, 1e12]}]
    blueprint["finetune"] = None
    build(
        blueprint,
        BuildSettings(out=tmp_path / "zoo", device="cpu", progress=False, save_pretrain=SavePolicy(keep_init=True)),
    )
    records = {r["factors"]["lr"]: r for r in Zoo.open(tmp_path / "zoo").records.values()}
    assert records[1e-2]["status"] == "done"
    assert records[1e12]["status"] == "diverged"
    assert records[1e12]["diverged_epoch"] == 1
    assert [c["epoch"] for c in records[1e12]["checkpoints"]] == [0]


def test_children_of_a_diverged_parent_are_skipped(tmp_path):
    blueprint = tiny_blueprint(pretrain={"optimizer": "sgd", "lr": 1e12})
    blueprint["pretrain"]["grid"] = [{"seed": [0]}]
    build(blueprint, BuildSettings(out=tmp_path / "zoo", device="cpu", progress=False))
    children = [r for r in Zoo.open(tmp_path / "zoo").records.values() if r["stage"] == "finetune"]
    assert len(children) == 2 and all(r["status"] == "skipped" and "diverged" in r["reason"] for r in children)


def test_verify_and_open_report_corrupted_and_truncated_checkpoints(tmp_path, tiny_zoo):
    import shutil

    zoo_dir = tmp_path / "copy"
    shutil.copytree(tiny_zoo.root, zoo_dir)
    zoo = Zoo.open(zoo_dir)
    truncated, flipped = zoo[0].path, zoo[1].path
    truncated.write_bytes(truncated.read_bytes()[:100])
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0xFF
    flipped.write_bytes(bytes(data))
    problems = verify(zoo_dir)
    assert len(problems) == 2
    assert any(str(truncated) in p for p in problems) and any(str(flipped) in p for p in problems)
    with pytest.raises(ZooError, match=str(truncated)):
        Zoo.open(zoo_dir)[0].state_dict()


def test_blueprint_rejects_unknown_factor_and_bad_values():
    blueprint = tiny_blueprint()
    blueprint["pretrain"]["grid"] = [{"colour": ["red"]}]
    with pytest.raises(ValueError, match="colour"):
        blueprint_from_config(blueprint)
    with pytest.raises(ValueError, match="optimizer"):
        blueprint_from_config(tiny_blueprint(pretrain={"optimizer": "lamb"}))


def test_model_ids_are_stable_and_unique():
    runs = expand(blueprint_from_config(tiny_blueprint()))
    again = expand(blueprint_from_config(tiny_blueprint()))
    assert [r.model_id for r in runs] == [r.model_id for r in again]
    assert len({r.model_id for r in runs}) == len(runs)


# ------------------------------------------------------------------------------- processes: kill, shards


def _write_blueprint_preset(tmp_path, epochs: int = 3):
    """The tiny blueprint as a Hydra override file (the CLI reads presets from configs/zoo)."""
    blueprint = tiny_blueprint(
        pretrain={"epochs": epochs, "train_subset": 512}, finetune={"epochs": epochs, "train_subset": 512}
    )
    path = tmp_path / "blueprint.json"
    path.write_text(json.dumps(blueprint))
    return path


BUILD_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from vitzoo.zoo_builder.build import BuildSettings, SavePolicy, build
blueprint = json.load(open(sys.argv[1]))
build(blueprint, BuildSettings(out=sys.argv[2], shard=sys.argv[3], device="cpu", progress=False,
      save_pretrain=SavePolicy(keep_init=True), save_finetune=SavePolicy()))
"""


def _builder(blueprint_path, out, shard="0/1"):
    return subprocess.Popen(
        [sys.executable, "-c", BUILD_SCRIPT, str(blueprint_path), str(out), shard],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stderr=subprocess.PIPE,
    )


def _checksums(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.safetensors") if "_state" not in p.parts}


def test_kill_9_then_rerun_finishes_without_retraining(tmp_path):
    blueprint_path = _write_blueprint_preset(tmp_path)
    reference = tmp_path / "reference"
    assert _builder(blueprint_path, reference).wait(timeout=300) == 0

    out = tmp_path / "killed"
    process = _builder(blueprint_path, out)
    deadline = time.time() + 120
    # kill in the middle of the fine-tuning stage, after at least one fine-tuning epoch landed
    while time.time() < deadline and not list(out.glob("checkpoints/ft-*/epoch_0001.safetensors")):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # finished: the checkpoints the records list (a file written just before the kill but not yet recorded is
    # written again, with the same bytes)
    listed = [out / c["path"] for p in out.glob("runs/*.json") for c in json.loads(p.read_text())["checkpoints"]]
    finished_before = {p: p.stat().st_mtime_ns for p in listed}
    assert finished_before, "the builder was killed before writing anything"
    assert not (out / "index.jsonl").exists()
    with pytest.raises(ZooError, match="unfinished zoo.*runs not finished.*no index.jsonl"):
        Zoo.open(out)  # a killed build is visibly incomplete, to evaluate and every other reader
    assert any("unfinished zoo" in problem for problem in verify(out))

    assert _builder(blueprint_path, out).wait(timeout=300) == 0
    for path, mtime in finished_before.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten"
    assert _checksums(out) == _checksums(reference), "a resumed build must equal an uninterrupted one bit for bit"
    assert not verify(out)
    assert all(r["status"] == "done" for r in Zoo.open(out).records.values())


def test_two_shards_into_one_directory_give_one_consistent_zoo(tmp_path):
    blueprint_path = _write_blueprint_preset(tmp_path, epochs=2)
    out = tmp_path / "sharded"
    workers = [_builder(blueprint_path, out, f"{i}/2") for i in range(2)]
    assert [w.wait(timeout=300) for w in workers] == [0, 0]
    zoo = Zoo.open(out)
    expected = {r.model_id for r in expand(blueprint_from_config(json.loads(blueprint_path.read_text())))}
    assert set(zoo.records) == expected
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert len(rows) == len(zoo) and {r["model_id"] for r in rows} == expected
    assert not verify(out)
    reference = tmp_path / "unsharded"
    assert _builder(blueprint_path, reference).wait(timeout=300) == 0
    assert _checksums(out) == _checksums(reference), "shards give the unsharded zoo byte for byte (on the CPU)"


@pytest.mark.parametrize("objective", ["supervised", "contrastive"])
def test_a_model_trains_the_same_alone_or_in_any_population(objective):
    """What makes shards equal the unsharded build: a population of 1, 2 or 3 gives model 0 the same bits."""
    from vitzoo.zoo_builder.build import initial_state
    from vitzoo.zoo_builder.population import PopulationTrainer

    blueprint = blueprint_from_config(tiny_blueprint(pretrain={"objective": objective, "train_subset": 128}))
    blueprint.pretrain.grid = [{"seed": [0, 1, 2]}]
    runs = [run for run in expand(blueprint) if run.stage == "pretrain"]
    architecture = blueprint.model_architecture
    weights = []
    for m in (1, 2, 3):
        states = [initial_state(run, architecture, None) for run in runs[:m]]
        trainer = PopulationTrainer([run.factors for run in runs[:m]], states, architecture, torch.device("cpu"))
        trainer.train_epoch(1)
        assert len(trainer.evaluate("val").values["val_acc"]) == m
        weights.append(trainer.state_dicts()[0])
    for other in weights[1:]:
        assert all(torch.equal(weights[0][k], other[k]) for k in weights[0])


def test_save_policy_keeps_last_epochs_and_more_for_chosen_seeds():
    policy = SavePolicy(keep_last=2, keep_init=True, extra_seeds=(42,), extra_keep_last=3)
    assert [e for e in range(11) if policy.keeps(e, 10, seed=7)] == [0, 9, 10]
    assert [e for e in range(11) if policy.keeps(e, 10, seed=42)] == [0, 8, 9, 10]
    assert [e for e in range(4) if SavePolicy().keeps(e, 3, seed=0)] == [1, 2, 3]


def test_resume_keeps_a_diverged_member_in_its_population(tmp_path, monkeypatch):
    import vitzoo.zoo_builder.build as build_module

    blueprint = tiny_blueprint(pretrain={"optimizer": "sgd", "epochs": 3})
    blueprint["pretrain"]["grid"] = [{"lr": [1e-2, 1e12]}]
    blueprint["finetune"] = None
    settings = BuildSettings(out=tmp_path / "zoo", device="cpu", progress=False)
    write_epoch = build_module._write_epoch

    def crash_after_epoch_two(*args):
        write_epoch(*args)
        if args[5] == 2:  # the epoch argument
            raise KeyboardInterrupt  # stands in for kill -9 after epoch 2 landed

    monkeypatch.setattr(build_module, "_write_epoch", crash_after_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        build(blueprint, settings)
    monkeypatch.setattr(build_module, "_write_epoch", write_epoch)
    build(blueprint, settings)
    records = {r["factors"]["lr"]: r for r in Zoo.open(tmp_path / "zoo").records.values()}
    assert records[1e12]["status"] == "diverged"
    assert records[1e-2]["status"] == "done" and [h["epoch"] for h in records[1e-2]["history"]] == [0, 1, 2, 3]
