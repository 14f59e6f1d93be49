"""storage/: real files through PyAV, zarr artifacts, names, and a real local S3 server."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import xarray as xr

from ops import metrics
from ops.images import to_float
from storage.artifacts import MARKER, ArtifactStore, artifact_key, read_json, write_json_atomic
from storage.names import list_videos, safe_output_name
from storage.sample import render_sample_frames, sample_clip_affines, true_backward_flow
from storage.video import VideoError, crop_to, pad_to_multiple, probe_video, read_video, write_video


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 videos (F, H, W, 3) taken as one signal."""
    return float(metrics.psnr(to_float(a).reshape(1, -1), to_float(b).reshape(1, -1)))


def noise_frames(f=5, h=33, w=47, seed=0) -> np.ndarray:
    """Random uint8 frames (F, H, W, 3): the hardest case for a lossless round trip."""
    return np.random.default_rng(seed).integers(0, 256, (f, h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- video round trips


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
def test_lossless_round_trip_is_exact_with_exact_fps(tmp_path, ext):
    x = noise_frames()  # odd size on purpose
    p = str(tmp_path / f"x.{ext}")
    write_video(p, x, Fraction(30000, 1001), lossless=True)
    y, info = read_video(p)
    assert np.array_equal(x, y)
    assert info.fps_fraction == "30000/1001" and info.frames == 5
    assert (info.height, info.width) == (33, 47)


def test_h264_round_trip_psnr_frames_fps(tmp_path):
    x = render_sample_frames(12, 64)
    p = str(tmp_path / "x.mp4")
    write_video(p, x, 24)
    y, info = read_video(p)
    assert y.shape == x.shape and info.frames == 12 and info.rate == 24
    assert info.codec == "h264"
    assert psnr(x, y) > 35


def test_h264_odd_size_is_padded_to_even(tmp_path):
    x = render_sample_frames(3, 64)[:, :63, :61]
    p = str(tmp_path / "odd.mp4")
    write_video(p, x, 8)
    y, _ = read_video(p)
    assert y.shape == (3, 64, 62, 3)
    assert psnr(x, y[:, :63, :61]) > 35


def test_read_range_and_probe(sample_clip):
    info = probe_video(sample_clip)
    assert (info.frames, info.width, info.height, info.rate) == (16, 64, 64, 8)
    assert not info.has_audio and info.duration_s == 2.0
    full, _ = read_video(sample_clip)
    part, _ = read_video(sample_clip, start=3, stop=7)
    assert np.array_equal(part, full[3:7])


@pytest.mark.parametrize("ext,lossless", [("mp4", False), ("mkv", True)])
def test_ranged_reads_seek_to_the_right_frames(tmp_path, ext, lossless):
    """Ranged reads seek to keyframes (every 6 frames, B-frames in H.264) and still return exact frames."""
    x = noise_frames(30, 32, 32)
    x[:, :16, :16] = (np.arange(30) * 8)[:, None, None, None]  # a per-frame marker block
    p = str(tmp_path / f"long.{ext}")
    write_video(p, x, 25, lossless=lossless, options={"g": 6})
    full, _ = read_video(p)
    for start, stop in [(1, 4), (6, 7), (13, 30), (29, 30)]:
        part, _ = read_video(p, start=start, stop=stop)
        assert np.array_equal(part, full[start:stop]), (start, stop)
    assert np.array_equal(np.round(full[:, 8, 8, 0] / 8), np.arange(30))  # frames in order


def test_sample_clip_is_deterministic_and_moves_as_its_affines_say(sample_clip):
    x, _ = read_video(sample_clip)
    assert np.array_equal(x, render_sample_frames(16, 64, seed=0))  # lossless + deterministic
    assert not np.array_equal(render_sample_frames(4, 64, seed=1), x[:4])
    flow = true_backward_flow(sample_clip_affines(16, 64), 64, 64)  # (F, H, W, 2)
    assert np.all(flow[0] == 0) and np.abs(flow[1:]).max() > 0.5  # the camera moves
    ys, xs = np.mgrid[0:64, 0:64].astype(np.float32)
    j = 8
    warped = cv2.remap(x[j - 1].astype(np.float32), xs + flow[j, ..., 0], ys + flow[j, ..., 1],
                       cv2.INTER_CUBIC)  # frame j-1 sampled where frame j's pixels were
    inner = (slice(6, -6), slice(6, -6))
    err_warp = np.abs(warped[inner] - x[j][inner]).mean()
    err_static = np.abs(x[j - 1].astype(np.float32)[inner] - x[j][inner]).mean()
    assert err_warp < 0.2 * err_static


def test_audio_is_carried_over(tmp_path, sample_clip_audio):
    src = probe_video(sample_clip_audio)
    assert src.has_audio and src.audio_codec == "aac"
    x, _ = read_video(sample_clip_audio)
    out = str(tmp_path / "restored.mp4")
    write_video(out, x[:, ::-1], 8, audio_from=sample_clip_audio)  # "restored" = flipped
    info = probe_video(out)
    assert info.has_audio and info.audio_codec == "aac" and info.frames == 16
    with av.open(out) as c:
        a = c.streams.audio[0]
        audio_s = float(a.duration * a.time_base)
        n_audio = sum(1 for p in c.demux(a) if p.size)
    assert n_audio > 0
    assert abs(audio_s - info.duration_s) <= 1 / 8


def test_audio_reencoded_when_container_cannot_hold_it(tmp_path, sample_clip_audio):
    x, _ = read_video(sample_clip_audio)
    out = str(tmp_path / "restored.webm")  # webm takes opus/vorbis only: aac must be re-encoded
    write_video(out, x, 8, audio_from=sample_clip_audio)
    info = probe_video(out)
    assert info.has_audio and info.audio_codec == "opus" and info.codec == "vp9"


# ---------------------------------------------------------------- bad inputs


def _expect(url, *words, **kw):
    """read_video(url) raises VideoError naming the file and every word."""
    with pytest.raises(VideoError) as e:
        read_video(url, **kw)
    msg = str(e.value)
    assert os.path.basename(url) in msg
    for w in words:
        assert w in msg, msg


def test_missing_file(tmp_path):
    _expect(str(tmp_path / "nope.mp4"), "not found")


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.mp4"
    p.write_bytes(b"")
    _expect(str(p), "empty")


def test_text_file_named_mp4(tmp_path):
    p = tmp_path / "notes.mp4"
    p.write_text("this is not a video\n" * 20)
    _expect(str(p), "not a video")


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
@pytest.mark.parametrize("frac", [0.5, 0.95])
def test_truncated_video(tmp_path, ext, frac):
    p = str(tmp_path / f"full.{ext}")
    write_video(p, render_sample_frames(16, 64), 8)
    data = Path(p).read_bytes()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[: int(len(data) * frac)])
    _expect(str(cut), "truncated")


def test_mp4_without_index_cut_is_truncated(tmp_path):
    """A plain (non-faststart) mp4 cut before its moov atom cannot even be opened."""
    p = str(tmp_path / "plain.mp4")
    with av.open(p, "w") as out:
        s = out.add_stream("libx264", rate=8)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        for i, fr in enumerate(render_sample_frames(8, 64)):
            vf = av.VideoFrame.from_ndarray(fr, format="rgb24")
            vf.pts = i
            out.mux(s.encode(vf))
        out.mux(s.encode(None))
    data = Path(p).read_bytes()
    cut = tmp_path / "plain_cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    _expect(str(cut), "truncated")


def test_one_frame_video(tmp_path):
    p = str(tmp_path / "single.mp4")
    write_video(p, render_sample_frames(1, 64), 8)
    _expect(p, "at least 2")


def test_frame_range_out_of_bounds(sample_clip):
    _expect(sample_clip, "out of bounds", start=10, stop=20)
    _expect(sample_clip, "out of bounds", start=5, stop=5)
    _expect(sample_clip, "out of bounds", start=-1, stop=3)


def test_write_rejects_float_frames(tmp_path):
    with pytest.raises(VideoError, match="uint8"):
        write_video(str(tmp_path / "f.mp4"), np.zeros((2, 8, 8, 3), np.float32), 8)


def test_atomic_write_leaves_nothing_when_encoder_fails(tmp_path):
    dest = tmp_path / "out.mp4"

    def frames():
        """Two good frames, then the producer dies."""
        yield from render_sample_frames(2, 64)
        raise RuntimeError("producer died mid-way")

    with pytest.raises(RuntimeError, match="mid-way"):
        write_video(str(dest), frames(), 8)
    assert os.listdir(tmp_path) == []  # neither the destination nor a temp file

    dest.write_bytes(b"old")  # an existing output survives a failed overwrite
    with pytest.raises(VideoError):
        write_video(str(dest), [np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)], 8)
    assert dest.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.mp4"]


