"""Stage outputs (the DESIGN's write_video): restored.mp4, comparison.mp4 and warping_error.png in --out (metrics.json
is written last, by the flow, with the whole run's report).

Its products live in the user's --out, not in the content-addressed store, so it always runs (see STAGE)."""

from __future__ import annotations

import io
from typing import Iterator

import numpy as np
import xarray as xr

from storage.artifacts import write_bytes_atomic
from storage.video import VideoError, frame_times, write_video
from tasks import metrics as metrics_stage
from tasks._stage import Stage, frame_chunks


def _resize_nearest(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    import cv2

    return np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_NEAREST) for f in frames])


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


def stored_frames(array) -> Iterator[np.ndarray]:
    """The (H, W, 3) frames of a (frame, y, x, rgb) array, read chunk by chunk."""
    for _, block in frame_chunks(array):
        yield from block


def _comparison_chunks(restored, prepared: xr.Dataset) -> Iterator[np.ndarray]:
    for s, block in frame_chunks(restored):
        yield from comparison_frames(block, prepared.isel(frame=slice(s, s + len(block))))


def write_outputs(out: str, restored, prepared: xr.Dataset, fps: float, audio_from: str | None, per_frame: dict, storage_options=None,
                  times=None, audio_start: float = 0.0, *, chroma: str) -> dict:
    """Publish the videos and the plot atomically; returns every output URL (metrics.json is written last by the flow).

    restored: (frame, y, x, rgb) uint8, lazy (zarr/dask) or numpy; the videos are encoded as chunks of frames are
    read. times: per-frame presentation times (s, first 0) to keep a variable frame rate; audio_start: where the
    first frame sits on audio_from's clock, so a frame range keeps its own audio segment. chroma: restored.mp4's
    colour sampling (RunOptions.chroma); comparison.mp4 is 4:2:0 (a preview that plays anywhere)."""
    urls = {name: f"{out.rstrip('/')}/{name}" for name in ("restored.mp4", "comparison.mp4", "warping_error.png", "metrics.json")}
    n = int(restored.shape[0])
    write_video(urls["restored.mp4"], stored_frames(restored), fps, audio_from=audio_from, storage_options=storage_options,
                times=times, audio_start=audio_start, n_frames=n, chroma=chroma)
    write_video(urls["comparison.mp4"], _comparison_chunks(restored, prepared), fps, storage_options=storage_options,
                times=times, n_frames=n)
    write_bytes_atomic(urls["warping_error.png"], warping_error_plot(per_frame), storage_options=storage_options)
    return urls


def _run(store, call) -> dict:
    """Read the restored frames chunk by chunk and write every output; returns {"urls": {name: URL}}."""
    a, up = call.args, call.upstream
    restored = store.open("decode", up["decode"])  # lazy: the writers read chunks of frames
    prepared = store.open("prepare", up["prepare"])
    extracted = store.open("extract_frames", up["extract_frames"])
    per_frame = metrics_stage.read(store, up["metrics"])["per_frame"]
    fps = float(extracted.attrs["fps"])
    frames = int(restored.sizes["frame"])
    opts = store.storage_options
    times, start_s = source_times(a["input"], a["first_frame"], frames, fps, opts)
    audio = a["input"] if extracted.attrs.get("info_has_audio") else None
    urls = write_outputs(a["out"], restored["frames"], prepared, fps, audio, per_frame, opts, times=times, audio_start=start_s,
                         chroma=a["chroma"])
    return {"urls": urls}


# args: out (URL of the output folder), input (the source: its audio and frame times), first_frame, chroma
STAGE = Stage("outputs", version="1", inputs=("decode", "prepare", "extract_frames", "metrics"),
              identity=lambda a, _: {"out": a["out"]}, delegate=_run, artifact=False,
              prefect_cache="NO_CACHE: the videos go to the user's --out, outside the content-addressed store, where they may "
                            "have been moved or deleted since; re-encoding is cheap next to sampling, so they are always written")
