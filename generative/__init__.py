"""Generative models over ViT weights: family bases, diffusion over family coordinates, delta tokens."""
