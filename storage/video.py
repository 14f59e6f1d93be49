"""Video decode/encode with PyAV over fsspec URLs, with clear errors and atomic writes."""

from __future__ import annotations

import os
import uuid
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Iterator

import av
import fsspec
import numpy as np

# Audio codecs a container can take by stream copy (remux); anything else is re-encoded.
_REMUX_AUDIO = {
    "mp4": {"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"},
    "mov": {"aac", "mp3", "alac", "ac3", "eac3", "pcm_s16le", "pcm_s16be"},
    "mkv": None,  # None: anything
    "webm": {"opus", "vorbis"},
    "avi": {"mp3", "ac3", "pcm_s16le"},
}
_REENCODE_AUDIO = {"webm": "libopus"}  # default re-encode target: aac
_MAGIC = (b"ftyp", b"\x1a\x45\xdf\xa3", b"RIFF", b"OggS", b"moov", b"mdat", b"free", b"wide")


class VideoError(ValueError):
    """A video that cannot be read or written as asked; the message says what to do."""


@dataclass(frozen=True)
class VideoInfo:
    """Container facts about one video."""

    frames: int
    fps: float
    fps_fraction: str  # exact rate, e.g. "30000/1001"
    width: int
    height: int
    has_audio: bool
    audio_codec: str | None
    audio_rate: int | None
    duration_s: float
    codec: str
    source: str

    @property
    def rate(self) -> Fraction:
        """The exact frame rate."""
        return Fraction(self.fps_fraction)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (for zarr attrs / MLflow params)."""
        return asdict(self)


# ---------------------------------------------------------------- reading


def _open_input(url: str, storage_options: dict | None):
    """Open url as a binary file object, mapping missing/empty files to VideoError."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        size = fs.size(path)
    except FileNotFoundError:
        raise VideoError(f"{url}: file not found — check the path/URL and credentials.") from None
    if fs.isdir(path):
        raise VideoError(f"{url}: is a directory, not a video file — pass a file URL.")
    if not size:
        raise VideoError(f"{url}: file is empty (0 bytes) — the upload/copy probably failed; re-copy it.")
    return fs.open(path, "rb")


def _open_container(url: str, fobj) -> av.container.InputContainer:
    """av.open on a file object; InvalidData becomes 'not a video' or 'truncated/corrupt'."""
    head = fobj.read(16)
    fobj.seek(0)
    try:
        container = av.open(fobj, mode="r")
    except av.error.FFmpegError as e:
        if any(m in head for m in _MAGIC):
            raise VideoError(
                f"{url}: video is truncated or corrupt (FFmpeg: {e.strerror or e}) — "
                "re-download or re-export the file."
            ) from None
        raise VideoError(
            f"{url}: not a video (FFmpeg cannot recognise the format: {e.strerror or e}) — "
            "pass an mp4/mov/mkv/avi/webm file."
        ) from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{url}: has no video stream (audio-only or data file) — pass a video file.")
    return container


def _claimed_frames(container, stream) -> int:
    """Frame count the container claims (header count, else duration x rate, else demux count)."""
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if stream.duration is not None and stream.time_base is not None and rate:
        return int(round(float(stream.duration * stream.time_base * rate)))
    if container.duration and rate:
        return int(round(container.duration / av.time_base * float(rate)))
    n = sum(1 for p in container.demux(stream) if p.size)
    container.seek(0)
    return n


def _info(url: str, container) -> VideoInfo:
    """VideoInfo from an open container."""
    v = container.streams.video[0]
    rate = Fraction(v.average_rate or v.guessed_rate or v.base_rate or 0)
    if rate <= 0:
        raise VideoError(f"{url}: video stream has no frame rate — re-mux it with an explicit rate.")
    a = container.streams.audio[0] if container.streams.audio else None
    frames = _claimed_frames(container, v)
    return VideoInfo(
        frames=frames,
        fps=float(rate),
        fps_fraction=f"{rate.numerator}/{rate.denominator}",
        width=int(v.codec_context.width),
        height=int(v.codec_context.height),
        has_audio=a is not None,
        audio_codec=a.codec_context.name if a is not None else None,
        audio_rate=int(a.codec_context.sample_rate) if a is not None else None,
        duration_s=frames / float(rate),
        codec=v.codec_context.name,
        source=url,
    )


