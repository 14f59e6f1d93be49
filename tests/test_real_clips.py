"""End to end on real encoded clips (PyAV, a camera panning and zooming over a photograph) at sizes that are not
multiples of the model's 32 px: QCIF 176x144, odd 177x145, 640x272 and 1280x720, with the embedded models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from storage.video import probe_video, read_video
from tests._clips import write_clip


def _run(clip, tmp_path, *extra, code=0):
    from flows.cli import main

    out = tmp_path / "out"
    rc = main(["run", str(clip), "--out", str(out), "--work-root", str(tmp_path / "work"), "--executor", "inline",
               "--steps", "2", "--json", *extra])
    assert rc == code
    return json.loads((out / "metrics.json").read_text()) if code == 0 else None


def _check_outputs(report, tmp_path, width, height, frames):
    assert report["frames"] == frames
    info = probe_video(str(tmp_path / "out" / "restored.mp4"))
    assert info.frames == frames
    assert (info.width, info.height) == (width + width % 2, height + height % 2)  # 4:2:0 pads odd sizes by one
    assert all(np.isfinite(v) for v in report["warping_error"].values())
    restored, _ = read_video(str(tmp_path / "out" / "restored.mp4"))
    assert restored[:, :height, :width].std() > 5  # a picture, not a flat frame
    return restored


def _bicubic_psnr(clip, frames):
    """PSNR of plain bicubic x8 SR on the same clip: the restoration must not be worse than it by much."""
    import torch

    from ops import degrade, metrics
    from storage.video import pad_to_multiple

    truth, _ = read_video(str(clip), stop=frames)
    h, w = truth.shape[1:3]
    x = torch.from_numpy(pad_to_multiple(truth, 8)[0]).permute(0, 3, 1, 2).double() / 255
    up = degrade.upsample(degrade.downsample(x, 8), 8)[..., :h, :w]
    return float(metrics.psnr(up, x[..., :h, :w]).mean())


def test_odd_177x145_sr8_benchmark(tmp_path):
    """Sizes that are not multiples of 32 used to crash in the UNet (latent 23x19 vs its two 2x downsamplings)."""
    clip = write_clip(str(tmp_path / "odd.mp4"), 177, 145, 3)
    report = _run(clip, tmp_path, "--task", "sr8", "--mode", "benchmark")
    _check_outputs(report, tmp_path, 177, 145, 3)
    assert report["preflight"]["padded_width"] == 192 and report["preflight"]["padded_height"] == 160
    assert report["psnr"] > _bicubic_psnr(clip, 3) - 3.0  # 2 steps: near bicubic; a misaligned crop is far below


def test_1280x720_sr8_restore_is_refused_by_preflight(tmp_path):
    """sr8 restore of 1280x720 targets 10240x5760 (59 Mpx per frame): refused by default, nothing written."""
    clip = write_clip(str(tmp_path / "hd.mp4"), 1280, 720, 2, bit_rate=300_000)
    _run(clip, tmp_path, "--task", "sr8", "--mode", "restore", code=2)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "work").exists() or not any(Path(tmp_path / "work").glob("*/*.zarr"))


@pytest.mark.slow
@pytest.mark.parametrize("task,mode,width,height,frames", [
    ("sr8", "benchmark", 176, 144, 6),
    ("inpaint", "benchmark", 176, 144, 4),
    ("sr8", "restore", 177, 145, 2),
    ("inpaint", "benchmark", 177, 145, 4),
    ("sr8", "benchmark", 640, 272, 6),
    ("inpaint", "benchmark", 640, 272, 3),
    ("sr8", "benchmark", 1280, 720, 3),
])
def test_real_clip_end_to_end(tmp_path, task, mode, width, height, frames):
    clip = write_clip(str(tmp_path / "clip.mp4"), width, height, frames, photo="rocket" if width > 200 else "coffee")
    report = _run(clip, tmp_path, "--task", task, "--mode", mode)
    scale = 8 if (task, mode) == ("sr8", "restore") else 1
    _check_outputs(report, tmp_path, width * scale, height * scale, frames)
    if mode == "benchmark":
        assert 15 < report["psnr"] < 60
        if task == "sr8":
            assert report["psnr"] > _bicubic_psnr(clip, frames) - 3.0


@pytest.mark.slow
def test_odd_inpaint_restore_with_mask(tmp_path):
    import cv2

    clip = write_clip(str(tmp_path / "odd.mp4"), 177, 145, 3)
    mask = np.zeros((145, 177), np.uint8)
    mask[50:90, 60:120] = 255
    cv2.imwrite(str(tmp_path / "mask.png"), mask)
    report = _run(clip, tmp_path, "--task", "inpaint", "--mode", "restore", "--mask", str(tmp_path / "mask.png"))
    restored = _check_outputs(report, tmp_path, 177, 145, 3)
    source, _ = read_video(str(clip))
    known = mask == 0
    err = np.abs(restored[:, :145, :177].astype(float) - source.astype(float))[:, known].mean()
    assert err < 6  # known pixels are kept (up to the H.264 round trip)
