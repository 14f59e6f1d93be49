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

Long videos run in temporal windows (`sample_window`): a window's first frame is guided by the previous
window's last frame through that frame's kept per-step predictions (the carry), so windowing changes memory,
not numbers. Large frames run in spatial tiles (`tiled_denoiser`, MultiDiffusion): the sampler, the noise and
the guidance stay global, only the denoiser call is split and blended.

Every tensor is created on the device and dtype of the noise (the model's), so CUDA and fp16 need no copies.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.utils.checkpoint

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
    if sigmas.device.type == "meta":  # shapes only: a meta tensor has no values to check
        return
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
    and valid. has_target: B booleans known on the host (a list, or a CPU bool tensor); the mask is built on
    x's device, so no host-device sync and no CPU tensor meets a CUDA one. Returns (x_next, prediction,
    denoised): prediction is what the next frame is compared with (decoded with `decode`), denoised the latent D(x).
    """
    flags = [bool(v) for v in has_target]
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        denoised = denoiser(x, sigma, cond)
        prediction = denoised if decode is None else decode(denoised)  # (B, C, h, w) or (B, 3, H, W)
        mask = torch.tensor(flags, dtype=x.dtype, device=x.device)  # (B,)
        err = equivariance_error(prediction, target, forward, valid) * mask
        grad = torch.autograd.grad(err.sum(), x)[0] if any(flags) else torch.zeros_like(x)
    shape = (-1,) + (1,) * (x.ndim - 1)
    x_next = euler_step(x.detach(), denoised.detach(), sigma.view(shape), sigma_next.view(shape))
    scale = torch.where(err > 0, strength / err.detach().clamp_min(1e-30).sqrt(), torch.zeros_like(err))
    return x_next - scale.view(shape) * grad, prediction.detach(), denoised.detach()


def _check_video_inputs(noise, sigmas, cond, forward, valid, grid, space, previous):
    check_sigmas(sigmas)
    if not isinstance(noise, torch.Tensor) or noise.ndim != 4:
        raise ValueError(f"noise must be a (F, C, h, w) tensor, got {getattr(noise, 'shape', type(noise).__name__)}")
    check_finite("noise", noise)
    f = noise.shape[0]
    h, w = grid
    flows = f if previous is not None else f - 1  # a window's first frame is guided by the previous window's last
    what = "flows into every frame, the first from the previous window's last frame" if previous is not None else "flows j-1 -> j"
    if cond is not None and cond.shape[0] != f:
        raise ValueError(f"cond has {cond.shape[0]} frames; expected {f} to match noise")
    if forward is not None:
        flowops.check_flow("forward", forward)
        check_shape("forward", forward, (flows, h, w, 2), f"({space} {what})")
    if valid is not None:
        check_shape("valid", valid, (flows, h, w), f"(masks on the predecessor's {space} grid)")
    if previous is not None:
        check_shape("previous", previous, (len(sigmas) - 1, *noise.shape[1:]),
                    "(the previous window's last-frame latent predictions, one per step)")


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
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample every frame of a video from its (unit-variance) initial noise (F, C, h, w) -> clean latents.

    forward: (F-1, h, w, 2) latent flows j-1 -> j; valid: (F-1, h, w) occlusion masks (all valid if None).
    guidance = lambda; with guidance 0 the 'parallel' schedule runs all frames in one batch per step.
    Pixel-space guidance: `decode` maps latents (B, C, h, w) -> frames (B, 3, H, W), decoded_size = (H, W),
    and forward / valid are the pixel flows (F-1, H, W, 2) / masks (F-1, H, W).
    """
    latents, _ = sample_window(denoiser, noise, sigmas, cond, forward, valid, guidance, schedule, max_batch, callback,
                               decode, decoded_size, start=start)
    return latents


