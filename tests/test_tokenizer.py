"""Tokenizer: bit-exact round trips over timm's ViT registry and random architectures, structural roles."""

import collections

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitzoo.tokenizer import ROLES, TokenizerError, TokenSpec, detokenize, tokenize, tokenize_batch
from vitzoo.zoo_builder import Zoo


def assert_exact_round_trip(state_dict, spec):
    tokens = tokenize(state_dict, spec)
    assert tokens.values.shape == (spec.num_tokens, spec.width)
    assert tokens.positions.shape == (spec.num_tokens, 6) and tokens.mask.shape == tokens.values.shape
    assert int(tokens.mask.sum()) == sum(v.numel() for v in state_dict.values())
    assert not tokens.values[~tokens.mask].any(), "padding is zero"
    back = detokenize(tokens.values, spec)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert back[key].shape == value.shape and torch.equal(back[key], value), key
    return tokens


def randomised(model: nn.Module) -> dict:
    """Distinct random values everywhere (timm zero-inits some tensors, which would hide mix-ups)."""
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=generator) for k, v in model.state_dict().items()}


def test_bundled_models_round_trip_with_both_heads():
    zoo = Zoo.open("bundled")
    for head in ("linear", "mlp"):
        entry = zoo.filter(stage="finetune", head=head, epoch="last")[0]
        state_dict = entry.state_dict()
        spec = TokenSpec.from_state_dict(state_dict, width=16, num_heads=2)
        assert_exact_round_trip(state_dict, spec)
        assert spec == TokenSpec.from_model(entry.model(), width=16)


def test_every_vision_transformer_in_timms_registry_round_trips():
    """Every `VisionTransformer` of the registry at a small size: exact from its modules; from its weights alone
    either exact too, or a TokenizerError (exotic blocks such as SwiGLU or attention pooling), never wrong."""
    covered, inferred = [], []
    for name in timm.list_models(["vit_*", "deit_*"]):
        try:
            model = timm.create_model(name, pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2,
                                      num_heads=2, num_classes=5)  # fmt: skip
        except (AssertionError, TypeError, ValueError):
            continue  # variants whose constructor rejects these small sizes
        if not isinstance(model, VisionTransformer):
            continue  # other families (EVA, relative-position ViTs) have other tensors
        state_dict = randomised(model)
        assert_exact_round_trip(state_dict, TokenSpec.from_model(model, width=24))
        covered.append(name)
        try:
            spec = TokenSpec.from_state_dict(state_dict, width=24, num_heads=2)
        except TokenizerError:
            continue
        assert_exact_round_trip(state_dict, spec)
        inferred.append(name)
    assert len(covered) >= 140, f"only {len(covered)} registry ViTs were covered"
    assert len(inferred) >= 100, f"only {len(inferred)} registry ViTs were inferred from their weights"


@settings(max_examples=25, deadline=None)
@given(
    width=st.integers(1, 40),
    dim_per_head=st.integers(1, 6),
    heads=st.integers(1, 3),
    depth=st.integers(1, 3),
    patch=st.sampled_from([2, 4, 7]),
    class_token=st.booleans(),
    reg_tokens=st.integers(0, 2),
    qkv_bias=st.booleans(),
    layer_scale=st.booleans(),
    qk_norm=st.booleans(),
    fc_norm=st.booleans(),
    head=st.sampled_from(["none", "linear", "mlp"]),
    mlp_ratio=st.sampled_from([1.0, 2.0, 4.0]),
)
def test_random_architectures_round_trip(width, dim_per_head, heads, depth, patch, class_token, reg_tokens, qkv_bias,
                                         layer_scale, qk_norm, fc_norm, head, mlp_ratio):  # fmt: skip
    dim = dim_per_head * heads * 2
    model = VisionTransformer(
        img_size=patch * 3, patch_size=patch, in_chans=2, embed_dim=dim, depth=depth, num_heads=heads,
        mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm, init_values=1e-5 if layer_scale else None,
        class_token=class_token, reg_tokens=reg_tokens, global_pool="token" if class_token and not fc_norm else "avg",
        fc_norm=fc_norm, num_classes=0 if head == "none" else 3,
    )  # fmt: skip
    if head == "mlp":
        model.head = nn.Sequential(nn.Linear(dim, 5), nn.ReLU(), nn.Linear(5, 3))
    state_dict = randomised(model)
    spec = TokenSpec.from_model(model, width)
    assert_exact_round_trip(state_dict, spec)
    assert TokenSpec.from_state_dict(state_dict, width, num_heads=heads) == spec


def test_distilled_deit_round_trips_with_its_distillation_token():
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, embed_dim=32, depth=1,
                              num_heads=2, num_classes=4)  # fmt: skip
    state_dict = randomised(model)
    spec = TokenSpec.from_state_dict(state_dict, width=8, num_heads=2)
    tokens = assert_exact_round_trip(state_dict, spec)
    roles = collections.Counter(ROLES[r] for r in tokens.positions[:, 2].tolist())
    assert roles["dist_token"] == 4 and roles["cls_token"] == 4  # one 32-wide row each, 4 tokens of 8