def probe_video(url: str, storage_options: dict | None = None) -> VideoInfo:
    """Container facts (frames, exact fps, size, audio) without decoding."""
    with _open_input(url, storage_options) as f, _open_container(url, f) as c:
        return _info(url, c)


def frame_times(url: str, storage_options: dict | None = None) -> np.ndarray:
    """Presentation times in seconds (container clock) of every frame of the first video stream, in display order,
    read from the packets without decoding -> (F,) float64. Variable-frame-rate clips keep their own spacing."""
    with _open_input(url, storage_options) as f, _open_container(url, f) as c:
        v = c.streams.video[0]
        pts = [p.pts for p in c.demux(v) if p.size and p.pts is not None]
        tb = v.time_base
    return np.sort(np.asarray(pts, dtype=np.float64)) * float(tb)  # (F,)


def _decode(url: str, container) -> Iterator[av.VideoFrame]:
    """Decode the first video stream, turning FFmpeg errors into 'truncated/corrupt'."""
    try:
        yield from container.decode(video=0)
    except av.error.FFmpegError as e:
        raise VideoError(
            f"{url}: video is truncated or corrupt (decoding failed: {e.strerror or e}) — "
            "re-download or re-export the file."
        ) from None


def _read_linear(url: str, c, start: int, stop: int) -> tuple[list[np.ndarray], int]:
    """Decode from the first frame, keeping [start, stop); returns (frames, frames decoded)."""
    out, n = [], 0
    for frame in _decode(url, c):
        if n >= start:
            out.append(frame.to_ndarray(format="rgb24"))  # (H, W, 3)
        n += 1
        if n >= stop:
            break
    return out, n


def _read_seek(url: str, c, start: int, stop: int, rate: Fraction):
    """Seek to the keyframe before `start`, index frames by pts; None when unsure (caller decodes linearly)."""
    v = c.streams.video[0]
    first = next(iter(_decode(url, c)), None)
    if first is None or first.pts is None or not v.time_base:
        return None
    t0, tb = first.pts, v.time_base
    try:
        c.seek(int(t0 + start / (rate * tb)), stream=v, backward=True, any_frame=False)
    except av.error.FFmpegError:
        return None
    out, expect = [], None
    for frame in _decode(url, c):
        if frame.pts is None:
            return None
        idx = round((frame.pts - t0) * tb * rate)
        if expect is None and idx > start:
            return None  # overshot the start
        if expect is not None and idx != expect:
            return None  # gap or repeat: timestamps are not a clean constant rate
        expect = idx + 1
        if idx >= start:
            out.append(frame.to_ndarray(format="rgb24"))  # (H, W, 3)
        if expect >= stop:
            break
    return (out, expect) if expect is not None else None


def read_video(
    url: str, start: int = 0, stop: int | None = None, storage_options: dict | None = None
) -> tuple[np.ndarray, VideoInfo]:
    """Decode frames [start, stop) as uint8 RGB (F, H, W, 3) plus the VideoInfo."""
    with _open_input(url, storage_options) as f, _open_container(url, f) as c:
        info = _info(url, c)
        if info.frames < 2:
            raise VideoError(
                f"{url}: has {info.frames} frame(s); temporal restoration needs at least 2 — "
                "pass a longer clip (or restore it as an image)."
            )
        stop = info.frames if stop is None else stop
        if not (0 <= start < stop <= info.frames):
            raise VideoError(
                f"{url}: frame range [{start}, {stop}) out of bounds for a video of "
                f"{info.frames} frames — use 0 <= start < stop <= {info.frames}."
            )
        got = _read_seek(url, c, start, stop, info.rate) if start > 0 else None
    if got is None:
        with _open_input(url, storage_options) as f, _open_container(url, f) as c:
            got = _read_linear(url, c, start, stop)
    out, n = got
    if n < stop:
        raise VideoError(
            f"{url}: video is truncated or corrupt: decoded {n} frames but the container claims "
            f"{info.frames} — re-download or re-export the file."
        )
    return np.stack(out), info  # (F, H, W, 3) uint8


