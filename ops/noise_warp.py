"""Noise-warping methods (paper Sec. 4.2): initial noise for every frame of a video -> (F, C, h, w).

All methods share one interface, `warp_noise(method, rng, shape, backward=..., forward=..., positions=...)`,
with flows on the latent grid in the conventions of `ops.flow`. `gp` evaluates the GP exactly at the
chained positions (u^(j) = u^(0) o P_j, Algorithm 1 line 5, composed back to frame 0); the others are the
baselines of "How I Warped Your Noise" (Chang et al. 2024): fixed, resample, nearest, bilinear, integral.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import flow as flowops
from . import gp
from ._checks import check_choice, check_shape

METHODS = ("fixed", "resample", "nearest", "bilinear", "integral", "gp")
BASE_NOISES = ("white", "gp")


def _base(rng: np.random.Generator, base: str, frames: int, c: int, h: int, w: int) -> np.ndarray:
    check_choice("base noise", base, BASE_NOISES)
    return (gp.gp_noise if base == "gp" else gp.white_noise)(rng, frames, c, h, w)  # (F, C, h, w)


def fixed_noise(rng, shape, base="white") -> torch.Tensor:
    """The same noise map for every frame."""
    f, c, h, w = shape
    return torch.from_numpy(_base(rng, base, 1, c, h, w)).expand(f, -1, -1, -1).clone()


def resample_noise(rng, shape, base="white") -> torch.Tensor:
    """Fresh independent noise for every frame."""
    return torch.from_numpy(_base(rng, base, *shape))


def interpolated_noise(rng, shape, backward: torch.Tensor, mode: str, base="white") -> torch.Tensor:
    """Warp frame j-1's noise onto frame j by sampling it at x + F_j(x); pixels from outside get fresh noise."""
    f, c, h, w = shape
    fresh = torch.from_numpy(_base(rng, base, f, c, h, w))  # (F, C, h, w)
    out = [fresh[0]]
    grid = flowops.identity_grid(h, w, backward.dtype)
    for j in range(1, f):
        points = (grid + backward[j - 1])[None]
        sampler = flowops.sample_nearest if mode == "nearest" else flowops.sample_bilinear
        warped = sampler(out[-1][None].to(backward.dtype), points)[0].float()
        valid = flowops.inside(points[0], h, w)
        out.append(torch.where(valid, warped, fresh[j]))
    return torch.stack(out)


def integral_noise(rng, shape, forward: torch.Tensor, subpixels: int = 8) -> torch.Tensor:
    """How I Warped Your Noise, discretised: upsample each pixel of frame j-1 into k x k sub-pixels conditioned
    on its value, move each sub-pixel along the forward flow, sum per destination pixel, divide by sqrt(count).

    Conditioned sub-pixels u = X/k + (Z - mean Z), Z ~ N(0, I_{k^2}), are i.i.d. N(0, 1) and average (times k)
    back to X, so every destination pixel stays N(0, 1); pixels no sub-pixel reaches get fresh noise.
    """
    f, c, h, w = shape
    k = subpixels
    noise = torch.from_numpy(gp.white_noise(rng, 1, c, h, w))[0].double()  # (C, h, w)
    out = [noise.float()]
    # sub-pixel centres of one pixel, offsets in pixel units: (k*k, 2)
    offs = (torch.arange(k, dtype=torch.float64) + 0.5) / k - 0.5
    oy, ox = torch.meshgrid(offs, offs, indexing="ij")
    sub = torch.stack([ox.flatten(), oy.flatten()], -1)
    grid = flowops.identity_grid(h, w, torch.float64)
    src = (grid[:, :, None, :] + sub[None, None]).reshape(1, h, w * k * k, 2)  # sub-pixel centres in frame j-1
    for j in range(1, f):
        z = torch.from_numpy(rng.standard_normal((c, h, w, k * k)))
        upsampled = noise[..., None] / k + (z - z.mean(-1, keepdim=True))  # (C, h, w, k*k)
        disp = flowops._displacement_sample(forward[j - 1][None].double(), src)[0].reshape(h, w, k * k, 2)
        dest = src.reshape(h, w, k * k, 2) + disp
        dx, dy = dest[..., 0].round().long(), dest[..., 1].round().long()
        keep = (dx >= 0) & (dx < w) & (dy >= 0) & (dy < h)
        index = (dy * w + dx)[keep]  # (n,)
        sums = torch.zeros(c, h * w, dtype=torch.float64).index_add_(1, index, upsampled[:, keep])
        counts = torch.zeros(h * w, dtype=torch.float64).index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
        fresh = torch.from_numpy(rng.standard_normal((c, h * w)))
        noise = torch.where(counts > 0, sums / counts.clamp(min=1).sqrt(), fresh).view(c, h, w)
        out.append(noise.float())
    return torch.stack(out)


def gp_warped_noise(rng, shape, positions: torch.Tensor, backend="nufft", tol=1e-6, **gp_kwargs) -> torch.Tensor:
    """One GP draw evaluated exactly at each frame's positions in frame 0 (latent pixels) -> (F, C, h, w)."""
    f, c, h, w = shape
    noise = gp.gp_noise_at(rng, positions.detach().cpu().double().numpy(), c, h, w, backend=backend, tol=tol, **gp_kwargs)
    return torch.from_numpy(noise)


def warp_noise(
    method: str,
    rng: np.random.Generator,
    shape: tuple[int, int, int, int],
    backward: torch.Tensor | None = None,
    forward: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    base: str = "white",
    **kwargs,
) -> torch.Tensor:
    """Initial noise for a video: (F, C, h, w) float32 by `method` (one of METHODS).

    backward/forward: (F-1, h, w, 2) latent flows; positions: (F, h, w, 2) chained positions in frame 0
    (derived from `backward` when not given). `base` picks white or GP noise for fixed/resample/nearest/bilinear.
    """
    check_choice("method", method, METHODS)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if len(shape) != 4 or any(not isinstance(s, (int, np.integer)) or s <= 0 for s in shape):
        raise ValueError(f"shape must be four positive integers (frames, channels, h, w), got {shape!r}")
    f, c, h, w = (int(s) for s in shape)
    for name, value, frames in (("backward", backward, f - 1), ("forward", forward, f - 1), ("positions", positions, f)):
        if value is not None:
            flowops.check_flow(name, value)
            check_shape(name, value, (frames, h, w, 2), f"to match shape {tuple(shape)}")
    if method == "fixed":
        return fixed_noise(rng, (f, c, h, w), base)
    if method == "resample":
        return resample_noise(rng, (f, c, h, w), base)
    if method in ("nearest", "bilinear"):
        if backward is None:
            raise ValueError(f"method {method!r} needs the backward flows (F-1, h, w, 2)")
        return interpolated_noise(rng, (f, c, h, w), backward, method, base)
    if method == "integral":
        if forward is None:
            raise ValueError("method 'integral' needs the forward flows (F-1, h, w, 2)")
        return integral_noise(rng, (f, c, h, w), forward, **kwargs)
    if positions is None:
        if backward is None:
            raise ValueError("method 'gp' needs positions (F, h, w, 2) or backward flows (F-1, h, w, 2)")
        positions = flowops.chain_positions(backward.double())
    return gp_warped_noise(rng, (f, c, h, w), positions, **kwargs)