def test_full_size_vit_small_layout():
    """ViT-S/16 at SANE's width: row-aligned tokens, no row or tensor mixed, every tensor kept."""
    model = timm.create_model("vit_small_patch16_224", pretrained=False)
    state_dict = model.state_dict()
    spec = TokenSpec.from_state_dict(state_dict, width=288)
    tokens = assert_exact_round_trip(state_dict, spec)
    roles = collections.Counter(ROLES[r] for r in tokens.positions[:, 2].tolist())
    assert roles["q"] == roles["k"] == roles["v"] == 12 * 384 * 2  # 385 values per row: 2 tokens of 288
    assert roles["pos_embed"] == 197 * 2 and roles["cls_token"] == 2  # 384 values: 2 tokens of 288
    assert spec.num_tokens == len(tokens.values) < 114_128  # SANE needs 114,128 tokens and drops pos/cls


def test_positions_give_heads_of_q_k_v_rows():
    model = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=12, depth=2, num_heads=3, num_classes=2)
    spec = TokenSpec.from_model(model, width=13)  # 12 weights + bias = 13: one token per row
    positions = spec.positions()
    qkv = spec.segments[[s.role for s in spec.segments].index("qkv")]
    rows = positions[(positions[:, 0] == spec.segments.index(qkv))]
    assert [ROLES[r] for r in rows[:, 2].tolist()] == ["q"] * 12 + ["k"] * 12 + ["v"] * 12
    assert (
        rows[:, 3].tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [0] * 4 + [1] * 4 + [2] * 4 + [0] * 4 + [1] * 4 + [2] * 4
    )
    assert set(rows[:, 1].tolist()) == {0}
    assert (positions[:, 3][positions[:, 2] == ROLES.index("fc1")] == -1).all()
    blocks = positions[:, 1]
    assert set(blocks.tolist()) == {-1, 0, 1}


def test_spec_saves_and_loads(tmp_path):
    spec = TokenSpec.from_model(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1), width=64)
    spec.save(tmp_path / "spec.json")
    loaded = TokenSpec.load(tmp_path / "spec.json")
    assert loaded == spec and torch.equal(loaded.positions(), spec.positions())


def test_batched_tokenize_and_detokenize_match_single():
    model = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=8, depth=1, num_heads=2, num_classes=2)
    spec = TokenSpec.from_model(model, width=5)
    state_dicts = [{k: torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(3)]
    batch = tokenize_batch(state_dicts, spec)
    assert batch.values.shape == (3, spec.num_tokens, 5)
    for i, state_dict in enumerate(state_dicts):
        assert torch.equal(batch.values[i], tokenize(state_dict, spec).values)
    back = detokenize(batch.values, spec)
    for key in state_dicts[0]:
        assert torch.equal(back[key][1], state_dicts[1][key])


def bad_inputs():
    model = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=8, depth=1, num_heads=2, num_classes=2)
    return model, TokenSpec.from_model(model, width=5)


def test_bad_state_dicts_are_refused_naming_the_tensor():
    model, spec = bad_inputs()
    state_dict = dict(model.state_dict())
    with pytest.raises(TokenizerError, match="cls_token"):
        tokenize({k: v for k, v in state_dict.items() if k != "cls_token"}, spec)
    with pytest.raises(TokenizerError, match="extra.weight"):
        tokenize({**state_dict, "extra.weight": torch.zeros(1)}, spec)
    with pytest.raises(TokenizerError, match="head.weight"):
        tokenize({**state_dict, "head.weight": torch.zeros(3, 8)}, spec)
    with pytest.raises(TokenizerError, match="blocks.0.mlp.fc1.weight holds NaN"):
        tokenize(
            {
                **state_dict,
                "blocks.0.mlp.fc1.weight": torch.full_like(state_dict["blocks.0.mlp.fc1.weight"], torch.nan),
            },
            spec,
        )


def test_bad_tokens_are_refused():
    model, spec = bad_inputs()
    values = tokenize(model.state_dict(), spec).values
    with pytest.raises(TokenizerError, match="expected"):
        detokenize(values[:-1], spec)
    with pytest.raises(TokenizerError, match="expected"):
        detokenize(torch.zeros(spec.num_tokens, 6), spec)
    broken = values.clone()
    broken[3, 0] = torch.inf
    with pytest.raises(TokenizerError, match="NaN/inf"):
        detokenize(broken, spec)


def test_spec_of_another_architecture_is_refused():
    _, spec = bad_inputs()
    other = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=8, depth=2, num_heads=2, num_classes=2)
    with pytest.raises(TokenizerError, match="blocks.1"):
        tokenize(other.state_dict(), spec)


def test_heads_must_be_given_when_weights_cannot_tell():
    model = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=24, depth=1, num_heads=2, num_classes=2)
    with pytest.raises(TokenizerError, match="num_heads"):
        TokenSpec.from_state_dict(model.state_dict(), width=8)
