"""A zoo is complete or visibly incomplete, reads stay inside it and within their sizes, files get the umask's mode,
and a resumed build continues the same training or refuses."""

import errno
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_blueprint
from safetensors.torch import load_file

import vitzoo.zoo_builder.build as build_module
from vitzoo.zoo_builder import Zoo, ZooError
from vitzoo.zoo_builder.build import BuildSettings, build
from vitzoo.zoo_builder.models import Architecture, build_vit
from vitzoo.zoo_builder.zoo import ZooWriter, atomic_write_bytes, verify, write_sampled


@pytest.fixture
def zoo_copy(tmp_path, tiny_zoo):
    """A copy of the tiny zoo to tamper with."""
    shutil.copytree(tiny_zoo.root, tmp_path / "zoo")
    return tmp_path / "zoo"


def _edit_record(zoo_dir, model_id, edit):
    path = zoo_dir / "runs" / f"{model_id}.json"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


def _samples(n: int):
    architecture = Architecture("vit_small_patch16_224", tiny_blueprint()["architecture"]["kwargs"])
    head = {"head": "linear", "head_hidden": 8, "num_classes": 10}
    model = build_vit(architecture, 10, "linear", 8)
    return architecture, [(model.state_dict(), {"method": "test", "i": i}, head) for i in range(n)]


# ------------------------------------------------------------------------------- 6: complete or visibly incomplete


def test_a_failed_sampling_leaves_no_population_behind(tmp_path, monkeypatch):
    architecture, samples = _samples(5)
    write_checkpoint = ZooWriter.write_checkpoint
    written = []

    def disk_full_at_the_third(self, record, epoch, state_dict):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(record["model_id"])
        write_checkpoint(self, record, epoch, state_dict)

    monkeypatch.setattr(ZooWriter, "write_checkpoint", disk_full_at_the_third)
    out = tmp_path / "samples"
    with pytest.raises(OSError, match="No space"):
        write_sampled(out, architecture, "digits", samples)
    assert written == ["sample-00000", "sample-00001"]
    assert not out.exists(), "a failed sampling must not leave part of a population at out"
    assert os.listdir(tmp_path) == [], "nor a temporary folder beside it"
    with pytest.raises(ZooError, match="not a zoo"):
        Zoo.open(out)

    monkeypatch.setattr(ZooWriter, "write_checkpoint", write_checkpoint)
    zoo = write_sampled(out, architecture, "digits", samples)  # a rerun after the error writes the whole population
    assert len(zoo.records) == 5 and not verify(out)


KILLED_SAMPLING = """
import os, sys, torch
from vitzoo.zoo_builder.models import Architecture, build_vit
from vitzoo.zoo_builder.zoo import ZooWriter, write_sampled
architecture = Architecture("vit_small_patch16_224", {kwargs!r})
state = build_vit(architecture, 10, "linear", 8).state_dict()
head = {{"head": "linear", "head_hidden": 8, "num_classes": 10}}
write_record = ZooWriter.write_record
def killed_after_two(self, record):
    write_record(self, record)
    if record["model_id"] == "sample-00001":
        os._exit(9)  # no cleanup runs: what kill -9 leaves
ZooWriter.write_record = killed_after_two
write_sampled(sys.argv[1], architecture, "digits", [(state, {{}}, head)] * 5)
"""


def test_a_killed_sampling_is_visibly_incomplete(tmp_path):
    out = tmp_path / "samples"
    (out / "logs").mkdir(parents=True)  # the command's own run folder, made before it samples
    script = KILLED_SAMPLING.format(kwargs=tiny_blueprint()["architecture"]["kwargs"])
    process = subprocess.run(
        [sys.executable, "-c", script, str(out)], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert process.returncode == 9
    assert os.listdir(out) == ["logs"], "out holds nothing of the killed population"
    (leftover,) = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-samples.")]
    assert len(list(leftover.glob("runs/*.json"))) == 2
    with pytest.raises(ZooError, match=f"not a zoo.*{leftover.name}.*interrupted"):
        Zoo.open(out)
    assert any("not a zoo" in problem for problem in verify(out))


def test_sampling_into_a_folder_with_logs_keeps_the_logs(tmp_path):
    architecture, samples = _samples(3)
    out = tmp_path / "samples"
    (out / "logs" / "run1").mkdir(parents=True)
    (out / "logs" / "run1" / "sample.log").write_text("started\n")
    zoo = write_sampled(out, architecture, "digits", samples)
    assert len(zoo.records) == 3 and not verify(out)
    assert (out / "logs" / "run1" / "sample.log").read_text() == "started\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples"]


