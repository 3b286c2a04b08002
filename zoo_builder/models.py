"""The ViT factory: timm Vision Transformers with the zoo's heads and initialisation schemes.

A zoo's architecture is a timm model name plus constructor kwargs (stored verbatim in `zoo.json`);
each run adds its head (linear, or the paper's MLP `dim-hidden-ReLU-classes` as `nn.Sequential`, keys
`head.0.*`/`head.2.*`) and number of outputs. Everything here is plain timm: `build_vit(...)` gives the
model that `timm.create_model(name, **kwargs)` would, with the head swapped.

timm's VisionTransformer has no option for an MLP head (its `head` is one Linear; `pre_logits` and
`head_hidden_size` of other timm families use other pooling or a tanh), so importing this module registers one
constructor with timm, `vitzoo_vit_mlp_head`: MLP-head models exported for timm (`vitzoo.zoo_builder.export`) name it.
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass, field

import timm
import torch
from timm.models import filter_pretrained_cfg, load_pretrained, register_model
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from vitzoo.errors import ConfigError

HEADS = ("linear", "mlp")
PRECISIONS = ("fp32", "bf16")
INIT_SCHEMES = ("timm", "torch", "kaiming_normal", "xavier_uniform")


@dataclass
class Architecture:
    """A timm model name and the kwargs its constructor gets (besides `num_classes`)."""

    model_name: str = "vit_small_patch16_224"
    kwargs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"model_name": self.model_name, "kwargs": dict(self.kwargs)}

    @property
    def num_heads(self) -> int:
        """Attention heads per block: the kwargs' `num_heads`, else the default of timm's constructor (kwargs may
        hold only what differs from it: an imported ViT-S/16 zoo has `kwargs == {}` and 6 heads)."""
        if "num_heads" in self.kwargs:
            return int(self.kwargs["num_heads"])
        return _default_num_heads(self.model_name, json.dumps(self.kwargs, sort_keys=True))


@functools.cache
def _default_num_heads(model_name: str, kwargs_json: str) -> int:
    with torch.device("meta"):  # structure only: no memory, no init
        model = timm.create_model(model_name, pretrained=False, **json.loads(kwargs_json))
    return model.blocks[0].attn.num_heads


def build_vit(
    architecture: Architecture,
    num_classes: int,
    head: str = "linear",
    head_hidden: int = 256,
    dropout: float = 0.0,
    drop_path: float = 0.0,
) -> nn.Module:
    """A randomly initialised timm ViT (timm's own init) with the requested head."""
    if head not in HEADS:
        raise ConfigError(f"unknown head {head!r}; expected one of {HEADS}")
    model = timm.create_model(
        architecture.model_name,
        pretrained=False,
        num_classes=num_classes,
        drop_rate=dropout,
        drop_path_rate=drop_path,
        **architecture.kwargs,
    )
    if head == "mlp":
        model.head = mlp_head(model.embed_dim, head_hidden, num_classes)
    return model


def mlp_head(in_features: int, head_hidden: int, num_classes: int) -> nn.Sequential:
    """The paper's MLP head `in-hidden-ReLU-classes` (keys `0.*`, `2.*`)."""
    return nn.Sequential(nn.Linear(in_features, head_hidden), nn.ReLU(), nn.Linear(head_hidden, num_classes))


def new_head(model: nn.Module, num_classes: int, head: str, head_hidden: int) -> nn.Module:
    """A freshly initialised head for fine-tuning, created with the current global RNG state."""
    if head == "linear":
        return nn.Linear(model.embed_dim, num_classes)
    return mlp_head(model.embed_dim, head_hidden, num_classes)


MLP_HEAD_MODEL = "vitzoo_vit_mlp_head"


@register_model
def vitzoo_vit_mlp_head(
    pretrained: bool = False,
    base: str = "vit_small_patch16_224",
    head_hidden: int = 256,
    pretrained_cfg: dict | str | None = None,
    cache_dir: str | None = None,
    **kwargs,
) -> nn.Module:
    """timm's ViT `base` built with `kwargs` (its own defaults for the rest), with the zoo's MLP head: the model
    `build_vit(Architecture(base, kwargs), num_classes, "mlp", head_hidden)` gives, for timm to create.

    It has no weights of its own: `pretrained=True` loads those of a `local-dir:` or `hf-hub:` export (its
    `pretrained_cfg`) through timm's loader (strict, classifier `head.2` dropped when `num_classes` differs).
    """
    if pretrained and not isinstance(pretrained_cfg, dict):
        raise ConfigError(f"{MLP_HEAD_MODEL} has no pretrained weights of its own; load an export of a zoo model "
                          "with timm.create_model('local-dir:<folder>', pretrained=True)")  # fmt: skip
    model = timm.create_model(base, pretrained=False, pretrained_cfg=pretrained_cfg, cache_dir=cache_dir, **kwargs)
    if model.num_classes > 0:
        model.head = mlp_head(model.embed_dim, head_hidden, model.num_classes)
    cfg = model.pretrained_cfg
    if not pretrained_cfg:  # base's own names base's weights (source, tag, format): they do not fit this head
        cfg = {k: v for k, v in filter_pretrained_cfg(cfg, remove_source=True).items() if k != "tag"}
        cfg["custom_load"] = False
    model.pretrained_cfg = {**cfg, "architecture": MLP_HEAD_MODEL, "classifier": "head.2"}
    model.default_cfg = model.pretrained_cfg  # timm's alias
    if pretrained:
        load_pretrained(model, model.pretrained_cfg, model.num_classes, model.in_chans, checkpoint_filter_fn,
                        cache_dir=cache_dir)  # fmt: skip
    return model


def initialize_weights(model: nn.Module, scheme: str) -> None:
    """Re-initialise a freshly built model in place. `timm` keeps timm's own init; `torch` uses PyTorch's
    default layer init; `kaiming_normal` is the ViT Model Zoo's from-scratch init (Kaiming-normal weights,
    biases 0.01); `xavier_uniform` the classic alternative. LayerNorms, class token and position embedding
    keep timm's init under every scheme."""
    if scheme not in INIT_SCHEMES:
        raise ConfigError(f"unknown init scheme {scheme!r}; expected one of {INIT_SCHEMES}")
    if scheme != "timm":
        init_linear_layers(model, scheme)


def init_linear_layers(module: nn.Module, scheme: str) -> None:
    """Initialise every Linear/Conv2d inside `module` by `scheme` (`timm`: truncated normal std .02, zero bias;
    `torch`: the layer's own `reset_parameters`, i.e. PyTorch's default)."""
    for layer in module.modules():
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        if scheme == "torch":
            layer.reset_parameters()
            continue
        if scheme == "timm":
            nn.init.trunc_normal_(layer.weight, std=0.02)
            bias_value = 0.0
        elif scheme == "kaiming_normal":
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            bias_value = 0.01
        elif scheme == "xavier_uniform":
            nn.init.xavier_uniform_(layer.weight)
            bias_value = 0.0
        else:
            raise ConfigError(f"unknown init scheme {scheme!r}; expected one of {INIT_SCHEMES}")
        if layer.bias is not None:
            nn.init.constant_(layer.bias, bias_value)


def select_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device} asked for but CUDA is not available")
    return torch.device(device)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be fp32 or bf16, got {precision!r}")


def autocast(device: torch.device, precision: str):
    """The context for forward passes and losses: bf16 autocast (weights and optimizer state stay fp32), or none."""
    check_precision(precision)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
