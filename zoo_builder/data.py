"""Datasets, preprocessed exactly as the zoo's models expect.

Every dataset is returned as `(images [N, C, H, W] float32, labels [N] int64)`, normalised with fixed
per-dataset constants. The validation split is carved from the official training split with a fixed
seed, so `train`, `val` and `test` never overlap and selection never needs the test split.

Nothing is downloaded: `digits` ships inside scikit-learn; Fashion-MNIST is read from IDX files (the
Debian package `dataset-fashion-mnist` installs them under `/usr/share/datasets/fashion-mnist`);
CIFAR is read by torchvision from a root the user gives. ImageNet (150 GB of JPEGs) is never held in memory:
its splits are `StoredImages`, which read the images of each batch when indexed: `ImageFiles` decode JPEGs,
`PreparedImages` (zoo_builder/prepared.py) read the uint8 shards `vitzoo prepare imagenet` wrote, memory-mapped.
"""

from __future__ import annotations

import gzip
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vitzoo.errors import VitzooError

SPLITS = ("train", "val", "test")
VAL_SEED = 0  # fixed: the val split must be the same on every machine and in every run
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)


@dataclass(frozen=True)
class DatasetInfo:
    image_size: int
    channels: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool  # whether horizontal flips are label-preserving (not for digits)


DATASETS: dict[str, DatasetInfo] = {
    # digits: 8x8 images upsampled to 28x28 so a Fashion-MNIST parent can be fine-tuned on them.
    "digits": DatasetInfo(28, 1, 10, (0.3050,), (0.3246,), hflip=False),
    "fashion_mnist": DatasetInfo(28, 1, 10, (0.2860,), (0.3530,), hflip=True),
    "cifar10": DatasetInfo(224, 3, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), hflip=True),
    "cifar100": DatasetInfo(224, 3, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), hflip=True),
    "imagenet": DatasetInfo(224, 3, 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), hflip=True),
}


class DatasetError(VitzooError, ValueError):
    """A dataset that is unknown, missing from disk or asked for with a bad split."""


