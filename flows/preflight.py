"""Preflight: before any heavy work, what a run will produce and cost, and whether it fits.

From the input's container header (PyAV probe: no frame is decoded) and the model's card (no weights are
loaded): the output size per frame, the padded and latent sizes, the peak memory and a rough sampling time.
A job whose output frame exceeds `max_output_pixels`, or whose peak memory cannot fit in the available RAM
even with the smallest window and tile, is refused with a `PreflightError` (a VideoError: CLI exit code 2)
that names the numbers and the way out (--tile, --window, --frames, --max-output-pixels, another task/mode).

The memory model (bytes), measured on the embedded sr8 models with pixel-space guidance: the process alone
peaks at ~0.85 GB; a 640x272 benchmark run (2 steps) at 1.17 GB for 8 frames and 1.54 GB for 32 frames, i.e.
~90 bytes per padded pixel per resident frame (with prepare, metrics and the writers streamed):

    peak = BASE + window * FRAME_BYTES_PER_PX * padded_pixels + batch * sampler_bytes(tile area)
    sampler_bytes(a) = SAMPLER_BYTES_PER_LATENT_PX * a + attention(a)   (per frame of the wavefront batch)
    batch = min(window, steps, max_batch): the frames a guided wavefront tick denoises at once (unguided: all)

The constants carry a margin over the measurements. Time: SECONDS_PER_LATENT_PX_STEP per latent pixel, frame
and step (measured 31-34 us on one idle CPU thread, guided), x the tile overlap.

Zero-shot solvers (`--solver dps|dflow|dmplug|vipaint`, ops.solvers) restore the whole clip in one piece (no
windows, no tiles) and differentiate through the denoiser, so autograd keeps each differentiated denoiser call's
activations, GRAPH_BYTES_PER_LATENT_PX per latent pixel and frame (measured on prior-gp: 12.5 KB at 4 frames,
14.3 KB at 8 frames of 32x32 latents; the peak RSS of one D-Flow iteration grows by 14.6 MB per frame and step):

    peak = BASE + frames * FRAME_BYTES_PER_PX * padded_pixels + batch * (graph_steps * GRAPH + sampler_bytes) + source
    graph_steps = steps (dflow/dmplug: R(z) is differentiated end to end), K levels (vipaint's ELBO), 1 (dps)
    batch = frames, except guided dps (one frame at a time); source = the video-level GP basis (F*h*w*J floats)

Measured peak above the loaded model (8 frames of 32x32 latents, 10 steps, prior-gp): dflow 1.17 GB (model
1.47), dflow with checkpointing 0.30, dps 0.28 (model 0.29), vipaint 0.47 (model 0.55). Their time counts every
denoiser call of the solver (`solver_passes`), a backward pass as BACKWARD_COST forward passes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from storage.video import VideoError
from tasks.degrade import input_multiple, output_scale

GIB = 2**30
BASE_BYTES = 1 * GIB  # interpreter + torch + prefect + the embedded model (measured ~0.85 GB)
FRAME_BYTES_PER_PX = 128  # resident arrays per padded pixel and frame: frames, conditioning, flows, positions, latents
SAMPLER_BYTES_PER_LATENT_PX = 300 * 64  # UNet activations + guidance graph per latent pixel of a batch frame
SECONDS_PER_LATENT_PX_STEP = 40e-6  # measured 31-34 us on one CPU thread (guided, pixel space)
MEMORY_FRACTION = 0.7  # of the available RAM a run may plan to use
TILE_OVERLAP = 0.25  # fraction of a tile shared with each neighbour (work grows by ~(1 + overlap)^2)
TILE_CHOICES = (256, 192, 128, 96, 64, 48, 32)  # latent tile edges tried, largest first
GRAPH_BYTES_PER_LATENT_PX = 16 * 1024  # autograd's saved activations of one denoiser call (measured 12.5-14.3 KB)
BACKWARD_COST = 1.0  # a backward pass through the denoiser in forward passes (measured 0.7 on prior-gp)


class PreflightError(VideoError):
    """A job that cannot fit: the message names the numbers and the way out."""


@dataclass(frozen=True)
class ModelSpec:
    """What preflight needs from a model card: latent factor, channels, the size multiple, the UNet's widths."""

    factor: int
    latent_channels: int
    multiple: int  # frame sizes must be multiples of this (latent factor x UNet downsampling)
    widths: tuple[int, ...]  # UNet block_out_channels
    attention: bool


