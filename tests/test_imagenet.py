"""ImageNet from an ImageFolder tree: splits decoded batch by batch, the paper's pre-training dataset in a build."""

import pytest
import torch
from conftest import tiny_blueprint
from PIL import Image

from vitzoo.zoo_builder import Zoo
from vitzoo.zoo_builder.build import BuildSettings, build
from vitzoo.zoo_builder.data import DATASETS, DatasetError, ImageFiles, load_split

MEAN, STD = DATASETS["imagenet"].mean, DATASETS["imagenet"].std


def colour(label: int) -> tuple[int, int, int]:
    """A flat colour per class, so a decoded image says which file it came from."""
    return (label % 256, (label * 7) % 256, (label * 13) % 256)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """<root>/imagenet: 1,000 class folders; 2 training and 1 validation image each, flat colours, 40 x 30 px."""
    root = tmp_path_factory.mktemp("imagenet")
    for label in range(1000):
        image = Image.new("RGB", (40, 30), colour(label))
        wnid = f"n{label:08d}"
        for split, copies in (("train", 2), ("val", 1)):
            (root / "imagenet" / split / wnid).mkdir(parents=True)
            for copy in range(copies):
                image.save(root / "imagenet" / split / wnid / f"{wnid}_{copy}.JPEG", quality=100)
    return root


def test_imagenet_splits_decode_per_batch_as_the_models_expect(imagenet):
    images, labels = load_split("imagenet", "test", str(imagenet))
    assert isinstance(images, ImageFiles) and len(images) == len(labels) == 1000
    assert torch.equal(labels, torch.arange(1000))  # sorted wnids give the standard class indices
    batch = images[torch.tensor([[3, 200], [999, 0]])]
    assert batch.shape == (2, 2, 3, 224, 224)
    expected = (torch.tensor(colour(200)) / 255.0 - torch.tensor(MEAN)) / torch.tensor(STD)  # [3]
    assert torch.allclose(batch[0, 1].mean(dim=(1, 2)), expected, atol=0.03)
    assert images[10:13].shape == (3, 3, 224, 224) and torch.equal(images[10:13][1], images[11])

    train, train_labels = load_split("imagenet", "train", str(imagenet))
    val, val_labels = load_split("imagenet", "val", str(imagenet))
    assert len(train) + len(val) == 2000 and len(val) == 2000 // 25
    assert not set(train.paths) & set(val.paths) and len(train_labels) == len(train)
    subset, subset_labels = load_split("imagenet", "test", str(imagenet), classes=[5, 3])
    assert subset.paths == [images.paths[3], images.paths[5]] and subset_labels.tolist() == [1, 0]


def test_imagenet_refuses_a_missing_or_partial_tree(tmp_path):
    with pytest.raises(DatasetError, match="data_root"):
        load_split("imagenet", "test")
    with pytest.raises(DatasetError, match="not a folder"):
        load_split("imagenet", "test", str(tmp_path))
    (tmp_path / "imagenet" / "val" / "n0").mkdir(parents=True)
    with pytest.raises(DatasetError, match="1 class folders, expected 1000"):
        load_split("imagenet", "test", str(tmp_path))


def test_a_zoo_pre_trained_on_imagenet_files_is_built_and_fine_tuned(imagenet, tmp_path):
    blueprint = tiny_blueprint(pretrain={"dataset": "imagenet", "epochs": 1, "train_subset": 64})
    blueprint["architecture"]["kwargs"].update({"img_size": 32, "patch_size": 8, "in_chans": 3})
    blueprint["finetune"] = None  # the fine-tuning datasets are covered elsewhere
    blueprint["pretrain"]["grid"] = [{"seed": [0]}]
    out = tmp_path / "zoo"
    build(blueprint, BuildSettings(out=out, device="cpu", progress=False, data_root=str(imagenet)))
    zoo = Zoo.open(out)
    (entry,) = [e for e in zoo if e.epoch == 1]
    assert entry.factors["dataset"] == "imagenet" and 0.0 <= entry.metrics["test_acc"] <= 1.0
    assert entry.state_dict()["head.weight"].shape == (1000, 16)
