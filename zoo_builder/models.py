"""The ViT factory: timm Vision Transformers with the zoo's heads and initialisation schemes.

A zoo's architecture is a timm model name plus constructor kwargs (stored verbatim in `zoo.json`);
each run adds its head (linear, or the paper's MLP `dim-hidden-ReLU-classes` as `nn.Sequential`, keys
`head.0.*`/`head.2.*`) and number of outputs. Everything here is plain timm: `build_vit(...)` gives the
model that `timm.create_model(name, **kwargs)` would, with the head swapped.
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass, field

import timm
import torch
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
        model.head = nn.Sequential(
            nn.Linear(model.embed_dim, head_hidden), nn.ReLU(), nn.Linear(head_hidden, num_classes)
        )
    return model


def new_head(model: nn.Module, num_classes: int, head: str, head_hidden: int) -> nn.Module:
    """A freshly initialised head for fine-tuning, created with the current global RNG state."""
    if head == "linear":
        return nn.Linear(model.embed_dim, num_classes)
    return nn.Sequential(nn.Linear(model.embed_dim, head_hidden), nn.ReLU(), nn.Linear(head_hidden, num_classes))


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
