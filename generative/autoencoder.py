"""The hyper-representation: a transformer autoencoder over a model's (delta) weight tokens.

Encoder: token values [B, T, d] -> linear -> + position embedding -> timm `Block`s -> per-token latents
[B, T, k]. The model-level embedding is the mean of the token latents, projected [B, e]. Decoder: latents ->
linear -> + position embedding -> timm `Block`s -> token values. Position embeddings are learned per field of
the tokenizer's positions (segment, block, role, head, row, chunk) and summed, so a token knows which tensor,
which block, which attention head and which row it holds.

Loss (SANE's recipe): reconstruction MSE over the real (unpadded) values of two augmented views (random
function-preserving permutation, Gaussian noise, a fraction of tokens zeroed), plus `contrastive_weight` x
NT-Xent between the two views' embeddings, so that permuted copies of one model embed together.

Shapes: B models, T tokens, d token width, k latent width, e embedding width, P position fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from timm.models.vision_transformer import Block
from torch import nn

from tokenizer.spec import POSITION_FIELDS, TokenSpec
from zoo_builder.population import info_nce


@dataclass
class AutoencoderConfig:
    d_model: int = 64
    depth: int = 2  # blocks in the encoder and again in the decoder
    heads: int = 4
    latent: int = 8  # k: per-token latent width
    embedding: int = 32  # e: model-level embedding width
    contrastive_weight: float = 0.05
    temperature: float = 0.1
    noise: float = 0.02  # augmentation noise, in normalised units
    mask_fraction: float = 0.1
    permute: bool = True
    steps: int = 600
    batch_size: int = 16
    lr: float = 1e-3
    ema: float = 0.99
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class PositionEmbedding(nn.Module):
    """Sum of one learned embedding per position field (`tokenizer.spec.POSITION_FIELDS`)."""

    def __init__(self, positions: torch.Tensor, d_model: int):
        super().__init__()
        self.register_buffer("positions", positions + 1, persistent=False)  # [T, P]; -1 (none) -> 0
        sizes = (positions.max(0).values + 2).tolist()
        self.tables = nn.ModuleList(nn.Embedding(int(size), d_model) for size in sizes)
        for table in self.tables:
            nn.init.normal_(table.weight, std=0.02)

    def forward(self) -> torch.Tensor:
        return sum(table(self.positions[:, i]) for i, table in enumerate(self.tables))  # [T, d_model]


class HyperAutoencoder(nn.Module):
    def __init__(self, spec: TokenSpec, config: AutoencoderConfig):
        super().__init__()
        assert spec.positions().shape[1] == len(POSITION_FIELDS)
        self.config = config
        self.register_buffer("value_mask", spec.mask().float(), persistent=False)  # [T, d]
        c = config
        self.encoder_in = nn.Linear(spec.width, c.d_model)
        self.encoder_positions = PositionEmbedding(spec.positions(), c.d_model)
        self.encoder = nn.Sequential(*[Block(c.d_model, c.heads) for _ in range(c.depth)])
        self.encoder_norm = nn.LayerNorm(c.d_model)
        self.to_latent = nn.Linear(c.d_model, c.latent)
        self.to_embedding = nn.Linear(c.latent, c.embedding)
        self.decoder_in = nn.Linear(c.latent, c.d_model)
        self.decoder_positions = PositionEmbedding(spec.positions(), c.d_model)
        self.decoder = nn.Sequential(*[Block(c.d_model, c.heads) for _ in range(c.depth)])
        self.decoder_norm = nn.LayerNorm(c.d_model)
        self.to_values = nn.Linear(c.d_model, spec.width)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, d] -> per-token latents [B, T, k]."""
        x = self.encoder_in(tokens) + self.encoder_positions()
        return self.to_latent(self.encoder_norm(self.encoder(x)))

    def embed(self, latents: torch.Tensor) -> torch.Tensor:
        """Per-token latents [B, T, k] -> model embedding [B, e]."""
        return self.to_embedding(latents.mean(dim=1))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Per-token latents [B, T, k] -> token values [B, T, d] (padding positions come out as 0)."""
        x = self.decoder_in(latents) + self.decoder_positions()
        return self.to_values(self.decoder_norm(self.decoder(x))) * self.value_mask

    def reconstruction_loss(self, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the real values only."""
        squared = (predicted - target).pow(2) * self.value_mask
        return squared.sum() / (self.value_mask.sum() * target.shape[0])

    def loss(self, views: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """views [2, B, T, d] (augmented inputs), clean [2, B, T, d] (their unmasked, noise-free targets)."""
        two, b = views.shape[:2]
        latents = self.encode(views.flatten(0, 1))  # [2B, T, k]
        reconstruction = self.reconstruction_loss(self.decode(latents), clean.flatten(0, 1))
        embeddings = self.embed(latents).view(two, b, -1)
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
    """Per-model MSE of encode -> decode, no augmentation [n]."""
    errors = []
    with torch.no_grad():
        for start in range(0, len(tokens), batch):
            x = tokens[start : start + batch]
            squared = (model.decode(model.encode(x)) - x).pow(2) * model.value_mask
            errors.append(squared.sum(dim=(1, 2)) / model.value_mask.sum())
    return torch.cat(errors)