def test_records_without_index_and_unfinished_runs_are_refused(zoo_copy):
    (zoo_copy / "index.jsonl").unlink()
    with pytest.raises(ZooError, match="no index.jsonl"):
        Zoo.open(zoo_copy)
    assert any("no index.jsonl" in problem for problem in verify(zoo_copy))
    assert len(Zoo.open(zoo_copy, allow_unfinished=True).records) == 6  # what the builder itself reads

    ZooWriter(zoo_copy, {}).write_index()
    model_id = sorted(Zoo.open(zoo_copy).records)[0]
    _edit_record(zoo_copy, model_id, lambda r: r.update(status="training"))
    with pytest.raises(ZooError, match=f"1 of 6 runs not finished \\({model_id}\\)"):
        Zoo.open(zoo_copy)


def test_unindexed_and_missing_checkpoints_are_refused(zoo_copy):
    rows = (zoo_copy / "index.jsonl").read_text().splitlines()
    (zoo_copy / "index.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    last = json.loads(rows[-1])
    with pytest.raises(ZooError, match=f"does not list 1 checkpoint.*{last['model_id']} epoch {last['epoch']}"):
        Zoo.open(zoo_copy)

    (zoo_copy / "index.jsonl").write_text("\n".join(rows) + "\n")
    (zoo_copy / last["path"]).unlink()
    with pytest.raises(ZooError, match=f"1 checkpoint file\\(s\\) missing \\({last['model_id']} epoch"):
        Zoo.open(zoo_copy)


def test_verify_reports_index_rows_without_a_run_record(zoo_copy):
    victim = sorted(Zoo.open(zoo_copy).records)[0]
    (zoo_copy / "runs" / f"{victim}.json").unlink()
    shutil.rmtree(zoo_copy / "checkpoints" / victim)
    problems = verify(zoo_copy)
    assert len(problems) == 1 and "of no run record" in problems[0] and victim in problems[0]


# ------------------------------------------------------------------------------------- 10: reads stay inside


def _outside_copy(zoo_dir, tmp_path):
    """The first checkpoint moved outside the zoo (same bytes, so the same sha256)."""
    entry = Zoo.open(zoo_dir)[0]
    outside = tmp_path / "outside.safetensors"
    shutil.move(entry.path, outside)
    return entry, outside


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_checkpoint_paths_leading_outside_the_zoo_are_refused(zoo_copy, tmp_path, how):
    entry, outside = _outside_copy(zoo_copy, tmp_path)
    if how == "absolute":
        _edit_record(zoo_copy, entry.model_id, lambda r: r["checkpoints"][0].update(path=str(outside)))
    elif how == "dotdot":
        _edit_record(
            zoo_copy, entry.model_id, lambda r: r["checkpoints"][0].update(path="checkpoints/../../outside.safetensors")
        )
    else:
        entry.path.symlink_to(outside)
    with pytest.raises(ZooError, match=f"run record {entry.model_id}, epoch {entry.epoch}.*outside the zoo"):
        Zoo.open(zoo_copy)
    problems = verify(zoo_copy)
    assert len(problems) == 1 and "outside the zoo" in problems[0] and entry.model_id in problems[0]


def test_a_symlink_inside_the_zoo_to_a_file_inside_is_read(zoo_copy):
    entry = Zoo.open(zoo_copy)[0]
    moved = zoo_copy / "checkpoints" / "elsewhere.safetensors"
    shutil.move(entry.path, moved)
    entry.path.symlink_to(moved)
    assert verify(zoo_copy) == [f"checkpoint not listed in any run record: {moved}"]  # read through the link
    assert torch.equal(Zoo.open(zoo_copy)[0].state_dict()["cls_token"], load_file(moved)["cls_token"])


def test_a_checkpoint_read_after_open_is_confined_again(zoo_copy):
    zoo = Zoo.open(zoo_copy)
    entry = zoo[0]
    entry.path.unlink()
    entry.path.symlink_to("/dev/zero")  # swapped in after the zoo was opened
    with pytest.raises(ZooError, match=f"run record {entry.model_id}.*outside the zoo"):
        entry.state_dict()


@pytest.mark.timeout(60)
def test_a_fifo_in_the_zoo_is_refused_without_blocking(zoo_copy):
    entry = Zoo.open(zoo_copy)[0]
    entry.path.unlink()
    os.mkfifo(entry.path)
    with pytest.raises(ZooError, match=f"run record {entry.model_id}.*not a regular file"):
        Zoo.open(zoo_copy)[0].state_dict()


def test_a_checkpoint_larger_than_recorded_is_refused_before_reading(zoo_copy):
    entry = Zoo.open(zoo_copy)[0]
    assert entry.size == entry.path.stat().st_size  # sizes are recorded at write time
    with open(entry.path, "r+b") as handle:
        handle.truncate(1 << 30)  # sparse: 1 GiB that is never read
    with pytest.raises(
        ZooError, match=f"run record {entry.model_id}.*corrupted.*{1 << 30} bytes, {entry.size} recorded"
    ):
        entry.state_dict()


def test_a_zoo_without_recorded_sizes_reads_within_the_file_size(zoo_copy):
    """Zoos written before sizes were recorded (the bundled one) still open and verify."""
    for record_path in (zoo_copy / "runs").glob("*.json"):
        record = json.loads(record_path.read_text())
        for checkpoint in record["checkpoints"]:
            del checkpoint["size"]
        record_path.write_text(json.dumps(record))
    zoo = Zoo.open(zoo_copy)
    assert all(entry.size is None for entry in zoo) and not verify(zoo_copy)


def test_a_run_record_symlinked_outside_is_refused(zoo_copy, tmp_path):
    record_path = sorted((zoo_copy / "runs").glob("*.json"))[0]
    shutil.move(record_path, tmp_path / "record.json")
    record_path.symlink_to(tmp_path / "record.json")
    with pytest.raises(ZooError, match=f"run record {record_path.name}.*outside the zoo"):
        Zoo.open(zoo_copy)


# ----------------------------------------------------------------------------------------- 11: file modes


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_and_folders_get_the_umask_mode(tmp_path, umask):
    architecture, samples = _samples(2)
    previous = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "file.bin", b"data")
        write_sampled(tmp_path / "samples", architecture, "digits", samples)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "file.bin").stat().st_mode) == 0o666 & ~umask
    for path in (tmp_path / "samples").rglob("*"):
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    assert stat.S_IMODE((tmp_path / "samples").stat().st_mode) == 0o777 & ~umask


