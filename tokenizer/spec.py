"""TokenSpec: how a ViT's tensors map to fixed-width tokens, derived from the model's structure.

Tensors are grouped into *segments*: a weight with its bias (`qkv.weight` + `qkv.bias`), a LayerNorm's
weight and bias, or a lone tensor (`cls_token`, `pos_embed`, a LayerScale's gamma). A segment is a matrix
of rows [R, L]:
- weights (Linear, Conv2d): one row per output unit, the unit's incoming weights with its bias appended
  (a Conv2d's kernel flattened), as in SANE;
- LayerNorm: two rows, weights then biases;
- token parameters (`cls_token`, `reg_token`, `dist_token`, `pos_embed`): one row per token;
- anything else: `[shape[0], -1]` (a scalar or vector is one row).
Each row is cut into ceil(L / d) tokens of width d, the last zero-padded (and masked), so a token never
mixes rows or tensors.

Every token has integer positions (columns of `POSITION_FIELDS`): the segment index (tensor order in the
state dict), the block index (-1 outside the transformer blocks), the role (`ROLES`), the attention head
(q/k/v rows and MLP-free roles: -1 where no head applies), the row within the segment and the chunk within
the row. Roles come from module types (timm's `PatchEmbed`, `Attention`, `Mlp`, `LayerScale`, `Block`,
`LayerNorm`, ...) and the attribute a parameter sits in, never from substrings of key names.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from timm.layers import LayerScale, Mlp, PatchEmbed
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from vitzoo.errors import VitzooError

ROLES = (
    "patch_embed", "cls_token", "reg_token", "dist_token", "pos_embed", "norm", "q", "k", "v", "qk_norm",
    "attn_proj", "layerscale", "fc1", "fc2", "mlp_norm", "final_norm", "head", "other",
)  # fmt: skip
POSITION_FIELDS = ("segment", "block", "role", "head", "row", "chunk")
SPEC_VERSION = 1


class TokenizerError(VitzooError, ValueError):
    """Input that does not fit a spec: wrong keys, shapes, widths or non-finite values (the message names it)."""


@dataclass
class Segment:
    """Tensors tokenized together as one row matrix [rows, row_length]."""

    keys: list[str]  # the weight first, then its bias (if any)
    shapes: list[list[int]]
    layout: str  # "rows" (weight [+ bias column]), "stack" (equal vectors as rows), "tokens" ([1, n, d] -> n rows)
    role: str  # a ROLES entry, or "qkv" (q, k and v rows in one fused weight)
    block: int  # -1 outside the blocks
    rows: int
    row_length: int
    chunks: int  # tokens per row
    num_heads: int = 0  # for "qkv": heads per q/k/v

    @property
    def tokens(self) -> int:
        return self.rows * self.chunks


@dataclass
class TokenSpec:
    """The token layout of one architecture. Build with `from_model` or `from_state_dict`; save as JSON."""

    width: int
    segments: list[Segment]
    architecture: dict = field(default_factory=dict)  # what it was derived from, for error messages

    def __post_init__(self):
        self._positions = None
        self._mask = None

    # ------------------------------------------------------------------------------------ construction

    @classmethod
    def from_model(cls, model: nn.Module, width: int) -> TokenSpec:
        """The spec of a timm ViT (any `VisionTransformer` subclass), from its module structure."""
        if width < 1:
            raise TokenizerError(f"token width must be positive, got {width}")
        if not isinstance(model, VisionTransformer):
            raise TokenizerError(f"expected a timm VisionTransformer, got {type(model).__name__}")
        roles = _parameter_roles(model)
        state = model.state_dict()
        segments = []
        consumed = set()
        for key in state:
            if key in consumed:
                continue
            role, block, layout, partner, num_heads = roles[key]
            keys = [key] + ([partner] if partner in state else [])
            consumed.update(keys)
            shapes = [list(state[k].shape) for k in keys]
            rows, row_length = _matrix_shape(layout, shapes)
            segments.append(
                Segment(keys, shapes, layout, role, block, rows, row_length, math.ceil(row_length / width), num_heads)
            )
        return cls(width, segments, {"class": type(model).__name__, "tensors": len(state)})

    @classmethod
    def from_state_dict(
        cls, state_dict: dict[str, torch.Tensor], width: int, num_heads: int | None = None
    ) -> TokenSpec:
        """The spec of a timm ViT state dict: the architecture is read from the tensors' shapes, instantiated
        on the meta device, and checked to give exactly these keys and shapes.

        Args:
            num_heads: attention heads per block; shapes cannot tell it. When omitted, timm's convention of
                64-wide heads is assumed only if the width divides by 64, else this is an error.
        """
        from vitzoo.zoo_builder.architecture import ArchitectureError, vit_from_state_dict

        try:
            model = vit_from_state_dict(state_dict, num_heads)
        except ArchitectureError as error:
            raise TokenizerError(str(error)) from None
        spec = cls.from_model(model, width)
        spec.check_state_dict(state_dict)
        return spec

    # --------------------------------------------------------------------------------------- properties

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.segments)

    @property
    def keys(self) -> list[str]:
        return [k for s in self.segments for k in s.keys]

    def positions(self) -> torch.Tensor:
        """[T, 6] int64 positions (columns: `POSITION_FIELDS`)."""
        if self._positions is None:
            parts = []
            for index, s in enumerate(self.segments):
                row = torch.arange(s.rows).repeat_interleave(s.chunks)  # [rows * chunks]
                chunk = torch.arange(s.chunks).repeat(s.rows)
                role = torch.full_like(row, ROLES.index(s.role) if s.role != "qkv" else 0)
                head = torch.full_like(row, -1)
                if s.role == "qkv":
                    dim = s.rows // 3
                    head_dim = dim // s.num_heads
                    role = torch.tensor([ROLES.index(r) for r in ("q", "k", "v")])[row // dim]
                    head = (row % dim) // head_dim
                columns = [torch.full_like(row, index), torch.full_like(row, s.block), role, head, row, chunk]
                parts.append(torch.stack(columns, dim=1))
            self._positions = torch.cat(parts)
        return self._positions

    def mask(self) -> torch.Tensor:
        """[T, d] bool: True where a token holds a real value (False on padding)."""
        if self._mask is None:
            parts = []
            for s in self.segments:
                real = torch.arange(s.chunks * self.width) < s.row_length  # [chunks * d]
                parts.append(real.view(1, s.chunks, self.width).expand(s.rows, -1, -1).reshape(-1, self.width))
            self._mask = torch.cat(parts)
        return self._mask

    # ------------------------------------------------------------------------------------------- checks

    def check_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        expected = self.keys
        missing = [k for k in expected if k not in state_dict]
        extra = [k for k in state_dict if k not in set(expected)]
        if missing or extra:
            raise TokenizerError(f"state dict does not fit the spec: missing {missing[:5]}, unexpected {extra[:5]}")
        for s in self.segments:
            for key, shape in zip(s.keys, s.shapes):
                if list(state_dict[key].shape) != shape:
                    raise TokenizerError(f"tensor {key} has shape {list(state_dict[key].shape)}, the spec says {shape}")

    # ------------------------------------------------------------------------------------------- saving

    def to_dict(self) -> dict:
        return {
            "version": SPEC_VERSION,
            "width": self.width,
            "architecture": self.architecture,
            "segments": [asdict(s) for s in self.segments],
        }

    @classmethod
    def from_dict(cls, data: dict) -> TokenSpec:
        if data.get("version") != SPEC_VERSION:
            raise TokenizerError(f"token spec version {data.get('version')} is not {SPEC_VERSION}")
        return cls(data["width"], [Segment(**s) for s in data["segments"]], data.get("architecture", {}))

    def save(self, path: str | Path) -> None:
        from vitzoo.zoo_builder.zoo import atomic_write_json

        atomic_write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> TokenSpec:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __eq__(self, other) -> bool:
        return isinstance(other, TokenSpec) and self.to_dict() == other.to_dict()


# ------------------------------------------------------------------------------------------ structure


def _matrix_shape(layout: str, shapes: list[list[int]]) -> tuple[int, int]:
    first = shapes[0]
    if layout == "rows" and len(first) <= 1 and len(shapes) == 1:  # a lone scalar or vector: one row
        return 1, max(1, math.prod(first))
    if layout == "rows":
        rows = first[0] if first else 1
        columns = math.prod(first[1:]) if len(first) > 1 else 1
        return rows, columns + (1 if len(shapes) > 1 else 0)
    if layout == "stack":
        return len(shapes), math.prod(first)
    if layout == "tokens":  # [1, n, d]
        return math.prod(first[:-1]), first[-1]
    raise ValueError(layout)


def _parameter_roles(model: VisionTransformer) -> dict[str, tuple]:
    """key -> (role, block, layout, partner key, num_heads) for every tensor of the model's state dict."""
    roles: dict[str, tuple] = {}
    blocks = {id(block): index for index, block in enumerate(model.blocks)} if hasattr(model, "blocks") else {}
    heads = {id(module): module for module in _head_modules(model)}
    final_norms = {id(getattr(model, name)) for name in ("norm", "fc_norm") if hasattr(model, name)}

    def visit(module: nn.Module, prefix: str, block: int, context: str) -> None:
        if id(module) in blocks:
            block = blocks[id(module)]
        if id(module) in heads:
            context = "head"
        local = dict(module.named_parameters(recurse=False))
        local.update(dict(module.named_buffers(recurse=False)))
        for name in local:
            key = prefix + name
            roles[key] = _role_of(model, module, name, key, block, context, final_norms)
        for child_name, child in module.named_children():
            visit(child, f"{prefix}{child_name}.", block, _child_context(module, child_name, context))

    visit(model, "", -1, "other")
    return roles