def info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def load_split(
    name: str, split: str, root: str | None = None, classes: tuple[int, ...] | list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of one split, preprocessed as the zoo's models expect.

    Args:
        name: dataset name (see `DATASETS`).
        split: "train", "val" (carved from the official train split with a fixed seed) or "test".
        root: where the dataset's files are; defaults per dataset (see module docstring).
        classes: optional class subset; labels are re-indexed to 0..len(classes)-1 in the given order.

    Returns:
        images [N, C, H, W] float32 and labels [N] int64. Treat them as read-only: they are cached. For ImageNet
        the images are `ImageFiles`, which index like that tensor and decode each batch from disk.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
    images, labels = _load_cached(name, split, root)
    if classes is None:
        return images, labels
    classes = tuple(int(c) for c in classes)
    num_classes = info(name).num_classes
    if not classes or len(set(classes)) != len(classes) or not all(0 <= c < num_classes for c in classes):
        raise DatasetError(
            f"class subset {list(classes)} is not a set of distinct classes of {name} (0..{num_classes - 1})"
        )
    remap = torch.full((num_classes,), -1, dtype=torch.long)
    remap[list(classes)] = torch.arange(len(classes))
    keep = remap[labels] >= 0
    return take(images, keep.nonzero().squeeze(1)), remap[labels[keep]]


def take(images, index: torch.Tensor | slice):
    """Rows of a split's images without decoding them: a tensor's rows, or fewer `StoredImages`."""
    return images.select(index) if isinstance(images, StoredImages) else images[index]


class StoredImages:
    """A split kept on disk, read batch by batch: what `load_split` gives for ImageNet.

    It is indexed like the images tensor of the other datasets, and indexing reads: `images[index]` for an index
    tensor of any shape is `[*index.shape, 3, size, size]` float32, normalised, on `device`; `images[a:b]` is
    `[b - a, 3, size, size]`. `select` gives a subset without reading. Subclasses say where the pixels come from
    (`pixels`): JPEG files (`ImageFiles`) or the memory-mapped shards of `vitzoo prepare` (`PreparedImages`)."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str):
        self.size = size
        self.mean, self.std = mean, std
        self.device = torch.device(device)

    def __len__(self) -> int:
        raise NotImplementedError

    def pixels(self, rows: list[int]) -> torch.Tensor:
        """[n, 3, size, size] uint8 on `device`: the images of `rows`, as stored (not normalised)."""
        raise NotImplementedError

    def select(self, index: torch.Tensor | slice) -> StoredImages:
        raise NotImplementedError

    def to(self, device: torch.device | str) -> StoredImages:
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), 3, self.size, self.size)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels [..., 3, H, W] as float32 normalised with the dataset's mean and std, in one pass."""
        mean = torch.tensor(self.mean, device=pixels.device).view(-1, 1, 1) * 255
        std = torch.tensor(self.std, device=pixels.device).view(-1, 1, 1) * 255
        return pixels.float().sub_(mean).div_(std)  # in place: one float copy of the pixels, not three

    def __getitem__(self, index: torch.Tensor | slice | int) -> torch.Tensor:
        if isinstance(index, int):
            return self[torch.tensor([index])][0]
        flat = torch.arange(len(self))[index] if isinstance(index, slice) else index.reshape(-1).cpu()
        images = self.normalise(self.pixels(flat.tolist()))  # [n, 3, size, size]
        return images.view(*(flat.shape if isinstance(index, slice) else index.shape), *images.shape[1:])


class ImageFiles(StoredImages):
    """ImageNet's JPEG files, decoded when indexed (see `StoredImages`). Each image is resized to `size * 8 / 7`
    (256 for 224) on its short side and centre-cropped to `size`: the standard ImageNet evaluation transform; in
    training the builder's own affine augmentation follows, as for every dataset.

    On the CPU, decoding uses Pillow (as torchvision's ImageFolder does) on `workers` threads: Pillow releases the GIL
    while it decodes and resizes; pixels stay uint8 until they are on `device`. On a CUDA `device` the files are read
    on the CPU and decoded on the GPU (nvJPEG through `torchvision.io.decode_jpeg`); a batch nvJPEG refuses (a PNG,
    a CMYK JPEG) is decoded by Pillow instead. The two decoders' resizes differ in the last bit of some pixels."""

    def __init__(self, paths: list[str], size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device | str = "cpu", workers: int | None = None):  # fmt: skip
        super().__init__(size, mean, std, device)
        self.paths = paths
        self.workers = workers or os.cpu_count() or 1

    def __len__(self) -> int:
        return len(self.paths)

    def select(self, index: torch.Tensor | slice) -> ImageFiles:
        paths = self.paths[index] if isinstance(index, slice) else [self.paths[i] for i in index.tolist()]
        return ImageFiles(paths, self.size, self.mean, self.std, self.device, self.workers)

    def to(self, device: torch.device | str) -> ImageFiles:
        return ImageFiles(self.paths, self.size, self.mean, self.std, device, self.workers)

    def pixels(self, rows: list[int]) -> torch.Tensor:
        if self.device.type == "cuda":
            decoded = self.decode_torchvision(rows)
            if decoded is not None:
                return decoded
        # [n, size, size, 3]: pinned when bound for a GPU, so the copy there does not wait for the CPU
        pixels = torch.empty((len(rows), self.size, self.size, 3), dtype=torch.uint8,
                             pin_memory=self.device.type == "cuda")  # fmt: skip
        out = pixels.numpy()

        def decode_into(slot: int) -> None:
            out[slot] = self._decode(rows[slot])

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            list(pool.map(decode_into, range(len(rows))))
        return pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # [n, 3, size, size]

    def _decode(self, i: int) -> np.ndarray:
        """[size, size, 3] uint8: one image, resized on its short side and centre-cropped."""
        from PIL import Image

        with Image.open(self.paths[i]) as image:
            image = image.convert("RGB")
            short = round(self.size * 8 / 7)
            scale = short / min(image.size)
            width, height = max(short, round(image.width * scale)), max(short, round(image.height * scale))
            image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=None)
            left, top = (width - self.size) // 2, (height - self.size) // 2
            return np.asarray(image.crop((left, top, left + self.size, top + self.size)))

    def decode_torchvision(self, rows: list[int]) -> torch.Tensor | None:
        """[n, 3, size, size] uint8 on `device`, decoded by torchvision (nvJPEG on CUDA) with the resize and crop of
        `_decode` (antialiased bilinear: a pixel or two off Pillow's); None when the decoder refuses a file."""
        from torchvision.io import ImageReadMode, decode_jpeg, read_file
        from torchvision.transforms.v2.functional import resize

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            encoded = list(pool.map(lambda i: read_file(self.paths[i]), rows))  # n x [bytes] uint8
        try:
            images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)  # n x [3, h, w]
        except (RuntimeError, ValueError):
            return None
        short = round(self.size * 8 / 7)
        crops = []
        for image in images:
            height, width = image.shape[-2:]
            scale = short / min(height, width)
            height, width = max(short, round(height * scale)), max(short, round(width * scale))
            resized = resize(image, [height, width], antialias=True)  # [3, height, width]
            top, left = (height - self.size) // 2, (width - self.size) // 2  # as `_decode` crops
            crops.append(resized[:, top : top + self.size, left : left + self.size])
        return torch.stack(crops)


