"""Datasets: fixed, disjoint splits; class subsets; clear errors when data is missing."""

import numpy as np
import pytest
import torch

from vitzoo.zoo_builder.data import DatasetError, _carve, load_split, read_idx


def test_digits_splits_are_disjoint_and_fixed():
    splits = {name: load_split("digits", name) for name in ("train", "val", "test")}
    assert [len(splits[n][1]) for n in ("train", "val", "test")] == [1295, 143, 359]
    flat = {n: {tuple(x.flatten().tolist()) for x in images} for n, (images, _) in splits.items()}
    assert not (flat["train"] & flat["test"]) and not (flat["val"] & flat["test"])
    assert splits["train"][0].shape[1:] == (1, 28, 28)
    assert abs(splits["train"][0].mean().item()) < 0.05 and abs(splits["train"][0].std().item() - 1) < 0.05
    assert torch.equal(load_split("digits", "val")[0], splits["val"][0])


def test_val_is_carved_from_train_with_a_fixed_seed():
    val, train = _carve(100, 10, "val"), _carve(100, 10, "train")
    assert len(val) == 10 and len(train) == 90 and not set(val) & set(train)
    assert np.array_equal(val, _carve(100, 10, "val"))


def test_class_subset_reindexes_labels():
    images, labels = load_split("digits", "test", classes=[7, 3])
    _, all_labels = load_split("digits", "test")
    assert set(labels.tolist()) == {0, 1}
    assert (labels == 0).sum() == (all_labels == 7).sum() and len(images) == len(labels)
    with pytest.raises(DatasetError, match="distinct"):
        load_split("digits", "test", classes=[3, 3])


def test_unknown_dataset_and_split_are_refused():
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_split("mnist_colour", "train")
    with pytest.raises(DatasetError, match="unknown split"):
        load_split("digits", "validation")


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        load_split("fashion_mnist", "train", root=str(tmp_path))


def test_idx_reader_round_trip_and_truncation(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = b"\x00\x00\x08\x03" + b"".join(int(n).to_bytes(4, "big") for n in data.shape)
    (tmp_path / "ok.idx").write_bytes(header + data.tobytes())
    assert np.array_equal(read_idx(tmp_path / "ok.idx"), data)
    (tmp_path / "short.idx").write_bytes(header + data.tobytes()[:-1])
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(tmp_path / "short.idx")


def test_fashion_mnist_from_the_debian_package():
    """CI installs `dataset-fashion-mnist`; the blueprint's pre-training data must load as the zoo expects."""
    images, labels = load_split("fashion_mnist", "val")
    assert images.shape == (5000, 1, 28, 28) and labels.max() == 9
    _, test_labels = load_split("fashion_mnist", "test")
    assert len(test_labels) == 10000