# -------------------------------------------------------------------------- 8 and 9: what a resumed build reads


def test_a_build_refuses_to_fine_tune_from_a_corrupted_parent(zoo_copy):
    zoo = Zoo.open(zoo_copy)
    parent = zoo.filter(stage="pretrain", epoch="last")[0]
    children = [m for m, r in zoo.records.items() if r["parent_id"] == parent.model_id]
    for child in children:  # as if the build had been killed before fine-tuning them
        (zoo_copy / "runs" / f"{child}.json").unlink()
        shutil.rmtree(zoo_copy / "checkpoints" / child)
    data = bytearray(parent.path.read_bytes())
    data[-1] ^= 0x01  # a flipped bit in the weights: the file still parses
    parent.path.write_bytes(bytes(data))
    settings = BuildSettings(out=zoo_copy, device="cpu", progress=False)
    with pytest.raises(ZooError, match=f"run record {parent.model_id}, epoch {parent.epoch}.*corrupted"):
        build(tiny_blueprint(), settings)
    assert not any((zoo_copy / "runs" / f"{child}.json").exists() for child in children)


@pytest.fixture(scope="module")
def interrupted_build(tmp_path_factory):
    """An unsharded build of two parents killed after their first epoch (resume state and checkpoints on disk)."""
    blueprint = tiny_blueprint()
    blueprint["finetune"] = None
    out = tmp_path_factory.mktemp("interrupted") / "zoo"
    write_epoch = build_module._write_epoch

    def crash_after_epoch_one(*args):
        write_epoch(*args)
        if args[5] == 1:  # the epoch argument
            raise KeyboardInterrupt  # stands in for kill -9 after epoch 1 landed

    build_module._write_epoch = crash_after_epoch_one
    try:
        with pytest.raises(KeyboardInterrupt):
            build(blueprint, BuildSettings(out=out, device="cpu", progress=False))
    finally:
        build_module._write_epoch = write_epoch
    return blueprint, out


@pytest.mark.parametrize("change", [{"shard": "0/2"}, {"population_size": 1}, {"mode": "loop"}])
def test_resuming_another_training_is_refused(interrupted_build, tmp_path, change):
    blueprint, source = interrupted_build
    out = tmp_path / "zoo"
    shutil.copytree(source, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (state,) = (out / "_state").glob("*.safetensors")
    settings = BuildSettings(out=out, device="cpu", progress=False, **change)
    with pytest.raises(
        ZooError, match=f"interrupted build with shard=0/1, population_size=64, mode=vmap.*{state.name}"
    ):
        build(blueprint, settings)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".lock"} == {
        p: data for p, data in before.items() if p.suffix != ".lock"
    }, "a refused resume changes nothing"

    build(blueprint, BuildSettings(out=out, device="cpu", progress=False))  # the same arguments finish it
    zoo = Zoo.open(out)
    assert all(r["status"] == "done" for r in zoo.records.values()) and not verify(out)
    assert not list((out / "_state").glob("*.safetensors"))