@dataclass(frozen=True)
class Estimate:
    """One job's sizes and costs; `window` frames at a time, latent tiles of `tile` (None: whole frames)."""

    frames: int
    input_width: int
    input_height: int
    output_width: int
    output_height: int
    padded_width: int
    padded_height: int
    latent_width: int
    latent_height: int
    window: int
    tile: int | None
    peak_bytes: int
    available_bytes: int
    seconds: float
    solver: str | None = None  # a zero-shot solver: the whole clip at once, its graph in peak_bytes

    @property
    def output_pixels(self) -> int:
        return self.output_width * self.output_height

    def to_dict(self) -> dict:
        return {**asdict(self), "output_pixels": self.output_pixels}

    def summary(self) -> str:
        tile = f"latent tiles {self.tile}x{self.tile}" if self.tile else "whole frames (no tiles)"
        if self.solver:
            tile += f", zero-shot solver {self.solver} (all frames at once)"
        return (f"preflight: {self.frames} frames {self.input_width}x{self.input_height} -> {self.output_width}x"
                f"{self.output_height} ({self.output_pixels / 1e6:.2f} Mpx/frame, padded {self.padded_width}x"
                f"{self.padded_height}, latent {self.latent_width}x{self.latent_height}); window {self.window} frames, "
                f"{tile}; peak memory ~{self.peak_bytes / GIB:.2f} GiB of {self.available_bytes / GIB:.1f} GiB "
                f"available; sampling ~{_duration(self.seconds)} on one CPU thread")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------- pure arithmetic


def output_size(task: str, mode: str, width: int, height: int) -> tuple[int, int]:
    """restored.mp4's frame size: sr8 restore upscales the input by 8, everything else keeps it."""
    scale = output_scale(task, mode)
    return width * scale, height * scale