def test_pad_and_crop():
    x = noise_frames(2, 33, 47)
    p, (ph, pw) = pad_to_multiple(x, 8)
    assert p.shape == (2, 40, 48, 3) and (ph, pw) == (7, 1)
    assert np.array_equal(p[:, 33, :47], x[:, 31])  # reflect: row H mirrors row H-2
    assert np.array_equal(crop_to(p, 33, 47), x)
    same, pads = pad_to_multiple(x[:, :32, :40], 8)
    assert pads == (0, 0) and same.shape == (2, 32, 40, 3)


# ---------------------------------------------------------------- artifacts


def _ds(f=4) -> xr.Dataset:
    """A small frames dataset (frame, y, x, rgb) uint8 with attrs."""
    return xr.Dataset({"frames": (("frame", "y", "x", "rgb"), noise_frames(f, 16, 24))},
                      coords={"frame": np.arange(f)}, attrs={"fps": "8/1", "source": "x.mp4"})


def test_artifact_key_is_canonical_and_sensitive():
    k = artifact_key("flow", "1", {"a": 1, "b": [1, 2]}, {"frames": "abc"})
    assert len(k) == 16 and int(k, 16) >= 0
    assert k == artifact_key("flow", "1", {"b": [1, 2], "a": np.int64(1)}, {"frames": "abc"})
    assert k != artifact_key("flow", "2", {"a": 1, "b": [1, 2]}, {"frames": "abc"})
    assert k != artifact_key("flow", "1", {"a": 1, "b": [1, 2]}, {"frames": "abd"})
    assert k != artifact_key("flow", "1", {"a": 1.5, "b": [1, 2]}, {"frames": "abc"})


