"""Regression + residual diffusion (stochastic refinement, Whang et al. 2022; ResShift, Yue et al. 2023).

A small deterministic regressor R predicts the latent mean mu = z_in + R(cond) of the restoration from the encoded
degraded frame z_in; a diffusion model only generates the residual r = x0 - mu:

    D(x, sigma, cond) = mu + D_r(x - mu, sigma, [mu, cond])          (EDM-preconditioned D_r, sigma_data = std r)

Sampling starts from sigma_max * noise as usual (GP noise for Warped Diffusion), so noise warping and
equivariance self-guidance act on the stochastic part, while most of the frame comes from R, which is temporally
stable by construction (a function of the degraded frame only). The condition the pipeline stores per frame is
[mu, regressor input]: R runs once per frame (in `condition`), not at every sampling step.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import degrade
from .denoisers import EDMDenoiser, RestorationModel, build_unet
from .training import telea_inpaint


class ResBlock(nn.Module):
    """conv3x3 - SiLU - conv3x3 with a skip connection (no normalisation: a regressor sees one image at a time)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, padding_mode="replicate")
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, padding_mode="replicate")

    def forward(self, x):
        return x + self.conv2(F.silu(self.conv1(x)))


class LatentRegressor(nn.Module):
    """Conv net at latent resolution: (B, Cin, h, w) -> (B, Cout, h, w) correction (zero at initialisation)."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 64, blocks: int = 4):
        super().__init__()
        if width < 1 or blocks < 0:
            raise ValueError(f"width must be >= 1 and blocks >= 0, got {width}, {blocks}")
        self.head = nn.Conv2d(in_channels, width, 3, padding=1, padding_mode="replicate")
        self.body = nn.Sequential(*[ResBlock(width) for _ in range(blocks)])
        self.tail = nn.Conv2d(width, out_channels, 3, padding=1, padding_mode="replicate")
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def forward(self, x):
        return self.tail(self.body(self.head(x)))


class DecodeRefiner(nn.Module):
    """Pixel-space refinement of a decoded frame that knows where the latent grid lies (identity at initialisation):

        refine(x) = x + pixel_shuffle(N(pixel_unshuffle(x - 1/2, f)), f)        (B, 3, H, W) -> (B, 3, H, W)

    N is a conv net at latent resolution over the f x f cells (3 f^2 channels), so every output pixel's correction
    depends on its offset in the cell: what a translation-equivariant pixel filter cannot see, and what the lapped
    decoder's cell-periodic structure in the diffusion samples needs (flows/train_residual.py --stage refine).
    """

    def __init__(self, factor: int, width: int = 64, blocks: int = 2):
        super().__init__()
        if factor < 1 or width < 1 or blocks < 0:
            raise ValueError(f"factor and width must be >= 1 and blocks >= 0, got {factor}, {width}, {blocks}")
        self.factor = int(factor)
        c = 3 * self.factor * self.factor
        self.head = nn.Conv2d(c, width, 3, padding=1, padding_mode="replicate")
        self.body = nn.Sequential(*[ResBlock(width) for _ in range(blocks)])
        self.tail = nn.Conv2d(width, c, 3, padding=1, padding_mode="replicate")
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f = self.factor
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"images must be (B, 3, H, W) with H, W divisible by {f}, got {tuple(images.shape)}")
        cells = F.pixel_unshuffle(images - 0.5, f)  # (B, 3 f^2, H/f, W/f)
        return images + F.pixel_shuffle(self.tail(self.body(self.head(cells))), f)


class ResidualDenoiser(nn.Module):
    """D(x, sigma, cond) = mu + D_r(x - mu, sigma, cond) with mu = cond[:, :C] (C = the latent's channels)."""

    def __init__(self, residual: EDMDenoiser, latent_channels: int):
        super().__init__()
        self.residual = residual
        self.latent_channels = int(latent_channels)

    def forward(self, x: torch.Tensor, sigma, cond: torch.Tensor) -> torch.Tensor:
        mu = cond[:, : self.latent_channels].to(x.dtype)  # (B, C, h, w)
        return mu + self.residual(x - mu, sigma, cond)


class ResidualRestorationModel(RestorationModel):
    """RestorationModel whose condition() runs the regressor and whose denoiser diffuses the residual only.

    condition(degraded, mask) -> [mu (C), regressor input (Cr)]: sr8: Cr = C (encode(bicubic)); sr4: `degraded` is the
    low-res frame itself (B, 3, H/s, W/s), as the pipeline gives an x4 model (tasks/encode.py), upsampled here by
    bicubic x s (s = card["sr_factor"]) and encoded, Cr = C; inpaint:
    Cr = C + f^2 (encode(holes filled by Telea when card["prefill"] == "telea", else 0.5), pixel-unshuffled
    mask: where in each cell the holes are). Measured on held-out views before Telea prefill: the regressor
    alone filled thin scratches at 22.7 dB hole PSNR against Telea's 30.7.
    `predict(degraded, mask)` -> mu (the regression-only restoration, in latent space).
    `refine(images)`: the card's DecodeRefiner on decoded frames (card["refiner"]; sr8-res-*: removes the cell-periodic
    structure the diffusion's samples get through the lapped synthesis functions), identity without one.
    """

    def __init__(self, autoencoder: nn.Module, regressor: LatentRegressor, denoiser: ResidualDenoiser | None,
                 task: str, noise: str | None = None, sigma_min: float = 0.002, sigma_max: float = 10.0,
                 card: dict | None = None, model_id: str = "", refiner: DecodeRefiner | None = None):
        super().__init__(autoencoder, denoiser, task, noise, sigma_min, sigma_max, card, model_id)
        if task not in ("sr8", "sr4", "inpaint"):
            raise ValueError(f"a residual model restores 'sr8', 'sr4' or 'inpaint', got {task!r}")
        if task == "sr4" and not int(self.card.get("sr_factor") or 0) > 1:
            raise ValueError("an sr4 residual model's card needs sr_factor (the upscaling factor of its low-res input)")
        self.regressor = regressor
        self.refiner = refiner

    def refine(self, images: torch.Tensor) -> torch.Tensor:
        """The DecodeRefiner (card["refiner"]) on decoded frames (B, 3, H, W), clamped to [0, 1]; identity without one."""
        if self.refiner is None:
            return images
        return self.refiner(images.to(next(self.refiner.parameters()).dtype)).to(images.dtype).clamp(0, 1)

    def regressor_input(self, degraded: torch.Tensor, mask: torch.Tensor | None = None):
        """-> (regressor input (B, Cr, h, w), encoded degraded frame z_in (B, C, h, w))."""
        if self.task == "sr8":
            z = self.encode(degraded)
            return z, z
        if self.task == "sr4":  # the low-res frame (B, 3, H/s, W/s) -> bicubic x s -> (B, C, H/f, W/f)
            z = self.encode(degrade.upsample(degraded, int(self.card["sr_factor"])))
            return z, z
        if mask is None:
            raise ValueError("inpaint models need a mask (B, 1, H, W) with 1 = hole")
        if self.card.get("prefill") == "telea":  # start from OpenCV's Telea fill, not a grey hole
            filled = telea_inpaint(degraded.detach().float().clamp(0, 1), mask.detach().float()).to(degraded.dtype)
            z = self.encode(mask * filled + (1 - mask) * degraded)
        else:
            z = self.encode(degraded * (1 - mask) + 0.5 * mask)
        return torch.cat([z, F.pixel_unshuffle(mask.to(z.dtype), self.factor)], dim=1), z

    def predict(self, degraded: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        inp, z = self.regressor_input(degraded, mask)
        return z + self.regressor(inp)  # (B, C, h, w)

    def condition(self, degraded: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        inp, z = self.regressor_input(degraded, mask)
        return torch.cat([z + self.regressor(inp), inp], dim=1)  # (B, C + Cr, h, w)

    def start(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        """card["start"] == "regression": the truncated schedule starts at mu + sigma_max noise (sigma_max of the
        order of the residual's fine detail, not of the whole frame): the diffusion refines the regression instead
        of generating the residual from pure noise (SDEdit, Meng et al. 2022; ResShift). Otherwise x_T = sigma_max
        noise (the full schedule)."""
        if self.card.get("start") != "regression":
            return None
        if cond is None:
            raise ValueError("a residual model needs its condition (from condition(degraded, mask))")
        return cond[:, : self.latent_channels]

    def denoise(self, x: torch.Tensor, sigma, cond: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """x0_hat (B, C, h, w); a regression-only model (no residual denoiser) predicts mu at every sigma, so any
        sampler ends at mu + (sigma_min / sigma_max) * noise: the deterministic restoration."""
        if cond is None:
            raise ValueError("a residual model needs its condition (from condition(degraded, mask))")
        if self.denoiser is None:  # constant in x; `+ 0 * x` keeps it in x's graph for self-guidance (zero gradient)
            return cond[:, : self.latent_channels].to(x.dtype) + 0 * x
        return self.denoiser(x, sigma, cond)


def regressor_channels(task: str, latent_channels: int, factor: int) -> int:
    """Channels of the regressor input for a task (see ResidualRestorationModel.regressor_input)."""
    return latent_channels + (factor * factor if task == "inpaint" else 0)


def build_residual_model(card: dict, autoencoder: nn.Module, model_id: str = "") -> ResidualRestorationModel:
    """An untrained ResidualRestorationModel of the architecture a card describes (card["residual"])."""
    c, f = int(autoencoder.latent_channels), int(autoencoder.factor)
    a = card["residual"]
    cr = regressor_channels(card["task"], c, f)
    reg = LatentRegressor(cr, c, int(a["regressor"]["width"]), int(a["regressor"]["blocks"]))
    den = None
    if a.get("unet"):
        unet = build_unet(in_channels=c + c + cr, out_channels=c, **a["unet"])
        den = ResidualDenoiser(EDMDenoiser(unet, sigma_data=float(a["sigma_data"]), time_scale=float(a["time_scale"])), c)
    ref = DecodeRefiner(f, int(card["refiner"]["width"]), int(card["refiner"]["blocks"])) if card.get("refiner") else None
    return ResidualRestorationModel(autoencoder, reg, den, card["task"], card.get("noise"), card.get("sigma_min", 0.002),
                                    card.get("sigma_max", 10.0), card=card, model_id=model_id, refiner=ref)
