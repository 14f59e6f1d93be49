"""Stage extract_frames: video URL -> frames (frame, y, x, rgb) uint8 with fps/source/audio attrs.

Streamed: frames are decoded one at a time and written to zarr in batches (`tasks._stage.batch_frames`), so
memory is bounded by the frame size, not the clip length.
"""

from __future__ import annotations

from typing import Iterator

import fsspec
import numpy as np

from storage.artifacts import frame_slices
from storage.video import VideoError, VideoInfo
from tasks._stage import Stage, batch_frames

MIN_SIDE = 16  # pixels: the smallest frame side the flow estimator and the models are run on


def source_identity(url: str, storage_options: dict | None = None) -> str:
    """A cheap content identity of the input (fsspec ukey: size/mtime/etag), so a changed file gets a new key."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.exists(path):
        raise VideoError(f"{url}: file not found; check the path or URL (and credentials for remote storage)")
    return fs.ukey(path)


def checked_range(url: str, info: VideoInfo, start: int, stop: int | None) -> tuple[int, int]:
    """[start, stop) validated against the container's frame count, with read_video's messages."""
    if info.frames < 2:
        raise VideoError(f"{url}: has {info.frames} frame(s); temporal restoration needs at least 2 — "
                         "pass a longer clip (or restore it as an image).")
    stop = info.frames if stop is None else stop
    if not (0 <= start < stop <= info.frames):
        raise VideoError(f"{url}: frame range [{start}, {stop}) out of bounds for a video of {info.frames} frames — "
                         f"use 0 <= start < stop <= {info.frames}.")
    return start, stop


def iter_frames(url: str, start: int, stop: int, storage_options: dict | None = None) -> Iterator[np.ndarray]:
    """Decode frames [start, stop) one at a time as (H, W, 3) uint8; a short file is a VideoError."""
    from storage.video import _decode, _open_container, _open_input

    n = 0
    with _open_input(url, storage_options) as f, _open_container(url, f) as c:
        for frame in _decode(url, c):
            if n >= start:
                yield frame.to_ndarray(format="rgb24")  # (H, W, 3)
            n += 1
            if n >= stop:
                return
    raise VideoError(f"{url}: video is truncated or corrupt: decoded {n} frames but the container claims at least "
                     f"{stop} — re-download or re-export the file.")


def produce(writer, url: str, frame_range, storage_options) -> None:
    """Decode and write frames batch by batch; attrs as the whole-clip version wrote them."""
    from storage.video import probe_video

    info = probe_video(url, storage_options)
    start, stop = checked_range(url, info, frame_range[0], frame_range[1])
    if min(info.width, info.height) < MIN_SIDE:
        raise VideoError(f"{url}: frames are {info.width}x{info.height} px; restore-video needs at least {MIN_SIDE} px on "
                         "each side — upscale the clip first (e.g. ffmpeg -vf scale=...)")
    count = stop - start
    frames = iter_frames(url, start, stop, storage_options)
    first = next(frames)
    h, w = first.shape[:2]
    writer.create("frames", ("frame", "y", "x", "rgb"), (count, h, w, 3), np.uint8)
    buffer = np.empty((min(batch_frames(first.nbytes), count), h, w, 3), np.uint8)  # (B, H, W, 3), reused
    buffer[0] = first
    for s in frame_slices(count, buffer.shape[0]):
        for i in range(1 if s.start == 0 else 0, s.stop - s.start):
            buffer[i] = next(frames)
        writer.write("frames", s.start, buffer[: s.stop - s.start])
    writer.attrs.update({"source": url, "fps": float(info.fps), "first_frame": start,
                         **{f"info_{k}": v for k, v in info.to_dict().items() if v is not None}})


def _identity(args: dict, storage_options: dict) -> dict:
    """The URL, the file's own identity (a changed file gets a new key) and the frame range."""
    return {"input": args["input"], "ukey": source_identity(args["input"], storage_options), "range": list(args["range"])}


# args: input (URL), range ([start, stop or None])
STAGE = Stage("extract_frames", version="2",  # 2: streamed
              inputs=(), identity=_identity,
              produce=lambda store, call, writer: produce(writer, call.args["input"], tuple(call.args["range"]),
                                                          store.storage_options))
