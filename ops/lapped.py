"""Lapped f=8 linear autoencoder: overlapping 16x16 analysis/synthesis kernels at stride 8 (no 8-px blocks).

The PCA latent (`ops.autoencoders.PCAAutoencoder`) decodes every latent cell into its own 8x8 block, so any error
of the denoiser shows up as a block pattern. Here each latent cell's synthesis functions span 2f x 2f pixels and
are multiplied by a separable sine window w(n) = sin(pi (n + 1/2) / 2f), which falls to ~0 at the support's edge
and satisfies w(n)^2 + w(n + f)^2 = 1 (Princen-Bradley, as in the MDCT/lapped orthogonal transform): an error
in one cell fades out smoothly across its neighbours instead of stopping at a cell border.

encode(x) = scale * conv2d(x - mean, A, stride f, padding f/2)   (B, 3, H, W) -> (B, C, H/f, W/f)
decode(z) = conv_transpose2d(z / scale, w * S, stride f, padding f/2) + mean
Both maps are linear (cheap differentiable decode for pixel-space guidance); A and S start from the PCA of 8x8
patches placed in the kernel's centre and are fitted by least squares on image crops plus a penalty on the
cell-border ratio of decoded latent errors (`fit_lapped`): the window alone does not stop the fitted synthesis
functions from keeping PCA's sharp 8x8 edges inside their support. `scale`
whitens each latent channel on the training crops (unit std, as the PCA latent does).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .metrics import cell_border_ratio


def sine_window(factor: int) -> torch.Tensor:
    """(2f, 2f) separable sine window; w(n)^2 + w(n+f)^2 = 1 along each axis."""
    n = torch.arange(2 * factor, dtype=torch.float64)
    w = torch.sin(math.pi * (n + 0.5) / (2 * factor))
    return (w[:, None] * w[None, :]).float()


class LappedAutoencoder(nn.Module):
    """Linear f=8 autoencoder with overlapping windowed 2f x 2f kernels: (B,3,H,W) in [0,1] <-> (B,C,H/f,W/f)."""

    linear_decoder = True

    def __init__(self, latent_channels: int = 48, factor: int = 8):
        super().__init__()
        if factor < 2 or factor % 2:
            raise ValueError(f"factor must be an even integer >= 2, got {factor}")
        if latent_channels < 1 or latent_channels > 3 * factor * factor:
            raise ValueError(f"latent_channels must be in [1, {3 * factor * factor}], got {latent_channels}")
        self.latent_channels, self.factor = latent_channels, factor
        k = 2 * factor
        self.analysis = nn.Parameter(torch.zeros(latent_channels, 3, k, k))  # (C, 3, 2f, 2f)
        self.synthesis = nn.Parameter(torch.zeros(latent_channels, 3, k, k))  # (C, 3, 2f, 2f), times the window
        self.register_buffer("window", sine_window(factor))  # (2f, 2f)
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1))  # per-channel mean colour
        self.register_buffer("scale", torch.ones(latent_channels))  # (C,) latent = scale * projection

    def config(self) -> dict:
        return {"type": "lapped", "latent_channels": self.latent_channels, "factor": self.factor}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, C, H/f, W/f); reflect padding at the image border."""
        b, c, h, w = images.shape
        f = self.factor
        if c != 3 or h % f or w % f:
            raise ValueError(f"images must be (B, 3, H, W) with H, W divisible by {f}, got {tuple(images.shape)}")
        x = F.pad(images - self.mean, (f // 2,) * 4, mode="reflect")
        return self.scale.view(1, -1, 1, 1) * F.conv2d(x, self.analysis, stride=f)

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, h*f, w*f) in [0, 1] (unclamped with clamp=False: exactly linear)."""
        out = F.conv_transpose2d(latents / self.scale.view(1, -1, 1, 1), self.synthesis * self.window,
                                 stride=self.factor, padding=self.factor // 2)
        out = out + self.mean
        return out.clamp(0, 1) if clamp else out


def init_from_pca(ae: LappedAutoencoder, components: torch.Tensor, mean: torch.Tensor) -> LappedAutoencoder:
    """Start from PCA: (C, 3, f, f) orthonormal components in the kernels' centre, mean colour from (1, 3, f, f)."""
    f = ae.factor
    with torch.no_grad():
        ae.analysis.zero_()
        ae.synthesis.zero_()
        ae.analysis[:, :, f // 2 : f // 2 + f, f // 2 : f // 2 + f] = components
        ae.synthesis[:, :, f // 2 : f // 2 + f, f // 2 : f // 2 + f] = components / ae.window[f // 2 : f // 2 + f, f // 2 : f // 2 + f]
        ae.mean.copy_(mean.mean((2, 3), keepdim=True))
    return ae


def fit_lapped(ae: LappedAutoencoder, batches, steps: int, lr: float = 3e-3, smooth: float = 1e-4, log=None,
               generator: torch.Generator | None = None) -> list[float]:
    """Least-squares fit of analysis + synthesis on crops: minimise |decode(encode(x)) - x|^2 with Adam.

    Plus `smooth` * max(0, r - 1) for two decoded latent errors, r = the cell-border ratio
    (`ops.metrics.cell_border_ratio`): white noise with the latent's per-channel std (what a denoiser's mistakes
    look like) and white noise scaled so every channel's synthesis functions carry the same pixel energy (a
    regressor corrects mostly the fine-detail channels, which PCA decodes into sharp 8x8 blocks).
    `batches`: a callable step -> (B, 3, H, W) crops in [0, 1]. Returns the loss every 50 steps. Afterwards
    `scale` is set so each latent channel has unit std on a fresh batch (the whitening of the PCA latent).
    """
    ae.scale.fill_(1.0)
    opt = torch.optim.Adam([ae.analysis, ae.synthesis], lr=lr)
    losses = []
    for step in range(steps):
        x = batches(step)
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
        z = ae.encode(x)  # (B, C, h, w)
        loss = F.mse_loss(ae.decode(z, clamp=False), x)
        if smooth:
            energy = (ae.synthesis * ae.window).detach().flatten(1).norm(dim=1).clamp_min(1e-8)  # (C,)
            for weight in (z.detach().std(dim=(0, 2, 3)), 1 / energy):  # latent-like errors; equal pixel energy
                err = torch.randn(z.shape, generator=generator) * weight.view(1, -1, 1, 1)
                loss = loss + smooth * (cell_border_ratio(ae.decode(err, clamp=False) - ae.mean, ae.factor) - 1).clamp_min(0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            losses.append(float(loss.detach()))
            if log:
                log(step, losses[-1])
    with torch.no_grad():
        z = ae.encode(batches(steps))  # (B, C, h, w)
        ae.scale.copy_(1.0 / z.std(dim=(0, 2, 3)).clamp_min(1e-6))
    return losses