# ---------------------------------------------------------------- writing


def _as_rate(fps) -> Fraction:
    """Exact frame rate from Fraction, int, float or 'num/den' string."""
    if isinstance(fps, str):
        rate = Fraction(fps)
    elif isinstance(fps, float):
        rate = Fraction(fps).limit_denominator(1001)
    else:
        rate = Fraction(fps)
    if rate <= 0:
        raise VideoError(f"fps must be positive, got {fps!r}.")
    return rate


def _frames_iter(frames) -> tuple[np.ndarray, Iterator[np.ndarray]]:
    """First frame and an iterator over all frames, validated to uint8 (H, W, 3)."""
    it = iter(frames)
    try:
        first = np.asarray(next(it))
    except StopIteration:
        raise VideoError("write_video: no frames given — pass at least one (H, W, 3) uint8 frame.") from None

    def check(x):
        x = np.asarray(x)
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3 or x.shape != first.shape:
            raise VideoError(
                f"write_video: frames must be uint8 (H, W, 3) of one size {first.shape}; "
                f"got {x.dtype} {x.shape} — convert with np.clip(x*255, 0, 255).astype(np.uint8)."
            )
        return x

    def gen():
        yield check(first)
        for x in it:
            yield check(x)

    return first, gen()


def _container_kind(path: str) -> str:
    """'mp4' / 'mov' / 'mkv' / 'webm' / 'avi' from the file extension."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    kind = {"m4v": "mp4", "mkv": "mkv", "mka": "mkv"}.get(ext, ext)
    if kind not in _REMUX_AUDIO:
        raise VideoError(f"{path}: unsupported output extension '.{ext}' — use .mp4, .mov, .mkv, .webm or .avi.")
    return kind


def _add_video_stream(out, kind, rate, h, w, lossless, codec, crf, options, chroma="420"):
    """Configure the video encoder; returns (stream, pad_h, pad_w)."""
    if lossless:
        codec, opts = ("ffv1", {}) if kind in ("mkv", "avi") else ("libx264rgb", {"qp": "0", "preset": "veryfast"})
        pix = "bgr0" if codec == "ffv1" else "rgb24"
        pad_h = pad_w = 0
    else:
        if kind == "webm" and codec.startswith("libx26"):
            codec = "libvpx-vp9"  # webm holds only VP8/VP9/AV1
        opts = {"crf": str(crf), "preset": "medium"} if codec.startswith("libx26") else {}
        if codec == "libvpx-vp9":
            opts = {"crf": str(max(crf, 15)), "b": "0", "deadline": "realtime", "cpu-used": "8"}
        if chroma not in ("420", "444"):
            raise ValueError(f"chroma must be '420' or '444', got {chroma!r}")
        pix = f"yuv{chroma}p"
        pad_h, pad_w = (h % 2, w % 2) if chroma == "420" else (0, 0)  # 4:2:0 needs even sizes
    s = out.add_stream(codec, rate=rate)
    s.width, s.height, s.pix_fmt = w + pad_w, h + pad_h, pix
    s.time_base = 1 / rate
    s.codec_context.time_base = 1 / rate
    s.options = {**opts, **{k: str(v) for k, v in (options or {}).items()}}
    return s, pad_h, pad_w


def _audio_source(audio_from, storage_options):
    """(file, container, stream) for audio_from, or None when it has no audio."""
    f = _open_input(audio_from, storage_options)
    try:
        c = av.open(f, mode="r")
    except av.error.FFmpegError as e:
        f.close()
        raise VideoError(f"{audio_from}: cannot read audio source ({e}) — pass a media file with audio.") from None
    if not c.streams.audio:
        c.close()
        f.close()
        return None
    return f, c, c.streams.audio[0]


def _audio_packets(src, out, kind, duration_s, start_s: float = 0.0):
    """Remux (or re-encode) the audio of [start_s, start_s + duration_s) of the source, shifted to start at 0;
    returns a time-sorted list of (t, packet) on the output clock. A cut lands on a packet boundary (AAC: 1024
    samples, ~21 ms at 48 kHz), well within one video frame. start_s 0 keeps the encoder's priming packets."""
    _, ic, ia = src
    allowed = _REMUX_AUDIO[kind]
    lower = start_s - 1e-6 if start_s > 0 else -float("inf")
    end = start_s + duration_s
    if allowed is None or ia.codec_context.name in allowed:
        oa = out.add_stream_from_template(ia)
        if start_s > 0:
            seek_to = int(max(start_s - 1.0, 0) / ia.time_base)
            ic.seek(seek_to, stream=ia, backward=True, any_frame=False)
        shift = int(round(start_s / ia.time_base)) if start_s > 0 else 0
        pkts = []
        for p in ic.demux(ia):
            if p.dts is None or p.pts is None:
                continue
            t = float(p.pts * p.time_base)
            if t >= end:
                break
            if t < lower:
                continue
            p.pts -= shift
            p.dts -= shift
            p.stream = oa
            pkts.append((t - max(start_s, 0.0), p))
        return pkts
    target = _REENCODE_AUDIO.get(kind, "aac")
    oa = out.add_stream(target, rate=48000 if target == "libopus" else ia.codec_context.sample_rate)
    oa.layout = ia.codec_context.layout.name if ia.codec_context.layout else "stereo"
    pkts = []
    resampler = av.AudioResampler(format=oa.codec_context.format.name, layout=oa.layout, rate=oa.rate)
    for fr in ic.decode(ia):
        if fr.time is not None and fr.time >= end:
            break
        if fr.time is not None and fr.time < lower:
            continue
        if start_s > 0 and fr.pts is not None:
            fr.pts -= int(round(start_s / fr.time_base))
        for rf in resampler.resample(fr):
            pkts += [(float(p.pts * p.time_base), p) for p in oa.encode(rf)]
    pkts += [(float(p.pts * p.time_base), p) for p in oa.encode(None)]
    return pkts


