"""ImageNet from an ImageFolder tree: splits decoded batch by batch, the paper's pre-training dataset in a build."""

import pytest
import torch
from conftest import tiny_blueprint
from PIL import Image

from vitzoo.cli import main
from vitzoo.zoo_builder import Zoo
from vitzoo.zoo_builder.build import BuildSettings, build
from vitzoo.zoo_builder.data import DATASETS, DatasetError, ImageFiles, load_split
from vitzoo.zoo_builder.pool import POOL_STEPS, pool_plan, pooled_batches
from vitzoo.zoo_builder.prepared import PreparedImages

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


def test_a_population_reads_one_shared_pool_and_each_model_keeps_its_own_order():
    seeds = [3, 1, 5]
    plan = pool_plan(n=40, batch=4, seeds=seeds, epoch=2)  # 10 steps: pools of 4, 4 and 2 batches
    order = plan.order  # [m, steps, b]
    assert order.shape == (3, 10, 4) and plan.pools == 3
    for model in range(3):  # every model sees each image of the epoch once, pool by pool
        assert sorted(order[model].flatten().tolist()) == sorted(plan.shared.tolist())
        for number in range(plan.pools):
            steps = slice(number * POOL_STEPS, (number + 1) * POOL_STEPS)
            assert set(order[model, steps].flatten().tolist()) == set(plan.pool(number).tolist())
    assert not torch.equal(order[0], order[1])  # own orders
    alone = pool_plan(n=40, batch=4, seeds=[5], epoch=2)  # a model's batches do not depend on its population
    assert torch.equal(alone.order[0], order[2])


@pytest.mark.parametrize("depth", [0, 2])
def test_pooled_batches_are_the_images_each_model_would_read_itself(imagenet, depth):
    images, labels = load_split("imagenet", "test", str(imagenet))
    images = ImageFiles(images.paths[:48], 16, MEAN, STD, workers=2)  # small images: fast
    plan = pool_plan(n=48, batch=4, seeds=[0, 1], epoch=0)
    batches = list(pooled_batches(images, labels[:48], plan, depth))
    assert len(batches) == plan.steps == 12
    for step, (x, y) in enumerate(batches):
        assert x.shape == (2, 4, 3, 16, 16)
        assert torch.equal(x, images[plan.order[:, step]]) and torch.equal(y, labels[plan.order[:, step]])


def test_prepared_shards_hold_the_decoded_pixels_and_builds_read_them(imagenet, tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    (root / "imagenet").symlink_to(imagenet / "imagenet")
    main(["prepare", "imagenet", f"data_root={root}", "size=24", "workers=2"])
    assert "imagenet_prepared" in capsys.readouterr().out
    prepared = root / "imagenet_prepared"
    assert sorted(p.name for p in prepared.glob("*.npy")) == [
        "train-00000.npy", "train-labels.npy", "val-00000.npy", "val-labels.npy"
    ]  # fmt: skip
    main(["prepare", "imagenet", f"data_root={root}", "size=24"])  # a rerun resumes: nothing to do

    test, test_labels = load_split("imagenet", "test", str(root))
    files, files_labels = load_split("imagenet", "test", str(imagenet))
    assert isinstance(test, PreparedImages) and torch.equal(test_labels, files_labels)
    index = torch.tensor([[0, 999], [500, 3]])
    decoded = ImageFiles(files.paths, 24, MEAN, STD)[index]
    assert torch.equal(test[index], decoded)  # the same pixels as decoding the JPEGs at that size
    train, _ = load_split("imagenet", "train", str(root))
    val, val_labels = load_split("imagenet", "val", str(root))
    assert len(train) + len(val) == 2000 and torch.equal(val.labels, val_labels)
    assert val[0:2].shape == (2, 3, 24, 24)

    with pytest.raises(SystemExit):  # another size into the same cache is refused
        main(["prepare", "imagenet", f"data_root={root}", "size=16"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):  # a folder of other files is not a cache to resume
        main(["prepare", "imagenet", f"data_root={root}", f"out={tmp_path / 'other'}"])
    (prepared / "val-00000.npy").unlink()
    with pytest.raises(DatasetError, match="unfinished"):
        PreparedImages.open(prepared, "val", MEAN, STD)


def test_torchvision_decoding_the_gpu_uses_matches_pillow(tmp_path):
    """The decode ImageFiles runs on CUDA (nvJPEG there, libjpeg here): same resize and crop as Pillow's."""
    generator = torch.Generator().manual_seed(0)
    paths = []
    for i in range(4):  # smooth 500 x 375 photos-to-be, as in benchmarks/imagenet_decoding.py
        coarse = torch.randint(0, 256, (12, 16, 3), dtype=torch.uint8, generator=generator).numpy()
        Image.fromarray(coarse).resize((500, 375), Image.Resampling.BICUBIC).save(tmp_path / f"{i}.JPEG", quality=90)
        paths.append(str(tmp_path / f"{i}.JPEG"))
    files = ImageFiles(paths, 224, MEAN, STD, workers=2)
    torchvision_pixels = files.decode_torchvision([0, 1, 2, 3]).float()  # [4, 3, 224, 224]
    assert torchvision_pixels.shape == (4, 3, 224, 224)
    assert (torchvision_pixels - files.pixels([0, 1, 2, 3]).float()).abs().mean() < 2  # in uint8 steps
