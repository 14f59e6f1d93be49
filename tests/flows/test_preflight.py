"""Preflight: sizes and costs from the card and the container header; absurd or unfittable jobs are refused fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import preflight as pf
from flows.config import RestoreConfig
from tests._clips import write_clip

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30


def test_pad_multiple_is_read_from_the_card():
    from tasks.models import pad_multiple

    card = json.loads((ROOT / "assets" / "models" / "sr8-gp" / "card.json").read_text())
    blocks = len(card["denoiser"]["unet"]["block_out_channels"])
    assert pad_multiple("sr8-gp") == card["autoencoder"]["factor"] * 2 ** (blocks - 1) == 32
    assert pad_multiple("inpaint-gp") == 32


def test_sizes_of_odd_frames():
    spec = pf.model_spec("sr8-gp")
    assert pf.output_size("sr8", "restore", 177, 145) == (1416, 1160)
    assert pf.padded_size("sr8", "restore", 177, 145, spec.multiple) == (180 * 8, 148 * 8)  # low-res padded to 4
    assert pf.padded_size("sr8", "benchmark", 176, 144, spec.multiple) == (192, 160)
    assert pf.padded_size("inpaint", "benchmark", 640, 272, spec.multiple) == (640, 288)
    est = pf.estimate(spec, "sr8", "benchmark", 176, 144, 6, 2, 16 * GIB)
    assert (est.latent_width, est.latent_height) == (24, 20) and est.window == 6 and est.tile is None


def test_less_memory_means_smaller_window_then_tiles():
    spec = pf.model_spec("sr8-gp")
    roomy = pf.estimate(spec, "sr8", "benchmark", 1920, 1080, 200, 10, 64 * GIB)
    tight = pf.estimate(spec, "sr8", "benchmark", 1920, 1080, 200, 10, 6 * GIB)
    assert 2 <= tight.window < roomy.window <= 200
    assert tight.peak_bytes <= 6 * GIB * pf.MEMORY_FRACTION
    huge = pf.estimate(spec, "sr8", "benchmark", 3840, 2160, 10, 10, 8 * GIB)
    assert huge.tile is not None and huge.tile < max(huge.latent_width, huge.latent_height)
    untiled = pf.peak_bytes(spec, huge.padded_width * huge.padded_height, huge.latent_width, huge.latent_height, huge.window, None)
    assert huge.peak_bytes < untiled


def test_memory_refusal_names_the_numbers_and_the_way_out(tmp_path):
    clip = write_clip(str(tmp_path / "c.mp4"), 176, 144, 4)
    cfg = RestoreConfig(input=clip, task="sr8", mode="benchmark", out=str(tmp_path / "out"))
    assert pf.preflight(cfg, available=16 * GIB).frames == 4
    with pytest.raises(pf.PreflightError) as err:
        pf.preflight(cfg, available=GIB)  # less than the process itself
    msg = str(err.value)
    assert "GiB" in msg and "--tile" in msg and "--window" in msg and "--frames" in msg and "176x144" in msg
    with pytest.raises(pf.PreflightError, match="multiple of 4"):  # the 3-level UNet halves the latent twice
        pf.preflight(cfg.model_copy(update={"tile": 30, "model": "sr8-gp"}))
    with pytest.raises(pf.PreflightError, match="multiple of 2"):  # the default residual model's 2-level UNet once
        pf.preflight(cfg.model_copy(update={"tile": 31}))


def test_window_and_tile_settings_are_validated():
    from flows.cli import main

    assert main(["run", "x.mp4", "--window", "1"]) == 2
    assert main(["run", "x.mp4", "--tile", "0"]) == 2


def test_4k_sr8_restore_is_refused_fast_small_and_clean(tmp_path):
    """The issue's check: a 3-frame 3840x2160 --task sr8 restore (a 30720x17280 target) stops with exit 2 within
    60 s, under 4 GB peak RSS, nothing written to --out, and the message says why and what to do."""
    clip = write_clip(str(tmp_path / "uhd.mp4"), 3840, 2160, 3, bit_rate=200_000)
    out = tmp_path / "out"
    probe = (
        "import resource, subprocess, sys, json\n"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(json.dumps({'rc': r.returncode, 'err': r.stderr, 'rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "flows.cli", "run", clip, "--task", "sr8", "--steps", "2",
                        "--executor", "inline", "--out", str(out), "--work-root", str(tmp_path / "work")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["rc"] == 2, result["err"][-2000:]
    assert seconds < 60
    assert result["rss_kb"] * 1024 < 4e9
    assert not out.exists() or not any(out.iterdir())
    msg = result["err"]
    assert "30720x17280" in msg and "3840x2160" in msg and "8294400" in msg  # the numbers
    assert "--max-output-pixels" in msg and "--tile" in msg and "--mode benchmark" in msg  # the way out
    assert "Traceback" not in msg


# ---- zero-shot solvers: the whole clip at once, autograd's graph in the estimate


def test_solver_memory_grows_with_the_graph_it_keeps():
    spec = pf.model_spec("prior-gp")
    args = ("deblur", "benchmark", 256, 256)
    dflow = pf.estimate_solver(spec, *args, 8, 10, 64 * GIB, "dflow", 20, guided=True)
    assert (dflow.window, dflow.tile, dflow.solver) == (8, None, "dflow") and "dflow" in dflow.summary()
    # dflow keeps every step's activations for every frame: the graph doubles with the steps and with the frames
    def graph(frames, steps):
        return (pf.solver_peak_bytes(spec, "dflow", 256 * 256, 32, 32, frames, steps, True)
                - pf.solver_peak_bytes(spec, "dflow", 256 * 256, 32, 32, frames, 0, True))

    assert graph(8, 20) == graph(16, 10) == 2 * graph(8, 10) > 0
    assert dflow.peak_bytes == pf.solver_peak_bytes(spec, "dflow", 256 * 256, 32, 32, 8, 10, True)
    # measured on prior-gp, 8 frames of 32x32 latents, 10 steps: one D-Flow iteration peaks 1.17 GB above the model
    assert 1.17e9 < graph(8, 10) < 2 * 1.17e9
    # dps differentiates one step at a time; guided, one frame at a time: far below dflow and flat in the steps
    dps = pf.estimate_solver(spec, *args, 8, 10, 64 * GIB, "dps", 20, guided=True)
    dps_long = pf.estimate_solver(spec, *args, 8, 100, 64 * GIB, "dps", 20, guided=True)
    assert dps.peak_bytes == dps_long.peak_bytes < dflow.peak_bytes
    vipaint = pf.estimate_solver(spec, *args, 8, 10, 64 * GIB, "vipaint", 20, guided=True)
    assert dps.peak_bytes < vipaint.peak_bytes < dflow.peak_bytes
    # --source video adds the dense RFF basis (F, h*w, J) float32
    video = pf.estimate_solver(spec, *args, 8, 10, 64 * GIB, "dflow", 20, guided=True, source_features=3000)
    assert video.peak_bytes - dflow.peak_bytes == 4 * 8 * 32 * 32 * 3000
    # time: every iteration runs R(z) forward and backward
    assert dflow.seconds == pytest.approx(2 * pf.estimate_solver(spec, *args, 8, 10, 64 * GIB, "dflow", 10, guided=True).seconds,
                                          rel=0.1)


def test_solver_refusal_names_the_numbers_and_the_way_out(tmp_path):
    clip = write_clip(str(tmp_path / "c.mp4"), 96, 64, 4)
    cfg = RestoreConfig(input=clip, task="deblur", mode="benchmark", solver="dflow", source="video", steps=10,
                        out=str(tmp_path / "out"))
    assert pf.preflight(cfg, available=16 * GIB).solver == "dflow"
    with pytest.raises(pf.PreflightError) as err:
        pf.preflight(cfg.model_copy(update={"steps": 1000}), available=4 * GIB)
    msg = str(err.value)
    for words in ("GiB", "dflow", "all 1000 sampler steps", "--steps", "--frames", "--window", "--iterations", "--solver dps"):
        assert words in msg, words
    with pytest.raises(pf.PreflightError, match="--window / --tile do not apply"):
        pf.preflight(cfg.model_copy(update={"window": 2}), available=16 * GIB)


def test_solver_refusal_exits_2_before_anything_is_written(tmp_path, capsys):
    """1000 D-Flow steps on 8 frames of 256x256 need ~130 GB of autograd graph: refused with exit 2, nothing written."""
    from flows.cli import main

    clip = write_clip(str(tmp_path / "c.mp4"), 256, 256, 8)
    out, work = tmp_path / "out", tmp_path / "work"
    code = main(["run", clip, "--task", "deblur", "--mode", "benchmark", "--solver", "dflow", "--steps", "1000",
                 "--executor", "inline", "--out", str(out), "--work-root", str(work)])
    assert code == 2
    err = capsys.readouterr().err
    assert "--steps" in err and "--frames" in err and "sampler steps" in err
    assert not out.exists() and not (work / "mlflow.db").exists()
