"""The zoo format: a directory of safetensors checkpoints, run records and an index.

```
zoo.json                                  format version, architecture, datasets, blueprints, code and library
                                          versions
runs/<model_id>.json                      one record per model: stage, parent, factors, head, status,
                                          per-epoch metrics, its checkpoints (path, sha256)
checkpoints/<model_id>/epoch_<NNNN>.safetensors   weights, timm key names, fp32
index.jsonl                               one row per checkpoint (derived from the records)
```

Every file is written atomically (temp file in the same folder, fsync, rename), so a reader never sees
a half-written file, and a build killed at any point resumes cleanly. Files get the mode the umask
gives (as `open` does), not mkstemp's 0600. Several builders may write disjoint runs into one zoo:
records are per model, and `zoo.json`/`index.jsonl` are rewritten under a file lock. Run records are
the source of truth; `Zoo.open` reads them, not the index. Every writer writes the index last, so a
zoo is finished when every run is finished (`done`, `diverged`, `skipped`) and the index lists every
checkpoint of the records: `Zoo.open` refuses anything less (a build in progress, a killed write).

A zoo may come from a stranger: every path it names must resolve inside it (symlinks followed), every
file read must be a regular file, and no read goes beyond the size recorded for it (or, for zoos
written before sizes were recorded, beyond the file's size when opened); checkpoints are checked
against their sha256. Anything else is refused with a ZooError naming the record.

A zoo may also live in a Hugging Face Hub model repository (`Zoo.open("owner/name")` or `"hf://owner/name@revision"`):
its metadata (zoo.json, index.jsonl, run records) is fetched through `huggingface_hub` into its cache, honouring
`HF_HUB_CACHE` and `HF_HUB_OFFLINE`, and each checkpoint on its first read, so a selection never downloads the whole
repository. In the cache a snapshot's files are symlinks into the repository's `blobs/`: reads are confined to that
repository's cache folder instead of the snapshot.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from vitzoo.errors import VitzooError
from vitzoo.zoo_builder.models import Architecture, build_vit

FORMAT_VERSION = 1
STAGES = ("pretrain", "finetune", "sampled")
FINISHED = ("done", "diverged", "skipped")  # run statuses of a finished run; "training" is the only other one
BUNDLED = Path(__file__).resolve().parent / "bundled"
HUB_PREFIX = "hf://"
HUB_METADATA = ["zoo.json", "index.jsonl", "runs/*.json", "*.md"]  # what opening a Hub zoo fetches; checkpoints: lazily
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?$")


class ZooError(VitzooError):
    """A zoo that is missing, corrupted or incompatible with what was asked."""


# ----------------------------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}.{secrets.token_hex(8)}"
    # mode 0666 lets the kernel apply the umask (and default ACLs) as it does for open(); mkstemp forces 0600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive advisory lock on `path` (created if needed), for read-modify-write of shared files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def finite_or_none(value: float) -> float | None:
    """A metric as stored in records: NaN and inf become null (JSON has no NaN)."""
    return value if math.isfinite(value) else None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_state_dict(state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    return save_safetensors(tensors, metadata=metadata)


# ----------------------------------------------------------------------------------------- the Hub


@dataclass(frozen=True)
class HubSnapshot:
    """A zoo's snapshot in the Hugging Face cache: `<cache>/models--<owner>--<name>/snapshots/<commit>/`."""

    repo_id: str
    commit: str
    cache_dir: Path

    @property
    def repo_folder(self) -> Path:
        """The repository's cache folder: the snapshot's symlinks point into its `blobs/`."""
        return self.cache_dir / ("models--" + self.repo_id.replace("/", "--"))

    @property
    def location(self) -> str:
        return f"{HUB_PREFIX}{self.repo_id}@{self.commit}"

    def fetch(self, relpath: str, what: str) -> None:
        """One file of the snapshot into the cache, unless it is there (in offline mode: only from the cache)."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            hf_hub_download(self.repo_id, relpath, revision=self.commit, cache_dir=self.cache_dir)
        except (OSError, ValueError, EntryNotFoundError) as error:  # not on the Hub, offline and not cached, …
            raise ZooError(f"{what}: cannot fetch {relpath} of {self.location}: {error}") from None


def hub_snapshot(root: Path) -> HubSnapshot | None:
    """The Hub snapshot `root` is, when it is a snapshot folder of the Hugging Face cache; else None."""
    repo_folder = root.parent.parent
    if root.parent.name != "snapshots" or not repo_folder.name.startswith("models--"):
        return None
    repo_id = repo_folder.name.removeprefix("models--").replace("--", "/", 1)  # the Hub forbids "--" in names
    return HubSnapshot(repo_id, root.name, repo_folder.parent)


def hub_reference(path: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `path` names a Hub repository: `hf://owner/name[@revision]`, or a bare
    `owner/name[@revision]` that is not a local path; else None."""
    text = str(path)
    explicit = text.startswith(HUB_PREFIX)
    text = text.removeprefix(HUB_PREFIX)
    if not explicit and (os.path.lexists(text) or not _REPO_ID.match(text)):
        return None
    if not _REPO_ID.match(text):
        raise ZooError(f"{path!r} is not a Hub repository id (expected hf://owner/name or hf://owner/name@revision)")
    repo_id, _, revision = text.partition("@")
    return repo_id, revision or None