def _store_round_trip(store: ArtifactStore):
    """Write/exists/open round trip, plus a killed write that must not count as existing."""
    ds = _ds()
    key = artifact_key("extract_frames", "1", {"n": 4}, {})
    assert not store.exists("extract_frames", key)
    with pytest.raises(FileNotFoundError):
        store.open("extract_frames", key)
    url = store.write("extract_frames", key, ds)
    assert url == store.url("extract_frames", key) and url.endswith(f"/extract_frames/{key}.zarr")
    assert store.exists("extract_frames", key)
    back = store.open("extract_frames", key)
    assert back.frames.chunks is not None  # lazy (dask)
    assert np.array_equal(back.frames.values, ds.frames.values)
    assert back.attrs["fps"] == "8/1"

    # killed write: data written, marker never written -> not existing
    k2 = artifact_key("extract_frames", "1", {"n": 5}, {})
    path = store._path("extract_frames", f"{k2}.zarr")
    store._to_zarr(_ds(), path, {})
    assert store.fs.exists(f"{path}/zarr.json") and not store.exists("extract_frames", k2)
    store.write("extract_frames", k2, _ds(2))  # a rerun replaces the partial one
    assert store.exists("extract_frames", k2) and store.open("extract_frames", k2).sizes["frame"] == 2
    return key


def test_artifact_store_local(tmp_path):
    store = ArtifactStore(str(tmp_path / "work"))
    key = _store_round_trip(store)
    # a killed local write leaves only a hidden temp dir, which is cleaned up
    tmp = store._path("extract_frames", f".tmp-{key}-dead.zarr")
    store._to_zarr(_ds(), tmp, {})
    assert store.exists("extract_frames", key)
    assert store.remove_stale_tmp(older_than_s=3600) == []  # fresh: maybe still being written
    assert store.remove_stale_tmp(older_than_s=0) == [tmp]
    assert sorted(os.listdir(tmp_path / "work" / "extract_frames"))[0] == f"{key}.zarr"
    assert os.path.exists(tmp_path / "work" / "extract_frames" / f"{key}.zarr" / MARKER)


def test_artifact_store_file_url(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}/work")
    _store_round_trip(store)


def test_json_helpers(tmp_path):
    url = str(tmp_path / "out" / "metrics.json")
    write_json_atomic(url, {"psnr": np.float32(30.5), "frames": np.int64(3)})
    assert read_json(url) == {"psnr": 30.5, "frames": 3}
    assert os.listdir(tmp_path / "out") == ["metrics.json"]


# ---------------------------------------------------------------- names


def test_safe_output_name():
    taken: set[str] = set()
    assert safe_output_name("../evil name.mp4", taken) == "evil name.mp4"
    assert safe_output_name("a/b.mp4", taken) == "a__b.mp4"
    assert safe_output_name("/etc/passwd", taken) == "etc__passwd"
    assert safe_output_name("..\\..\\win.mp4", taken) == "win.mp4"
    assert safe_output_name("nul\x00byte.mp4", taken) == "nulbyte.mp4"
    assert safe_output_name("café vidéo 東京.mp4", taken) == "café vidéo 東京.mp4"
    assert safe_output_name("..", taken) == "video"
    first = safe_output_name("x/clip.mp4", taken)
    second = safe_output_name("x/Clip.mp4", taken)  # collides case-insensitively
    third = safe_output_name("x/clip.mp4", taken)
    assert first == "x__clip.mp4" and second.startswith("x__Clip-") and second.endswith(".mp4")
    assert len({first, second, third}) == 3 and {first, second, third} <= taken
    for name in taken:
        assert "/" not in name and "\\" not in name and "\x00" not in name and not name.startswith(".")