# (parent module type, attribute) -> the role of the layers inside it
CHILD_ROLES = {
    (Attention, "qkv"): "qkv",
    (Attention, "proj"): "attn_proj",
    (Attention, "q_norm"): "qk_norm",
    (Attention, "k_norm"): "qk_norm",
    (Mlp, "fc1"): "fc1",
    (Mlp, "fc2"): "fc2",
    (Mlp, "norm"): "mlp_norm",
    (PatchEmbed, "proj"): "patch_embed",
    (Block, "norm1"): "norm",
    (Block, "norm2"): "norm",
}


def _child_context(module: nn.Module, child_name: str, context: str) -> str:
    for (module_type, attribute), role in CHILD_ROLES.items():
        if isinstance(module, module_type) and child_name == attribute:
            return role
    return context


def _head_modules(model: VisionTransformer) -> list[nn.Module]:
    return [getattr(model, name) for name in ("head", "head_dist") if isinstance(getattr(model, name, None), nn.Module)]


def _role_of(model, module, name, key, block, context, final_norms):
    """(role, block, layout, partner, num_heads) of parameter `name` of `module`."""
    partner = key[: -len(name)] + "bias" if name == "weight" else None
    if module is model:  # parameters of the VisionTransformer itself: token parameters
        role = {"cls_token": "cls_token", "reg_token": "reg_token", "dist_token": "dist_token",
                "pos_embed": "pos_embed"}.get(name, "other")  # fmt: skip
        return role, -1, "tokens" if module.get_parameter(name).dim() == 3 else "rows", None, 0
    if isinstance(module, LayerScale):
        return "layerscale", block, "stack", None, 0
    if isinstance(module, nn.LayerNorm):
        if context == "head":
            role = "head"
        elif id(module) in final_norms:
            role = "final_norm"
        else:
            role = context if context in ("norm", "qk_norm", "mlp_norm") else "norm"
        if name == "bias" and module.weight is not None:
            return role, block, "stack", None, 0  # consumed with its weight
        return role, block, "stack", partner, 0
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        role = context if context in ("qkv", "attn_proj", "fc1", "fc2", "patch_embed", "head") else "other"
        num_heads = getattr(_attention_of(model, key), "num_heads", 0) if role == "qkv" else 0
        return role, block, "rows", partner, num_heads
    return ("head" if context == "head" else "other"), block, "rows", None, 0


def _attention_of(model: nn.Module, key: str) -> nn.Module | None:
    path = key.rsplit(".", 2)[0]  # blocks.3.attn.qkv.weight -> blocks.3.attn
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