def open_hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The local snapshot folder of a Hub zoo with its metadata fetched (checkpoints come on first read)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_METADATA))
    except (OSError, ValueError) as error:  # no such repo or revision, offline and not cached, no connection
        at = f"@{revision}" if revision else ""
        raise ZooError(f"not a zoo: {repo_id}{at} is no local folder, and the Hub gives: {error}") from None


# --------------------------------------------------------------------------------------------- reading


def boundary_of(root: Path) -> Path:
    """The folder every read of the zoo at `root` must stay in: the zoo itself, or for a Hub snapshot its
    repository's cache folder (the snapshot's files are symlinks into the repository's blobs/)."""
    snapshot = hub_snapshot(root)
    return (snapshot.repo_folder if snapshot else root).resolve()


def confined(root: Path, relpath, what: str) -> Path:
    """`root / relpath`, refused unless `relpath` is a relative path that stays inside the zoo once every
    symlink is resolved (an absolute path, `..` or a symlink out of the zoo is refused, naming `what`)."""
    if not isinstance(relpath, str) or not relpath:
        raise ZooError(f"{what}: path {relpath!r} is not a relative path inside the zoo")
    path = root / relpath
    if not path.resolve().is_relative_to(boundary_of(root)):
        raise ZooError(f"{what}: path {relpath!r} leads outside the zoo {root} (to {path.resolve()}); refused")
    return path