@lru_cache(maxsize=8)
def _load_cached(name: str, split: str, root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    meta = info(name)
    if name == "imagenet":
        return _imagenet(split, root, meta)  # files, normalised as each batch is decoded
    if name == "digits":
        images, labels = _digits(split)
    elif name == "fashion_mnist":
        images, labels = _fashion_mnist(split, root)
    else:
        images, labels = _cifar(name, split, root)
    mean = torch.tensor(meta.mean).view(1, -1, 1, 1)
    std = torch.tensor(meta.std).view(1, -1, 1, 1)
    images = ((images - mean) / std).contiguous()
    images.requires_grad_(False)
    return images, labels


def _carve(n_train: int, n_val: int, split: str) -> np.ndarray:
    """Indices into the official train split for our train or val split."""
    order = np.random.default_rng(VAL_SEED).permutation(n_train)
    return np.sort(order[:n_val]) if split == "val" else np.sort(order[n_val:])


def _digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8] in [0, 1]
    labels = torch.tensor(data.target, dtype=torch.long)
    # digits has no official split: a fixed 20% test split, then 10% of the rest as val
    order = np.random.default_rng(VAL_SEED).permutation(len(labels))
    n_test = len(labels) // 5
    test, rest = np.sort(order[:n_test]), order[n_test:]
    if split == "test":
        index = test
    else:
        index = rest[_carve(len(rest), len(rest) // 10, split)]
    images = F.interpolate(images[index], size=(28, 28), mode="bilinear", align_corners=False)
    return images, labels[index]


def _fashion_mnist_dir(root: str | None) -> Path:
    candidates = [root] if root else [os.environ.get("VITZOO_FASHION_MNIST"), *FASHION_MNIST_DIRS]
    for candidate in candidates:
        if candidate and (Path(candidate) / "train-images-idx3-ubyte.gz").exists():
            return Path(candidate)
    raise DatasetError(
        "Fashion-MNIST not found (looked in "
        + ", ".join(str(c) for c in candidates if c)
        + "); install the Debian package `dataset-fashion-mnist` (apt-get install dataset-fashion-mnist) "
        "or pass the folder holding train-images-idx3-ubyte.gz as data_root=<path> (or VITZOO_FASHION_MNIST)"
    )


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: magic, dims, big-endian sizes, uint8 data), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DatasetError(f"{path} is not a uint8 IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DatasetError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {data.size}")
    return data.reshape(shape)


def _fashion_mnist(split: str, root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    folder = _fashion_mnist_dir(root)
    prefix = "t10k" if split == "test" else "train"
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    if split != "test":
        index = _carve(len(labels), 5000, split)
        images, labels = images[index], labels[index]
    return torch.from_numpy(images.copy()).float().unsqueeze(1) / 255.0, torch.from_numpy(labels.astype(np.int64))


def _cifar(name: str, split: str, root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10/100 through torchvision, from disk only (no download)."""
    if root is None:
        raise DatasetError(f"{name} needs data_root=<path> (a torchvision {name} folder); nothing is downloaded")
    import torchvision

    train = split != "test"
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        dataset = cls(root, train=train, download=False)
    except RuntimeError as error:
        raise DatasetError(f"{name} not found under {root}: {error}") from error
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).float() / 255.0  # [N, 3, 32, 32]
    labels = torch.tensor(dataset.targets, dtype=torch.long)
    if train:
        index = torch.from_numpy(_carve(len(labels), len(labels) // 10, split))
        images, labels = images[index], labels[index]
    # kept at 32x32: models at 224 upsample per batch (see `resize_for`), not 30 GB in memory here
    return images, labels


IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


PREPARED_FOLDER = "imagenet_prepared"  # beside imagenet/ under a data_root: `vitzoo prepare imagenet`'s default out


def _imagenet(split: str, root: str | None, meta: DatasetInfo) -> tuple[StoredImages, torch.Tensor]:
    """ImageNet-1k in the ImageFolder layout, beside the other datasets of `root` (CIFAR's `cifar-100-python/`):
    `<root>/imagenet/train/<wnid>/*.JPEG` and `<root>/imagenet/val/<wnid>/*.JPEG`. Our test split is the official
    validation set; our val split is carved from the official train set. When `<root>/imagenet_prepared` holds the
    shards of `vitzoo prepare imagenet`, they are read instead of the JPEGs (the same pixels as a CPU decode)."""
    if root is None:
        raise DatasetError("imagenet needs data_root=<path> holding imagenet/train/<wnid>/ and imagenet/val/<wnid>/; "
                           "nothing is downloaded")  # fmt: skip
    official = "val" if split == "test" else "train"
    prepared = Path(root) / PREPARED_FOLDER
    if prepared.is_dir():
        from vitzoo.zoo_builder.prepared import PreparedImages

        images = PreparedImages.open(prepared, official, meta.mean, meta.std)
        labels = images.labels
    else:
        paths, labels = imagenet_files(Path(root), official)
        images = ImageFiles(paths, meta.image_size, meta.mean, meta.std)
    if split != "test":
        index = torch.from_numpy(_carve(len(labels), len(labels) // 25, split))  # val: 4%, about 51,000 images
        images, labels = images.select(index), labels[index]
    return images, labels


def imagenet_files(root: Path, official: str) -> tuple[list[str], torch.Tensor]:
    """The image paths of ImageNet's official `train` or `val` folder under `root`, in ImageFolder order (sorted
    wnids, then sorted names), and their labels [N] (the wnid's index)."""
    folder = root / "imagenet" / official
    if not folder.is_dir():
        raise DatasetError(f"imagenet not found: {folder} is not a folder (expected <root>/imagenet/train and /val)")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if len(classes) != DATASETS["imagenet"].num_classes:
        raise DatasetError(f"imagenet: {folder} holds {len(classes)} class folders, expected 1000")
    paths, labels = [], []
    for label, wnid in enumerate(classes):
        files = sorted(e.path for e in os.scandir(folder / wnid) if e.name.lower().endswith(IMAGE_SUFFIXES))
        paths += files
        labels += [label] * len(files)
    return paths, torch.tensor(labels, dtype=torch.long)


def resize_for(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Bring a batch [..., C, h, w] to the model's input size (bilinear), a no-op when it already fits."""
    if images.shape[-1] == image_size and images.shape[-2] == image_size:
        return images
    lead = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:])
    flat = F.interpolate(flat, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return flat.reshape(*lead, *flat.shape[1:])
