"""Token datasets over a zoo: lazy items with labels, windows, augmentations, two views."""

import torch
from torch.utils.data import DataLoader

from vitzoo.tokenizer import TokenSpec, detokenize
from vitzoo.tokenizer.dataset import Augmentation, TokenDataset, collate
from vitzoo.tokenizer.normalize import Normalizer
from vitzoo.zoo_builder import Zoo


def bundled_selection():
    zoo = Zoo.open("bundled").filter(stage="finetune", head="linear", seed=42, epoch="last")
    spec = TokenSpec.from_state_dict(zoo[0].state_dict(), width=16, num_heads=2)
    return zoo, spec


def test_items_are_the_checkpoints_tokens_with_labels():
    zoo, spec = bundled_selection()
    dataset = TokenDataset(zoo, spec)
    assert len(dataset) == len(zoo) == 60
    item = dataset[3]
    assert item["values"].shape == (spec.num_tokens, 16) and item["positions"].shape == (spec.num_tokens, 6)
    assert item["model_id"] == zoo[3].model_id and item["parent_id"] == zoo[3].parent_id
    assert item["factors"]["head"] == "linear" and "test_acc" in item["metrics"]
    back = detokenize(item["values"], spec)
    assert all(torch.equal(back[k], v) for k, v in zoo[3].state_dict().items())


def test_windows_normalisation_and_loader():
    zoo, spec = bundled_selection()
    normalizer = Normalizer.fit(e.state_dict() for e in zoo)
    dataset = TokenDataset(zoo, spec, normalizer=normalizer, window=64, seed=1)
    loader = DataLoader(dataset, batch_size=8, shuffle=True, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["values"].shape == (8, 64, 16) and batch["positions"].shape == (8, 64, 6)
    assert len(batch["model_id"]) == 8
    starts = {int(dataset[0]["positions"][0, 0]) * 1000 + int(dataset[0]["positions"][0, 4]) for _ in range(10)}
    assert len(starts) > 1, "windows are drawn at random"
    full = TokenDataset(zoo, spec, normalizer=normalizer)[0]["values"]
    assert abs(full[spec.mask()].mean().item()) < 0.5  # standardised


def test_two_augmented_views_differ_but_keep_the_function():
    zoo, spec = bundled_selection()
    dataset = TokenDataset(zoo, spec, augmentation=Augmentation(permute=True), views=2, seed=0)
    item = dataset[0]
    assert item["values"].shape == (2, spec.num_tokens, 16)
    assert not torch.equal(item["values"][0], item["values"][1])
    from vitzoo.zoo_builder.data import load_split

    images, _ = load_split("digits", "test")
    model = zoo[0].model()
    with torch.no_grad():
        expected = model(images[:50])
        for view in item["values"]:
            model.load_state_dict(detokenize(view, spec))
            torch.testing.assert_close(model(images[:50]), expected, rtol=1e-5, atol=1e-5)


def test_noise_and_masking_touch_only_what_they_should():
    zoo, spec = bundled_selection()
    clean = TokenDataset(zoo, spec)[0]["values"]
    noisy = TokenDataset(zoo, spec, augmentation=Augmentation(noise=0.1))[0]["values"]
    assert not torch.equal(noisy, clean) and not noisy[~spec.mask()].any(), "padding stays zero"
    masked = TokenDataset(zoo, spec, augmentation=Augmentation(mask_fraction=0.5))[0]["values"]
    zeroed = (masked == 0).all(dim=1) & ~(clean == 0).all(dim=1)
    assert 0.3 < zeroed.float().mean() < 0.7
