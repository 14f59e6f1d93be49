"""Deterministic sample clips: a smooth pan + zoom over a bundled scikit-image photograph."""

from __future__ import annotations

import os
import tempfile

import av
import cv2
import numpy as np

from storage.video import write_video


SOURCE_IMAGE = "coffee"  # held out of every embedded model's training (storage.models / storage.train_data)


def _photo(size: int, image: np.ndarray | None = None) -> np.ndarray:
    """The source photograph (skimage's SOURCE_IMAGE, or `image` (H, W, 3) uint8), centre square, resized so the
    camera has room to move: (S, S, 3) uint8, S >= 2*size."""
    if image is None:
        from skimage import data

        image = getattr(data, SOURCE_IMAGE)()  # (400, 600, 3) uint8
    h, w = image.shape[:2]
    side = min(h, w)
    img = np.ascontiguousarray(image[(h - side) // 2: (h - side) // 2 + side, (w - side) // 2: (w - side) // 2 + side])
    s = max(512, 2 * size)
    if s != side:
        img = cv2.resize(img, (s, s), interpolation=cv2.INTER_CUBIC)
    return img


def sample_clip_affines(frames: int = 16, size: int = 256, seed: int = 0, height: int | None = None) -> np.ndarray:
    """Ground-truth affines (F, 2, 3): frame pixel (x, y, 1) -> photo pixel, pixel-index coords. Frames are size x
    size, or size wide and `height` high (the motion's scale follows the longer side)."""
    rng = np.random.default_rng(seed)
    width, height = size, height or size
    size = max(width, height)
    s_img = max(512, 2 * size)
    t = np.linspace(0.0, 1.0, frames)
    ease = 0.5 - 0.5 * np.cos(np.pi * t)  # smooth start/stop
    z0, z1 = (1.3, 1.1) if rng.random() < 0.5 else (1.1, 1.3)  # source px per frame px
    zoom = z0 + (z1 - z0) * ease  # (F,)
    angle = rng.uniform(0, 2 * np.pi)
    travel = rng.uniform(0.25, 0.4) * size  # photo pixels over the clip
    half = 1.3 * size / 2
    c0 = rng.uniform(half + travel / 2, s_img - half - travel / 2, size=2)
    centres = c0 + (ease - 0.5)[:, None] * travel * np.array([np.cos(angle), np.sin(angle)])  # (F, 2)
    mid = np.array([(width - 1) / 2, (height - 1) / 2])  # the frame's centre pixel follows `centres`
    A = np.zeros((frames, 2, 3))
    A[:, 0, 0] = A[:, 1, 1] = zoom
    A[:, :, 2] = centres - zoom[:, None] * mid
    return A  # (F, 2, 3)


def render_sample_frames(frames: int = 16, size: int = 256, seed: int = 0, image: np.ndarray | None = None,
                         height: int | None = None) -> np.ndarray:
    """The clip's frames (F, height or size, size, 3) uint8, rendered with subpixel cubic warps (of `image`, see
    _photo)."""
    img = _photo(max(size, height or size), image)
    img = cv2.GaussianBlur(img, (0, 0), 0.5)  # light prefilter against aliasing when zoomed out
    out = [
        cv2.warpAffine(img, a, (size, height or size), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                       borderMode=cv2.BORDER_REFLECT)
        for a in sample_clip_affines(frames, size, seed, height)
    ]
    return np.stack(out)  # (F, H, W, 3)


def true_backward_flow(affines: np.ndarray, height: int, width: int) -> np.ndarray:
    """Exact backward flow (F, H, W, 2) (dx, dy): where pixel x of frame j was in frame j-1; frame 0 is 0."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    pts = np.stack([xs, ys, np.ones_like(xs)], -1)  # (H, W, 3)
    flow = np.zeros((len(affines), height, width, 2), np.float32)
    for j in range(1, len(affines)):
        src = pts @ affines[j].T  # (H, W, 2) photo coords
        prev = np.vstack([affines[j - 1], [0, 0, 1]])
        back = np.concatenate([src, np.ones_like(xs)[..., None]], -1) @ np.linalg.inv(prev).T
        flow[j] = back[..., :2] - pts[..., :2]
    return flow


def true_forward_flow(affines: np.ndarray, height: int, width: int) -> np.ndarray:
    """Exact forward flows (F-1, H, W, 2) (dx, dy): pixel x of frame j-1 is at x + flow(x) in frame j."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    pts = np.stack([xs, ys, np.ones_like(xs)], -1)  # (H, W, 3)
    flow = np.zeros((len(affines) - 1, height, width, 2), np.float32)
    for j in range(1, len(affines)):
        src = pts @ affines[j - 1].T  # (H, W, 2) photo coords
        nxt = np.vstack([affines[j], [0, 0, 1]])
        fwd = np.concatenate([src, np.ones_like(xs)[..., None]], -1) @ np.linalg.inv(nxt).T
        flow[j - 1] = fwd[..., :2] - pts[..., :2]
    return flow


def make_sample_clip(path: str, frames: int = 16, size: int = 256, seed: int = 0, fps=8,
                     lossless: bool = True, audio_from: str | None = None, image: np.ndarray | None = None,
                     height: int | None = None) -> str:
    """Write the sample clip (of `image`, default the bundled photograph; size x size, or size wide and `height`
    high) to path (lossless by default); returns path."""
    return write_video(path, render_sample_frames(frames, size, seed, image, height), fps, audio_from=audio_from,
                       lossless=lossless)


def write_sine_audio(path: str, seconds: float, rate: int = 44100, hz: float = 440.0) -> str:
    """Write a mono AAC sine tone to path (.m4a)."""
    n = int(round(seconds * rate))
    wave = (0.2 * np.sin(2 * np.pi * hz * np.arange(n) / rate)).astype(np.float32)  # (n,)
    with av.open(path, "w") as out:
        s = out.add_stream("aac", rate=rate)
        s.layout = "mono"
        mux_mono_audio(out, s, wave, rate)
    return path


def mux_mono_audio(out, stream, wave: np.ndarray, rate: int) -> None:
    """Encode a mono float wave (n,) into an open PyAV audio stream, frame by frame, and flush it."""
    size = stream.codec_context.frame_size or 1024
    for i in range(0, len(wave), size):
        frame = av.AudioFrame.from_ndarray(wave[None, i:i + size].copy(), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = rate, i
        out.mux(stream.encode(frame))
    out.mux(stream.encode(None))


def make_sample_clip_with_audio(path: str, frames: int = 16, size: int = 256, seed: int = 0, fps=8,
                                lossless: bool = True) -> str:
    """The sample clip plus a 440 Hz AAC tone of the same duration."""
    with tempfile.TemporaryDirectory() as d:
        tone = write_sine_audio(os.path.join(d, "tone.m4a"), frames / float(fps) + 0.1)
        return make_sample_clip(path, frames, size, seed, fps, lossless, audio_from=tone)