def _time_base(rate: Fraction, times) -> Fraction:
    """1/rate when every timestamp sits on the rate's grid (constant rate; within 2% of a frame, so a container's
    millisecond rounding, e.g. Matroska's, is not mistaken for VFR), else a 1/90000 s clock (variable rate)."""
    if times is None or all(abs(t * rate - round(t * rate)) < 0.02 for t in times):
        return 1 / rate
    return Fraction(1, 90000)


def _encode_local(path, frames, rate, audio_from, lossless, codec, crf, storage_options, n_frames, options,
                  times=None, audio_start=0.0, chroma="420"):
    """Encode into a local file path (not atomic by itself)."""
    kind = _container_kind(path)
    first, it = _frames_iter(frames)
    h, w = first.shape[:2]
    opts = {"movflags": "+faststart"} if kind in ("mp4", "mov") else {}
    src = _audio_source(audio_from, storage_options) if audio_from else None
    tb = _time_base(rate, times)
    try:
        with av.open(path, mode="w", options=opts) as out:
            vs, pad_h, pad_w = _add_video_stream(out, kind, rate, h, w, lossless, codec, crf, options, chroma)
            vs.time_base = tb
            vs.codec_context.time_base = tb
            if times is not None and n_frames and len(times) > 1:  # last frame shown for the mean interval
                dur = times[n_frames - 1] + (times[n_frames - 1] - times[0]) / (n_frames - 1)
            else:
                dur = (n_frames / rate) if n_frames else float("inf")
            audio = _audio_packets(src, out, kind, float(dur), float(audio_start)) if src else []
            ai = 0
            for i, x in enumerate(it):
                t = float(times[i]) if times is not None else float(i / rate)
                while ai < len(audio) and audio[ai][0] <= t:  # interleave by time
                    out.mux(audio[ai][1])
                    ai += 1
                if pad_h or pad_w:
                    x = np.pad(x, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(x), format="rgb24")
                vf.pts = int(round(t / tb))
                vf.time_base = tb
                out.mux(vs.encode(vf))
            out.mux(vs.encode(None))
            for _, p in audio[ai:]:
                out.mux(p)
    finally:
        if src:
            src[1].close()
            src[0].close()


