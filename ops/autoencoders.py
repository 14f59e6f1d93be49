"""Embedded f=8 autoencoder: PCA of 8x8x3 pixel patches (a linear encoder/decoder pair).

Encoding is a stride-8 convolution with the top-C principal components of centred 8x8x3 patches, times a
per-channel `scale` (1 / sqrt(eigenvalue)) so every latent channel has unit standard deviation on the training
patches (a whitened latent: the EDM preconditioning with sigma_data = 1 then fits every channel; with one global
scale the low-variance detail channels were under-fitted and sampled as 8x8 texture); decoding is the
transposed convolution plus the mean patch. It keeps SD/SDXL's pixel-block <-> latent-cell geometry exactly, and a linear decoder
cannot break equivariance (paper, limitation 2). Fitted in seconds from patches (`fit_pca_autoencoder`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FACTOR = 8


class PCAAutoencoder(nn.Module):
    """Linear f=8 autoencoder: encode (B,3,H,W) in [0,1] -> (B,C,H/8,W/8); decode back (clamped to [0,1])."""

    def __init__(self, latent_channels: int = 32, factor: int = FACTOR):
        super().__init__()
        if latent_channels < 1 or latent_channels > 3 * factor * factor:
            raise ValueError(f"latent_channels must be in [1, {3 * factor * factor}], got {latent_channels}")
        self.latent_channels = latent_channels
        self.factor = factor
        self.register_buffer("components", torch.zeros(latent_channels, 3, factor, factor))  # (C, 3, f, f) orthonormal rows
        self.register_buffer("mean", torch.zeros(1, 3, factor, factor))  # mean patch
        self.register_buffer("scale", torch.ones(latent_channels))  # (C,) latent = scale * projection

    def config(self) -> dict:
        return {"type": "pca", "latent_channels": self.latent_channels, "factor": self.factor, "scale": [round(float(v), 6) for v in self.scale]}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, C, H/f, W/f)."""
        b, c, h, w = images.shape
        if c != 3 or h % self.factor or w % self.factor:
            raise ValueError(f"images must be (B, 3, H, W) with H, W divisible by {self.factor}, got {tuple(images.shape)}")
        centred = images - self.mean.repeat(1, 1, h // self.factor, w // self.factor)
        return self.scale.view(1, -1, 1, 1) * F.conv2d(centred, self.components, stride=self.factor)

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, h*f, w*f) in [0, 1] (unclamped with clamp=False: exactly linear)."""
        out = F.conv_transpose2d(latents / self.scale.view(1, -1, 1, 1), self.components, stride=self.factor)
        out = out + self.mean.repeat(1, 1, latents.shape[-2], latents.shape[-1])
        return out.clamp(0, 1) if clamp else out


def image_patches(images: torch.Tensor, factor: int = FACTOR) -> torch.Tensor:
    """(B, 3, H, W) -> (N, 3*f*f) non-overlapping f x f patches, flattened in (c, y, x) order."""
    b, c, h, w = images.shape
    p = images[:, :, : h - h % factor, : w - w % factor].unfold(2, factor, factor).unfold(3, factor, factor)
    return p.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * factor * factor)  # (N, 3*f*f)


def fit_pca_autoencoder(patches: torch.Tensor, latent_channels: int, factor: int = FACTOR) -> PCAAutoencoder:
    """PCA of (N, 3*f*f) patches -> a PCAAutoencoder whose latent channels each have unit std (whitened)."""
    x = patches.double()
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / max(x.shape[0] - 1, 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(evals, descending=True)[:latent_channels]
    comps = evecs[:, order].T  # (C, 3*f*f)
    # Deterministic sign: the largest-magnitude entry of each component is positive.
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * sign
    ae = PCAAutoencoder(latent_channels, factor)
    ae.components.copy_(comps.float().view(latent_channels, 3, factor, factor))
    ae.mean.copy_(mean.float().view(1, 3, factor, factor))
    ae.scale.copy_((1.0 / evals[order].clamp_min(1e-12).sqrt()).float())
    return ae
