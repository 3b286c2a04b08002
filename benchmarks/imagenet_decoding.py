"""ImageNet batches decoded from JPEG files: `ImageFiles` on a thread per core vs on one thread, in one run.

python benchmarks/imagenet_decoding.py                 # 512 synthetic 500 x 375 JPEGs, batches of 256
python benchmarks/imagenet_decoding.py --root <data>   # or the first images of a real <data>/imagenet/train

Synthetic images are smooth random fields (JPEG-compressible like photographs), at ImageNet's typical size.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vitzoo.zoo_builder.data import DATASETS, ImageFiles


def synthetic_jpegs(folder: Path, count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)  # upsampled: smooth, photo-like
        image = Image.fromarray(coarse).resize((500, 375), Image.Resampling.BICUBIC)
        path = folder / f"{i:05d}.JPEG"
        image.save(path, quality=90)
        paths.append(str(path))
    return paths


def real_jpegs(root: str, count: int) -> list[str]:
    train = Path(root) / "imagenet" / "train"
    paths = []
    for wnid in sorted(os.listdir(train)):
        paths += sorted(str(p) for p in (train / wnid).iterdir())[: max(1, count // 1000)]
        if len(paths) >= count:
            break
    return paths[:count]


def images_per_second(files: ImageFiles, batch: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(files), batch):
        files[start : start + batch]
    return len(files) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--root", default=None, help="a data_root holding imagenet/train (default: synthetic)")
    options = parser.parse_args()
    meta = DATASETS["imagenet"]
    with tempfile.TemporaryDirectory() as folder:
        if options.root:
            paths = real_jpegs(options.root, options.images)
        else:
            paths = synthetic_jpegs(Path(folder), options.images)
        one = ImageFiles(paths, meta.image_size, meta.mean, meta.std, workers=1)
        pooled = ImageFiles(paths, meta.image_size, meta.mean, meta.std)  # a thread per core
        images_per_second(one, options.batch)  # warms the page cache for both
        baseline = images_per_second(one, options.batch)
        rate = images_per_second(pooled, options.batch)
    print(f"{len(paths)} JPEGs, batches of {options.batch}, to [3, 224, 224] each")
    print(f"  one thread                  : {baseline:7.0f} images/s")
    print(f"  ImageFiles, {pooled.workers:2d} threads      : {rate:7.0f} images/s   ({rate / baseline:.2f}x)")


if __name__ == "__main__":
    main()
