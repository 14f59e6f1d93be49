"""One golden number for the whole restoration maths: a tiny seeded model restores a tiny clip to recorded numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def test_tiny_seeded_restoration_matches_the_recorded_numbers(tmp_path):
    """A 2-frame 32x32 clip restored by a tiny seeded diffusers model in 2 steps gives the recorded numbers.

    The maths under test: benchmark degradation (sr8: antialiased /8, bicubic x8), the exact flow of a known
    subpixel shift (`shift:1.5,0.5`, so OpenCV's estimator is not part of the number), chained latent positions, GP
    noise (RFF, seed 0), EDM/Karras Euler steps with equivariance self-guidance (latent space, lambda 1, wavefront),
    the VAE decode with sr8 back-projection, and the self-warping error / PSNR of the metrics stage. Every stage goes
    through the stage runner (tasks._stage.run; the sampler through SamplerWorker), without Prefect or MLflow.

    How the numbers were recorded (2026-11-29, torch 2.x on CPU, 1 thread): model = tests._tiny_pipelines.build_concat
    (UNet2DModel blocks (8, 16) and AutoencoderKL f=8 initialised under torch.manual_seed(0) / (1), v-prediction
    DDPM scheduler); clip = tests._clips.render(32, 32, 2) ("coffee", a pan with zoom) written lossless with PyAV;
    RestoreConfig(mode="benchmark", steps=2, flow_backend="shift:1.5,0.5", executor="inline", device="cpu"), other
    settings at their defaults. The same script on the code before the stages were made declarative (commit cb21dd3)
    gave bit-identical frames and latents. Tolerances absorb thread-count and BLAS rounding (a uint8 flip here and
    there), not a change of the maths: a sign flip in the Euler step, another noise draw or no guidance moves
    these numbers by orders of magnitude more.
    """
    from flows.config import RestoreConfig
    from flows.restore_video import derive_calls
    from storage.video import write_video
    from tasks import metrics as metrics_stage
    from tasks._stage import run, store_for
    from tasks.sample import SamplerWorker, worker_request
    from tasks.stages import STAGES
    from tests._clips import render
    from tests._tiny_pipelines import build_concat

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_concat(tmp_path / "tiny")
        clip = write_video(str(tmp_path / "clip.mkv"), render(32, 32, 2), 8, lossless=True)
        cfg = RestoreConfig(input=clip, model=str(model), mode="benchmark", steps=2, guidance=1.0, flow_backend="shift:1.5,0.5",
                            executor="inline", device="cpu", work_root=str(tmp_path / "work"))
        calls, plan = derive_calls(cfg)
        space = plan.sample_space
        store = store_for(cfg.work_root, {})
        for name, call in calls.items():
            if name == "sample":
                SamplerWorker(cfg.model_name, device="cpu").sample(**worker_request(store, call))
            elif name != "outputs":
                assert not run(STAGES[name], store, call).cached
    finally:
        torch.set_num_threads(threads)
    frames = store.open("decode", calls["decode"].key)["frames"].values  # (2, 32, 32, 3) uint8
    latents = store.open("sample", calls["sample"].key)["latents"].values  # (2, 4, 4, 4)
    summary = metrics_stage.read(store, calls["metrics"].key)["summary"]
    assert space == "latent" and frames.shape == (2, 32, 32, 3) and latents.shape == (2, 4, 4, 4)
    assert frames.astype(np.float64).mean() == pytest.approx(141.5859375, abs=0.05)
    assert np.abs(latents).mean() == pytest.approx(0.3659486174583435, rel=1e-4)
    assert latents.astype(np.float64).sum() == pytest.approx(9.638299791840836, abs=2e-3)
    assert summary["psnr"] == pytest.approx(16.08298870248009, abs=0.01)
    assert summary["warping_error"]["pixel_first"] == pytest.approx(0.043094332687042054, rel=2e-3)
    assert summary["warping_error"]["latent_first"] == pytest.approx(0.012468857253075009, rel=1e-3)
