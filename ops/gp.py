"""Gaussian-process noise by Random Fourier Features (paper Sec. 3.1, App. F.2).

xi(p) = sqrt(2/J) * sum_j w_j cos(<z_j, p> + b_j),  z_j ~ N(0, eps^-2 I) truncated at |z| <= trunc/eps,
b_j ~ U(0, 2pi), w_j ~ N(0, 1) independently per channel. Points p are in unit-square coordinates of
the latent grid: pixel (i, k) of an (h, w) grid sits at ((k + 0.5) / res, (i + 0.5) / res) as (x, y) with
res = max(h, w), one scale for both axes so the noise stays isotropic on non-square frames.
Each channel has unit variance everywhere, and the field can be evaluated exactly at any point, which
is what makes noise warping exact: the noise of a warped frame is the same field at warped points.

Two evaluators of the same sum: `rff_eval_dense` (reference, O(J N)) and `rff_eval_nufft`, a type-3
non-uniform FFT (FINUFFT), exact to the requested tolerance and ~35x faster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ._checks import check_finite, check_positive, check_shape

DEFAULT_FEATURES = 3000
DEFAULT_TRUNCATION = 2.0


def default_length_scale(resolution: int) -> float:
    """eps = 2 / (pi * res): the paper's rule of thumb; 2/eps then sits exactly at Nyquist (App. F.2)."""
    return 2.0 / (math.pi * resolution)


@dataclass(frozen=True)
class RFFeatures:
    """One draw of the GP: shared frequencies and phases, independent weights per channel."""

    freqs: np.ndarray  # (J, 2) z_j, radians per unit length
    phases: np.ndarray  # (J,) b_j
    weights: np.ndarray  # (C, J) w_j per channel
    length_scale: float

    @property
    def channels(self) -> int:
        return self.weights.shape[0]

    @property
    def num_features(self) -> int:
        return self.freqs.shape[0]


def draw_rff(
    rng: np.random.Generator,
    channels: int,
    resolution: int,
    num_features: int = DEFAULT_FEATURES,
    length_scale: float | None = None,
    truncation: float | None = DEFAULT_TRUNCATION,
) -> RFFeatures:
    """Draw (z, b, w) for a C-channel GP; `resolution` is the larger latent side, used for the default eps."""
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    for name, value in (("channels", channels), ("resolution", resolution), ("num_features", num_features)):
        if not (isinstance(value, (int, np.integer)) and value > 0):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    eps = default_length_scale(resolution) if length_scale is None else length_scale
    check_positive("length_scale", eps)
    if truncation is not None:
        check_positive("truncation", truncation)
    # 1. z ~ N(0, eps^-2 I) truncated at |z| <= truncation/eps (None: untruncated, the exact RBF kernel),
    #    by rejection (acceptance 1 - e^{-t^2/2}).
    limit = math.inf if truncation is None else truncation
    freqs = np.empty((0, 2))
    while freqs.shape[0] < num_features:
        cand = rng.standard_normal((2 * num_features, 2))
        cand = cand[np.linalg.norm(cand, axis=1) <= limit]
        freqs = np.concatenate([freqs, cand])
    freqs = freqs[:num_features] / eps  # (J, 2)
    # 2. phases and per-channel weights.
    phases = rng.uniform(0.0, 2.0 * math.pi, num_features)  # (J,)
    weights = rng.standard_normal((channels, num_features))  # (C, J)
    return RFFeatures(freqs=freqs, phases=phases, weights=weights, length_scale=float(eps))


def grid_points(height: int, width: int) -> np.ndarray:
    """Pixel-centre positions of an (h, w) grid in pixel units, (h, w, 2) as (x, y)."""
    ys, xs = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    return np.stack([xs, ys], axis=-1)


