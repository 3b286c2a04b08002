"""The hyper-representation: a transformer autoencoder over a model's (delta) weight tokens.

Encoder: token values [B, n, d] -> linear -> + position embedding -> timm `Block`s -> per-token latents
[B, n, k]. The embedding pools the token latents over n and projects them [B, e]: `pooling="moments"` pools
each latent dimension's mean, std and log std, "mean" its mean only. Fine-tuning moves weights by amounts that
span orders of magnitude (learning rates 1e-4 to 3e-3, SGD and AdamW) and accuracy follows the log of that
scale, which a mean of signed latents loses and the log std keeps; a linear probe reads it off (README).
Decoder: latents -> linear -> + position embedding -> timm `Block`s -> token values. Position embeddings are
learned per field of the tokenizer's positions (segment, block, role, head, row, chunk) and summed, so a token
knows which tensor, which block, which attention head and which row it holds.

Windows (for models with too many tokens for one sequence): with `window` = w > 0 the encoder and decoder run on
w consecutive tokens at a time, each token keeping its absolute position embedding. Training draws one random
window per model and step; a whole model is encoded as the windows starting every `window_stride` tokens (the
last one ending on the last token), decoded by averaging each token's reconstructions over the windows that hold
it, and embedded as the mean of its windows' embeddings. `window=0` is one window of all T tokens.

Loss (SANE's recipe): reconstruction MSE over the real (unpadded) values of two augmented views (random
function-preserving permutation, Gaussian noise, a fraction of tokens zeroed), plus `contrastive_weight` x
NT-Xent between the two views' embeddings, so that permuted copies of one model embed together.

Shapes: B models, T tokens, n tokens of one window (T when window=0), W windows, d token width, k latent width,
e embedding width, P position fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from timm.models.vision_transformer import Block
from torch import nn

from vitzoo.errors import ConfigError, check_number
from vitzoo.generative.data import HOLDOUTS
from vitzoo.tokenizer.spec import POSITION_FIELDS, TokenSpec
from vitzoo.zoo_builder.population import info_nce


@dataclass
class AutoencoderConfig:
    d_model: int = 64
    depth: int = 2  # blocks in the encoder and again in the decoder
    heads: int = 4
    latent: int = 20  # k: per-token latent width
    embedding: int = 32  # e: model-level embedding width
    contrastive_weight: float = 0.05
    temperature: float = 0.1
    noise: float = 0.02  # augmentation noise, in normalised units
    mask_fraction: float = 0.1
    permute: bool = True
    pooling: str = "moments"  # moments | mean: how token latents pool into the model embedding
    window: int = 0  # tokens per window; 0 = the whole sequence
    window_stride: int = 0  # whole-model encoding: a window starts every this many tokens (0 when window=0)
    projections: str = "per_position"  # shared | per_position: token <-> model-width maps, one for all or per token
    holdout: str = "none"  # none | run | family: models kept out of training (generative/data.py held_out)
    steps: int = 3000
    batch_size: int = 16
    lr: float = 1e-3
    ema: float = 0.99
    seed: int = 0

    def __post_init__(self):
        for name, kind, low, high, low_open, high_open in (
            ("d_model", int, 1, None, False, False),
            ("depth", int, 1, None, False, False),
            ("heads", int, 1, None, False, False),
            ("latent", int, 1, None, False, False),
            ("embedding", int, 1, None, False, False),
            ("contrastive_weight", float, 0, None, False, False),
            ("temperature", float, 0, None, True, False),
            ("noise", float, 0, None, False, False),
            ("mask_fraction", float, 0, 1, False, True),
            ("steps", int, 1, None, False, False),  # 0 steps would write an untrained autoencoder
            ("batch_size", int, 1, None, False, False),
            ("lr", float, 0, None, True, False),
            ("ema", float, 0, 1, False, True),
            ("seed", int, 0, None, False, False),
        ):  # fmt: skip
            check_number(f"autoencoder {name}", getattr(self, name), kind, low, high, low_open, high_open)
        if self.d_model % self.heads:
            raise ConfigError(f"autoencoder d_model={self.d_model} must be a multiple of heads={self.heads}")
        if not isinstance(self.permute, bool):
            raise ConfigError(f"autoencoder permute must be true or false, got {self.permute!r}")
        if self.projections not in ("shared", "per_position"):
            raise ConfigError(f"projections must be shared or per_position, got {self.projections!r}")
        if self.holdout not in HOLDOUTS:
            raise ConfigError(f"holdout must be one of {', '.join(HOLDOUTS)}, got {self.holdout!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling={self.pooling!r} is not one of {', '.join(POOLINGS)}")
        if not isinstance(self.window, int) or self.window < 0:
            raise ConfigError(f"window must be 0 (the whole sequence) or positive, got {self.window}")
        if self.window == 0 and self.window_stride != 0:
            raise ConfigError("window_stride needs a window > 0")
        if self.window > 0 and not 0 < self.window_stride <= self.window:
            raise ConfigError(f"window_stride must be in [1, window={self.window}], got {self.window_stride}")

    def to_dict(self) -> dict:
        return asdict(self)


POOLINGS = {"mean": 1, "moments": 3}  # pooling -> pooled features per latent dimension


class PositionEmbedding(nn.Module):
    """Sum of one learned embedding per position field (`tokenizer.spec.POSITION_FIELDS`)."""

    def __init__(self, positions: torch.Tensor, d_model: int):
        super().__init__()
        self.register_buffer("positions", positions + 1, persistent=False)  # [T, P]; -1 (none) -> 0
        sizes = (positions.max(0).values + 2).tolist()
        self.tables = nn.ModuleList(nn.Embedding(int(size), d_model) for size in sizes)
        for table in self.tables:
            nn.init.normal_(table.weight, std=0.02)

    def forward(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """[T, d_model] for every token, or [..., n, d_model] for the tokens at `index` [..., n]."""
        positions = self.positions if index is None else self.positions[index]  # [..., n, P]
        return sum(table(positions[..., i]) for i, table in enumerate(self.tables))


class PositionwiseLinear(nn.Module):
    """A separate linear map for every token position (G.pt's per-position projections): [..., n, i] -> [..., n, o].

    A token position always holds the same slice of the same tensor, so each position may read and write its
    values its own way; a shared map must serve every tensor at once."""

    def __init__(self, positions: int, in_features: int, out_features: int):
        super().__init__()
        bound = in_features**-0.5  # nn.Linear's default initialisation, per position
        self.weight = nn.Parameter(torch.empty(positions, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(positions, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., n, i]; `index` [n] or [B, n]: the positions of x's tokens (None: all of them, n = T)."""
        weight, bias = (self.weight, self.bias) if index is None else (self.weight[index], self.bias[index])
        return torch.einsum("...ni,...nio->...no", x, weight) + bias


class SharedLinear(nn.Linear):
    """One linear map for every token position, with PositionwiseLinear's signature."""

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class HyperAutoencoder(nn.Module):
    def __init__(self, spec: TokenSpec, config: AutoencoderConfig):
        super().__init__()
        assert spec.positions().shape[1] == len(POSITION_FIELDS)
        if config.window > spec.num_tokens:
            raise ValueError(f"window={config.window} is longer than the {spec.num_tokens} tokens of a model")
        self.config = config
        self.register_buffer("value_mask", spec.mask().float(), persistent=False)  # [T, d]
        c = config

        def projection(in_features: int, out_features: int) -> nn.Module:
            if c.projections == "per_position":
                return PositionwiseLinear(spec.num_tokens, in_features, out_features)
            return SharedLinear(in_features, out_features)

        self.encoder_in = projection(spec.width, c.d_model)
        self.encoder_positions = PositionEmbedding(spec.positions(), c.d_model)
        self.encoder = nn.Sequential(*[Block(c.d_model, c.heads) for _ in range(c.depth)])
        self.encoder_norm = nn.LayerNorm(c.d_model)
        self.to_latent = nn.Linear(c.d_model, c.latent)
        self.to_embedding = nn.Linear(POOLINGS[c.pooling] * c.latent, c.embedding)
        self.decoder_in = nn.Linear(c.latent, c.d_model)
        self.decoder_positions = PositionEmbedding(spec.positions(), c.d_model)
        self.decoder = nn.Sequential(*[Block(c.d_model, c.heads) for _ in range(c.depth)])
        self.decoder_norm = nn.LayerNorm(c.d_model)
        self.to_values = projection(c.d_model, spec.width)

    def mask(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Which values are real (1) or padding (0): [T, d], or [..., n, d] at `index` [..., n]."""
        return self.value_mask if index is None else self.value_mask[index]

    def encode(self, tokens: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """[B, n, d] -> per-token latents [B, n, k]; `index` [n] or [B, n]: the tokens' positions (None: all T)."""
        x = self.encoder_in(tokens, index) + self.encoder_positions(index)
        return self.to_latent(self.encoder_norm(self.encoder(x)))

    def embed(self, latents: torch.Tensor) -> torch.Tensor:
        """Per-token latents [B, n, k] -> embedding [B, e]."""
        pooled = [latents.mean(dim=1)]  # [B, k]
        if self.config.pooling == "moments":
            variance = latents.var(dim=1, correction=0)  # [B, k]
            pooled += [variance.sqrt(), 0.5 * torch.log(variance + 1e-8)]  # var, not std: finite gradients at 0
        return self.to_embedding(torch.cat(pooled, dim=1))

    def decode(self, latents: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token latents [B, n, k] -> token values [B, n, d] (padding positions come out as 0)."""
        x = self.decoder_in(latents) + self.decoder_positions(index)
        return self.to_values(self.decoder_norm(self.decoder(x)), index) * self.mask(index)

    def windows(self) -> torch.Tensor:
        """[W, n] the token positions of the windows that cover a whole model ([1, T] for window=0)."""
        num_tokens = self.value_mask.shape[0]
        w, stride = self.config.window or num_tokens, self.config.window_stride or num_tokens
        starts = list(range(0, num_tokens - w + 1, stride))
        if starts[-1] != num_tokens - w:
            starts.append(num_tokens - w)  # the last window ends on the last token
        return torch.tensor(starts)[:, None] + torch.arange(w)

    def encode_model(self, tokens: torch.Tensor) -> torch.Tensor:
        """Whole models [B, T, d] -> latents of every window [B, W, n, k]."""
        if self.config.window == 0:
            return self.encode(tokens)[:, None]  # exactly the unwindowed encoder
        return torch.stack([self.encode(tokens[:, index], index) for index in self.windows()], dim=1)

    def embed_model(self, tokens: torch.Tensor) -> torch.Tensor:
        """Whole models [B, T, d] -> model embeddings [B, e], the mean of the windows' embeddings."""
        latents = self.encode_model(tokens)  # [B, W, n, k]
        return self.embed(latents.flatten(0, 1)).view(*latents.shape[:2], -1).mean(dim=1)

    def decode_model(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents of every window [B, W, n, k] -> whole models [B, T, d], each token averaged over its windows."""
        if self.config.window == 0:
            return self.decode(latents[:, 0])
        total = torch.zeros(latents.shape[0], *self.value_mask.shape, device=latents.device)  # [B, T, d]
        count = torch.zeros(self.value_mask.shape[0], 1, device=latents.device)  # [T, 1]
        for w, index in enumerate(self.windows()):
            total[:, index] += self.decode(latents[:, w], index)
            count[index] += 1
        return total / count

    def reconstruction_loss(
        self, predicted: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean squared error over the real values only; predicted, target [B, n, d]."""
        mask = self.mask(index).expand_as(target)
        return ((predicted - target).pow(2) * mask).sum() / mask.sum()

    def loss(
        self,
        views: torch.Tensor,
        clean: torch.Tensor,
        index: torch.Tensor | None = None,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """views [2, B, n, d] (augmented inputs), clean [2, B, n, d] (their unmasked, noise-free targets); index
        [B, n]: each model's window (both views share it), None for all T tokens. `gather` turns these views'
        embeddings [2, B, e] into those of a larger batch that holds them (data-parallel training: every rank's
        share), so that NT-Xent draws its negatives from the whole batch."""
        two, b = views.shape[:2]
        both = None if index is None else index.repeat(two, 1)  # [2B, n]
        latents = self.encode(views.flatten(0, 1), both)  # [2B, n, k]
        reconstruction = self.reconstruction_loss(self.decode(latents, both), clean.flatten(0, 1), both)
        embeddings = self.embed(latents).view(two, b, -1)
        if gather is not None:
            embeddings = gather(embeddings)
            b = embeddings.shape[1]
        temperature = torch.tensor(self.config.temperature, device=views.device)
        contrastive, correct = info_nce(embeddings[0], embeddings[1], temperature)
        w = self.config.contrastive_weight
        total = (1 - w) * reconstruction + w * contrastive
        return total, {
            "loss": total.item(),
            "reconstruction": reconstruction.item(),
            "contrastive": contrastive.item(),
            "view_match": correct.item() / (2 * b),
        }


def reconstruction_error(model: HyperAutoencoder, tokens: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Per-model MSE of whole-model encode -> decode over every real value, no augmentation [B]."""
    errors = []
    with torch.no_grad():
        for start in range(0, len(tokens), batch):
            x = tokens[start : start + batch]
            squared = (model.decode_model(model.encode_model(x)) - x).pow(2) * model.value_mask
            errors.append(squared.sum(dim=(1, 2)) / model.value_mask.sum())
    return torch.cat(errors)
