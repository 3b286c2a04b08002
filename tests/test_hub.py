"""Zoos on the Hugging Face Hub, opened offline through a hand-built Hub cache (the layout huggingface_hub writes:
`models--<owner>--<name>/{refs,snapshots/<commit>,blobs}`, the snapshot's files symlinks into blobs/)."""

import hashlib
import os
from pathlib import Path

import huggingface_hub
import pytest
import torch

from vitzoo.zoo_builder.zoo import HUB_PREFIX, Zoo, ZooError, hub_reference, verify

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO_ID = "someone/tiny-zoo"


def cache_file(repo_folder: Path, relpath: str, data: bytes) -> None:
    """One file of the snapshot, as huggingface_hub caches it: a blob named by its hash and a relative symlink."""
    blob = repo_folder / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo_folder / "snapshots" / COMMIT / relpath
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))


@pytest.fixture
def hub(tmp_path, tiny_zoo, monkeypatch):
    """An offline Hub cache holding the tiny zoo's metadata; its checkpoints lie on a stand-in Hub (a dict) and
    reach the cache only through `hf_hub_download`, which records what it was asked for."""
    cache = tmp_path / "hub-cache"
    repo_folder = cache / f"models--{REPO_ID.replace('/', '--')}"
    remote = {p.relative_to(tiny_zoo.root).as_posix(): p.read_bytes() for p in tiny_zoo.root.rglob("*") if p.is_file()}
    for relpath, data in remote.items():
        if not relpath.startswith("checkpoints/"):
            cache_file(repo_folder, relpath, data)
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text(COMMIT)
    downloads = []

    def hf_hub_download(repo_id, filename, revision, cache_dir):
        assert (repo_id, revision, Path(cache_dir)) == (REPO_ID, COMMIT, cache)
        if filename not in remote:
            raise huggingface_hub.errors.EntryNotFoundError(f"{filename} is not in {repo_id}")
        downloads.append(filename)
        cache_file(repo_folder, filename, remote[filename])
        return str(repo_folder / "snapshots" / COMMIT / filename)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return {"repo_folder": repo_folder, "remote": remote, "downloads": downloads}


def test_a_hub_zoo_opens_offline_from_the_cache_and_fetches_only_the_checkpoints_it_reads(hub, tiny_zoo):
    for name in (REPO_ID, f"{HUB_PREFIX}{REPO_ID}", f"{HUB_PREFIX}{REPO_ID}@{COMMIT}"):
        zoo = Zoo.open(name)
        assert [e.model_id for e in zoo] == [e.model_id for e in tiny_zoo]
        assert zoo.location == f"{HUB_PREFIX}{REPO_ID}@{COMMIT}"  # what a generator records: repo and revision
    assert hub["downloads"] == []  # opening reads metadata only

    entry = Zoo.open(zoo.location).filter(stage="finetune", epoch="last")[0]
    local = tiny_zoo.filter(model_id=entry.model_id, epoch=entry.epoch)[0]
    for key, tensor in local.state_dict().items():
        assert torch.equal(entry.state_dict()[key], tensor)
    assert hub["downloads"] == [local.checkpoint["path"]]  # that one checkpoint, once

    from vitzoo.generative.family import FamilyBasis

    assert FamilyBasis(Zoo.open(REPO_ID)).zoo_root == zoo.location  # recorded in generator checkpoints
    assert verify(REPO_ID) == []  # verifying fetches and checks every checkpoint
    assert sorted(hub["downloads"]) == sorted(e.checkpoint["path"] for e in tiny_zoo)


def test_a_hub_checkpoint_is_checked_like_a_local_one(hub, tiny_zoo):
    entry = Zoo.open(REPO_ID)[0]
    hub["remote"][entry.checkpoint["path"]] = b"not the recorded weights"
    with pytest.raises(ZooError, match="holds 24 bytes|sha256 mismatch"):
        entry.state_dict()
    missing = Zoo.open(REPO_ID)[1]
    del hub["remote"][missing.checkpoint["path"]]
    with pytest.raises(ZooError, match=f"cannot fetch {missing.checkpoint['path']} of {HUB_PREFIX}{REPO_ID}@"):
        missing.state_dict()


def test_a_snapshot_link_out_of_the_repository_cache_is_refused(hub, tmp_path):
    entry = Zoo.open(REPO_ID)[0]
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(hub["remote"][entry.checkpoint["path"]])
    entry.path.parent.mkdir(parents=True, exist_ok=True)
    entry.path.symlink_to(outside)
    with pytest.raises(ZooError, match="leads outside the zoo"):
        entry.state_dict()


def test_an_uncached_repository_offline_is_a_one_line_error(hub):
    with pytest.raises(ZooError, match=r"not a zoo: someone/other-zoo is no local folder, and the Hub gives"):
        Zoo.open("someone/other-zoo")
    with pytest.raises(ZooError, match="not a Hub repository id"):
        Zoo.open("hf://no-owner")


def test_a_local_folder_wins_over_a_repository_of_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_reference("runs/zoo") == ("runs/zoo", None)
    (tmp_path / "runs" / "zoo").mkdir(parents=True)
    assert hub_reference("runs/zoo") is None
    assert hub_reference("/abs/zoo") is None and hub_reference("bundled") is None
    assert hub_reference("hf://runs/zoo@v1") == ("runs/zoo", "v1")
