"""Stage metrics: four self-warping errors (pixel/latent x first/prev), PSNR/SSIM (and the holes' PSNR), grad ratio and
blockiness against the truth when known, flicker; the same pixel scores for the input baseline (bicubic, Telea, the
degraded frames): whether the restoration beat what it was given. Stored as JSON in the artifact's attrs, so a rerun reads it back (`read`)."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import xarray as xr

from ops import flow as flowops
from ops import metrics
from ops.images import to_float
from tasks._stage import Stage, frame_chunks
from tasks.degrade import SR_FACTORS


class _FirstFrameError:
    """Self-warping error w.r.t. frame 0, streamed frame by frame: keeps frame 0 and where its pixels are now
    (the recursion of ops.flow.chain_forward, Q_j = Q_{j-1} + G_j(Q_{j-1}), one step per frame), so the whole
    video is never held. Equal to ops.metrics.warping_error(..., 'first') (tested)."""

    def __init__(self):
        self.ref = self.points = self.ok = None
        self.errors: list[float] = []

    def add(self, frames: torch.Tensor, forward: torch.Tensor, valid: torch.Tensor) -> None:
        """frames (n, C, H, W) float64, the next frames; forward/valid: the flows into them, (n, H, W, 2) / (n, H, W)
        (one fewer on the first call: frame 0 has none)."""
        if self.ref is None:
            h, w = frames.shape[-2:]
            self.ref = frames[:1]
            self.points = flowops.identity_grid(h, w, torch.float64)  # (H, W, 2)
            self.ok = torch.ones(h, w, dtype=torch.bool)
            frames = frames[1:]
        h, w = self.ref.shape[-2:]
        for frame, flow, mask in zip(frames, forward.double(), valid):
            self.ok = self.ok & (flowops.sample_nearest(mask[None, None].float(), self.points[None])[0, 0] > 0.5)
            self.points = self.points + flowops.sample_bilinear(flow.permute(2, 0, 1)[None], self.points[None])[0].permute(1, 2, 0)
            self.ok = self.ok & flowops.inside(self.points, h, w)
            warped = flowops.sample_bilinear(frame[None], self.points[None])  # (1, C, H, W)
            sq = (warped - self.ref).pow(2).mean(1)[0]  # (H, W)
            count = int(self.ok.sum())
            self.errors.append(float((sq * self.ok).sum() / count) if count else math.nan)


def _chunk(array, start: int, stop: int, height: int | None = None, width: int | None = None) -> np.ndarray:
    block = np.asarray(array[start:stop])
    return block if height is None else block[:, :height, :width]


# What the model was given, scored like a restoration: the bar a restoration has to clear.
INPUT_BASELINES = {"sr8": "bicubic x8 + back-projection", "sr4": "bicubic x4 + back-projection",
                   "inpaint": "Telea fill (OpenCV) of the holes", "deblur": "the blurred input", "denoise": "the noisy input"}


def input_frames(prepared: xr.Dataset, start: int, stop: int, height: int, width: int) -> torch.Tensor:
    """(n, 3, H, W) float64 frames of the input baseline (INPUT_BASELINES): for super-resolution the bicubic
    upsampling back-projected onto the low-res input (ops.degrade.back_project, what tasks/decode.py does to a
    restoration too: the bar a restoration has to clear), holes filled by OpenCV's Telea for inpainting, the degraded
    frames otherwise."""
    from ops import degrade
    from ops.training import telea_inpaint

    task = prepared.attrs.get("task")
    if task in SR_FACTORS:
        scale = SR_FACTORS[task]
        low = to_float(_chunk(prepared["input"], start, stop)).float()  # (n, 3, H/s, W/s), the padded grid
        return degrade.back_project(degrade.upsample(low, scale), low, scale).double()[..., :height, :width]
    x = to_float(_chunk(prepared["cond"], start, stop, height, width), torch.float64)
    if "mask" in prepared:
        holes = torch.from_numpy(_chunk(prepared["mask"], start, stop, height, width)).double()[:, None]  # (n, 1, H, W)
        x = telea_inpaint(x, holes).double()
    return x


CELL = 8  # blockiness is measured on 8-px cells (issue 13's definition; the latent factor of every model shipped)


class _Scores:
    """Streamed scores of one video in pixels (and latents when given): self-warping errors, PSNR/SSIM/hole PSNR,
    sharpness (grad ratio) and blockiness against the truth, flicker."""

    def __init__(self, latent: bool):
        self.pixel_first, self.latent_first = _FirstFrameError(), (_FirstFrameError() if latent else None)
        self.series = {"warping_error_pixel_prev": [], "warping_error_latent_prev": [], "psnr": [], "ssim": []}
        self.means: list[float] = []
        self.hole_sq, self.hole_n = 0.0, 0
        self.grad = torch.zeros(2, dtype=torch.float64)  # sums of per-frame mean gradient: restored, truth
        self.cells = torch.zeros(2, 4, dtype=torch.float64)  # metrics.cell_border_stats: restored, truth
        self.prev_x = self.prev_z = None
        self.has_truth = False

    def add(self, x, fwd, valid, truth=None, hole=None, z=None, lfwd=None, lvalid=None) -> None:
        """x (n, 3, H, W) float64, the next frames; fwd / valid the pixel flows into them (one fewer on the first
        call); truth like x; hole (n, 1, H, W) bool; z, lfwd, lvalid the same for latents."""
        self.pixel_first.add(x, fwd, valid)
        xs = x if self.prev_x is None else torch.cat([self.prev_x, x])  # the frame before the chunk: the 'prev' reference
        if len(xs) > 1:
            self.series["warping_error_pixel_prev"] += metrics.warping_error(xs, fwd, valid, "prev").tolist()
        self.prev_x = x[-1:]
        if z is not None:
            self.latent_first.add(z, lfwd, lvalid)
            zs = z if self.prev_z is None else torch.cat([self.prev_z, z])
            if len(zs) > 1:
                self.series["warping_error_latent_prev"] += metrics.warping_error(zs, lfwd, lvalid, "prev").tolist()
            self.prev_z = z[-1:]
        self.means += x.mean((1, 2, 3)).tolist()
        if truth is None:
            return
        self.has_truth = True
        self.series["psnr"] += metrics.psnr(x, truth).tolist()
        self.series["ssim"] += metrics.ssim(x, truth).tolist()
        self.grad += torch.stack([metrics.mean_gradient(x).sum(), metrics.mean_gradient(truth).sum()])
        if max(x.shape[-2:]) > CELL:
            self.cells += torch.stack([metrics.cell_border_stats(x, CELL), metrics.cell_border_stats(truth, CELL)])
        if hole is not None:
            hole = hole.expand_as(x)
            self.hole_sq += float(((x - truth)[hole] ** 2).sum())
            self.hole_n += int(hole.sum())

    def per_frame(self) -> dict:
        out = {"warping_error_pixel_first": self.pixel_first.errors,
               "warping_error_pixel_prev": self.series["warping_error_pixel_prev"]}
        if self.latent_first is not None:
            out.update(warping_error_latent_first=self.latent_first.errors,
                       warping_error_latent_prev=self.series["warping_error_latent_prev"])
        if self.has_truth:
            out.update(psnr=self.series["psnr"], ssim=self.series["ssim"])
        return out

    def summary(self, per_frame: dict) -> dict:
        names = [k[len("warping_error_"):] for k in per_frame if k.startswith("warping_error_")]
        out = {"warping_error": {n: metrics.summarize(torch.tensor(per_frame[f"warping_error_{n}"], dtype=torch.float64))
                                 for n in names},
               "flicker": float(np.abs(np.diff(self.means)).mean()) if len(self.means) > 1 else math.nan}
        if self.has_truth:
            out.update(psnr=float(np.mean(self.series["psnr"])), ssim=float(np.mean(self.series["ssim"])),
                       grad_ratio=float(self.grad[0] / self.grad[1].clamp_min(1e-12)),
                       blockiness=float(metrics.border_ratio(self.cells[0]) / metrics.border_ratio(self.cells[1]))
                       if self.cells[0, 1] > 0 else math.nan)
            if self.hole_n:
                out["hole_psnr"] = float(10 * np.log10(1 / max(self.hole_sq / self.hole_n, 1e-20)))
        return out


def compute_metrics(restored: xr.Dataset, prepared: xr.Dataset, flows: xr.Dataset, latents) -> dict:
    """Four self-warping errors (pixel/latent x first/prev), flicker and, against the truth when known, PSNR/SSIM (and
    the holes' PSNR), grad ratio and blockiness (8-px cells); the same pixel scores for the input baseline
    (INPUT_BASELINES, under summary["input"]) when the prepared frames say which task it is.

    Streamed: frames, flows, latents and the truth are read one stored chunk of frames at a time (plus the frame
    before the chunk), so memory does not grow with the video's length. latents: (frame, c, ly, lx), lazy or numpy."""
    task = prepared.attrs.get("task")
    scores, baseline = _Scores(latent=True), (_Scores(latent=False) if task in INPUT_BASELINES and "cond" in prepared else None)
    for s, block in frame_chunks(restored["frames"]):
        e = s + len(block)
        h, w = block.shape[1:3]
        lo = max(s - 1, 0)  # flows j-1 -> j of this chunk's frames
        fwd = torch.from_numpy(_chunk(flows["forward"], lo, e - 1, h, w))
        valid = torch.from_numpy(_chunk(flows["valid"], lo, e - 1, h, w))
        lfwd = torch.from_numpy(_chunk(flows["latent_forward"], lo, e - 1))
        lvalid = torch.from_numpy(_chunk(flows["latent_valid"], lo, e - 1))
        x = to_float(block, torch.float64)  # (n, 3, H, W)
        z = torch.from_numpy(_chunk(latents, s, e)).double()  # (n, C, h, w)
        truth = to_float(_chunk(prepared["truth"], s, e, h, w), torch.float64) if "truth" in prepared else None
        hole = (torch.from_numpy(_chunk(prepared["mask"], s, e, h, w)).bool()[:, None]
                if truth is not None and "mask" in prepared else None)  # (n, 1, H, W)
        scores.add(x, fwd, valid, truth, hole, z, lfwd, lvalid)
        if baseline is not None:
            baseline.add(input_frames(prepared, s, e, h, w), fwd, valid, truth, hole)
    per_frame = scores.per_frame()
    summary = scores.summary(per_frame)
    if baseline is not None:
        summary["input"] = {"name": INPUT_BASELINES[task], **baseline.summary(baseline.per_frame())}
    return {"summary": summary, "per_frame": {k: [float(v) for v in t] for k, t in per_frame.items()}}


def _compute(store, call) -> xr.Dataset:
    up = call.upstream
    result = compute_metrics(store.open("decode", up["decode"]), store.open("prepare", up["prepare"]),
                             store.open("estimate_flow", up["estimate_flow"]), store.open("sample", up["sample"])["latents"])
    return xr.Dataset(attrs={"metrics_json": json.dumps(result)})


def read(store, key: str) -> dict:
    """{"summary", "per_frame"} of a published metrics artifact."""
    return json.loads(store.open("metrics", key).attrs["metrics_json"])


# args: none (everything comes from the upstream artifacts)
STAGE = Stage("metrics", version="2", inputs=("decode", "prepare", "estimate_flow", "sample"), identity=lambda a, _: {},
              compute=_compute)