def pixel_to_unit(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixel coordinates (x, y) -> unit coordinates (p + 0.5) / res, res = max(h, w)."""
    return (np.asarray(points, dtype=np.float64) + 0.5) / max(height, width)


def _check_points(points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim < 1 or points.shape[-1] != 2:
        raise ValueError(f"points has shape {points.shape}; expected (..., 2) holding (x, y)")
    check_finite("points", points)
    return points


def rff_eval_dense(features: RFFeatures, points: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Reference evaluation: (..., 2) unit-square points -> (C, ...), the cos matrix in float64 chunks (torch)."""
    points = _check_points(points)
    flat = torch.from_numpy(points.reshape(-1, 2))
    freqs, phases = torch.from_numpy(features.freqs), torch.from_numpy(features.phases)
    weights = torch.from_numpy(features.weights)
    out = torch.empty(features.channels, flat.shape[0], dtype=torch.float64)
    scale = math.sqrt(2.0 / features.num_features)
    for start in range(0, flat.shape[0], chunk):
        arg = flat[start : start + chunk] @ freqs.T + phases  # (n, J)
        out[:, start : start + chunk] = scale * (weights @ torch.cos(arg).T)
    return out.numpy().reshape((features.channels,) + points.shape[:-1])


def rff_eval_nufft(features: RFFeatures, points: np.ndarray, tol: float = 1e-6, nthreads: int | None = None) -> np.ndarray:
    """Exact-to-`tol` evaluation by a type-3 NUFFT: f(p) = Re sum_j (w_j e^{i b_j}) e^{i <z_j, p>}."""
    import finufft

    points = _check_points(points)
    check_positive("tol", tol)
    flat = points.reshape(-1, 2)
    coeffs = features.weights * np.exp(1j * features.phases)  # (C, J) complex
    kwargs = {} if nthreads is None else {"nthreads": nthreads}
    vals = finufft.nufft2d3(
        features.freqs[:, 0].copy(), features.freqs[:, 1].copy(), np.ascontiguousarray(coeffs),
        flat[:, 0].copy(), flat[:, 1].copy(), eps=tol, isign=1, **kwargs,
    )  # (C, N) complex
    out = math.sqrt(2.0 / features.num_features) * np.real(vals).reshape(features.channels, -1)
    return out.reshape((features.channels,) + points.shape[:-1])


def rff_eval(features: RFFeatures, points: np.ndarray, backend: str = "nufft", tol: float = 1e-6) -> np.ndarray:
    """Evaluate the GP at unit-square points with the chosen backend ('nufft' or 'dense')."""
    if backend == "nufft":
        return rff_eval_nufft(features, points, tol=tol)
    if backend == "dense":
        return rff_eval_dense(features, points)
    raise ValueError(f"unknown backend {backend!r}; expected one of nufft, dense")


def gp_noise_at(
    rng: np.random.Generator,
    positions: np.ndarray,
    channels: int,
    height: int,
    width: int,
    backend: str = "nufft",
    tol: float = 1e-6,
    num_features: int = DEFAULT_FEATURES,
    length_scale: float | None = None,
) -> np.ndarray:
    """GP noise of one draw at pixel positions (F, h, w, 2) of an (h, w) latent grid -> (F, C, h, w) float32."""
    positions = np.asarray(positions, dtype=np.float64)
    check_shape("positions", positions, (None, None, None, 2), "as (frames, h, w, xy)")
    features = draw_rff(rng, channels, max(height, width), num_features, length_scale)
    field = rff_eval(features, pixel_to_unit(positions, height, width), backend=backend, tol=tol)  # (C, F, h, w)
    return np.ascontiguousarray(field.transpose(1, 0, 2, 3)).astype(np.float32)


def gp_noise(rng: np.random.Generator, frames: int, channels: int, height: int, width: int, **kwargs) -> np.ndarray:
    """Independent GP draws on the regular grid, one per frame -> (F, C, h, w) float32."""
    grid = grid_points(height, width)[None]
    return np.concatenate([gp_noise_at(rng, grid, channels, height, width, **kwargs) for _ in range(frames)])


def white_noise(rng: np.random.Generator, frames: int, channels: int, height: int, width: int) -> np.ndarray:
    """I.i.d. N(0, 1) noise with the same interface as gp_noise -> (F, C, h, w) float32."""
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng.standard_normal((frames, channels, height, width)).astype(np.float32)


def truncated_rbf_kernel(distance: float, length_scale: float, truncation: float = DEFAULT_TRUNCATION) -> float:
    """Covariance the truncated RFF draw converges to: E[cos(<z, d>) | |z| <= t/eps] (radial Bessel integral).

    Without truncation it is the RBF kernel exp(-d^2 / (2 eps^2)).
    """
    from scipy import integrate, special

    sigma = 1.0 / length_scale
    radius = truncation * sigma
    mass = 1.0 - math.exp(-0.5 * truncation**2)
    integrand = lambda r: special.j0(r * distance) * r / sigma**2 * math.exp(-0.5 * (r / sigma) ** 2)
    value, _ = integrate.quad(integrand, 0.0, radius, limit=200)
    return value / mass


def gp_noise_torch(
    generator: torch.Generator,
    batch: int,
    channels: int,
    height: int,
    width: int,
    num_features: int = DEFAULT_FEATURES,
    length_scale: float | None = None,
    truncation: float = DEFAULT_TRUNCATION,
    device=None,
    dtype=torch.float32,
) -> torch.Tensor:
    """Independent GP draws on the regular grid, dense RFF in torch (training batches, GPU-friendly) -> (B, C, h, w)."""
    res = max(height, width)
    eps = default_length_scale(res) if length_scale is None else length_scale
    check_positive("length_scale", eps)
    # 1. truncated z by rejection, oversampled once (acceptance 1 - e^{-t^2/2} = 0.86 at t = 2).
    freqs = torch.empty(0, 2, device=device)
    while freqs.shape[0] < batch * num_features:
        cand = torch.randn(2 * batch * num_features, 2, generator=generator, device=device)
        freqs = torch.cat([freqs, cand[cand.norm(dim=1) <= truncation]])
    freqs = freqs[: batch * num_features].view(batch, num_features, 2) / eps  # (B, J, 2)
    phases = torch.rand(batch, num_features, generator=generator, device=device) * (2 * math.pi)  # (B, J)
    weights = torch.randn(batch, channels, num_features, generator=generator, device=device)  # (B, C, J)
    # 2. evaluate at pixel centres in unit coordinates.
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    points = (torch.stack([xs, ys], -1).reshape(-1, 2).float() + 0.5) / res  # (h*w, 2)
    basis = torch.cos(points @ freqs.transpose(1, 2) + phases[:, None, :])  # (B, h*w, J)
    field = math.sqrt(2.0 / num_features) * weights @ basis.transpose(1, 2)  # (B, C, h*w)
    return field.view(batch, channels, height, width).to(dtype)