def sample_window(
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
    previous: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`sample_video` for one temporal window of a longer video -> (latents (F, C, h, w), carry).

    previous: the carry of the window before (its last frame's latent prediction at every step, (steps, C, h, w),
    decoded here when guidance is in pixel space: 3 f^2 / C times smaller to keep than decoded frames); then
    forward / valid have F rows, row 0 being the flow from that frame into this window's frame 0. Frame 0 is guided by `previous` exactly as it would be
    by its predecessor inside one long wavefront (the same step index is compared), so windows of any size
    give the unwindowed numbers to float precision. carry: this window's last frame's predictions, the
    `previous` of the next window (None for the unguided 'parallel' schedule, which needs none).
    start: the latents (F, C, h, w) a truncated schedule starts from, x_T = start + sigmas[0] noise (the model's
    `start(cond)`, e.g. a residual model's regression mean; SDEdit, Meng et al. 2022); None: x_T = sigmas[0] noise.
    """
    if (decode is None) != (decoded_size is None):
        raise ValueError("pixel-space guidance needs both decode and decoded_size=(H, W)")
    grid = tuple(decoded_size) if decode is not None else tuple(noise.shape[-2:])
    space = "latent" if decode is None else "decoded-frame"
    _check_video_inputs(noise, sigmas, cond, forward, valid, grid, space, previous)
    check_choice("schedule", schedule, SCHEDULES)
    if not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}")
    f = noise.shape[0]
    h, w = grid
    sigmas = sigmas.to(device=noise.device, dtype=noise.dtype)
    x0 = noise * sigmas[0]  # (F, C, h, w)
    if start is not None:
        check_shape("start", start, tuple(noise.shape), "(the latents the schedule starts from, like the noise)")
        x0 = x0 + start.to(device=noise.device, dtype=noise.dtype)
    if schedule == "parallel":
        if guidance != 0:
            raise ValueError("schedule 'parallel' ignores the frame order and needs guidance=0; use 'wavefront'")
        return sample_euler(denoiser, x0, sigmas, cond, callback), None
    if forward is None:
        if guidance != 0:
            raise ValueError("guidance > 0 needs the forward latent flows (F-1, h, w, 2)")
        forward = noise.new_zeros(f - (previous is None), h, w, 2)
    if valid is None:
        valid = torch.ones(f - (previous is None), h, w, dtype=torch.bool, device=noise.device)
    forward, valid = forward.to(device=noise.device, dtype=noise.dtype), valid.to(noise.device)
    if previous is None:  # frame 0 has no predecessor: a zero flow, nothing valid, no target
        forward = torch.cat([forward.new_zeros(1, h, w, 2), forward])  # (F, h, w, 2)
        valid = torch.cat([valid.new_zeros(1, h, w), valid])  # (F, h, w)
    else:
        previous = previous.to(device=noise.device, dtype=noise.dtype)
    has_target = [previous is not None] + [True] * (f - 1)
    run = _wavefront if schedule == "wavefront" else _sequential
    return run(denoiser, x0, sigmas, cond, forward, valid, has_target, previous, guidance, max_batch, callback, decode)


def _no_target(like: torch.Tensor, channels: int) -> torch.Tensor:
    """Placeholder target of a frame without predecessor (its error is masked out) -> (C', H, W) zeros."""
    return like.new_zeros(channels, *like.shape[-3:-1])


def _carried_target(previous, k, decode) -> torch.Tensor:
    """The previous window's last frame's prediction at step k as a guidance target -> (1, C', H, W)."""
    return previous[k : k + 1] if decode is None else decode(previous[k : k + 1])


def _sequential(denoiser, x0, sigmas, cond, forward, valid, has_target, previous, strength, max_batch, callback,
                decode=None):
    """Frame by frame, step by step: frames x steps model calls."""
    steps = len(sigmas) - 1
    empty = _no_target(forward, 3 if decode is not None else x0.shape[1])[None]
    targets = None  # frame j-1's predictions at every step (frame 0: decoded from the carry one step at a time)
    out = []
    for j in range(x0.shape[0]):
        x, current, latents = x0[j : j + 1], [], []
        c = None if cond is None else cond[j : j + 1]
        for k in range(steps):
            x, prediction, denoised = guided_update(
                denoiser, x, sigmas[k : k + 1], sigmas[k + 1 : k + 2], c,
                targets[k] if targets is not None else (empty if previous is None else _carried_target(previous, k, decode)),
                forward[j : j + 1], valid[j : j + 1], has_target[j : j + 1], strength, decode,
            )
            current.append(prediction)
            latents.append(denoised[0])
            if callback is not None:
                callback({"frame": j, "step": k, "calls": j * steps + k + 1, "total_calls": x0.shape[0] * steps})
        out.append(x[0])
        targets = current  # frame j's predictions: what frame j + 1 is compared with, step by step
    return torch.stack(out), torch.stack(latents)


def _wavefront(denoiser, x0, sigmas, cond, forward, valid, has_target, previous, strength, max_batch, callback,
               decode=None):
    """Diagonal batches: at tick t frame j runs step t - j; frames + steps - 1 batched calls."""
    frames, steps = x0.shape[0], len(sigmas) - 1
    x = x0.clone()
    last_denoised: dict[int, torch.Tensor] = {}  # frame -> its prediction at the previous tick
    empty = _no_target(forward, 3 if decode is not None else x0.shape[1])
    carry = []  # the last frame's latent prediction at every step, in step order: the next window's `previous`
    ticks = frames + steps - 1
    for t in range(ticks):
        active = [j for j in range(frames) if 0 <= t - j < steps]
        chunk = max_batch or len(active)
        new_denoised = {}
        for start in range(0, len(active), chunk):
            batch = active[start : start + chunk]
            ks = torch.tensor([t - j for j in batch], device=sigmas.device)  # each frame's own step
            target = torch.stack([last_denoised[j - 1] if j > 0 else
                                  (_carried_target(previous, t, decode)[0] if previous is not None else empty)
                                  for j in batch])
            x_next, prediction, denoised = guided_update(
                denoiser, x[batch], sigmas[ks], sigmas[ks + 1], None if cond is None else cond[batch], target,
                forward[batch], valid[batch], [has_target[j] for j in batch], strength, decode,
            )
            x[batch] = x_next
            new_denoised.update({j: d for j, d in zip(batch, prediction)})
            if frames - 1 in batch:
                carry.append(denoised[batch.index(frames - 1)])  # (C, h, w), in step order
        last_denoised = new_denoised
        if callback is not None:
            callback({"tick": t, "total_ticks": ticks, "frames_done": sum(1 for j in range(frames) if t - j >= steps - 1)})
    return x, torch.stack(carry)


def window_spans(frames: int, window: int | None) -> list[tuple[int, int]]:
    """[start, stop) of consecutive temporal windows of `window` frames (None: one window of the whole video)."""
    if window is None:
        return [(0, frames)]
    if not (isinstance(window, int) and window >= 1):
        raise ValueError(f"window must be an integer >= 1 (frames), got {window!r}")
    return [(s, min(s + window, frames)) for s in range(0, frames, window)]


def window_flow_rows(span: tuple[int, int]) -> slice:
    """Rows of the video's (F-1, ...) flows j-1 -> j that `sample_window` needs for window [start, stop): from
    the previous window's last frame into `start` onwards (none into frame 0 of the video)."""
    start, stop = span
    return slice(max(start - 1, 0), stop - 1)


def tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, stop) of tiles of side `tile` covering [0, size), `overlap` apart at least, the last one flush with
    the end (so every tile has the full side, which a UNet's size multiple needs); one span if size <= tile."""
    if size <= tile:
        return [(0, size)]
    starts = list(range(0, size - tile, tile - overlap)) + [size - tile]
    return [(s, s + tile) for s in starts]


def _fade(distance: torch.Tensor, overlap: int) -> torch.Tensor:
    """Blend weight at `distance` (pixel centres, from 0.5) from a tile's inner edge: 0 over the outer quarter of
    the overlap (those pixels see the tile's zero padding), a raised cosine over the middle half, 1 beyond."""
    if overlap == 0:
        return torch.ones_like(distance)
    margin = overlap / 4
    u = ((distance - margin) / (overlap - 2 * margin)).clamp(0, 1)
    return torch.sin(0.5 * math.pi * u) ** 2


def tile_weights(span: tuple[int, int], size: int, overlap: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """1-D blend weights of one tile span -> (stop - start,); edges that are the frame's own edges keep weight 1."""
    start, stop = span
    d = torch.arange(stop - start, dtype=dtype, device=device) + 0.5
    w = torch.ones_like(d)
    if start > 0:
        w = w * _fade(d, overlap)
    if stop < size:
        w = w * _fade(d.flip(0), overlap)
    return w


def _crop_cond(cond, grid: tuple[int, int], ys: tuple[int, int], xs: tuple[int, int]):
    """Spatial conditioning (B, C, h, w) on the latent grid is cropped with the tile; anything else (prompt
    embeddings, class labels) is global and passed whole."""
    if isinstance(cond, torch.Tensor) and cond.ndim == 4 and tuple(cond.shape[-2:]) == grid:
        return cond[..., ys[0] : ys[1], xs[0] : xs[1]]
    return cond


def tiled_denoiser(denoiser: Denoiser, tile: int, overlap: int | None = None) -> Denoiser:
    """MultiDiffusion (Bar-Tal et al. 2023, Eq. 5): D(x) = sum_t W_t D(crop_t x) / sum_t W_t, every call.

    The latent is covered by overlapping tile x tile crops (`tile_spans`); each crop is denoised on its own
    and the predictions are averaged with smooth weights (`tile_weights`, outer product of the 1-D ramps), so
    the sampler sees one seamless prediction per step: guidance compares that blended prediction, and the flows,
    masks and noise stay global. overlap defaults to tile // 4. With gradients on (guidance), each tile is
    checkpointed, so peak memory is one tile's activations, not the frame's.
    """
    overlap = tile // 4 if overlap is None else overlap
    if not (isinstance(tile, int) and tile >= 1):
        raise ValueError(f"tile must be an integer >= 1 (latent cells), got {tile!r}")
    if not (isinstance(overlap, int) and 0 <= overlap < tile):
        raise ValueError(f"overlap must be an integer in [0, tile) = [0, {tile}), got {overlap!r}")

    def tiled(x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        h, w = x.shape[-2:]
        rows, cols = tile_spans(h, tile, overlap), tile_spans(w, tile, overlap)
        if len(rows) == len(cols) == 1:
            return denoiser(x, sigma, cond)
        checkpoint = torch.is_grad_enabled() and x.requires_grad
        total = x.new_zeros(x.shape)  # (B, C, h, w) weighted sum of the tile predictions
        weight = x.new_zeros(h, w)
        for ys in rows:
            wy = tile_weights(ys, h, overlap, x.dtype, x.device)
            for xs in cols:
                wt = wy[:, None] * tile_weights(xs, w, overlap, x.dtype, x.device)[None]  # (th, tw)
                crop = x[..., ys[0] : ys[1], xs[0] : xs[1]]
                c = _crop_cond(cond, (h, w), ys, xs)
                if checkpoint:
                    d = torch.utils.checkpoint.checkpoint(denoiser, crop, sigma, c, use_reentrant=False)
                else:
                    d = denoiser(crop, sigma, c)
                total[..., ys[0] : ys[1], xs[0] : xs[1]] += d * wt
                weight[ys[0] : ys[1], xs[0] : xs[1]] += wt
        return total / weight

    return tiled
