"""EDM/Karras sampling with equivariance self-guidance (paper Algorithm 1).

A denoiser is any callable D(x, sigma, cond) -> x0_hat with x (B, C, h, w), sigma (B,), cond (B, ...) or
None; it must treat batch elements independently (eval mode, no batch norm). Frames are guided towards
their predecessor: at step k of frame j, the current prediction D_j is sampled at T_j(x) = x + G_j(x) for
every pixel x of frame j-1 (G_j the forward flow j-1 -> j, bilinear, differentiable) and compared with
frame j-1's prediction at the same step k, held constant:

    e = sum_{x valid} |D_j(T_j(x)) - D_{j-1}(x)|^2,     x_{k+1} <- x_{k+1} - lambda * grad_x e / sqrt(e).

With `decode` (an image decoder, differentiable), D_j and D_{j-1} are compared as decoded frames warped by the
full-resolution pixel flow instead ("pixel-space guidance"): a latent that is not shift-equivariant below its
8x8 cell (our PCA latent) makes latent agreement under a sub-cell warp a poor proxy for pixel agreement.

Two schedules give the same numbers: `sequential` (frame by frame) and `wavefront` (step k of frame j in
the same batch as step k+1 of frame j-1, so frames x steps calls become frames + steps batched calls).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from . import flow as flowops
from ._checks import check_choice, check_finite, check_shape

Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
SCHEDULES = ("wavefront", "sequential", "parallel")


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Noise levels of Karras et al. 2022, Eq. 5, with a final 0 appended -> (steps + 1,) float64."""
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min ({sigma_min}) must be smaller than sigma_max ({sigma_max})")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def check_sigmas(sigmas: torch.Tensor) -> None:
    """A schedule is a finite, strictly decreasing, non-negative 1-D tensor of at least two levels."""
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError("sigmas must be a 1-D tensor of at least 2 noise levels (e.g. karras_sigmas(...))")
    check_finite("sigmas", sigmas)
    if (sigmas[:-1] <= sigmas[1:]).any() or (sigmas < 0).any():
        raise ValueError("sigmas must be strictly decreasing and non-negative")


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step of the probability-flow ODE dx/dsigma = (x - D) / sigma (the sign Eq. 7 gets wrong)."""
    return x + (sigma_next - sigma) * (x - denoised) / sigma


def _as_batch_sigma(sigma, batch: int, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(batch).clone()


def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond=None, callback=None) -> torch.Tensor:
    """Plain Euler sampling of a batch of independent images; x is the initial noise already scaled by sigmas[0]."""
    check_sigmas(sigmas)
    for k in range(len(sigmas) - 1):
        with torch.no_grad():
            denoised = denoiser(x, _as_batch_sigma(sigmas[k], x.shape[0], x), cond)
        x = euler_step(x, denoised, sigmas[k], sigmas[k + 1])
        if callback is not None:
            callback({"step": k, "total": len(sigmas) - 1})
    return x


def equivariance_error(denoised: torch.Tensor, target: torch.Tensor, forward: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """e per frame: squared mismatch of D_j sampled at x + G_j(x) with D_{j-1}(x) over valid x -> (B,).

    denoised, target: (B, C, h, w); forward: (B, h, w, 2) flows j-1 -> j; valid: (B, h, w) bool.
    """
    h, w = forward.shape[1:3]
    points = flowops.identity_grid(h, w, forward.dtype, forward.device) + forward
    warped = flowops.sample_bilinear(denoised, points)  # (B, C, h, w) on frame j-1's grid
    mask = (valid & flowops.inside(points, h, w))[:, None].to(denoised.dtype)
    return ((warped - target) * mask).pow(2).flatten(1).sum(1)


def guided_update(
    denoiser: Denoiser, x, sigma, sigma_next, cond, target, forward, valid, has_target, strength: float,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler step plus self-guidance for a batch of frames at their own noise levels (Algorithm 1, lines 7-10).

    x: (B, C, h, w); sigma, sigma_next: (B,); target: predecessor predictions (ignored where has_target is
    False), (B, C, h, w) latents or, with `decode`, (B, 3, H, W) decoded frames, matching forward (B, ., ., 2)
    and valid. Returns (x_next, prediction): prediction is what the next frame is compared with (decoded
    with `decode`).
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        denoised = denoiser(x, sigma, cond)
        prediction = denoised if decode is None else decode(denoised)  # (B, C, h, w) or (B, 3, H, W)
        err = equivariance_error(prediction, target, forward, valid) * has_target.to(x.dtype)
        grad = torch.autograd.grad(err.sum(), x)[0] if bool(has_target.any()) else torch.zeros_like(x)
    shape = (-1,) + (1,) * (x.ndim - 1)
    x_next = euler_step(x.detach(), denoised.detach(), sigma.view(shape), sigma_next.view(shape))
    scale = torch.where(err > 0, strength / err.detach().clamp_min(1e-30).sqrt(), torch.zeros_like(err))
    return x_next - scale.view(shape) * grad, prediction.detach()


def _check_video_inputs(noise, sigmas, cond, forward, valid, grid, space):
    check_sigmas(sigmas)
    if not isinstance(noise, torch.Tensor) or noise.ndim != 4:
        raise ValueError(f"noise must be a (F, C, h, w) tensor, got {getattr(noise, 'shape', type(noise).__name__)}")
    check_finite("noise", noise)
    f = noise.shape[0]
    h, w = grid
    if cond is not None and cond.shape[0] != f:
        raise ValueError(f"cond has {cond.shape[0]} frames; expected {f} to match noise")
    if forward is not None:
        flowops.check_flow("forward", forward)
        check_shape("forward", forward, (f - 1, h, w, 2), f"({space} flows j-1 -> j)")
    if valid is not None:
        check_shape("valid", valid, (f - 1, h, w), f"(masks on frame j-1's {space} grid)")


def sample_video(
    denoiser: Denoiser,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    cond: torch.Tensor | None = None,
    forward: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    guidance: float = 1.0,
    schedule: str = "wavefront",
    max_batch: int | None = None,
    callback: Callable[[dict], None] | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    decoded_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Sample every frame of a video from its (unit-variance) initial noise (F, C, h, w) -> clean latents.

    forward: (F-1, h, w, 2) latent flows j-1 -> j; valid: (F-1, h, w) occlusion masks (all valid if None).
    guidance = lambda; with guidance 0 the 'parallel' schedule runs all frames in one batch per step.
    Pixel-space guidance: `decode` maps latents (B, C, h, w) -> frames (B, 3, H, W), decoded_size = (H, W),
    and forward / valid are the pixel flows (F-1, H, W, 2) / masks (F-1, H, W).
    """
    if (decode is None) != (decoded_size is None):
        raise ValueError("pixel-space guidance needs both decode and decoded_size=(H, W)")
    grid = tuple(decoded_size) if decode is not None else tuple(noise.shape[-2:])
    _check_video_inputs(noise, sigmas, cond, forward, valid, grid, "latent" if decode is None else "decoded-frame")
    check_choice("schedule", schedule, SCHEDULES)
    if not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}")
    f, c = noise.shape[:2]
    h, w = grid
    sigmas = sigmas.to(noise.device)
    x0 = noise * sigmas[0].to(noise.dtype)  # (F, C, h, w)
    if schedule == "parallel":
        if guidance != 0:
            raise ValueError("schedule 'parallel' ignores the frame order and needs guidance=0; use 'wavefront'")
        return sample_euler(denoiser, x0, sigmas.to(noise.dtype), cond, callback)
    if forward is None:
        if guidance != 0:
            raise ValueError("guidance > 0 needs the forward latent flows (F-1, h, w, 2)")
        forward = noise.new_zeros(f - 1, h, w, 2)
    if valid is None:
        valid = torch.ones(f - 1, h, w, dtype=torch.bool, device=noise.device)
    run = _wavefront if schedule == "wavefront" else _sequential
    return run(denoiser, x0, sigmas.to(noise.dtype), cond, forward.to(noise.dtype), valid, guidance, max_batch, callback,
               decode)