def test_list_videos_local(tmp_path):
    for rel in ["a.mp4", "sub/B.MOV", "sub/deep/c.mkv", "sub/notes.txt", ".hidden/d.mp4", "sub/.tmp-x.mp4"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    got = list_videos(str(tmp_path))
    assert got == sorted(str(tmp_path / r) for r in ["a.mp4", "sub/B.MOV", "sub/deep/c.mkv"])
    assert list_videos(str(tmp_path), glob="*.mp4") == [str(tmp_path / "a.mp4")]
    with pytest.raises(FileNotFoundError):
        list_videos(str(tmp_path / "missing"))


# ---------------------------------------------------------------- real local S3


def test_s3_artifacts_videos_and_names(s3_server, s3_bucket, sample_clip, tmp_path):
    import s3fs

    _, opts = s3_server
    fs = s3fs.S3FileSystem(**opts)
    fs.put_file(sample_clip, f"{s3_bucket}/archive/2024/clip one.mp4")
    fs.pipe_file(f"{s3_bucket}/archive/readme.txt", b"not a video")

    videos = list_videos(f"{s3_bucket}/archive", storage_options=opts)
    assert videos == [f"{s3_bucket}/archive/2024/clip one.mp4"]

    frames, info = read_video(videos[0], start=2, stop=6, storage_options=opts)
    local, _ = read_video(sample_clip, start=2, stop=6)
    assert info.frames == 16 and np.array_equal(frames, local)
    with pytest.raises(VideoError, match="not found"):
        read_video(f"{s3_bucket}/archive/missing.mp4", storage_options=opts)

    out = f"{s3_bucket}/out/{safe_output_name('2024/clip one.mp4', set())}"
    write_video(out, frames, 8, lossless=True, storage_options=opts)
    back, _ = read_video(out, storage_options=opts)
    assert np.array_equal(back, frames)

    store = ArtifactStore(f"{s3_bucket}/work", storage_options=opts)
    _store_round_trip(store)
    write_json_atomic(f"{s3_bucket}/out/metrics.json", {"psnr": 31.0}, storage_options=opts)
    assert read_json(f"{s3_bucket}/out/metrics.json", storage_options=opts) == {"psnr": 31.0}


def test_non_square_sample_clip_moves_as_its_affines_say():
    """A 96x40 clip (wide, as film scans are): same camera model, its exact flow explains every frame pair."""
    x = render_sample_frames(6, 96, seed=2, height=40)
    assert x.shape == (6, 40, 96, 3)
    flow = true_backward_flow(sample_clip_affines(6, 96, seed=2, height=40), 40, 96)  # (F, 40, 96, 2)
    ys, xs = np.mgrid[0:40, 0:96].astype(np.float32)
    inner = (slice(5, -5), slice(5, -5))
    for j in (1, 5):
        warped = cv2.remap(x[j - 1].astype(np.float32), xs + flow[j, ..., 0], ys + flow[j, ..., 1], cv2.INTER_CUBIC)
        err_warp = np.abs(warped[inner] - x[j][inner]).mean()
        err_static = np.abs(x[j - 1].astype(np.float32)[inner] - x[j][inner]).mean()
        assert err_warp < 0.2 * err_static, (j, err_warp, err_static)
    assert np.array_equal(render_sample_frames(3, 64, seed=0), render_sample_frames(3, 64, seed=0, height=64))


def test_chroma_444_keeps_odd_sizes_and_full_colour(tmp_path):
    """restored.mp4's default (RunOptions.chroma = 444): no padding of odd sizes, no 4:2:0 colour blur and its 8-px
    block structure; 420 for players that need it."""
    import torch

    from ops.metrics import blockiness, psnr

    x = render_sample_frames(6, 64, seed=0)[:, :47, :63]  # odd size
    out = {}
    for chroma in ("444", "420"):
        path = write_video(str(tmp_path / f"{chroma}.mp4"), x, 8, chroma=chroma)
        with av.open(path) as c:
            assert c.streams.video[0].codec_context.pix_fmt == f"yuv{chroma}p"
        y, _ = read_video(path)
        out[chroma] = torch.from_numpy(y[:, :47, :63]).permute(0, 3, 1, 2).double() / 255
        assert y.shape[1:3] == ((47, 63) if chroma == "444" else (48, 64))
    truth = torch.from_numpy(x).permute(0, 3, 1, 2).double() / 255
    assert float(psnr(out["444"], truth).mean()) > float(psnr(out["420"], truth).mean()) + 1.0
    assert float(blockiness(out["444"], truth)) < float(blockiness(out["420"], truth))
    with pytest.raises(ValueError, match="chroma"):
        write_video(str(tmp_path / "bad.mp4"), x, 8, chroma="422")
