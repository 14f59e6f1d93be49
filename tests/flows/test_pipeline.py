"""restore-video end to end on real files: cache/resume, SIGKILL mid-sampling, Ray == inline, audio kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from storage.artifacts import ArtifactStore
from storage.video import probe_video, read_video

ROOT = Path(__file__).resolve().parents[2]
PRE_SAMPLING = ("extract_frames", "prepare", "estimate_flow", "encode", "generate_noise")


def _cli(args, env_extra=None, **kwargs):
    env = {**os.environ, "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs)


def _restore(clip, out, work, *extra):
    from flows.cli import main

    code = main(["run", clip, "--mode", "benchmark", "--out", str(out), "--work-root", str(work), "--json", *extra])
    assert code == 0
    return json.loads((Path(out) / "metrics.json").read_text())


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from storage.sample import make_sample_clip

    return make_sample_clip(str(tmp_path_factory.mktemp("clip") / "clip.mp4"), frames=6, size=64)


def test_rerun_recomputes_nothing_and_reports_it(clip, tmp_path):
    first = _restore(clip, tmp_path / "a", tmp_path / "work", "--executor", "inline", "--steps", "4")
    assert not any(first["cached"].values())
    assert first["frames"] == 6 and first["task"] == "sr8" and first["method"] == "warped-diffusion"
    assert first["guidance_space"] == "pixel"  # auto: the embedded sr8 model's decoder is linear
    assert set(first["warping_error"]) == {"pixel_first", "pixel_prev", "latent_first", "latent_prev"}
    assert 5 < first["psnr"] < 60 and 0 < first["ssim"] <= 1
    second = _restore(clip, tmp_path / "b", tmp_path / "work", "--executor", "inline", "--steps", "4")
    assert all(second["cached"].values())
    assert second["keys"] == first["keys"]  # the very same decoded frames feed both outputs
    a, _ = read_video(str(tmp_path / "a" / "restored.mp4"))
    b, _ = read_video(str(tmp_path / "b" / "restored.mp4"))
    # The lossy H.264 re-encode is not bit-identical between the first and a later encode in one process (seen
    # with identical input frames and timestamps; not x264 threading): compare within the codec's error instead.
    assert a.shape == b.shape and np.abs(a.astype(int) - b).mean() < 2.0
    for name in ("restored.mp4", "comparison.mp4", "warping_error.png", "metrics.json"):
        assert (tmp_path / "b" / name).stat().st_size > 0
    info = probe_video(str(tmp_path / "a" / "restored.mp4"))
    assert info.frames == 6 and abs(info.fps - 8) < 1e-6 and (info.width, info.height) == (64, 64)


@pytest.mark.slow  # a CLI subprocess killed mid-sampling, then two full restores: ~21 s
def test_sigkill_during_sampling_then_resume_equals_uninterrupted(clip, tmp_path):
    work = tmp_path / "work"
    args = ["run", clip, "--mode", "benchmark", "--executor", "inline", "--steps", "60", "--work-root", str(work)]
    proc = _cli([*args, "--out", str(tmp_path / "killed")])
    store = ArtifactStore(str(work))
    deadline = time.time() + 240
    noise_dir = work / "generate_noise"
    while time.time() < deadline:  # sampling has started once the noise artifact is published
        if noise_dir.exists() and any((p / "_COMPLETE").exists() for p in noise_dir.glob("*.zarr")):
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (work / "sample").exists() or not any((p / "_COMPLETE").exists() for p in (work / "sample").glob("*.zarr"))
    assert not (tmp_path / "killed" / "metrics.json").exists()

    resumed = _restore(clip, tmp_path / "resumed", work, "--executor", "inline", "--steps", "60")
    assert all(resumed["cached"][s] for s in PRE_SAMPLING), resumed["cached"]
    assert not resumed["cached"]["sample"]
    fresh = _restore(clip, tmp_path / "fresh", tmp_path / "work2", "--executor", "inline", "--steps", "60")
    assert not any(fresh["cached"].values())
    z1 = store.open("sample", resumed["keys"]["sample"])["latents"].values
    z2 = ArtifactStore(str(tmp_path / "work2")).open("sample", fresh["keys"]["sample"])["latents"].values
    assert np.array_equal(z1, z2)
    assert resumed["warping_error"] == fresh["warping_error"] and resumed["psnr"] == fresh["psnr"]


@pytest.mark.slow
def test_ray_and_inline_executors_give_the_same_frames(clip, tmp_path):
    ray_report = _restore(clip, tmp_path / "ray", tmp_path / "w1", "--executor", "ray", "--steps", "4")
    inline_report = _restore(clip, tmp_path / "inline", tmp_path / "w2", "--executor", "inline", "--steps", "4")
    z_ray = ArtifactStore(str(tmp_path / "w1")).open("sample", ray_report["keys"]["sample"])["latents"].values
    z_inline = ArtifactStore(str(tmp_path / "w2")).open("sample", inline_report["keys"]["sample"])["latents"].values
    assert ray_report["keys"]["sample"] == inline_report["keys"]["sample"]  # the executor is not part of the result
    assert np.abs(z_ray - z_inline).max() <= 1e-5
    f_ray = ArtifactStore(str(tmp_path / "w1")).open("decode", ray_report["keys"]["decode"])["frames"].values.astype(int)
    f_inline = ArtifactStore(str(tmp_path / "w2")).open("decode", inline_report["keys"]["decode"])["frames"].values.astype(int)
    assert np.abs(f_ray - f_inline).max() <= 1


def test_audio_track_is_kept(sample_clip_audio, tmp_path):
    report = _restore(sample_clip_audio, tmp_path / "out", tmp_path / "work", "--executor", "inline", "--steps", "2", "--frames", "0:16")
    src, out = probe_video(sample_clip_audio), probe_video(str(tmp_path / "out" / "restored.mp4"))
    assert out.has_audio and out.frames == src.frames == report["frames"]
    assert abs(out.duration_s - src.duration_s) <= 1.0 / src.fps + 1e-6


def test_inpaint_restore_mode_with_mask_image(clip, tmp_path):
    import cv2

    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 24:44] = 255
    cv2.imwrite(str(tmp_path / "mask.png"), mask)
    from flows.cli import main

    code = main(["run", clip, "--task", "inpaint", "--mask", str(tmp_path / "mask.png"), "--executor", "inline", "--steps", "3",
                 "--out", str(tmp_path / "out"), "--work-root", str(tmp_path / "work")])
    assert code == 0
    restored, _ = read_video(str(tmp_path / "out" / "restored.mp4"))
    source, _ = read_video(clip)
    known = mask == 0
    # known pixels are kept (up to H.264), the hole is filled with something else than the grey fill
    assert np.abs(restored[:, known].astype(int) - source[:, known].astype(int)).mean() < 4
    assert np.abs(restored[:, ~known].astype(int) - 128).mean() > 5