def read_bounded(root: Path, path: Path, size: int | None, what: str) -> bytes:
    """The bytes of a file inside the zoo `root`: a regular file (a FIFO or device is refused without blocking on it)
    that holds exactly `size` bytes when a size is recorded, and is never read beyond its size when opened."""
    resolved = path.resolve()  # checked again here: the tree may have changed since the zoo was opened
    if not resolved.is_relative_to(boundary_of(root)):
        raise ZooError(f"{what}: {path} leads outside the zoo {root} (to {resolved}); refused")
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ZooError(f"{what}: file missing: {path}") from None
    except OSError as error:
        raise ZooError(f"{what}: cannot read {path}: {error.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ZooError(f"{what}: {path} is not a regular file; refused")
        if size is not None and info.st_size != size:
            raise ZooError(f"{what}: corrupted: {path} holds {info.st_size} bytes, {size} recorded")
        limit = info.st_size if size is None else size
        data = handle.read(limit + 1)
    if len(data) != limit:
        raise ZooError(f"{what}: {path} changed size while it was read")
    return data


def read_checkpoint(root: Path, model_id: str, checkpoint: dict) -> dict[str, torch.Tensor]:
    """The weights of one checkpoint of a run record (`{"epoch", "path", "sha256", "size"}`; zoos written before
    sizes were recorded have no "size"): confined to the zoo, bounded in size and checked against the sha256.
    Every read of a zoo checkpoint goes through here; a Hub zoo's checkpoint is fetched on its first read."""
    what = f"run record {model_id}, epoch {checkpoint['epoch']}"
    path = confined(root, checkpoint["path"], what)
    snapshot = hub_snapshot(root)
    if snapshot and not os.path.lexists(path):
        snapshot.fetch(checkpoint["path"], what)
    data = read_bounded(root, path, checkpoint.get("size"), what)
    if sha256_bytes(data) != checkpoint["sha256"]:
        raise ZooError(f"{what}: checkpoint corrupted (sha256 mismatch): {path}")
    try:
        return load_safetensors(data)
    except SafetensorError as error:
        raise ZooError(f"{what}: checkpoint unreadable: {path}: {error}") from error


def read_json(root: Path, relpath: str, what: str):
    """A JSON file of the zoo (zoo.json, a run record), confined and bounded like a checkpoint."""
    path = confined(root, relpath, what)
    try:
        return json.loads(read_bounded(root, path, None, what))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ZooError(f"{what}: unreadable JSON in {path}: {error}") from error


@dataclass
class ZooEntry:
    """One checkpoint of one model."""

    model_id: str
    epoch: int
    stage: str
    parent_id: str | None
    factors: dict
    metrics: dict
    head: dict  # {"head": "linear"|"mlp", "head_hidden": int, "num_classes": int}
    path: Path
    sha256: str
    architecture: Architecture = field(repr=False)
    root: Path = field(repr=False)
    size: int | None = None  # bytes; None in zoos written before sizes were recorded

    @property
    def checkpoint(self) -> dict:
        """The checkpoint as its run record lists it."""
        listed = {"epoch": self.epoch, "path": self.path.relative_to(self.root).as_posix(), "sha256": self.sha256}
        return listed if self.size is None else {**listed, "size": self.size}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights, checked (a missing, corrupted, oversized or outside file raises ZooError naming it)."""
        return read_checkpoint(self.root, self.model_id, self.checkpoint)

    def model(self) -> torch.nn.Module:
        """A timm ViT with this checkpoint loaded, in eval mode."""
        model = build_vit(self.architecture, self.head["num_classes"], self.head["head"], self.head["head_hidden"])
        model.load_state_dict(self.state_dict(), strict=True)
        return model.eval()


class Zoo:
    """A population of checkpoints on disk. Iterate for entries; `filter` narrows them."""

    def __init__(self, root: Path, meta: dict, records: dict[str, dict], entries: list[ZooEntry]):
        self.root = root
        self.meta = meta
        self.records = records
        self.entries = entries

    @classmethod
    def open(cls, path: str | os.PathLike, allow_unfinished: bool = False) -> Zoo:
        """Open a zoo directory; `"bundled"` opens the zoo shipped with vitzoo; a Hugging Face Hub repository id
        (`owner/name`, `hf://owner/name@revision`) opens a zoo on the Hub through its cache.

        A zoo whose writing did not finish (runs still training, no index, records the index does not list,
        checkpoint files missing) raises ZooError saying what is missing, unless `allow_unfinished` (a build
        in progress, read by its own builders)."""
        hub = hub_reference(path) if str(path) != "bundled" else None
        root = BUNDLED if str(path) == "bundled" else open_hub_snapshot(*hub) if hub else Path(path)
        meta_path = root / "zoo.json"
        if not meta_path.exists():
            hint = " (the bundled zoo is not built in this checkout)" if root == BUNDLED else _interrupted_hint(root)
            raise ZooError(f"not a zoo: {meta_path} does not exist{hint}")
        meta = read_json(root, "zoo.json", "zoo.json")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ZooError(f"{meta_path}: format version {meta.get('format_version')} != {FORMAT_VERSION}")
        architecture = Architecture(**meta["architecture"])
        records, entries = {}, []
        for record_path in sorted((root / "runs").glob("*.json")):
            what = f"run record {record_path.name}"
            record = read_json(root, f"runs/{record_path.name}", what)
            try:
                if record["model_id"] != record_path.stem:
                    raise ZooError(f"{what} names another model, {record['model_id']!r}")
                entries += [entry_from_record(root, record, c, architecture) for c in record["checkpoints"]]
            except (KeyError, TypeError, AttributeError) as error:
                raise ZooError(f"{what}: missing or malformed field ({error!r})") from error
            records[record["model_id"]] = record
        entries.sort(key=lambda e: (STAGES.index(e.stage), e.parent_id or "", e.model_id, e.epoch))
        zoo = cls(root, meta, records, entries)
        if not allow_unfinished:
            unfinished = zoo.unfinished()
            if unfinished:
                raise ZooError(f"unfinished zoo {root}: " + "; ".join(unfinished))
        return zoo

    def unfinished(self) -> list[str]:
        """What shows that this zoo's writing did not finish (empty when it did): runs still training, no index,
        checkpoints of the records that the index does not list, checkpoint files missing. Every writer (build,
        import, sample) writes the index last, after every record is final."""
        problems = []
        training = sorted(m for m, r in self.records.items() if r["status"] not in FINISHED)
        if training:
            problems.append(
                f"{len(training)} of {len(self.records)} runs not finished ({_some(training)}): a build was "
                "interrupted or is still running (rerun it with the same arguments to finish)"
            )
        indexed = self.index_rows()
        if indexed is None:
            problems.append(f"no index.jsonl beside {len(self.records)} run records: its writing was interrupted")
        else:
            listed = {(row["model_id"], row["epoch"], row["sha256"]) for row in indexed}
            unlisted = [f"{e.model_id} epoch {e.epoch}" for e in self if (e.model_id, e.epoch, e.sha256) not in listed]
            if unlisted:
                problems.append(
                    f"index.jsonl does not list {len(unlisted)} checkpoint(s) of the run records ({_some(unlisted)}): "
                    "the zoo was written after its index, or its writing was interrupted"
                )
        fetched_on_read = hub_snapshot(self.root) is not None  # a Hub zoo's checkpoints are fetched when read
        missing = [f"{e.model_id} epoch {e.epoch}" for e in self if not (fetched_on_read or os.path.lexists(e.path))]
        if missing:
            problems.append(f"{len(missing)} checkpoint file(s) missing ({_some(missing)})")
        return problems

    def index_rows(self) -> list[dict] | None:
        """The rows of index.jsonl, or None when there is none."""
        if not os.path.lexists(self.root / "index.jsonl"):
            return None
        text = read_bounded(self.root, self.root / "index.jsonl", None, "index.jsonl")
        try:
            return [json.loads(line) for line in text.decode().splitlines()]
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ZooError(f"index.jsonl of {self.root} unreadable: {error}") from error

    @property
    def architecture(self) -> Architecture:
        return Architecture(**self.meta["architecture"])

    @property
    def location(self) -> str:
        """What `Zoo.open` takes to open this zoo again: "bundled", `hf://owner/name@commit` or its path."""
        snapshot = hub_snapshot(self.root)
        return "bundled" if self.root == BUNDLED else snapshot.location if snapshot else str(self.root)

    @property
    def dataset(self) -> str:
        """The dataset of the zoo's final models (the fine-tuning dataset when there is a fine-tuning stage)."""
        return self.meta["dataset"]

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[ZooEntry]:
        return iter(self.entries)

    def __getitem__(self, index: int) -> ZooEntry:
        return self.entries[index]

    def filter(
        self,
        stage: str | None = None,
        epoch: int | str | None = None,
        model_id: str | None = None,
        parent_id: str | None = None,
        status: str | None = None,
        **factors,
    ) -> Zoo:
        """A view with the entries that match. `epoch="last"` keeps each model's last checkpoint;
        factor values may be a single value or a list of accepted values."""
        selected = []
        for entry in self.entries:
            record = self.records[entry.model_id]
            if stage is not None and entry.stage != stage:
                continue
            if model_id is not None and entry.model_id != model_id:
                continue
            if parent_id is not None and entry.parent_id != parent_id:
                continue
            if status is not None and record["status"] != status:
                continue
            if isinstance(epoch, int) and entry.epoch != epoch:
                continue
            if epoch == "last" and entry.epoch != record["checkpoints"][-1]["epoch"]:
                continue
            if not all(_matches(entry.factors.get(name, _MISSING), wanted) for name, wanted in factors.items()):
                unknown = [name for name in factors if name not in entry.factors]
                if unknown:
                    raise KeyError(f"unknown factor(s) {unknown}; known: {sorted(entry.factors)}")
                continue
            selected.append(entry)
        return Zoo(self.root, self.meta, self.records, selected)

    select = filter

    def summary(self) -> str:
        """A few lines: models per stage and status, checkpoints, size, accuracy spread of the last epochs."""
        where = self.location
        names = ", ".join(dict.fromkeys(b["name"] for b in self.meta.get("blueprints", []))) or "no blueprint"
        lines = [f"zoo {where} ({names})"]
        total_bytes = sum(e.path.stat().st_size for e in self.entries if e.path.exists())
        lines.append(f"  {len(self.records)} models, {len(self.entries)} checkpoints, {total_bytes / 1e6:.1f} MB")
        for stage in STAGES:
            records = [r for r in self.records.values() if r["stage"] == stage]
            if not records:
                continue
            statuses = {}
            for r in records:
                statuses[r["status"]] = statuses.get(r["status"], 0) + 1
            last = [r["history"][-1] for r in records if r["history"]]
            accs = sorted(h["test_acc"] for h in last if h.get("test_acc") is not None)
            spread = ""
            if accs:
                spread = f"; final test_acc min {accs[0]:.3f} median {accs[len(accs) // 2]:.3f} max {accs[-1]:.3f}"
            counts = ", ".join(f"{n} {s}" for s, n in statuses.items())
            lines.append(f"  {stage}: {len(records)} models ({counts}){spread}")
        return "\n".join(lines)


_MISSING = object()


def _matches(value, wanted) -> bool:
    if isinstance(wanted, (list, tuple, set)) and not isinstance(value, (list, tuple)):
        return value in wanted
    return value == wanted


def _some(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def _interrupted_hint(root: Path) -> str:
    """Names the temporary folders an interrupted `write_sampled` into `root` left beside it."""
    leftovers = sorted(root.parent.glob(f".tmp-{root.name}.*")) if root.name else []
    if not leftovers:
        return ""
    return f" ({', '.join(map(str, leftovers))} is an interrupted write of it: remove it and write again)"


def entry_from_record(root: Path, record: dict, checkpoint: dict, architecture: Architecture) -> ZooEntry:
    what = f"run record {record['model_id']}, epoch {checkpoint['epoch']}"
    size = checkpoint.get("size")
    if size is not None and (not isinstance(size, int) or size < 0):
        raise ZooError(f"{what}: size {size!r} is not a byte count")
    epoch = checkpoint["epoch"]
    metrics = next((h for h in record["history"] if h["epoch"] == epoch), {})
    return ZooEntry(
        model_id=record["model_id"],
        epoch=epoch,
        stage=record["stage"],
        parent_id=record["parent_id"],
        factors=record["factors"],
        metrics={k: v for k, v in metrics.items() if k != "epoch"},
        head=record["head"],
        path=confined(root, checkpoint["path"], what),
        sha256=checkpoint["sha256"],
        architecture=architecture,
        root=root,
        size=size,
    )


# --------------------------------------------------------------------------------------------- writing


class ZooWriter:
    """Writes checkpoints and run records into a zoo directory, safely beside other writers."""

    def __init__(self, root: Path, meta: dict):
        self.root = root
        self.meta = meta

    @classmethod
    def create_or_open(
        cls,
        root: str | os.PathLike,
        architecture: Architecture,
        dataset: str,
        datasets: list[str],
        blueprint: dict | None,
    ) -> ZooWriter:
        """Create a zoo, or join an existing one with the same architecture (refusing anything else)."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise ZooError(f"output {root} exists and is not a directory")
        if root.exists() and any(root.iterdir()) and not (root / "zoo.json").exists():
            # another builder of this zoo may be writing zoo.json (under the lock) right now
            ours = ("logs", "zoo.lock")
            entries = [p.name for p in root.iterdir() if p.name not in ours and not p.name.startswith(".tmp-zoo.json.")]
            if entries:
                raise ZooError(f"output {root} is not empty and holds no zoo (found {entries[:3]}); not writing there")
        with locked(root / "zoo.lock"):
            meta_path = root / "zoo.json"
            if meta_path.exists():
                meta = read_json(root, "zoo.json", "zoo.json")
                if meta["architecture"] != architecture.to_dict():
                    raise ZooError(
                        f"{root} holds a zoo of another architecture ({meta['architecture']}) than asked "
                        f"({architecture.to_dict()}); choose another out=<dir>"
                    )
                if meta["dataset"] != dataset:
                    raise ZooError(f"{root} holds a zoo for dataset {meta['dataset']}, not {dataset}")
            else:
                meta = {
                    "format_version": FORMAT_VERSION,
                    "architecture": architecture.to_dict(),
                    "dataset": dataset,
                    "datasets": [],
                    "blueprints": [],
                    "created_by": code_version(),
                    "versions": library_versions(),
                }
            changed = not meta_path.exists()
            for name in datasets:
                if name not in meta["datasets"]:
                    meta["datasets"].append(name)
                    changed = True
            if blueprint is not None and blueprint not in meta["blueprints"]:
                meta["blueprints"].append(blueprint)
                changed = True
            if changed:
                atomic_write_json(meta_path, meta)
        return cls(root, meta)

    def record_path(self, model_id: str) -> Path:
        return self.root / "runs" / f"{model_id}.json"

    def read_record(self, model_id: str) -> dict | None:
        path = self.record_path(model_id)
        return read_json(self.root, f"runs/{path.name}", f"run record {model_id}") if path.exists() else None

    def write_record(self, record: dict) -> None:
        atomic_write_json(self.record_path(record["model_id"]), record)

    def checkpoint_relpath(self, model_id: str, epoch: int) -> str:
        return f"checkpoints/{model_id}/epoch_{epoch:04d}.safetensors"

    def write_checkpoint(self, record: dict, epoch: int, state_dict: dict[str, torch.Tensor]) -> None:
        """Write one checkpoint's weights and list it in the record (the record itself is written by the caller)."""
        relpath = self.checkpoint_relpath(record["model_id"], epoch)
        # one metadata key: safetensors stores metadata in a hash map, so several keys would come out in a
        # random order and the same weights would not give the same bytes (and sha256) in every process
        metadata = {
            "vitzoo": json.dumps(
                {
                    "model_id": record["model_id"],
                    "epoch": epoch,
                    "stage": record["stage"],
                    "architecture": self.meta["architecture"],
                    "head": record["head"],
                },
                sort_keys=True,
            )
        }
        data = encode_state_dict(state_dict, metadata)
        atomic_write_bytes(self.root / relpath, data)
        record["checkpoints"] = [c for c in record["checkpoints"] if c["epoch"] != epoch]
        record["checkpoints"].append({"epoch": epoch, "path": relpath, "sha256": sha256_bytes(data), "size": len(data)})
        record["checkpoints"].sort(key=lambda c: c["epoch"])

    def write_index(self) -> Path:
        """Rebuild `index.jsonl` (one row per checkpoint) from the run records, under the zoo lock."""
        with locked(self.root / "zoo.lock"):
            zoo = Zoo.open(self.root, allow_unfinished=True)  # other shards may still be training
            rows = []
            for entry in zoo:
                rows.append(
                    {
                        "model_id": entry.model_id,
                        "stage": entry.stage,
                        "parent_id": entry.parent_id,
                        "status": zoo.records[entry.model_id]["status"],
                        "factors": entry.factors,
                        **entry.metrics,
                        **entry.checkpoint,  # epoch, path, sha256, size
                    }
                )
            data = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()
            atomic_write_bytes(self.root / "index.jsonl", data)
        return self.root / "index.jsonl"


def verify(root: str | os.PathLike) -> list[str]:
    """Every problem found in a zoo: an unfinished write, index rows without a run record, missing, truncated,
    corrupted or oversized checkpoints, paths leading outside the zoo, unreadable records.
    Returns one line per problem (empty when the zoo is sound)."""
    try:
        zoo = Zoo.open(root, allow_unfinished=True)
        problems = [f"unfinished zoo: {problem}" for problem in zoo.unfinished()]
        rows = zoo.index_rows() or []
    except ZooError as error:
        return [str(error)]
    recorded = {(e.model_id, e.epoch) for e in zoo}
    orphans = [r for r in rows if (r.get("model_id"), r.get("epoch")) not in recorded]
    if orphans:
        names = [f"{r.get('model_id')} epoch {r.get('epoch')}" for r in orphans]
        problems.append(f"index.jsonl lists {len(orphans)} checkpoint(s) of no run record ({_some(names)})")
    on_hub = hub_snapshot(zoo.root) is not None  # a Hub zoo's checkpoints are fetched to be checked
    for entry in zoo:
        if not (on_hub or os.path.lexists(entry.path)):
            continue  # reported above
        try:
            entry.state_dict()
        except ZooError as error:
            problems.append(str(error))
    stray = [p for p in Path(zoo.root, "checkpoints").rglob("*.safetensors") if p not in {e.path for e in zoo}]
    problems += [f"checkpoint not listed in any run record: {p}" for p in stray]
    return problems


def code_version() -> str:
    """The vitzoo version and, when run from a git checkout, its commit."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = f"vitzoo {version('vitzoo')}"
    except PackageNotFoundError:
        text = "vitzoo (not installed)"
    head = Path(__file__).resolve().parent.parent / ".git" / "HEAD"
    with contextlib.suppress(OSError):
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref = (head.parent / ref[5:]).read_text().strip()
        text += f" @ {ref[:12]}"
    return text


LIBRARIES = ("torch", "timm", "diffusers")  # what the weights, the tokenizer's module types and the samplers depend on


def library_versions() -> dict[str, str | None]:
    """The installed versions of `LIBRARIES` (None for one not installed), as `"versions"` in every zoo.json, run
    record and generator or autoencoder checkpoint. Readers never require them: artefacts written before they were
    recorded have none."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def write_sampled(
    root: str | os.PathLike,
    architecture: Architecture,
    dataset: str,
    samples: list[tuple[dict[str, torch.Tensor], dict, dict]],
    parents: list[str | None] | None = None,
) -> Zoo:
    """A new zoo of stage `sampled`: model i (`sample-00000`, ...) gets one checkpoint (epoch 0) with the
    state dict, its `.factors` (the condition and how it was made: method, generator, ...) and its head
    ({"head", "head_hidden", "num_classes"}). Refuses a folder that holds a zoo or anything but `logs/`.

    The zoo is written into a temporary folder beside `root` (`.tmp-<name>.<random>`) and renamed into place
    when complete: `root` never holds part of a population. An error removes the temporary folder; a killed
    process leaves it, and `Zoo.open(root)` names it."""
    root = Path(root)
    if (root / "zoo.json").exists():
        raise ZooError(f"output {root} already holds a zoo; sampled zoos are written into a new folder only")
    if root.exists() and [p for p in root.iterdir() if p.name != "logs"]:  # logs: the command's own run folder
        raise ZooError(f"output {root} is not empty; sampled zoos are written into a new folder only")
    if not samples:
        raise ZooError("no samples to write")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".tmp-{root.name}.{secrets.token_hex(8)}"
    staging.mkdir()  # mode from the umask (mkdtemp would force 0700)
    try:
        _write_sampled_records(staging, architecture, dataset, samples, parents)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    others = [p.name for p in root.iterdir() if p.name != "logs"] if root.exists() else []
    if others:
        raise ZooError(f"output {root} was written to while sampling ({others[:3]}); the samples are in {staging}")
    if root.exists():
        for leftover in root.iterdir():  # the command's logs/ move into the new zoo, so root is empty
            os.rename(leftover, staging / leftover.name)
    os.replace(staging, root)  # rename(2) replaces an empty directory in one step
    return Zoo.open(root)


def _write_sampled_records(root: Path, architecture: Architecture, dataset: str, samples, parents) -> None:
    writer = ZooWriter.create_or_open(root, architecture, dataset, [dataset], blueprint=None)
    for i, (state_dict, factors, head) in enumerate(samples):
        record = {
            "model_id": f"sample-{i:05d}",
            "stage": "sampled",
            "parent_id": parents[i] if parents else None,
            "factors": factors,
            "head": head,
            "status": "done",
            "history": [],
            "checkpoints": [],
            "code_version": code_version(),
            "versions": library_versions(),
        }
        writer.write_checkpoint(record, 0, {k: v.float().contiguous() for k, v in state_dict.items()})
        writer.write_record(record)
    writer.write_index()
