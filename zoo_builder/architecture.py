"""A ViT's architecture and head read from its weights: the one place that does it (tokenizer specs, the evaluator,
fine-tuning, importers of foreign zoos all call this).

`vit_from_state_dict` rebuilds a timm ViT on the meta device from a state dict's shapes and checks it gives exactly
those keys and shapes; `head_from_state_dict` says which of the zoo's heads (linear, or the MLP `head.0`/`head.2`)
a state dict holds.

Everything that shapes the weights is read from them: patch size and channels, width, depth, MLP ratio,
class/register/distillation tokens, position-embedding length, qkv bias, q/k norms, LayerScale, pre-norm,
final norm vs fc-norm, linear or MLP (`Sequential`) head. Two things weights cannot tell: the number of
heads (pass it; timm's 64-wide convention is assumed only when the width divides by 64) and the pooling of a
class-token model (it changes the forward pass, not the tensors).
"""

from __future__ import annotations

import math
import re

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitzoo.errors import VitzooError
from vitzoo.zoo_builder.blueprint import Factors


class ArchitectureError(VitzooError, ValueError):
    """Weights that are not a ViT these functions can rebuild (the message says what is missing or differs)."""


def vit_kwargs_from_state_dict(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> dict:
    """timm `VisionTransformer` kwargs that give exactly these tensors (see module docstring)."""
    if "patch_embed.proj.weight" not in state_dict:
        raise ArchitectureError("not a timm ViT state dict: no patch_embed.proj.weight")
    dim, in_chans, *patch = state_dict["patch_embed.proj.weight"].shape
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise ArchitectureError("not a timm ViT state dict: no blocks.<i>.* tensors")
    if num_heads is None:
        if dim % 64:
            raise ArchitectureError(f"width {dim} is not a multiple of 64: pass num_heads (weights do not tell it)")
        num_heads = dim // 64
    class_token = "cls_token" in state_dict
    reg_tokens = state_dict["reg_token"].shape[1] if "reg_token" in state_dict else 0
    distilled = "dist_token" in state_dict
    prefix = int(class_token) + reg_tokens + int(distilled)
    if "pos_embed" not in state_dict:
        raise ArchitectureError("ViTs without a learned pos_embed are not supported")
    length = state_dict["pos_embed"].shape[1]
    grid_with_prefix = math.isqrt(max(length - prefix, 0))
    if grid_with_prefix**2 == length - prefix:
        grid, no_embed_class = grid_with_prefix, False
    elif math.isqrt(length) ** 2 == length:
        grid, no_embed_class = math.isqrt(length), True
    else:
        raise ArchitectureError(f"pos_embed of length {length} fits no square patch grid (with {prefix} prefix tokens)")
    fc_norm = "fc_norm.weight" in state_dict
    if "blocks.0.mlp.fc1.weight" not in state_dict:
        raise ArchitectureError("blocks without mlp.fc1 (e.g. SwiGLU or parallel blocks): for a tokenizer spec, use "
                                "TokenSpec.from_model")  # fmt: skip
    kwargs = {
        "img_size": (grid * patch[0], grid * patch[1]),
        "patch_size": tuple(patch),
        "in_chans": in_chans,
        "embed_dim": dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": state_dict["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
        "qk_norm": "blocks.0.attn.q_norm.weight" in state_dict,
        "init_values": 1e-5 if "blocks.0.ls1.gamma" in state_dict else None,
        "class_token": class_token,
        "reg_tokens": reg_tokens,
        "no_embed_class": no_embed_class,
        "pre_norm": "norm_pre.weight" in state_dict,
        "global_pool": "avg" if fc_norm or not class_token else "token",
        "fc_norm": fc_norm,
        "num_classes": _head_outputs(state_dict),
    }
    return kwargs


def _head_outputs(state_dict: dict[str, torch.Tensor]) -> int:
    if "head.weight" in state_dict:
        return state_dict["head.weight"].shape[0]
    layers = sorted(int(m.group(1)) for k in state_dict if (m := re.match(r"head\.(\d+)\.weight$", k)))
    return state_dict[f"head.{layers[-1]}.weight"].shape[0] if layers else 0


def vit_from_state_dict(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> VisionTransformer:
    """A meta-device timm ViT whose state dict has exactly the keys and shapes of `state_dict`."""
    kwargs = vit_kwargs_from_state_dict(state_dict, num_heads)
    with torch.device("meta"):
        if "dist_token" in state_dict:
            from timm.models.deit import VisionTransformerDistilled

            model = VisionTransformerDistilled(**kwargs)
        else:
            model = VisionTransformer(**kwargs)
        layers = sorted(int(m.group(1)) for k in state_dict if (m := re.match(r"head\.(\d+)\.weight$", k)))
        if layers:  # an MLP head: Linear / activation / Linear ... as nn.Sequential, keys head.<i>.*
            modules: list[nn.Module] = []
            for index in range(layers[-1] + 1):
                weight = state_dict.get(f"head.{index}.weight")
                if weight is None:
                    modules.append(nn.ReLU())
                else:
                    modules.append(nn.Linear(weight.shape[1], weight.shape[0], bias=f"head.{index}.bias" in state_dict))
            model.head = nn.Sequential(*modules)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state_dict.items()}
    if expected != given:
        missing = sorted(set(expected) - set(given))[:5]
        extra = sorted(set(given) - set(expected))[:5]
        wrong = [k for k in expected.keys() & given.keys() if expected[k] != given[k]][:5]
        raise ArchitectureError(
            f"state dict is not a timm ViT vitzoo knows: missing {missing}, unexpected {extra}, "
            f"shapes differ for {wrong}"
        )
    return model


def head_from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict:
    """{"head", "head_hidden", "num_classes"} of the zoo's heads from their shapes: `head.*` is linear (recorded with
    the Factors default as its unused hidden size), `head.0`/`head.2` the MLP (hidden = head.0's output size)."""
    if "head.weight" in state_dict:  # [classes, d]
        classes = state_dict["head.weight"].shape[0]
        return {"head": "linear", "head_hidden": Factors().head_hidden, "num_classes": classes}
    if "head.0.weight" in state_dict and "head.2.weight" in state_dict:  # [hidden, d], [classes, hidden]
        return {"head": "mlp", "head_hidden": state_dict["head.0.weight"].shape[0],
                "num_classes": state_dict["head.2.weight"].shape[0]}  # fmt: skip
    raise ArchitectureError("no classification head (head.weight, or head.0/head.2 for an MLP)")
