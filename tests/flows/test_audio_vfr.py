"""A frame range keeps its own audio segment (in sync within one frame); variable-frame-rate clips keep their
timestamps. Clips made with PyAV: the audio's pitch changes with every frame, so the test hears which frame it is."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest

from storage.video import frame_times, read_video, write_video
from tests._clips import frame_tone_hz, write_clip

VFR_TIMES = list(np.cumsum([0.0, 0.1, 0.05, 0.15, 0.1, 0.2, 0.05, 0.1, 0.15, 0.1, 0.05, 0.1]))  # 12 frames


def _audio(path):
    """(start time s, mono samples, rate) of the first audio stream."""
    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        frames = list(c.decode(a))
        return float(frames[0].time), np.concatenate([f.to_ndarray()[0] for f in frames]), a.sample_rate


def _pitch(x, rate):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()])


def _video_times(path):
    with av.open(str(path)) as c:
        return [float(f.time) for f in c.decode(video=0)]


def _heard_frames(path, times):
    """The frame index whose tone is heard during each output frame's display interval."""
    t0, x, rate = _audio(path)
    ends = list(times[1:]) + [times[-1] + 0.1]
    heard = []
    for a, b in zip(times, ends):
        i, j = int((a - t0) * rate) + int(0.01 * rate), int((b - t0) * rate) - int(0.01 * rate)
        heard.append(round((_pitch(x[max(i, 0):j], rate) - frame_tone_hz(0)) / (frame_tone_hz(1) - frame_tone_hz(0))))
    return heard


def test_write_video_cuts_the_audio_of_a_frame_range(tmp_path):
    clip = write_clip(str(tmp_path / "a.mp4"), 64, 48, 20, fps=10, audio=True)
    times = frame_times(clip)
    frames, _ = read_video(clip, 5, 15)
    out = write_video(str(tmp_path / "o.mp4"), iter(frames), 10, audio_from=clip, times=times[5:15] - times[5],
                      audio_start=float(times[5]), n_frames=10)
    start, x, rate = _audio(out)
    assert abs(start) < 0.1  # in sync within one frame (0.1 s)
    assert abs(len(x) / rate - 1.0) < 0.1  # 10 frames at 10 fps
    assert _heard_frames(out, [i / 10 for i in range(10)]) == list(range(5, 15))


def test_write_video_keeps_variable_frame_rate(tmp_path):
    clip = write_clip(str(tmp_path / "vfr.mp4"), 64, 48, len(VFR_TIMES), fps=10, times=VFR_TIMES)
    src = frame_times(clip)
    assert np.allclose(src, VFR_TIMES, atol=1e-3)  # the clip really is VFR
    frames, _ = read_video(clip)
    out = write_video(str(tmp_path / "o.mp4"), frames, 10, times=src - src[0])
    assert np.allclose(_video_times(out), src - src[0], atol=1e-3)
    with pytest.raises(ValueError, match="increase"):
        write_video(str(tmp_path / "bad.mp4"), frames[:3], 10, times=[0.0, 0.1, 0.1])


@pytest.mark.slow
def test_restore_frame_range_of_a_vfr_clip_keeps_its_audio_and_timestamps(tmp_path):
    from flows.cli import main

    clip = write_clip(str(tmp_path / "vfr.mp4"), 96, 64, len(VFR_TIMES), fps=10, times=VFR_TIMES, audio=True)
    out = tmp_path / "out"
    rc = main(["run", clip, "--task", "sr8", "--mode", "benchmark", "--frames", "3:9", "--steps", "2", "--executor", "inline",
               "--out", str(out), "--work-root", str(tmp_path / "work"), "--json"])
    assert rc == 0
    assert json.loads((out / "metrics.json").read_text())["frames"] == 6
    expected = np.asarray(VFR_TIMES[3:9]) - VFR_TIMES[3]
    got = _video_times(out / "restored.mp4")
    assert np.allclose(got, expected, atol=1e-3)  # output pts match the input's
    assert np.allclose(_video_times(out / "comparison.mp4"), expected, atol=1e-3)
    start, x, rate = _audio(out / "restored.mp4")
    assert abs(start) < 0.05  # within one (the shortest) frame
    assert abs(len(x) / rate - (VFR_TIMES[9] - VFR_TIMES[3])) < 0.1
    assert _heard_frames(out / "restored.mp4", list(expected)) == list(range(3, 9))
