"""Tokenizer: ViT weights <-> fixed-width token sequences (exact), with structural positions."""

from vitzoo.tokenizer.spec import POSITION_FIELDS, ROLES, Segment, TokenizerError, TokenSpec
from vitzoo.tokenizer.tokens import Tokens, detokenize, tokenize, tokenize_batch

__all__ = [
    "POSITION_FIELDS", "ROLES", "Segment", "TokenSpec", "TokenizerError", "Tokens", "detokenize", "tokenize",
    "tokenize_batch",
]  # fmt: skip
