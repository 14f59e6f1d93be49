"""Stages write_video and metrics: restored.mp4, comparison.mp4, metrics.json, warping_error.png in --out."""

from __future__ import annotations

import io
import json
import math
from typing import Iterator

import numpy as np
import torch
import xarray as xr

from ops import flow as flowops
from ops import metrics
from storage.artifacts import write_bytes_atomic, write_json_atomic
from storage.video import VideoError, frame_times, write_video
from tasks._stage import StageRecord, run_stage, stage_key


def _float(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).double() / 255.0  # (F, 3, H, W)


def _resize_nearest(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    import cv2

    return np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_NEAREST) for f in frames])


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
        x = _float(block)  # (n, 3, H, W)
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
            truth = _float(_chunk(prepared["truth"], s, e, h, w))
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


def metrics_key(decode: str, prepare: str, flow: str, sample: str) -> str:
    return stage_key("metrics", {}, {"decode": decode, "prepare": prepare, "estimate_flow": flow, "sample": sample})


def cached_metrics(store, key: str, restored: xr.Dataset, prepared: xr.Dataset, flow: str, sample: str) -> tuple[dict, StageRecord]:
    """compute_metrics as a content-addressed stage (the DESIGN's `metrics`): a rerun reads it back -> (result, record)."""
    def compute() -> xr.Dataset:
        result = compute_metrics(restored, prepared, store.open("estimate_flow", flow), store.open("sample", sample)["latents"])
        return xr.Dataset(attrs={"metrics_json": json.dumps(result)})

    record = run_stage(store, "metrics", key, compute)
    return json.loads(store.open("metrics", key).attrs["metrics_json"]), record


def comparison_frames(restored: np.ndarray, prepared: xr.Dataset) -> np.ndarray:
    """input | restored | truth (when known), side by side -> (F, H, k*W, 3). The input is enlarged to the padded
    frame (the conditioning's size) and cropped like the output, so the panels line up."""
    h, w = restored.shape[1:3]
    ch, cw = prepared["cond"].shape[1:3]
    panels = [_resize_nearest(np.asarray(prepared["input"].values), ch, cw)[:, :h, :w], restored]
    if "truth" in prepared:
        panels.append(prepared["truth"].values[:, :h, :w])
    return np.concatenate(panels, axis=2)


def warping_error_plot(per_frame: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, space in zip(axes, ("pixel", "latent")):
        for ref in ("first", "prev"):
            values = per_frame[f"warping_error_{space}_{ref}"]
            ax.plot(range(1, len(values) + 1), values, marker="o", label=f"w.r.t. {ref} frame")
        ax.set_title(f"self-warping error ({space})")
        ax.set_xlabel("frame")
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def source_times(url: str, start: int, frames: int, fps: float, storage_options=None) -> tuple[np.ndarray | None, float]:
    """Presentation times of frames [start, start + frames) of the source, first at 0 (variable frame rate kept),
    and where frame `start` sits on the source's clock (so its audio segment can be cut to match).
    (None, start / fps) when the packets do not give one time per frame."""
    try:
        times = frame_times(url, storage_options)
    except VideoError:
        return None, start / fps
    if len(times) < start + frames:
        return None, start / fps
    chosen = times[start:start + frames]
    if np.any(np.diff(chosen) <= 0):
        return None, start / fps
    return chosen - chosen[0], float(chosen[0])


def frame_chunks(array) -> Iterator[tuple[int, np.ndarray]]:
    """(first frame, block (f, ...)) of a (frame, ...) array, one stored chunk of frames at a time (zarr chunks along
    `frame`; never the whole video); a numpy array comes in blocks of 8 frames."""
    n = int(array.shape[0])
    chunks = getattr(array, "chunks", None)
    step = int(chunks[0][0]) if chunks and isinstance(chunks[0], tuple) and chunks[0] else 8
    for s in range(0, n, step):
        yield s, np.asarray(array[s:s + step])


def iter_frames(array) -> Iterator[np.ndarray]:
    """The (H, W, 3) frames of a (frame, y, x, rgb) array, read chunk by chunk."""
    for _, block in frame_chunks(array):
        yield from block


def _comparison_chunks(restored, prepared: xr.Dataset) -> Iterator[np.ndarray]:
    for s, block in frame_chunks(restored):
        yield from comparison_frames(block, prepared.isel(frame=slice(s, s + len(block))))


def write_outputs(out: str, restored, prepared: xr.Dataset, fps: float, audio_from: str | None, per_frame: dict, storage_options=None,
                  times=None, audio_start: float = 0.0) -> dict:
    """Publish the videos and the plot atomically; returns every output URL (metrics.json is written last by the flow).

    restored: (frame, y, x, rgb) uint8, lazy (zarr/dask) or numpy; the videos are encoded as chunks of frames are
    read. times: per-frame presentation times (s, first 0) to keep a variable frame rate; audio_start: where the
    first frame sits on audio_from's clock, so a frame range keeps its own audio segment."""
    urls = {name: f"{out.rstrip('/')}/{name}" for name in ("restored.mp4", "comparison.mp4", "warping_error.png", "metrics.json")}
    n = int(restored.shape[0])
    write_video(urls["restored.mp4"], iter_frames(restored), fps, audio_from=audio_from, storage_options=storage_options,
                times=times, audio_start=audio_start, n_frames=n)
    write_video(urls["comparison.mp4"], _comparison_chunks(restored, prepared), fps, storage_options=storage_options,
                times=times, n_frames=n)
    write_bytes_atomic(urls["warping_error.png"], warping_error_plot(per_frame), storage_options=storage_options)
    return urls


def log_to_mlflow(report: dict, per_frame: dict, urls: dict, storage_options=None, log_videos: bool = False) -> None:
    """Into the active MLflow run (its params were logged, redacted, when it opened): summary + per-frame metrics,
    the outputs as artifacts (videos only with `log_videos`)."""
    import mlflow

    from infra import tracking

    mlflow.log_param("guidance_space_used", report["guidance_space"])
    flat = {}
    for key, value in report.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = value
        elif key in ("warping_error", "timings_s") and isinstance(value, dict):
            flat.update({f"{key}_{k}": v for k, v in value.items() if isinstance(v, (int, float))})
    mlflow.log_metrics({k: float(v) for k, v in flat.items() if v == v})  # NaN-free
    for name, values in per_frame.items():
        tracking.log_series(f"per_frame_{name}", values)
    tracking.log_output_files(urls, storage_options, log_videos=log_videos)