def write_video(
    path_or_url: str,
    frames,
    fps,
    audio_from: str | None = None,
    lossless: bool = False,
    codec: str = "libx264",
    crf: int = 18,
    storage_options: dict | None = None,
    options: dict | None = None,
    times=None,
    audio_start: float = 0.0,
    n_frames: int | None = None,
    chroma: str = "420",
) -> str:
    """Encode uint8 RGB frames (F, H, W, 3) (or an iterable of (H, W, 3)) atomically; returns the URL.

    Lossy: H.264 yuv420p (odd sizes padded by one edge row/column to even), or yuv444p with chroma="444" (no
    padding, full colour resolution; the High 4:4:4 profile, which some browsers and phones do not play).
    Lossless: libx264rgb qp 0 (.mp4/.mov) or ffv1 (.mkv/.avi), bit-exact RGB.
    audio_from: a media URL whose first audio stream is copied (re-encoded if the container
    cannot hold it), trimmed to the video's duration.
    options: extra encoder options (e.g. {"g": 8} for a keyframe every 8 frames).
    times: per-frame presentation times in seconds, first frame at 0 (variable frame rate kept); None: i / fps.
    audio_start: where in audio_from the video begins (seconds, its own clock): a frame range keeps its audio.
    n_frames: the frame count when `frames` is an iterator (so the audio is trimmed to the video).
    Frames may be a generator: they are encoded as they come (only one frame is held).
    """
    rate = _as_rate(fps)
    if n_frames is None:
        n_frames = len(frames) if hasattr(frames, "__len__") else (len(times) if times is not None else None)
    if times is not None:
        times = [float(t) for t in times]
        if any(b <= a for a, b in zip(times, times[1:])):
            raise VideoError("write_video: times must increase strictly (one presentation time per frame, in seconds).")
    fs, dest = fsspec.core.url_to_fs(path_or_url, **(storage_options or {}))
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    base, ext = os.path.splitext(os.path.basename(dest))
    if local:
        d = os.path.dirname(os.path.abspath(dest))
        os.makedirs(d, exist_ok=True)
    else:
        import tempfile

        d = tempfile.gettempdir()
    tmp = os.path.join(d, f".{base}.tmp-{uuid.uuid4().hex[:12]}{ext}")
    try:
        _encode_local(tmp, frames, rate, audio_from, lossless, codec, crf, storage_options, n_frames, options, times,
                      audio_start, chroma)
        if local:
            os.replace(tmp, dest)
        else:
            fs.put_file(tmp, dest)  # one object PUT: visible whole or not at all
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path_or_url


# ---------------------------------------------------------------- array helpers


def pad_to_multiple(frames: np.ndarray, multiple: int = 8) -> tuple[np.ndarray, tuple[int, int]]:
    """Reflect-pad (..., H, W, C) at the bottom/right to multiples of `multiple`."""
    h, w = frames.shape[-3], frames.shape[-2]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if not (pad_h or pad_w):
        return frames, (0, 0)
    widths = [(0, 0)] * (frames.ndim - 3) + [(0, pad_h), (0, pad_w), (0, 0)]
    mode = "reflect" if (h > 1 or not pad_h) and (w > 1 or not pad_w) else "edge"
    return np.pad(frames, widths, mode=mode), (pad_h, pad_w)  # (..., H+pad_h, W+pad_w, C)


def crop_to(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop (..., H, W, C) to the top-left (height, width)."""
    if frames.shape[-3] < height or frames.shape[-2] < width:
        raise ValueError(f"crop_to: frames {frames.shape} smaller than ({height}, {width}).")
    return frames[..., :height, :width, :]
