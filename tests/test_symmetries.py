"""Function-preserving permutations of ViTs: heads and MLP units; weight matching back to a reference."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vitzoo.tokenizer.symmetries import align_to, permute, random_permutation
from vitzoo.zoo_builder import Zoo


def small_vit(**kwargs):
    torch.manual_seed(0)
    options = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=24, depth=2, num_heads=3, num_classes=5)
    return VisionTransformer(**{**options, **kwargs}).eval()


def outputs(model, state_dict, images):
    model.load_state_dict(state_dict)
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("kwargs", [{}, {"qkv_bias": False}, {"init_values": 0.1, "qk_norm": True},
                                    {"class_token": False, "global_pool": "avg", "reg_tokens": 2}])  # fmt: skip
def test_random_permutation_preserves_the_function(kwargs):
    model = small_vit(**kwargs)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(4, 3, 16, 16)
    expected = outputs(model, original, images)
    permuted = random_permutation(original, seed=1, num_heads=3)
    changed = [k for k in original if not torch.equal(original[k], permuted[k])]
    assert {"blocks.0.mlp.fc1.weight", "blocks.1.mlp.fc2.weight"} <= set(changed)
    assert any(key.endswith("attn.qkv.weight") for key in changed)  # (3 heads: a block may draw the identity)
    torch.testing.assert_close(outputs(model, permuted, images), expected, rtol=1e-5, atol=1e-5)


def test_breaking_the_symmetry_changes_the_function():
    """The test above can fail: permuting fc1 rows without fc2's columns changes the outputs."""
    model = small_vit()
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(4, 3, 16, 16)
    expected = outputs(model, state_dict, images)
    broken = dict(state_dict)
    broken["blocks.0.mlp.fc1.weight"] = state_dict["blocks.0.mlp.fc1.weight"].flip(0)
    assert not torch.allclose(outputs(model, broken, images), expected, atol=1e-4)


def test_align_to_undoes_a_permutation_exactly():
    model = small_vit()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    heads = {0: torch.tensor([2, 0, 1]), 1: torch.tensor([1, 2, 0])}
    units = {0: torch.randperm(96), 1: torch.randperm(96)}
    shuffled = permute(reference, heads, units, num_heads=3)
    aligned = align_to(shuffled, reference, num_heads=3)
    for key in reference:
        assert torch.equal(aligned[key], reference[key]), key


def test_bundled_model_permutation_keeps_its_accuracy():
    from vitzoo.zoo_builder.data import load_split

    entry = Zoo.open("bundled").filter(stage="finetune", head="mlp", epoch="last")[0]
    model = entry.model()
    images, labels = load_split("digits", "test")
    permuted = random_permutation(entry.state_dict(), seed=3, num_heads=2)
    with torch.no_grad():
        before = model(images)
        model.load_state_dict(permuted)
        after = model(images)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