def _frame_inputs(j, cond, forward, valid, like):
    """Per-frame guidance inputs; frame 0 has no predecessor (zero flow, no target)."""
    fw = forward[j - 1] if j > 0 else forward.new_zeros(forward.shape[1:])
    ok = valid[j - 1] if j > 0 else valid.new_zeros(valid.shape[1:])
    c = cond[j] if cond is not None else None
    return c, fw, ok


def _stack_or_none(items):
    return None if items[0] is None else torch.stack(items)


def _no_target(forward: torch.Tensor, valid: torch.Tensor, channels: int) -> torch.Tensor:
    """Placeholder target for frame 0 (it has no predecessor; its error is masked out) -> (C', H, W) zeros."""
    return forward.new_zeros(channels, *valid.shape[-2:])


def _sequential(denoiser, x0, sigmas, cond, forward, valid, strength, max_batch, callback, decode=None):
    """Frame by frame, step by step: frames x steps model calls."""
    steps = len(sigmas) - 1
    out, previous = [], None  # previous: frame j-1's predictions at every step
    for j in range(x0.shape[0]):
        x, current = x0[j : j + 1], []
        c, fw, ok = _frame_inputs(j, cond, forward, valid, x)
        for k in range(steps):
            target = previous[k] if previous is not None else _no_target(forward, valid, 3 if decode else x.shape[1])[None]
            x, denoised = guided_update(
                denoiser, x, sigmas[k : k + 1], sigmas[k + 1 : k + 2], None if c is None else c[None], target,
                fw[None], ok[None], torch.tensor([j > 0]), strength, decode,
            )
            current.append(denoised)
            if callback is not None:
                callback({"frame": j, "step": k, "calls": j * steps + k + 1, "total_calls": x0.shape[0] * steps})
        out.append(x[0])
        previous = current
    return torch.stack(out)


def _wavefront(denoiser, x0, sigmas, cond, forward, valid, strength, max_batch, callback, decode=None):
    """Diagonal batches: at tick t frame j runs step t - j; frames + steps - 1 batched calls."""
    frames, steps = x0.shape[0], len(sigmas) - 1
    x = x0.clone()
    last_denoised: dict[int, torch.Tensor] = {}  # frame -> its prediction at the previous tick
    empty = _no_target(forward, valid, 3 if decode else x0.shape[1])
    ticks = frames + steps - 1
    for t in range(ticks):
        active = [j for j in range(frames) if 0 <= t - j < steps]
        chunk = max_batch or len(active)
        new_denoised = {}
        for start in range(0, len(active), chunk):
            batch = active[start : start + chunk]
            ks = torch.tensor([t - j for j in batch])
            inputs = [_frame_inputs(j, cond, forward, valid, x) for j in batch]
            target = torch.stack([last_denoised.get(j - 1, empty) for j in batch])
            x_next, denoised = guided_update(
                denoiser, x[batch], sigmas[ks], sigmas[ks + 1], _stack_or_none([i[0] for i in inputs]), target,
                torch.stack([i[1] for i in inputs]), torch.stack([i[2] for i in inputs]),
                torch.tensor([j > 0 for j in batch]), strength, decode,
            )
            x[batch] = x_next
            new_denoised.update({j: d for j, d in zip(batch, denoised)})
        last_denoised = new_denoised
        if callback is not None:
            callback({"tick": t, "total_ticks": ticks, "frames_done": sum(1 for j in range(frames) if t - j >= steps - 1)})
    return x
