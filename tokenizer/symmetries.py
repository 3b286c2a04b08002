"""Function-preserving permutations of a ViT's weights: attention heads and MLP hidden units, per block.

Within a block, permuting the heads of an attention layer (the q, k and v rows of each head, and the
matching input columns of the output projection) or the hidden units of its MLP (rows of fc1 and its bias,
columns of fc2) leaves the network's function unchanged; the residual stream is not permuted, so every block
can be permuted independently. Used as free augmentations (`random_permutation`) and to align a model to a
reference before comparing or averaging (`align_to`, weight matching per block).

The layers are found from the model structure (timm `Attention` and `Mlp` modules of a ViT rebuilt from the
weights' shapes), not from key names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from timm.layers import Mlp
from timm.models.vision_transformer import Attention

from vitzoo.zoo_builder.architecture import vit_from_state_dict


@dataclass
class BlockLayers:
    """Key prefixes of the permutable layers of one block."""

    attention: str  # e.g. "blocks.3.attn." (holds qkv and proj)
    num_heads: int
    mlp: str  # e.g. "blocks.3.mlp." (holds fc1, fc2, maybe norm)


def permutable_layers(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> list[BlockLayers]:
    model = vit_from_state_dict(state_dict, num_heads)
    layers = []
    for index, block in enumerate(model.blocks):
        attention = next(m for m in block.modules() if isinstance(m, Attention))
        mlp = next(m for m in block.modules() if isinstance(m, Mlp))
        prefix = f"blocks.{index}."
        names = {module: name for name, module in block.named_modules()}
        layers.append(BlockLayers(prefix + names[attention] + ".", attention.num_heads, prefix + names[mlp] + "."))
    return layers


def permute(
    state_dict: dict[str, torch.Tensor],
    head_orders: dict[int, torch.Tensor],
    unit_orders: dict[int, torch.Tensor],
    num_heads: int | None = None,
    layers: list[BlockLayers] | None = None,
) -> dict[str, torch.Tensor]:
    """A copy of `state_dict` with block b's heads in order `head_orders[b]` and its MLP units in order
    `unit_orders[b]` (blocks missing from a dict stay as they are). `layers` (from `permutable_layers`) saves
    finding the structure again when many checkpoints of one architecture are permuted."""
    out = dict(state_dict)
    for b, block in enumerate(layers or permutable_layers(state_dict, num_heads)):
        if b in head_orders:
            _permute_heads(out, block.attention, block.num_heads, head_orders[b])
        if b in unit_orders:
            _permute_units(out, block.mlp, unit_orders[b])
    return out


def random_permutation(
    state_dict: dict[str, torch.Tensor],
    seed: int | None = None,
    num_heads: int | None = None,
    generator: torch.Generator | None = None,
    layers: list[BlockLayers] | None = None,
) -> dict[str, torch.Tensor]:
    """A function-preserving copy with every block's heads and MLP units randomly permuted, drawn from `seed`
    (or from `generator`, to continue a stream). `layers` (from `permutable_layers`) saves finding the
    structure again for many checkpoints of one architecture."""
    if generator is None:
        if seed is None:
            raise ValueError("random_permutation needs a seed or a generator")
        generator = torch.Generator().manual_seed(seed)
    layers = layers or permutable_layers(state_dict, num_heads)
    head_orders = {b: torch.randperm(layer.num_heads, generator=generator) for b, layer in enumerate(layers)}
    unit_orders = {
        b: torch.randperm(state_dict[layer.mlp + "fc1.weight"].shape[0], generator=generator)
        for b, layer in enumerate(layers)
    }
    return permute(state_dict, head_orders, unit_orders, num_heads, layers=layers)


def align_to(
    state_dict: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    num_heads: int | None = None,
    layers: list[BlockLayers] | None = None,
) -> dict[str, torch.Tensor]:
    """Permute `state_dict` to best match `reference` (weight matching: per block, the assignment of heads and
    of MLP units that maximises the inner product of their weights, solved exactly by linear assignment)."""
    layers = layers or permutable_layers(state_dict, num_heads)
    head_orders, unit_orders = {}, {}
    for b, block in enumerate(layers):
        mine = head_features(state_dict, block.attention, block.num_heads)  # [H, features]
        theirs = head_features(reference, block.attention, block.num_heads)
        head_orders[b] = best_order(theirs @ mine.T)
        mine = unit_features(state_dict, block.mlp)  # [units, features]
        theirs = unit_features(reference, block.mlp)
        unit_orders[b] = best_order(theirs @ mine.T)
    return permute(state_dict, head_orders, unit_orders, num_heads, layers=layers)


def best_order(similarity: torch.Tensor) -> torch.Tensor:
    """order[i] = which of my items goes to slot i, maximising the summed similarity [slots, items]."""
    rows, columns = linear_sum_assignment(similarity.double().numpy(), maximize=True)
    order = torch.empty(len(rows), dtype=torch.long)
    order[torch.as_tensor(rows)] = torch.as_tensor(columns)
    return order


def permuted_keys(layers: list[BlockLayers], state_dict: dict[str, torch.Tensor]) -> set[str]:
    """The tensors a permutation touches: exactly those `head_features` and `unit_features` read."""
    keys = set()
    for block in layers:
        keys |= {block.attention + name for name in ("qkv.weight", "qkv.bias", "proj.weight")}
        keys |= {block.mlp + name for name in ("fc1.weight", "fc1.bias", "fc2.weight", "norm.weight", "norm.bias")}
    return keys & set(state_dict)


def head_features(state_dict, prefix: str, num_heads: int) -> torch.Tensor:
    """Every weight that moves with an attention head, one row per head [H, features]."""
    qkv = state_dict[prefix + "qkv.weight"]  # [3 * dim, dim]
    dim = qkv.shape[1]
    parts = [qkv.view(3, num_heads, dim // num_heads, dim).transpose(0, 1).reshape(num_heads, -1)]
    if prefix + "qkv.bias" in state_dict:
        parts.append(state_dict[prefix + "qkv.bias"].view(3, num_heads, -1).transpose(0, 1).reshape(num_heads, -1))
    proj = state_dict[prefix + "proj.weight"]  # [dim, dim]: input columns grouped by head
    parts.append(proj.view(proj.shape[0], num_heads, -1).transpose(0, 1).reshape(num_heads, -1))
    return torch.cat(parts, dim=1)


def unit_features(state_dict, prefix: str) -> torch.Tensor:
    """Every weight that moves with an MLP hidden unit, one row per unit [units, features]."""
    parts = [state_dict[prefix + "fc1.weight"], state_dict[prefix + "fc2.weight"].T]
    for key in ("fc1.bias", "norm.weight", "norm.bias"):
        if prefix + key in state_dict:
            parts.append(state_dict[prefix + key][:, None])
    return torch.cat(parts, dim=1)


def _permute_heads(out: dict, prefix: str, num_heads: int, order: torch.Tensor) -> None:
    qkv = out[prefix + "qkv.weight"]  # [3 * dim, dim] = [3, heads, head_dim, dim]
    dim = qkv.shape[1]
    out[prefix + "qkv.weight"] = qkv.view(3, num_heads, -1, dim)[:, order].reshape(qkv.shape)
    if prefix + "qkv.bias" in out:
        bias = out[prefix + "qkv.bias"]
        out[prefix + "qkv.bias"] = bias.view(3, num_heads, -1)[:, order].reshape(bias.shape)
    proj = out[prefix + "proj.weight"]  # [dim, dim]: columns [heads, head_dim]
    out[prefix + "proj.weight"] = proj.view(proj.shape[0], num_heads, -1)[:, order].reshape(proj.shape)


def _permute_units(out: dict, prefix: str, order: torch.Tensor) -> None:
    out[prefix + "fc1.weight"] = out[prefix + "fc1.weight"][order]
    for key in ("fc1.bias", "norm.weight", "norm.bias"):  # norm: a LayerNorm over the hidden units, if any
        if prefix + key in out:
            out[prefix + key] = out[prefix + key][order]
    out[prefix + "fc2.weight"] = out[prefix + "fc2.weight"][:, order]
