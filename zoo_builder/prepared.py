"""The prepared ImageNet cache: JPEGs decoded once into uint8 shards, read memory-mapped by every build after.

`vitzoo prepare imagenet data_root=<root>` decodes `<root>/imagenet/{train,val}` exactly as `ImageFiles` does on the
CPU (short side to 8/7 of the size, centre crop) and writes, into `<root>/imagenet_prepared` (or `out`):

    prepared.json                      size, shard length and image count of each official split
    {split}-labels.npy                 [N] int64, the ImageFolder labels
    {split}-files.txt                  the source files, relative to <root>/imagenet/{split}, one a line
    {split}-00000.npy, -00001.npy ...  [<=SHARD_IMAGES, size, size, 3] uint8 (a .npy numpy reads with mmap_mode="r")

At 224 a shard of 8,192 images is 1.2 GB and ImageNet's train split about 190 GB: more than the JPEGs, in exchange
for no decoding at all (a batch is a copy of rows). A shard is written under a temporary name and renamed when
whole, so an interrupted prepare resumes where it stopped. Builds read `<data_root>/imagenet_prepared` when present.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from vitzoo.zoo_builder.data import DATASETS, DatasetError, ImageFiles, StoredImages, imagenet_files

FORMAT = 1
SHARD_IMAGES = 8192
OFFICIAL_SPLITS = ("train", "val")


class PreparedImages(StoredImages):
    """One official split of a prepared cache (see module docstring), indexed like `ImageFiles`.

    `rows` are this split's rows of the cache (a subset after `select`); `pixels` copies them out of the
    memory-mapped shards, so reading costs a copy, not a decode."""

    def __init__(self, shards: list[np.ndarray], rows: np.ndarray, labels: torch.Tensor, size: int,
                 mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str = "cpu"):  # fmt: skip
        super().__init__(size, mean, std, device)
        self.shards = shards  # each [shard_images (the last: fewer), size, size, 3] uint8, memory-mapped
        self.shard_images = len(shards[0]) if shards else SHARD_IMAGES
        self.rows = rows  # [N] int64, rows of the whole split
        self.labels = labels  # [N] int64

    @classmethod
    def open(cls, folder: Path, official: str, mean: tuple[float, ...], std: tuple[float, ...]) -> PreparedImages:
        manifest = read_manifest(folder)
        count = manifest["splits"][official]
        names = shard_names(official, count)
        missing = [name for name in names if not (folder / name).exists()]
        if missing:
            raise DatasetError(f"{folder} is an unfinished imagenet cache ({missing[0]} is missing): rerun "
                               f"vitzoo prepare imagenet, or remove the folder to read the JPEGs")  # fmt: skip
        shards = [np.load(folder / name, mmap_mode="r") for name in names]
        labels = torch.from_numpy(np.load(folder / f"{official}-labels.npy"))
        return cls(shards, np.arange(count), labels, manifest["size"], mean, std)

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, index: torch.Tensor | slice) -> PreparedImages:
        index = index if isinstance(index, slice) else index.numpy()
        return PreparedImages(self.shards, self.rows[index], self.labels[index], self.size, self.mean, self.std,
                              self.device)  # fmt: skip

    def to(self, device: torch.device | str) -> PreparedImages:
        return PreparedImages(self.shards, self.rows, self.labels, self.size, self.mean, self.std, device)

    def pixels(self, rows: list[int]) -> torch.Tensor:
        wanted = self.rows[np.asarray(rows, dtype=np.int64)]  # [n] rows of the whole split
        pixels = torch.empty((len(rows), self.size, self.size, 3), dtype=torch.uint8,
                             pin_memory=self.device.type == "cuda")  # fmt: skip
        out = pixels.numpy()
        shard_of, offset = wanted // self.shard_images, wanted % self.shard_images
        for shard in np.unique(shard_of):
            slots = np.flatnonzero(shard_of == shard)
            out[slots] = self.shards[shard][offset[slots]]  # one fancy-indexed read per shard
        return pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # [n, 3, size, size]


def shard_names(official: str, count: int) -> list[str]:
    return [f"{official}-{i:05d}.npy" for i in range((count + SHARD_IMAGES - 1) // SHARD_IMAGES)]


def read_manifest(folder: Path) -> dict:
    path = folder / "prepared.json"
    if not path.exists():
        raise DatasetError(f"{folder} holds no prepared.json: not an imagenet cache of vitzoo prepare")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("shard_images") != SHARD_IMAGES:
        raise DatasetError(f"{path}: cache format {manifest.get('format')}, this vitzoo reads {FORMAT}; rerun prepare")
    return manifest


def prepare_imagenet(data_root: str, out: str | None = None, size: int | None = None, workers: int | None = None,
                     progress: bool = True) -> Path:  # fmt: skip
    """Decode `<data_root>/imagenet/{train,val}` into the shards of the module docstring; returns the folder.

    `size` defaults to ImageNet's 224 (the same pixels as decoding the JPEGs); a smaller cache holds smaller
    images, which builds resize to the model's input as they do CIFAR's. Shards already whole in `out` are kept
    (a rerun resumes), provided `out` was prepared from the same files at the same size."""
    from tqdm import tqdm

    root = Path(data_root)
    folder = Path(out) if out else root / "imagenet_prepared"
    meta = DATASETS["imagenet"]
    size = size or meta.image_size
    files = {official: imagenet_files(root, official) for official in OFFICIAL_SPLITS}
    manifest = {"format": FORMAT, "size": size, "shard_images": SHARD_IMAGES,
                "splits": {official: len(paths) for official, (paths, _) in files.items()}}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "prepared.json").exists():
        if read_manifest(folder) != manifest:
            raise DatasetError(f"{folder} holds a cache of other files or another size ({read_manifest(folder)}); "
                               "overwrite=true replaces it")  # fmt: skip
    elif any(folder.iterdir()):
        raise DatasetError(f"{folder} holds files but no prepared.json: not a cache to resume; choose another out")
    (folder / "prepared.json").write_text(json.dumps(manifest, indent=1) + "\n")  # first: what a rerun checks
    for official, (paths, labels) in files.items():
        relative = [str(Path(p).relative_to(root / "imagenet" / official)) for p in paths]
        listing = "\n".join(relative) + "\n"
        if (folder / f"{official}-files.txt").exists() and (folder / f"{official}-files.txt").read_text() != listing:
            raise DatasetError(f"{folder}/{official}-files.txt lists other files; overwrite=true replaces the cache")
        (folder / f"{official}-files.txt").write_text(listing)
        np.save(folder / f"{official}-labels.npy", labels.numpy())
    for official, (paths, _) in files.items():
        decoder = ImageFiles(paths, size, meta.mean, meta.std, workers=workers)
        names = shard_names(official, len(paths))
        bar = tqdm(total=len(paths), desc=f"prepare {official}", unit="img", disable=not progress)
        for number, name in enumerate(names):
            rows = list(range(number * SHARD_IMAGES, min(len(paths), (number + 1) * SHARD_IMAGES)))
            if not (folder / name).exists():
                partial = folder / f".{name}.partial"
                shard = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8,
                                                  shape=(len(rows), size, size, 3))  # fmt: skip
                for start in range(0, len(rows), 512):  # [512, size, size, 3] at a time: memory stays small
                    chunk = rows[start : start + 512]
                    shard[start : start + len(chunk)] = decoder.pixels(chunk).permute(0, 2, 3, 1).numpy()
                shard.flush()
                del shard
                os.replace(partial, folder / name)
            bar.update(len(rows))
        bar.close()
    return folder
