"""Stage extract_frames: video URL -> frames (frame, y, x, rgb) uint8 with fps/source/audio attrs."""

from __future__ import annotations

import fsspec
import numpy as np
import xarray as xr
from prefect import task

from storage.video import read_video
from tasks._stage import StageRecord, retry_on_io_error, run_stage, stage_key, store_for


def source_identity(url: str, storage_options: dict | None = None) -> str:
    """A cheap content identity of the input (fsspec ukey: size/mtime/etag), so a changed file gets a new key."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.exists(path):
        from storage.video import VideoError

        raise VideoError(f"{url}: file not found; check the path or URL (and credentials for remote storage)")
    return fs.ukey(path)


def extract_key(url: str, frame_range: tuple[int, int | None], storage_options: dict | None = None) -> str:
    ident = source_identity(url, storage_options)
    return stage_key("extract_frames", {"input": url, "ukey": ident, "range": list(frame_range)}, {})


def compute(url: str, frame_range, storage_options) -> xr.Dataset:
    start, stop = frame_range
    frames, info = read_video(url, start=start, stop=stop, storage_options=storage_options)  # (F, H, W, 3) uint8
    ds = xr.Dataset({"frames": (("frame", "y", "x", "rgb"), np.ascontiguousarray(frames))})
    ds.attrs.update({"source": url, "fps": float(info.fps), "first_frame": start, **{f"info_{k}": v for k, v in info.to_dict().items() if v is not None}})
    return ds


@task(name="extract_frames", retries=2, retry_delay_seconds=1, retry_condition_fn=retry_on_io_error)
def extract_frames(work_root: str, storage_options: dict, key: str, url: str, frame_range: tuple) -> StageRecord:
    store = store_for(work_root, storage_options)
    return run_stage(store, "extract_frames", key, lambda: compute(url, tuple(frame_range), storage_options))
