"""Stages write_video and metrics: restored.mp4, comparison.mp4, metrics.json, warping_error.png in --out."""

from __future__ import annotations

import io
import json

import numpy as np
import torch
import xarray as xr

from ops import metrics
from storage.artifacts import write_bytes_atomic, write_json_atomic
from storage.video import write_video
from tasks._stage import StageRecord, run_stage, stage_key


def _float(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).double() / 255.0  # (F, 3, H, W)


def _resize_nearest(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    import cv2

    return np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_NEAREST) for f in frames])


def compute_metrics(restored: xr.Dataset, prepared: xr.Dataset, flows: xr.Dataset, latents: np.ndarray) -> dict:
    """Four self-warping errors (pixel/latent x first/prev), PSNR/SSIM against the truth when known, flicker."""
    frames = restored["frames"].values  # (F, H, W, 3)
    h, w = frames.shape[1:3]
    fwd = torch.from_numpy(flows["forward"].values)[:, :h, :w]
    valid = torch.from_numpy(flows["valid"].values)[:, :h, :w]
    x = _float(frames)
    per_frame = {
        "warping_error_pixel_first": metrics.warping_error(x, fwd, valid, "first"),
        "warping_error_pixel_prev": metrics.warping_error(x, fwd, valid, "prev"),
    }
    z = torch.from_numpy(latents).double()
    lfwd = torch.from_numpy(flows["latent_forward"].values)
    lvalid = torch.from_numpy(flows["latent_valid"].values)
    per_frame["warping_error_latent_first"] = metrics.warping_error(z, lfwd, lvalid, "first")
    per_frame["warping_error_latent_prev"] = metrics.warping_error(z, lfwd, lvalid, "prev")
    summary = {
        "warping_error": {
            "pixel_first": metrics.summarize(per_frame["warping_error_pixel_first"]),
            "pixel_prev": metrics.summarize(per_frame["warping_error_pixel_prev"]),
            "latent_first": metrics.summarize(per_frame["warping_error_latent_first"]),
            "latent_prev": metrics.summarize(per_frame["warping_error_latent_prev"]),
        },
        "flicker": float(metrics.flicker(x)),
    }
    if "truth" in prepared:
        truth = _float(prepared["truth"].values[:, :h, :w])
        per_frame["psnr"] = metrics.psnr(x, truth)
        per_frame["ssim"] = metrics.ssim(x, truth)
        summary["psnr"] = float(per_frame["psnr"].mean())
        summary["ssim"] = float(per_frame["ssim"].mean())
        if "mask" in prepared:
            hole = torch.from_numpy(prepared["mask"].values[:, :h, :w]).bool()[:, None].expand_as(x)
            summary["hole_psnr"] = float(10 * torch.log10(1 / ((x - truth)[hole] ** 2).mean().clamp_min(1e-20)))
    return {"summary": summary, "per_frame": {k: [float(v) for v in t] for k, t in per_frame.items()}}


def metrics_key(decode: str, prepare: str, flow: str, sample: str) -> str:
    return stage_key("metrics", {}, {"decode": decode, "prepare": prepare, "estimate_flow": flow, "sample": sample})


def cached_metrics(store, key: str, restored: xr.Dataset, prepared: xr.Dataset, flow: str, sample: str) -> tuple[dict, StageRecord]:
    """compute_metrics as a content-addressed stage (the DESIGN's `metrics`): a rerun reads it back -> (result, record)."""
    def compute() -> xr.Dataset:
        result = compute_metrics(restored, prepared, store.open("estimate_flow", flow).load(),
                                 store.open("sample", sample)["latents"].values)
        return xr.Dataset(attrs={"metrics_json": json.dumps(result)})

    record = run_stage(store, "metrics", key, compute)
    return json.loads(store.open("metrics", key).attrs["metrics_json"]), record


def comparison_frames(restored: np.ndarray, prepared: xr.Dataset) -> np.ndarray:
    """input | restored | truth (when known), side by side -> (F, H, k*W, 3)."""
    h, w = restored.shape[1:3]
    panels = [_resize_nearest(prepared["input"].values, h, w)[:, :h, :w], restored]
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


def write_outputs(out: str, restored: np.ndarray, prepared: xr.Dataset, fps: float, audio_from: str | None, per_frame: dict, storage_options=None) -> dict:
    """Publish the videos and the plot atomically; returns every output URL (metrics.json is written last by the flow)."""
    urls = {name: f"{out.rstrip('/')}/{name}" for name in ("restored.mp4", "comparison.mp4", "warping_error.png", "metrics.json")}
    write_video(urls["restored.mp4"], restored, fps, audio_from=audio_from, storage_options=storage_options)
    write_video(urls["comparison.mp4"], comparison_frames(restored, prepared), fps, storage_options=storage_options)
    write_bytes_atomic(urls["warping_error.png"], warping_error_plot(per_frame), storage_options=storage_options)
    return urls


def log_to_mlflow(params: dict, report: dict, per_frame: dict, urls: dict, storage_options=None, log_videos: bool = False) -> None:
    """Into the active MLflow run: the config (secrets redacted by infra.tracking), summary + per-frame metrics, the
    outputs as artifacts (videos only with `log_videos`)."""
    import mlflow

    from infra import tracking

    tracking.log_config(params, artifact_file="config.json")
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
