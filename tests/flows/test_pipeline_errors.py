"""Bad input to `restore-video run`: a clear message naming the problem, exit code 2, nothing left in --out."""

from __future__ import annotations

import numpy as np
import pytest

from flows.cli import main
from storage.sample import make_sample_clip
from storage.video import write_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("clips") / "clip.mp4"
    make_sample_clip(str(path), frames=4, size=64)
    return str(path)


def _run(args, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", *args, "--out", str(out), "--work-root", str(tmp_path / "work"), "--executor", "inline", "--steps", "2"])
    err = capsys.readouterr().err
    leftovers = [p for p in out.rglob("*")] if out.exists() else []
    return code, err, leftovers


def test_missing_file(tmp_path, capsys):
    code, err, left = _run([str(tmp_path / "nope.mp4")], tmp_path, capsys)
    assert code == 2 and "not found" in err and "nope.mp4" in err and not left


def test_zero_byte_file(tmp_path, capsys):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    code, err, left = _run([str(empty)], tmp_path, capsys)
    assert code == 2 and "empty" in err.lower() and not left


def test_text_file_named_mp4(tmp_path, capsys):
    fake = tmp_path / "notes.mp4"
    fake.write_text("these are my holiday notes, not a video\n" * 20)
    code, err, left = _run([str(fake)], tmp_path, capsys)
    assert code == 2 and "notes.mp4" in err and "not a video" in err.lower() and not left


def test_truncated_video(tmp_path, capsys, clip):
    data = open(clip, "rb").read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    code, err, left = _run([str(cut)], tmp_path, capsys)
    assert code == 2 and ("truncated" in err or "corrupt" in err) and not left


def test_one_frame_video(tmp_path, capsys):
    one = tmp_path / "one.mp4"
    write_video(str(one), np.zeros((1, 64, 64, 3), np.uint8), 8, lossless=True)
    code, err, left = _run([str(one)], tmp_path, capsys)
    assert code == 2 and "at least 2" in err and not left


def test_mask_size_mismatch(tmp_path, capsys, clip):
    import cv2

    mask = tmp_path / "mask.png"
    cv2.imwrite(str(mask), np.zeros((10, 12), np.uint8))
    code, err, left = _run([clip, "--task", "inpaint", "--mask", str(mask)], tmp_path, capsys)
    assert code == 2 and "does not match" in err and "12x10" in err and not left


@pytest.mark.parametrize("flag,value,needle", [("--method", "magic", "invalid choice: 'magic'"), ("--task", "colorize", "task")])
def test_unknown_method_or_task(tmp_path, capsys, clip, flag, value, needle):
    code, err, left = _run([clip, flag, value], tmp_path, capsys)
    assert code == 2 and needle in err and not left


def test_unwritable_output(tmp_path, capsys, clip):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["run", clip, "--out", str(blocker / "out"), "--work-root", str(tmp_path / "work"), "--executor", "inline"])
    err = capsys.readouterr().err
    assert code == 2 and "not writable" in err and str(blocker / "out") in err
    assert blocker.read_text() == "x"
