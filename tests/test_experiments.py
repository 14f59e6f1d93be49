"""flows.experiments: the configuration grids (no model needed) and the shift clip's exact translation."""

from __future__ import annotations

import numpy as np
import pytest

from flows import compare, experiments
from flows.config import METHODS, RestoreConfig


def test_shift_inpaint_grid_is_methods_x_models_x_seeds(tmp_path):
    specs = experiments.experiment_grid("shift-inpaint", "clip.mkv", seeds=2, work_root=str(tmp_path))
    assert len(specs) == len(METHODS) * 2 * 2
    cells = {(s.config["method"], s.config["model"], s.config["seed"]) for s in specs}
    assert cells == {(m, model, seed) for m in METHODS for model in ("inpaint-gp", "inpaint-white") for seed in (0, 1)}
    for s in specs:
        assert s.row == (f"{s.config['method']}/white" if s.config["model"] == "inpaint-white" else s.config["method"])
        assert s.tags[compare.ROW_TAG] == s.row
        cfg = RestoreConfig(**s.config)
        assert (cfg.task, cfg.mode, cfg.executor) == ("inpaint", "restore", "inline")
        assert cfg.mask == experiments.mask_path("clip.mkv", cfg.seed)  # the hole moves with the content
        assert cfg.flow_backend == f"shift:{experiments.SHIFT_PX[0]},{experiments.SHIFT_PX[1]}"
    assert len({s.config["out"] for s in specs}) == len(specs)  # every run writes its own outputs


def test_video_sr_grid_every_method():
    specs = experiments.experiment_grid("video-sr", "clip.mp4", frames=12, steps=20, guidance=0.5)
    assert [s.config["method"] for s in specs] == list(METHODS)
    assert all(s.config["task"] == "sr8" and s.config["flow_backend"] == "dis" and s.config["frames"] == "0:12"
               and s.config["steps"] == 20 and s.config["guidance"] == 0.5 for s in specs)
    default = experiments.experiment_grid("video-sr", "clip.mp4")
    assert {(s.config["steps"], s.config["guidance"]) for s in default} == {(experiments.VIDEO_SR_STEPS, experiments.VIDEO_SR_GUIDANCE)}
    with pytest.raises(ValueError, match="guidance must be in"):
        experiments.experiment_grid("video-sr", "clip.mp4", guidance=-1)


def test_guidance_sweep_grid_lambdas_x_steps():
    specs = experiments.experiment_grid("guidance-sweep", "clip.mp4")
    assert {(s.config["guidance"], s.config["steps"]) for s in specs} == {
        (lam, n) for lam in (0, 0.25, 0.5, 1, 2) for n in (25, 50, 100)}
    assert len(specs) == 15 and all(s.config["method"] == "warped-diffusion" for s in specs)
    assert specs[0].config["frames"] == f"0:{experiments.SWEEP_FRAMES}"
    rows = [s.row for s in specs]
    assert sorted(rows, key=compare._order) == [f"λ={lam:g} steps={n}" for n in (25, 50, 100) for lam in (0, 0.25, 0.5, 1, 2)]
    only = experiments.experiment_grid("guidance-sweep", "clip.mp4", steps=10)
    assert {s.config["steps"] for s in only} == {10}


def test_unknown_experiment_and_seeds():
    with pytest.raises(ValueError, match="unknown experiment"):
        experiments.experiment_grid("nope", "clip.mp4")
    with pytest.raises(ValueError, match="seeds"):
        experiments.experiment_grid("video-sr", "clip.mp4", seeds=0)


def test_shift_clip_and_masks_are_exact_lossless_translations(tmp_path):
    from storage.video import read_video

    dx, dy = experiments.SHIFT_PX
    assert (dx % 8, dy % 8) == (0, 0)  # whole latent pixels, as in the paper
    made = experiments.make_shift_clip(str(tmp_path / "shift.mkv"), size=64, frames=8, mask_seeds=(0, 1))
    frames, _ = read_video(made["clip"])
    assert frames.shape == (8, 64, 64, 3)
    masks = [read_video(made["masks"][s])[0][..., 0] > 127 for s in (0, 1)]
    assert masks[0].any() and not (masks[0] == masks[1]).all()  # a hole, drawn from the seed
    for j in range(1, 8):  # content and hole move by +dx: frame j at x + dx equals frame j-1 at x
        np.testing.assert_array_equal(frames[j][:, dx:], frames[j - 1][:, : 64 - dx])
        np.testing.assert_array_equal(masks[0][j][:, dx:], masks[0][j - 1][:, : 64 - dx])
    assert all(m.sum() == masks[0][0].sum() for m in masks[0])  # the hole stays in view in every frame
    with pytest.raises(ValueError, match="leaves"):
        experiments.make_shift_clip(str(tmp_path / "x.mkv"), size=128, frames=40)


def test_run_experiment_nests_runs_and_prints_json(tmp_path, monkeypatch, capsys):
    """run_experiment + experiment_cli with a stand-in restore (real MLflow): one parent, nested tagged children,
    compare artifacts on the parent, `--json` = per-row means over seeds."""
    import argparse
    import json

    import mlflow

    from infra import tracking

    def fake_restore(cfg, parent_run_id):
        import os

        we = {"warped-diffusion": 0.001, "gp": 0.05}.get(cfg.method, 0.1) * (1 + cfg.seed)
        with tracking.start_run(os.environ["RESTORE_VIDEO_EXPERIMENT"], f"x:{cfg.method}", parent_run_id=parent_run_id,
                                tags={"method": cfg.method, "model": cfg.model_name},
                                uri=tracking.tracking_uri(cfg.work_root)) as run:
            tracking.log_config(cfg.model_dump(mode="json"))
            mlflow.log_metrics({"warping_error_pixel_first": we, "warping_error_pixel_prev": we / 2, "psnr": 20.0 + cfg.seed,
                                "ssim": 0.5})
            tracking.log_series(compare.PER_FRAME_METRIC, [we] * 3)
        return {"mlflow_run_id": run.info.run_id, "warping_error": {"pixel_first": we, "pixel_prev": we / 2},
                "psnr": 20.0 + cfg.seed, "ssim": 0.5, "cached": {"sample": False}}

    previous = mlflow.get_tracking_uri()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(experiments, "_restore", fake_restore)
    try:
        args = argparse.Namespace(name="video-sr", input=str(tmp_path / "clip.mp4"), frames=None, steps=2, seeds=2, work_root=str(tmp_path), json=True)
        assert experiments.experiment_cli(args) == 0
        out = json.loads(capsys.readouterr().out)
        assert list(out) == list(METHODS)
        assert out["gp"]["warping_error_pixel_first"] == pytest.approx(0.05 * 1.5)  # mean over seeds 0, 1
        assert out["warped-diffusion"]["psnr"] == pytest.approx(20.5)
        assert set(out["gp"]) == {"warping_error_pixel_first", "warping_error_pixel_prev", "psnr", "ssim"}

        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking.tracking_uri(str(tmp_path)))
        exp = client.get_experiment_by_name("video-sr")
        runs = client.search_runs([exp.experiment_id])
        parents = [r for r in runs if r.data.tags.get(compare.ROLE_TAG) == "experiment-parent"]
        assert len(parents) == 1
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
        assert len(children) == len(METHODS) * 2
        assert {r.data.tags[compare.ROW_TAG] for r in children} == set(METHODS)
        names = {a.path for a in client.list_artifacts(parents[0].info.run_id, "compare")}
        assert "compare/warping_error_per_frame.png" in names and "compare/table.md" in names
    finally:
        mlflow.set_tracking_uri(previous)