def padded_size(task: str, mode: str, width: int, height: int, multiple: int) -> tuple[int, int]:
    """The frame size the model works on: the input padded as prepare pads it, times the output scale."""
    m, scale = input_multiple(task, mode, multiple), output_scale(task, mode)
    return _ceil_to(width, m) * scale, _ceil_to(height, m) * scale


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def attention_bytes(spec: ModelSpec, latent_px: int) -> int:
    """Self-attention at the UNet's lowest level: heads x tokens^2 float32 scores (and their softmax)."""
    if not spec.attention:
        return 0
    tokens = latent_px // 4 ** (len(spec.widths) - 1)
    heads = max(1, spec.widths[-1] // 32)
    return 2 * 4 * heads * tokens * tokens


def peak_bytes(spec: ModelSpec, padded_px: int, latent_w: int, latent_h: int, window: int, tile: int | None,
               batch: int | None = None) -> int:
    """Peak RSS of a run holding `window` frames and denoising `batch` (default: window) of them at once in tiles of
    tile x tile latent pixels (None: whole frames)."""
    area = latent_w * latent_h if tile is None else min(tile, latent_w) * min(tile, latent_h)
    sampler = SAMPLER_BYTES_PER_LATENT_PX * area + attention_bytes(spec, area)
    batch = window if batch is None else min(batch, window)
    return int(BASE_BYTES + window * FRAME_BYTES_PER_PX * padded_px + batch * sampler)


def sampling_seconds(latent_px: int, frames: int, steps: int, tile: int | None) -> float:
    overlap = (1 + TILE_OVERLAP) ** 2 if tile else 1.0
    return SECONDS_PER_LATENT_PX_STEP * latent_px * frames * steps * overlap


def choose(spec: ModelSpec, padded_px: int, latent_w: int, latent_h: int, frames: int, budget: int,
           window: int | None, tile: int | None, batch: int | None = None) -> tuple[int, int | None]:
    """Defaults for what the user left open: whole frames if they fit, else the largest tile that does; then the
    longest window (up to all frames) that fits. Returns (window, tile); the caller checks the result fits."""
    def peak(w, t):
        return peak_bytes(spec, padded_px, latent_w, latent_h, w, t, batch)

    if tile is None:
        tiles = [None] + [t for t in TILE_CHOICES if t < max(latent_w, latent_h)]
        w_min = window or min(2, frames)
        tile = next((t for t in tiles if peak(w_min, t) <= budget), tiles[-1])
    if window is None:
        lo, hi = min(2, frames), max(frames, 1)  # the longest window that fits: peak grows with the window
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if peak(mid, tile) <= budget else (lo, mid - 1)
        window = lo
    return min(window, max(frames, 1)), tile


def estimate(spec: ModelSpec, task: str, mode: str, width: int, height: int, frames: int, steps: int, available: int,
             window: int | None = None, tile: int | None = None, max_batch: int | None = None, guided: bool = True) -> Estimate:
    """Sizes and costs of one job (pure arithmetic; nothing is checked here)."""
    ow, oh = output_size(task, mode, width, height)
    pw, ph = padded_size(task, mode, width, height, spec.multiple)
    lw, lh = pw // spec.factor, ph // spec.factor
    budget = int(available * MEMORY_FRACTION)
    # frames denoised at once: a guided wavefront tick holds at most `steps`; unguided sampling runs all at once
    batch = min(steps if guided else frames, max_batch or frames)
    window, tile = choose(spec, pw * ph, lw, lh, frames, budget, window, tile, batch)
    if tile is not None and tile >= max(lw, lh):
        tile = None  # a tile as large as the frame is no tile
    return Estimate(frames=frames, input_width=width, input_height=height, output_width=ow, output_height=oh,
                    padded_width=pw, padded_height=ph, latent_width=lw, latent_height=lh, window=window, tile=tile,
                    peak_bytes=peak_bytes(spec, pw * ph, lw, lh, window, tile, batch), available_bytes=available,
                    seconds=sampling_seconds(lw * lh, frames, steps, tile))


def solver_graph_steps(solver: str, steps: int) -> int:
    """Denoiser calls whose activations a zero-shot solver keeps at once (per frame of its batch)."""
    from ops.solvers import default_levels

    if solver in ("dflow", "dmplug"):
        return steps  # R(z): every sampler step is differentiated end to end
    if solver == "vipaint":
        return len(default_levels(steps))  # the hierarchy's transitions and the final prediction
    return 1  # dps: one step's gradient at a time


def solver_passes(solver: str, steps: int, iterations: int) -> float:
    """Sampler steps' worth of denoiser work per frame (a backward pass = BACKWARD_COST forward passes)."""
    from ops.solvers import default_levels

    fwd_bwd = 1 + BACKWARD_COST
    if solver in ("dflow", "dmplug"):
        return iterations * steps * fwd_bwd + steps  # every iteration through R(z), then the final run
    if solver == "vipaint":
        levels = default_levels(steps)
        return iterations * len(levels) * fwd_bwd + (steps - levels[-1]) * fwd_bwd  # the ELBO fit, then DPS
    return steps * fwd_bwd  # dps


def solver_peak_bytes(spec: ModelSpec, solver: str, padded_px: int, latent_w: int, latent_h: int, frames: int,
                      steps: int, guided: bool, source_features: int = 0) -> int:
    """Peak RSS of a zero-shot solver on the whole clip (module docstring); source_features: J of --source video."""
    area = latent_w * latent_h
    per_frame = solver_graph_steps(solver, steps) * GRAPH_BYTES_PER_LATENT_PX * area
    per_frame += SAMPLER_BYTES_PER_LATENT_PX * area + attention_bytes(spec, area)
    batch = 1 if solver == "dps" and guided else frames
    source = 4 * frames * area * source_features  # the dense float32 RFF basis (F, h*w, J)
    return int(BASE_BYTES + frames * FRAME_BYTES_PER_PX * padded_px + batch * per_frame + source)


def estimate_solver(spec: ModelSpec, task: str, mode: str, width: int, height: int, frames: int, steps: int,
                    available: int, solver: str, iterations: int, guided: bool, source_features: int = 0) -> Estimate:
    """Sizes and costs of a zero-shot restoration (one window of all frames, whole frames)."""
    ow, oh = output_size(task, mode, width, height)
    pw, ph = padded_size(task, mode, width, height, spec.multiple)
    lw, lh = pw // spec.factor, ph // spec.factor
    return Estimate(frames=frames, input_width=width, input_height=height, output_width=ow, output_height=oh,
                    padded_width=pw, padded_height=ph, latent_width=lw, latent_height=lh, window=frames, tile=None,
                    peak_bytes=solver_peak_bytes(spec, solver, pw * ph, lw, lh, frames, steps, guided, source_features),
                    available_bytes=available, solver=solver,
                    seconds=SECONDS_PER_LATENT_PX_STEP * lw * lh * frames * solver_passes(solver, steps, iterations))


def check_solver(est: Estimate, steps: int, iterations: int) -> None:
    """Refuse a zero-shot restoration whose graph cannot fit, naming the numbers and the way out."""
    budget = int(est.available_bytes * MEMORY_FRACTION)
    if est.peak_bytes <= budget:
        return
    keeps = (f"keeps the activations of all {steps} sampler steps" if est.solver in ("dflow", "dmplug")
             else "keeps the activations of its denoiser calls")
    raise PreflightError(
        f"estimated peak memory {est.peak_bytes / GIB:.1f} GiB exceeds {MEMORY_FRACTION:.0%} of the "
        f"{est.available_bytes / GIB:.1f} GiB available: --solver {est.solver} restores all {est.frames} frames "
        f"({est.output_width}x{est.output_height}, latent {est.latent_width}x{est.latent_height}) at once and {keeps} "
        f"for every frame. Use fewer --steps (memory grows with steps x frames), fewer --frames (e.g. --frames 0:"
        f"{max(2, est.frames // 2)}, restoring the clip in parts), or --solver dps (one step's activations); --window "
        f"and --tile do not apply to zero-shot solvers, and --iterations changes the time (~{_duration(est.seconds)} "
        f"with --iterations {iterations}), not the memory")


def check(est: Estimate, max_output_pixels: int, task: str, mode: str) -> None:
    """Refuse what cannot (or should not) run, naming the numbers and the way out."""
    if est.output_pixels > max_output_pixels:
        other = (" (or --mode benchmark to restore it at its own size)" if task == "sr8" and mode == "restore" else "")
        raise PreflightError(
            f"the output would be {est.output_width}x{est.output_height} = {est.output_pixels / 1e6:.1f} Mpx per frame "
            f"({est.frames} frames of {est.input_width}x{est.input_height}, task {task}, mode {mode}), above "
            f"--max-output-pixels {max_output_pixels} ({max_output_pixels / 1e6:.1f} Mpx); estimated peak memory "
            f"{est.peak_bytes / GIB:.1f} GiB, sampling ~{_duration(est.seconds)}. Use a smaller input or fewer --frames, another task{other}, or raise --max-output-pixels "
            f"if you mean it (with --tile and --window to bound memory)")
    budget = int(est.available_bytes * MEMORY_FRACTION)
    if est.peak_bytes > budget and est.solver is None:  # a zero-shot solver's memory: check_solver
        raise PreflightError(
            f"estimated peak memory {est.peak_bytes / GIB:.1f} GiB exceeds {MEMORY_FRACTION:.0%} of the "
            f"{est.available_bytes / GIB:.1f} GiB available ({est.frames} frames of {est.output_width}x{est.output_height}, "
            f"window {est.window}, {'tile ' + str(est.tile) if est.tile else 'no tiles'}); use a smaller --tile "
            f"(latent pixels, e.g. {TILE_CHOICES[-2]}) and --window (e.g. 2), fewer --frames, or another task/mode")


# ---------------------------------------------------------------- inputs: the card and the probe


def model_spec(name: str) -> ModelSpec:
    """From card.json (our models) or the diffusers configs, without loading weights."""
    from storage.models import CARD, resolve
    from tasks.models import pad_multiple

    path = resolve(name)
    multiple = pad_multiple(name)
    if (path / CARD).exists():
        card = json.loads((path / CARD).read_text())
        unet = (card.get("denoiser") or card.get("residual") or {}).get("unet") or {}
        return ModelSpec(factor=int(card["autoencoder"].get("factor", 8)), latent_channels=int(card["autoencoder"]["latent_channels"]),
                         multiple=multiple, widths=tuple(unet.get("block_out_channels", (64,))),
                         attention=bool(unet.get("attention", True)))
    unet = json.loads((path / "unet" / "config.json").read_text())
    vae = json.loads((path / "vae" / "config.json").read_text())
    blocks = vae.get("encoder_block_out_channels", vae.get("block_out_channels"))
    return ModelSpec(factor=2 ** (len(blocks) - 1), latent_channels=int(vae.get("latent_channels", 4)), multiple=multiple,
                     widths=tuple(unet.get("block_out_channels", (320,))),
                     attention=any("Attn" in t for t in unet.get("down_block_types", ())))


def available_memory() -> int:
    """Bytes of RAM available now."""
    import psutil

    return int(psutil.virtual_memory().available)


def preflight(cfg, available: int | None = None, plan=None) -> Estimate:
    """Probe the input (header only), estimate, check; returns the Estimate with the chosen window and tile.
    `plan`: the run's flows.config.Plan (default: planned here from the settings and the model's card)."""
    from flows.config import plan as plan_of
    from storage.video import probe_video
    from tasks.models import model_info

    info = probe_video(cfg.input, storage_options=cfg.storage_options)
    start, stop = cfg.frame_range
    stop = info.frames if stop is None else min(stop, info.frames)
    frames = max(stop - start, 0)
    spec = model_spec(cfg.model_name)
    step = spec.multiple // spec.factor
    if cfg.tile is not None and cfg.tile % step:
        raise PreflightError(f"--tile {cfg.tile} must be a multiple of {step} latent pixels for model {cfg.model_name!r} "
                             f"(its UNet downsamples by {step}); e.g. --tile {max(step, cfg.tile // step * step)}")
    avail = available_memory() if available is None else available
    if cfg.zero_shot:
        if cfg.window is not None or cfg.tile is not None:
            raise PreflightError(f"--window / --tile do not apply to --solver {cfg.solver}: a zero-shot solver restores "
                                 "all frames at once; drop them and use --frames START:END to restore a part of the clip")
        from ops.gp import DEFAULT_FEATURES

        video_source = cfg.solver in ("dflow", "dmplug") and cfg.source == "video"
        est = estimate_solver(spec, cfg.task, cfg.mode, info.width, info.height, frames, cfg.steps, avail, cfg.solver,
                              cfg.iterations, cfg.guidance_strength > 0, DEFAULT_FEATURES if video_source else 0)
        check(est, cfg.max_output_pixels, cfg.task, cfg.mode)
        check_solver(est, cfg.steps, cfg.iterations)
        return est
    est = estimate(spec, cfg.task, cfg.mode, info.width, info.height, frames, cfg.steps, avail, cfg.window, cfg.tile,
                   cfg.max_batch, (plan or plan_of(cfg, model_info(cfg.model_name))).guided)
    check(est, cfg.max_output_pixels, cfg.task, cfg.mode)
    return est

