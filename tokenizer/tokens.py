"""state_dict <-> tokens, bit-exact, with tensor ops only (one copy per segment, no loops over rows).

Shapes: T tokens, d token width, P position fields; batched forms take a leading model axis m.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitzoo.tokenizer.spec import TokenizerError, TokenSpec


@dataclass
class Tokens:
    values: torch.Tensor  # [T, d] (or [m, T, d])
    positions: torch.Tensor  # [T, P] int64
    mask: torch.Tensor  # [T, d] bool


def tokenize(state_dict: dict[str, torch.Tensor], spec: TokenSpec, check_finite: bool = True) -> Tokens:
    """The tokens of one state dict: values [T, d], positions [T, P], mask [T, d].

    Raises TokenizerError naming the tensor when a key is missing or extra, a shape differs from the spec,
    or a value is NaN/inf (unless `check_finite=False`).
    """
    spec.check_state_dict(state_dict)
    if check_finite:
        _check_finite_tensors(state_dict, spec)
    values = _tokenize_into(state_dict, spec, lead=())
    return Tokens(values, spec.positions(), spec.mask())


def tokenize_batch(state_dicts: list[dict[str, torch.Tensor]], spec: TokenSpec) -> Tokens:
    """Tokens of many state dicts of one architecture: values [m, T, d]."""
    for state_dict in state_dicts:
        spec.check_state_dict(state_dict)
    stacked = {key: torch.stack([sd[key] for sd in state_dicts]) for key in spec.keys}
    _check_finite_tensors(stacked, spec)
    values = _tokenize_into(stacked, spec, lead=(len(state_dicts),))
    return Tokens(values, spec.positions(), spec.mask())


def _tokenize_into(tensors: dict[str, torch.Tensor], spec: TokenSpec, lead: tuple[int, ...]) -> torch.Tensor:
    first = tensors[spec.segments[0].keys[0]]
    d = spec.width
    values = torch.empty(*lead, spec.num_tokens, d, dtype=first.dtype, device=first.device)
    start = 0
    for s in spec.segments:
        # a [*lead, rows, chunks * d] view of this segment's tokens, filled row-aligned
        rows = values[..., start : start + s.tokens, :].view(*lead, s.rows, s.chunks * d)
        rows[..., s.row_length :] = 0  # the padding
        if s.layout == "stack":
            for i, key in enumerate(s.keys):
                rows[..., i, : s.row_length] = tensors[key].reshape(*lead, -1)
        else:
            weight = tensors[s.keys[0]].reshape(*lead, s.rows, -1)
            rows[..., : weight.shape[-1]] = weight
            if len(s.keys) == 2:  # the bias as the last column of its unit's row
                rows[..., weight.shape[-1]] = tensors[s.keys[1]].reshape(*lead, s.rows)
        start += s.tokens
    return values


def detokenize(values: torch.Tensor, spec: TokenSpec, check_finite: bool = True) -> dict[str, torch.Tensor]:
    """The state dict of tokens [T, d] (or a batch [m, T, d] -> tensors with a leading m): the exact inverse
    of `tokenize`; padding is ignored. Raises TokenizerError on a wrong token count or width, or NaN/inf."""
    if values.dim() < 2 or tuple(values.shape[-2:]) != (spec.num_tokens, spec.width):
        raise TokenizerError(
            f"tokens of shape {list(values.shape)} do not fit the spec: expected [..., {spec.num_tokens}, {spec.width}]"
        )
    if check_finite and not _all_finite(values):
        bad = int(torch.nonzero((~torch.isfinite(values)).reshape(-1, *values.shape[-2:]).any(0).any(-1))[0, 0])
        raise TokenizerError(f"tokens hold NaN/inf (first at token {bad}, tensor {_tensor_of_token(spec, bad)})")
    lead = tuple(values.shape[:-2])
    state_dict = {}
    start = 0
    for s in spec.segments:
        rows = values[..., start : start + s.tokens, :].reshape(*lead, s.rows, s.chunks * spec.width)
        if s.layout == "stack":
            for i, (key, shape) in enumerate(zip(s.keys, s.shapes)):
                state_dict[key] = _copy(rows[..., i, : s.row_length], (*lead, *shape))
        else:
            columns = s.row_length - (1 if len(s.keys) == 2 else 0)
            state_dict[s.keys[0]] = _copy(rows[..., :columns], (*lead, *s.shapes[0]))
            if len(s.keys) == 2:
                state_dict[s.keys[1]] = _copy(rows[..., columns], (*lead, *s.shapes[1]))
        start += s.tokens
    return state_dict


def _copy(view: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A fresh tensor of `shape` holding `view`'s values, in exactly one copy (never aliasing the tokens)."""
    out = torch.empty(view.shape, dtype=view.dtype, device=view.device)
    out.copy_(view)
    return out.view(shape)


def _all_finite(tensor: torch.Tensor) -> bool:
    """One read pass, no temporary the size of the tensor (min and max propagate NaN, and are inf if any is)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _check_finite_tensors(state_dict: dict[str, torch.Tensor], spec: TokenSpec) -> None:
    for key in spec.keys:
        if not _all_finite(state_dict[key]):
            raise TokenizerError(f"tensor {key} holds NaN/inf")


def _tensor_of_token(spec: TokenSpec, token: int) -> str:
    start = 0
    for s in spec.segments:
        if token < start + s.tokens:
            return "+".join(s.keys)
        start += s.tokens
    return "?"
