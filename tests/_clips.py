"""Real encoded test clips made with PyAV: a camera panning and zooming over a scikit-image photograph.

Any size (odd ones too), constant or variable frame rate, with or without an audio track whose pitch changes
every frame (so a test can tell which frame's audio it hears).
"""

from __future__ import annotations

from fractions import Fraction

import av
import cv2
import numpy as np

from storage.sample import mux_mono_audio


def _photo(name: str, width: int, height: int) -> np.ndarray:
    """The photograph, scaled so a frame of (width, height) at zoom <= 1.3 plus the pan fits inside it."""
    from skimage import data

    img = getattr(data, name)()  # (H, W, 3) uint8
    scale = max(2.0 * width / img.shape[1], 2.0 * height / img.shape[0], 1.0)
    if scale > 1.0:
        img = cv2.resize(img, (int(np.ceil(img.shape[1] * scale)), int(np.ceil(img.shape[0] * scale))), interpolation=cv2.INTER_CUBIC)
    return img


def render(width: int, height: int, frames: int, photo: str = "coffee") -> np.ndarray:
    """(F, height, width, 3) uint8: a smooth diagonal pan with a slow zoom-in (real, sub-pixel camera motion)."""
    img = _photo(photo, width, height)
    ih, iw = img.shape[:2]
    t = np.linspace(0.0, 1.0, frames)
    zoom = 1.3 - 0.2 * t  # photo px per frame px
    cx = iw / 2 + (t - 0.5) * 0.15 * width
    cy = ih / 2 + (t - 0.5) * 0.1 * height
    out = []
    for z, x, y in zip(zoom, cx, cy):
        a = np.array([[z, 0, x - z * (width - 1) / 2], [0, z, y - z * (height - 1) / 2]])
        out.append(cv2.warpAffine(img, a, (width, height), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT))
    return np.stack(out)


def frame_tone_hz(index: int) -> float:
    """The pitch of frame `index`'s audio."""
    return 300.0 + 100.0 * index


def write_clip(path: str, width: int, height: int, frames: int, fps=10, photo: str = "coffee", times: list[float] | None = None,
               audio: bool = False, audio_rate: int = 48000, lossless: bool | None = None, bit_rate: int | None = None) -> str:
    """Encode the clip with PyAV. times: per-frame timestamps in seconds (variable frame rate); audio: a tone of
    frame_tone_hz(i) while frame i is shown. Odd sizes are stored losslessly (libx264rgb) unless lossless=False."""
    rate = Fraction(fps).limit_denominator(1001)
    video = render(width, height, frames, photo)
    if times is None:
        times = [i / float(rate) for i in range(frames)]
    lossless = (width % 2 or height % 2) if lossless is None else lossless
    tb = Fraction(1, 1000) if any(abs(t * rate - round(t * rate)) > 1e-6 for t in times) else 1 / rate
    with av.open(path, "w") as out:
        vs = out.add_stream("libx264rgb" if lossless else "libx264", rate=rate)
        vs.width, vs.height = width, height
        vs.pix_fmt = "rgb24" if lossless else "yuv420p"
        vs.time_base = tb
        vs.codec_context.time_base = tb
        vs.options = {"qp": "0", "preset": "ultrafast"} if lossless else {"preset": "ultrafast"}
        if bit_rate:
            vs.bit_rate = bit_rate
        if audio:
            aus = out.add_stream("aac", rate=audio_rate)
            aus.layout = "mono"
        for i, x in enumerate(video):
            vf = av.VideoFrame.from_ndarray(x, format="rgb24")
            vf.pts = int(round(times[i] / tb))
            vf.time_base = tb
            out.mux(vs.encode(vf))
        out.mux(vs.encode(None))
        if audio:
            ends = list(times[1:]) + [times[-1] + (times[-1] - times[-2] if frames > 1 else 0.1)]
            n = int(round(ends[-1] * audio_rate))
            ts = np.arange(n) / audio_rate
            idx = np.clip(np.searchsorted(np.asarray(ends), ts, side="right"), 0, frames - 1)
            phase = 2 * np.pi * np.cumsum(np.array([frame_tone_hz(i) for i in range(frames)])[idx]) / audio_rate
            wave = (0.3 * np.sin(phase)).astype(np.float32)  # (n,)
            mux_mono_audio(out, aus, wave, audio_rate)
    return path
