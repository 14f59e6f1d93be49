"""Stage metrics: four self-warping errors (pixel/latent x first/prev), PSNR/SSIM (and the holes' PSNR) against the
truth when known, flicker; stored as JSON in the artifact's attrs, so a rerun reads it back (`read`)."""

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


def compute_metrics(restored: xr.Dataset, prepared: xr.Dataset, flows: xr.Dataset, latents) -> dict:
    """Four self-warping errors (pixel/latent x first/prev), PSNR/SSIM against the truth when known, flicker.

    Streamed: frames, flows, latents and the truth are read one stored chunk of frames at a time (plus the frame
    before the chunk), so memory does not grow with the video's length. latents: (frame, c, ly, lx), lazy or numpy."""
    pixel_first, latent_first = _FirstFrameError(), _FirstFrameError()
    series = {"warping_error_pixel_prev": [], "warping_error_latent_prev": [], "psnr": [], "ssim": []}
    means, hole_sq, hole_n = [], 0.0, 0
    prev_x = prev_z = None
    h = w = None
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
        pixel_first.add(x, fwd, valid)
        latent_first.add(z, lfwd, lvalid)
        xs = x if prev_x is None else torch.cat([prev_x, x])  # the frame before the chunk: the 'prev' reference
        zs = z if prev_z is None else torch.cat([prev_z, z])
        if len(xs) > 1:
            series["warping_error_pixel_prev"] += metrics.warping_error(xs, fwd, valid, "prev").tolist()
            series["warping_error_latent_prev"] += metrics.warping_error(zs, lfwd, lvalid, "prev").tolist()
        prev_x, prev_z = x[-1:], z[-1:]
        means += x.mean((1, 2, 3)).tolist()
        if "truth" in prepared:
            truth = to_float(_chunk(prepared["truth"], s, e, h, w), torch.float64)
            series["psnr"] += metrics.psnr(x, truth).tolist()
            series["ssim"] += metrics.ssim(x, truth).tolist()
            if "mask" in prepared:
                hole = torch.from_numpy(_chunk(prepared["mask"], s, e, h, w)).bool()[:, None].expand_as(x)
                hole_sq += float(((x - truth)[hole] ** 2).sum())
                hole_n += int(hole.sum())
    per_frame = {"warping_error_pixel_first": pixel_first.errors, "warping_error_pixel_prev": series["warping_error_pixel_prev"],
                 "warping_error_latent_first": latent_first.errors, "warping_error_latent_prev": series["warping_error_latent_prev"]}
    summary = {
        "warping_error": {name: metrics.summarize(torch.tensor(per_frame[f"warping_error_{name}"], dtype=torch.float64))
                          for name in ("pixel_first", "pixel_prev", "latent_first", "latent_prev")},
        "flicker": float(np.abs(np.diff(means)).mean()),
    }
    if "truth" in prepared:
        per_frame["psnr"], per_frame["ssim"] = series["psnr"], series["ssim"]
        summary["psnr"] = float(np.mean(series["psnr"]))
        summary["ssim"] = float(np.mean(series["ssim"]))
        if "mask" in prepared:
            mse = hole_sq / hole_n if hole_n else 0.0
            summary["hole_psnr"] = float(10 * np.log10(1 / max(mse, 1e-20)))
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
STAGE = Stage("metrics", version="1", inputs=("decode", "prepare", "estimate_flow", "sample"), identity=lambda a, _: {},
              compute=_compute)
