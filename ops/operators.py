"""Measurement operators A for zero-shot restoration (D-Flow, DMPlug, VIPaint, DPS) and their adjoints.

Every operator is a pure function of images (B, C, H, W) (pixel space, [0, 1]) and its parameters; the linear
ones have an explicit adjoint A^T with <A x, y> = <x, A^T y> (tested to float precision), which is what
projection and back-projection methods need; the solvers themselves only differentiate through A.

- downsample x f: the antialiased bicubic kernel of the sr tasks (`ops.degrade.downsample` is this operator
  followed by the clamp to [0, 1]); its adjoint is the vector-Jacobian product of the same call.
- mask: elementwise product with a keep mask (1 = observed), self-adjoint.
- blur: circular convolution with a given odd-sized kernel (Gaussian or linear motion); the adjoint is the
  circular correlation, i.e. the same convolution with the kernel flipped in both axes.
- noise: y = A x + level * n, n ~ N(0, I) from an injected generator; an unknown level is estimated from y
  by the median absolute diagonal Haar coefficient (Donoho & Johnstone 1994).
- tone curve (non-linear): y = (1 - exp(-g x)) / (1 - exp(-g)), a camera-like saturating response.

`deblur` and `denoise` are the benchmark-mode degradations of the tasks of the same names.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ._checks import check_finite, check_positive

Operator = Callable[[torch.Tensor], torch.Tensor]
# Median |N(0, 1)| = Phi^-1(3/4): MAD -> standard deviation.
MAD_TO_STD = 0.6744897501960817


def _check_images(name: str, images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"{name} must be a (B, C, H, W) tensor, got {getattr(images, 'shape', type(images).__name__)}")


def _check_factor(factor) -> None:
    if not (isinstance(factor, int) and factor >= 1):
        raise ValueError(f"factor must be a positive integer (4 or 8 for the sr tasks), got {factor!r}")


# ---- downsampling (linear) ----


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Antialiased bicubic x`factor` downsampling without the clamp: (B, C, H, W) -> (B, C, H/f, W/f), linear."""
    _check_images("x", x)
    _check_factor(factor)
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} is not divisible by the factor {factor}; pad or crop to a multiple")
    return F.interpolate(x, size=(h // factor, w // factor), mode="bicubic", antialias=True, align_corners=False)


def downsample_adjoint(y: torch.Tensor, factor: int) -> torch.Tensor:
    """A^T of `downsample`: (B, C, h, w) -> (B, C, h*f, w*f), the vector-Jacobian product of the same kernel."""
    _check_images("y", y)
    _check_factor(factor)
    b, c, h, w = y.shape
    x = y.new_zeros(b, c, h * factor, w * factor).requires_grad_(True)
    with torch.enable_grad():
        out = downsample(x, factor)
        (grad,) = torch.autograd.grad(out, x, grad_outputs=y)
    return grad


# ---- masks (linear, self-adjoint) ----


def mask(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Observed pixels only: x * keep with keep (B or 1, 1 or C, H, W) in {0, 1} (1 = observed); A^T = A."""
    _check_images("x", x)
    _check_images("keep", keep)
    if keep.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"keep mask {tuple(keep.shape)} must cover the image {tuple(x.shape)} (same H, W)")
    return x * keep.to(x.dtype)


mask_adjoint = mask


# ---- blur (linear) ----


def gaussian_kernel(size: int, std: float, dtype=torch.float64) -> torch.Tensor:
    """Normalised isotropic Gaussian kernel (size, size), size odd."""
    _check_kernel_size(size)
    check_positive("std", std)
    t = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-0.5 * (t / std) ** 2)
    k = g[:, None] * g[None, :]
    return k / k.sum()


def motion_kernel(size: int, length: float, angle: float, dtype=torch.float64, samples: int = 64) -> torch.Tensor:
    """Normalised linear motion-blur kernel (size, size): a centred segment of `length` px at `angle` degrees
    (0 = horizontal), rasterised by bilinear splatting of `samples` points along it."""
    _check_kernel_size(size)
    check_positive("length", length)
    if length > size:
        raise ValueError(f"motion length {length} does not fit in a {size}x{size} kernel; use size >= length")
    t = torch.linspace(-0.5, 0.5, samples, dtype=dtype) * (length - 1 if length > 1 else 0.0)
    c = (size - 1) / 2
    xs = c + t * math.cos(math.radians(angle))
    ys = c - t * math.sin(math.radians(angle))
    k = torch.zeros(size, size, dtype=dtype)
    x0, y0 = xs.floor(), ys.floor()
    for dx in (0, 1):
        for dy in (0, 1):
            wgt = (1 - (xs - x0 - dx).abs()) * (1 - (ys - y0 - dy).abs())
            xi, yi = (x0 + dx).long().clamp(0, size - 1), (y0 + dy).long().clamp(0, size - 1)
            k.index_put_((yi, xi), wgt, accumulate=True)
    return k / k.sum()


def _check_kernel_size(size) -> None:
    if not (isinstance(size, int) and size >= 1 and size % 2 == 1):
        raise ValueError(f"kernel size must be an odd positive integer, got {size!r}")


def _check_kernel(kernel: torch.Tensor, x: torch.Tensor) -> None:
    if not isinstance(kernel, torch.Tensor) or kernel.ndim != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
        raise ValueError(f"kernel must be a 2-D tensor with odd sides (e.g. gaussian_kernel(9, 2.0)), got "
                         f"{getattr(kernel, 'shape', type(kernel).__name__)}")
    check_finite("kernel", kernel)
    if kernel.shape[0] > x.shape[-2] or kernel.shape[1] > x.shape[-1]:
        raise ValueError(f"kernel {tuple(kernel.shape)} is larger than the image {tuple(x.shape[-2:])}")


def _circular_correlate(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """out(i) = sum_k kernel(k) x(i + k - r), indices mod the image size (conv2d is a correlation)."""
    ry, rx = kernel.shape[0] // 2, kernel.shape[1] // 2
    c = x.shape[1]
    weight = kernel.to(x)[None, None].expand(c, 1, -1, -1)
    return F.conv2d(F.pad(x, (rx, rx, ry, ry), mode="circular"), weight, groups=c)


def blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Circular convolution of every channel of (B, C, H, W) with `kernel` (kh, kw), odd sides -> (B, C, H, W)."""
    _check_images("x", x)
    _check_kernel(kernel, x)
    return _circular_correlate(x, kernel.flip(0, 1))


def blur_adjoint(y: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """A^T of `blur`: circular correlation with the kernel (convolution with the flipped kernel)."""
    _check_images("y", y)
    _check_kernel(kernel, y)
    return _circular_correlate(y, kernel)


# ---- noise ----


def add_noise(y: torch.Tensor, level: float, generator: torch.Generator) -> torch.Tensor:
    """y + level * n, n ~ N(0, I) drawn from `generator` (level = standard deviation in [0, 1] pixel units)."""
    if not (isinstance(level, (int, float)) and math.isfinite(level) and level >= 0):
        raise ValueError(f"noise level must be a finite number >= 0, got {level!r}")
    n = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=generator.device).to(y.device)
    return y + level * n


def estimate_noise_level(y: torch.Tensor) -> torch.Tensor:
    """Noise std per image of (B, C, H, W): median |HH| / 0.6745 over diagonal Haar details -> (B,).

    HH = (a - b - c + d) / 2 over 2x2 blocks has the variance of the noise for i.i.d. noise and is near zero on
    smooth content, so the median is robust to edges (Donoho & Johnstone 1994).
    """
    _check_images("y", y)
    if y.shape[-2] < 2 or y.shape[-1] < 2:
        raise ValueError(f"images {tuple(y.shape)} are too small to estimate noise (need at least 2x2)")
    h, w = y.shape[-2] // 2 * 2, y.shape[-1] // 2 * 2
    v = y[..., :h, :w]
    hh = (v[..., 0::2, 0::2] - v[..., 0::2, 1::2] - v[..., 1::2, 0::2] + v[..., 1::2, 1::2]) / 2
    return hh.abs().flatten(1).median(dim=1).values / MAD_TO_STD


# ---- non-linear ----


def tone_curve(x: torch.Tensor, gain: float = 4.0) -> torch.Tensor:
    """Saturating camera response y = (1 - e^{-g x}) / (1 - e^{-g}): maps [0, 1] onto [0, 1], monotone, non-linear."""
    check_positive("gain", gain)
    return torch.expm1(-gain * x) / math.expm1(-gain)


def tone_curve_inverse(y: torch.Tensor, gain: float = 4.0) -> torch.Tensor:
    """Inverse of `tone_curve` on its range."""
    check_positive("gain", gain)
    return -torch.log1p(y * math.expm1(-gain)) / gain


# ---- benchmark-mode degradations of the deblur and denoise tasks ----


def deblur(frames: torch.Tensor, kernel: torch.Tensor, level: float, generator: torch.Generator) -> torch.Tensor:
    """Blurred, noisy frames in [0, 1]: clamp(blur(x, k) + level * n) for (B, C, H, W) frames in [0, 1]."""
    return add_noise(blur(frames, kernel), level, generator).clamp(0, 1)


def denoise(frames: torch.Tensor, level: float, generator: torch.Generator) -> torch.Tensor:
    """Noisy frames clamp(x + level * n) in [0, 1] (A = identity)."""
    _check_images("frames", frames)
    return add_noise(frames, level, generator).clamp(0, 1)
