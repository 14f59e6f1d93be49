"""flows.experiments: the configuration grids (no model needed) and the shift clip's exact translation."""

from __future__ import annotations

import numpy as np
import pytest

from flows import compare, experiments
from flows.config import METHODS, RestoreConfig


def test_shift_inpaint_grid_is_methods_x_models_x_seeds(tmp_path):
    specs = experiments.experiment_grid("shift-inpaint", "clip.mkv", seeds=2, work_root=str(tmp_path))
    white_only = set(experiments.WHITE_ONLY)
    assert len(specs) == (2 * len(METHODS) - len(white_only)) * 2
    cells = {(s.config["method"], s.config["model"], s.config["seed"]) for s in specs}
    assert cells == {(m, model, seed) for m in METHODS for model in ("inpaint-gp", "inpaint-white") for seed in (0, 1)
                     if not (m in white_only and model == "inpaint-gp")}  # integral never runs with the GP model
    for s in specs:
        assert s.row == (f"{s.config['method']}/white" if s.config["model"] == "inpaint-white" else s.config["method"])
        assert s.tags[compare.ROW_TAG] == s.row
        cfg = RestoreConfig(**s.config)
        assert (cfg.task, cfg.mode, cfg.executor) == ("inpaint", "restore", "inline")
        assert cfg.mask == experiments.mask_path("clip.mkv", cfg.seed)  # the hole moves with the content
        assert cfg.flow_backend == f"shift:{experiments.SHIFT_PX[0]},{experiments.SHIFT_PX[1]}"
    assert len({s.config["out"] for s in specs}) == len(specs)  # every run writes its own outputs


def test_white_noise_baselines_run_with_the_white_model():
    assert experiments.model_for("sr8", "integral") == "sr8-white"
    assert experiments.model_for("sr4", "integral", "gp") == "sr4-white"  # generic over the task
    assert experiments.model_for("sr8", "warped-diffusion") == "sr8-gp"
    assert experiments.model_for("inpaint", "fixed", "white") == "inpaint-white"
    with pytest.raises(ValueError, match="unknown noise"):
        experiments.model_for("sr8", "gp", "pink")


def test_res_family_maps_to_the_residual_models_and_its_own_experiment(tmp_path):
    """--family res: every method on {task}-res-gp, integral on {task}-res-white; its own MLflow experiment and
    output folder (video-sr-res), so the PCA tables of `make experiments` stay as they are."""
    assert experiments.model_for("sr8", "warped-diffusion", family="res") == "sr8-res-gp"
    assert experiments.model_for("sr8", "integral", family="res") == "sr8-res-white"
    assert experiments.model_for("inpaint", "gp", "white", family="res") == "inpaint-res-white"
    with pytest.raises(ValueError, match="unknown model family"):
        experiments.model_for("sr8", "gp", family="lapped")
    assert experiments.experiment_label("video-sr") == "video-sr"
    assert experiments.experiment_label("video-sr", "res") == "video-sr-res"
    clips = [experiments.Clip(path="coffee.mkv", image="coffee", role="report")]
    specs = experiments.experiment_grid("video-sr", clips, seeds=1, work_root=str(tmp_path), family="res")
    assert {(s.row, s.config["model"]) for s in specs} == {
        ("integral/white" if m == "integral" else m, "sr8-res-white" if m == "integral" else "sr8-res-gp") for m in METHODS}
    assert all(s.config["out"].startswith(f"{tmp_path}/experiments/video-sr-res/") for s in specs)
    pca = experiments.experiment_grid("video-sr", clips, seeds=1, work_root=str(tmp_path))
    assert not {s.config["out"] for s in specs} & {s.config["out"] for s in pca}
    from storage.models import list_models

    assert {s.config["model"] for s in specs} <= set(list_models())  # every model it names ships


def test_video_sr_grid_every_method_on_every_report_clip():
    clips = [experiments.Clip(path=f"{n}.mkv", image=n, role="report") for n in ("coffee", "motorcycle_right")]
    specs = experiments.experiment_grid("video-sr", clips, steps=20, guidance=0.5, seeds=3)
    assert len(specs) == len(METHODS) * 2 * 3
    for s in specs:
        assert s.config["model"] == ("sr8-white" if s.config["method"] == "integral" else "sr8-gp")
        assert s.row == ("integral/white" if s.config["method"] == "integral" else s.config["method"])
        assert s.config["input"] == s.clip.path and s.tags[experiments.CLIP_TAG] == s.clip.image
        assert s.tags[experiments.ROLE_TAG] == "report"
        assert (s.config["task"], s.config["flow_backend"], s.config["steps"], s.config["guidance"]) == ("sr8", "dis", 20, 0.5)
    default = experiments.experiment_grid("video-sr", "clip.mp4")
    assert {s.config["seed"] for s in default} == set(range(experiments.DEFAULT_SEEDS))  # >= 3 seeds by default
    assert experiments.DEFAULT_SEEDS >= 3
    assert {(s.config["steps"], s.config["guidance"]) for s in default} == {(experiments.VIDEO_SR_STEPS, experiments.VIDEO_SR_GUIDANCE)}
    with pytest.raises(ValueError, match="guidance must be in"):
        experiments.experiment_grid("video-sr", "clip.mp4", guidance=-1)


def test_guidance_sweep_grid_lambdas_x_steps_x_spaces():
    specs = experiments.experiment_grid("guidance-sweep", "clip.mp4", seeds=1)
    assert {(s.config["guidance"], s.config["steps"], s.config["guidance_space"]) for s in specs} == {
        (lam, n, sp) for lam in experiments.LAMBDAS for n in experiments.SWEEP_STEPS for sp in ("pixel", "latent")}
    assert 0.0 in experiments.LAMBDAS and len(experiments.LAMBDAS) >= 3  # lambda = 0 is the sweep's PSNR baseline
    assert all(s.config["method"] == "warped-diffusion" for s in specs)
    wide = experiments.experiment_grid("guidance-sweep", "clip.mp4", seeds=1, lambdas=(0, 0.25, 0.5, 1, 2),
                                       sweep_steps=(25, 50, 100))
    rows = list(dict.fromkeys(s.row for s in wide))
    assert sorted(rows, key=compare._order) == [f"λ={lam:g} steps={n} space={sp}" for n in (25, 50, 100)
                                                 for sp in ("latent", "pixel") for lam in (0, 0.25, 0.5, 1, 2)]
    only = experiments.experiment_grid("guidance-sweep", "clip.mp4", steps=10, space="pixel", seeds=1, lambdas=(0, 3))
    assert {(s.config["steps"], s.config["guidance_space"], s.config["guidance"]) for s in only} == {
        (10, "pixel", 0), (10, "pixel", 3)}
    for bad in (dict(lambdas=(0, -1)), dict(lambdas=()), dict(sweep_steps=(25, 0)), dict(sweep_steps=(2.5,))):
        with pytest.raises(ValueError, match="--lambdas|--sweep-steps"):
            experiments.experiment_grid("guidance-sweep", "clip.mp4", seeds=1, **bad)


def test_cli_sweep_grid_lists(tmp_path, capsys):
    """`--lambdas` / `--sweep-steps` parse comma lists; a malformed one is exit code 2 with the flag named."""
    import argparse

    assert experiments._numbers("0,0.5, 2", float, "--lambdas") == (0.0, 0.5, 2.0)
    assert experiments._numbers(None, int, "--sweep-steps") is None
    args = argparse.Namespace(name="guidance-sweep", input=None, frames=4, steps=None, seeds=1, work_root=str(tmp_path),
                              json=False, guidance=None, guidance_space=None, tune_image=None, report_images=None,
                              update_doc=None, lambdas="0,half", sweep_steps=None)
    assert experiments.experiment_cli(args) == 2
    assert "--lambdas takes comma-separated numbers" in capsys.readouterr().err


def test_unknown_experiment_and_seeds():
    with pytest.raises(ValueError, match="unknown experiment"):
        experiments.experiment_grid("nope", "clip.mp4")
    with pytest.raises(ValueError, match="seeds"):
        experiments.experiment_grid("video-sr", "clip.mp4", seeds=0)


def test_training_images_are_refused(tmp_path):
    import json

    card = tmp_path / "sr8-gp"
    card.mkdir()
    (card / "card.json").write_text(json.dumps({"data": {"train": ["astronaut", "skimage:camera"], "heldout": ["coffee"],
                                                         "photographs": {"train": ["BytheWater.jpg"], "test": ["Grey"]}}}))
    assert experiments.training_images(tmp_path) == {"sr8-gp": {"astronaut", "camera", "BytheWater"}}
    for image in ("astronaut", "camera", "/some/dir/BytheWater.png"):
        with pytest.raises(ValueError, match="training image of sr8-gp"):
            experiments.check_held_out(image, tmp_path)
    experiments.check_held_out("coffee", tmp_path)  # held out: accepted
    with pytest.raises(ValueError, match="training image"):  # before any rendering or run
        experiments.prepare_clips("video-sr", None, str(tmp_path / "w"), 4, 1, report_images=("coffee", "camera"),
                                  models_root=tmp_path)
    # the shipped cards: every default clip is held out of every model's training
    for image in (experiments.TUNE_IMAGE, *experiments.REPORT_IMAGES, experiments.SHIFT_IMAGE):
        experiments.check_held_out(image)
    assert experiments.TUNE_IMAGE not in experiments.REPORT_IMAGES


def test_choose_tuning_prefers_consistency_without_blur():
    def row(lam, steps, space, we, psnr):
        return {"row": f"λ={lam:g} steps={steps} space={space}", "guidance": str(lam), "steps": str(steps),
                "space": space, "warping_error_pixel_first_mean": we * 2, "warping_error_pixel_first_exact_mean": we,
                "psnr_mean": psnr}

    rows = [row(0, 50, "pixel", 1.0, 20.0), row(1, 50, "pixel", 0.5, 19.8), row(2, 50, "pixel", 0.1, 18.0),
            row(0, 100, "latent", 1.1, 20.0), row(2, 100, "latent", 0.3, 19.9)]
    pick = experiments.choose_tuning(rows)
    assert (pick["guidance"], pick["steps"], pick["guidance_space"]) == (2.0, 100, "latent")  # 0.1 costs 2 dB: excluded
    assert pick["warping_error_pixel_first"] == 0.3
    assert experiments.choose_tuning(rows, slack_db=5)["warping_error_pixel_first"] == 0.1


def test_metrics_grad_ratio_blockiness_noise_sigma():
    import torch

    from ops import metrics

    g = torch.Generator().manual_seed(0)
    truth = torch.rand(2, 3, 32, 48, generator=g, dtype=torch.float64)
    blocks = truth.reshape(2, 3, 4, 8, 6, 8).mean((3, 5), keepdim=True).expand(-1, -1, -1, 8, -1, 8).reshape(2, 3, 32, 48)
    assert metrics.blockiness(truth, truth) == pytest.approx(1.0)
    assert metrics.blockiness(blocks, truth) > 5  # piecewise-constant 8x8 cells: all change at cell borders
    blur = torch.nn.functional.avg_pool2d(truth, 3, 1, 1, count_include_pad=False)
    assert metrics.grad_ratio(blur, truth) < 0.7 and metrics.grad_ratio(truth, truth) == pytest.approx(1.0)

    ramp = torch.linspace(0.2, 0.6, 48, dtype=torch.float64).view(1, 1, 1, 48).expand(2, 3, 32, 48)
    assert metrics.noise_sigma(ramp) == pytest.approx(0.0, abs=1e-12)  # planar content: no noise
    for sigma in (0.01, 0.05):  # white noise of known sigma (same in every channel) is recovered to a few %
        noisy = ramp + sigma * torch.randn(2, 1, 32, 48, generator=g, dtype=torch.float64).expand(-1, 3, -1, -1)
        assert metrics.noise_sigma(noisy) == pytest.approx(sigma, rel=0.1)


def test_exact_flow_of_the_sample_clip_warps_frames_onto_each_other():
    import torch

    from ops import metrics
    from storage.sample import render_sample_frames, sample_clip_affines, true_backward_flow, true_forward_flow

    frames = torch.from_numpy(render_sample_frames(4, 64, 0)).permute(0, 3, 1, 2).double() / 255
    affines = sample_clip_affines(4, 64, 0)
    fwd = torch.from_numpy(true_forward_flow(affines, 64, 64)).double()
    assert fwd.shape == (3, 64, 64, 2)
    exact = metrics.summarize(metrics.warping_error(frames, fwd, None, "prev"))
    assert exact < 0.2 * metrics.summarize(metrics.warping_error(frames, torch.zeros_like(fwd), None, "prev"))
    back = torch.from_numpy(true_backward_flow(affines, 64, 64)[1:]).double()  # frame j -> j-1
    from ops import flow as flowops

    grid = flowops.identity_grid(64, 64, torch.float64, "cpu")
    there = grid + fwd  # frame j-1's pixels in frame j; the backward flow there leads back to them
    round_trip = there + flowops.sample_bilinear(back.permute(0, 3, 1, 2), there).permute(0, 2, 3, 1)
    inside = flowops.inside(there, 64, 64)
    assert (round_trip - grid)[inside].abs().max() < 1e-3


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


def _stand_in_restore(calls):
    """A stand-in for flows.restore_video.restore: the real prepare / flow stages, a 'restoration' = the bicubic
    input plus seed- and method-dependent noise, its latents from the real autoencoder, a real nested MLflow run."""
    import inspect
    import os

    import mlflow
    import torch
    import xarray as xr

    from infra import tracking
    from storage.video import read_video
    from tasks import optical_flow as flow_stage
    from tasks import degrade as prepare_stage
    from tasks._stage import run_stage, run_stage_chunked, store_for
    from tasks.models import latent_factor, pad_multiple

    def restore(cfg, parent_run_id):
        calls.append(cfg)
        store = store_for(cfg.work_root)
        frames, _ = read_video(cfg.input)
        tag = f"{os.path.basename(cfg.input)}-{cfg.seed}-{cfg.mode}"
        keys = {"prepare": f"fake-{tag}", "estimate_flow": f"fake-{tag}-{cfg.flow_backend}",
                "decode": f"fake-{tag}-{cfg.method}-{cfg.guidance}-{cfg.steps}-{cfg.model_name}"}
        keys["sample"] = keys["decode"]
        extracted = xr.Dataset({"frames": (("frame", "y", "x", "rgb"), frames)})
        extra = {"multiple": 8} if "multiple" in inspect.signature(prepare_stage.compute).parameters else {}
        run_stage(store, "prepare", keys["prepare"],
                  lambda: prepare_stage.compute(extracted, cfg.task, cfg.mode, cfg.seed, cfg.mask, {}, **extra))
        prepared = store.open("prepare", keys["prepare"]).load()
        geometry = flow_stage.geometry_for(cfg.task, latent_factor(cfg.model_name), pad_multiple(cfg.model_name))
        run_stage_chunked(store, "estimate_flow", keys["estimate_flow"],
                          lambda w: flow_stage.produce(w, prepared["cond"].data, cfg.flow_backend, geometry))
        g = torch.Generator().manual_seed(cfg.seed * 100 + len(cfg.method) + int(10 * cfg.guidance))
        cond = torch.from_numpy(prepared["cond"].values).permute(0, 3, 1, 2).float() / 255
        out = (cond + 0.02 * torch.randn(cond.shape, generator=g)).clamp(0, 1)  # (F, 3, H, W)
        with torch.no_grad():  # the lapped autoencoders of the res models have trainable parameters
            z = experiments._autoencoder(cfg.model_name).encode(out)
        restored = (out * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        run_stage(store, "decode", keys["decode"], lambda: xr.Dataset({"frames": (("frame", "y", "x", "rgb"), restored)}))
        run_stage(store, "sample", keys["sample"], lambda: xr.Dataset({"latents": (("frame", "c", "ly", "lx"), z.numpy())}))
        with tracking.start_run(os.environ["RESTORE_VIDEO_EXPERIMENT"], f"x:{cfg.method}", parent_run_id=parent_run_id,
                                tags={"method": cfg.method, "model": cfg.model_name},
                                uri=tracking.tracking_uri(cfg.work_root)) as run:
            tracking.log_config(cfg.model_dump(mode="json"))
            mlflow.log_metric("warping_error_pixel_first", 1.0)  # overwritten by the experiment's own scoring
        return {"mlflow_run_id": run.info.run_id, "keys": keys, "cached": {"sample": False}}

    return restore


@pytest.fixture
def stand_in(monkeypatch):
    """The experiments run with `_stand_in_restore` and a real MLflow store of their own; -> the list of configs
    restored. MLflow's tracking URI is put back afterwards."""
    import mlflow

    calls, previous = [], mlflow.get_tracking_uri()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(experiments, "_restore", _stand_in_restore(calls))
    yield calls
    mlflow.set_tracking_uri(previous)


def _child_runs(work_root, name):
    from mlflow.tracking import MlflowClient

    from infra import tracking

    client = MlflowClient(tracking_uri=tracking.tracking_uri(str(work_root)))
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get(compare.ROLE_TAG) == "experiment-parent"]
    children = {p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id] for p in parents}
    return client, parents, children


@pytest.mark.slow
def test_tuning_then_report_with_input_rows_and_floors(tmp_path, monkeypatch, capsys, stand_in):
    """experiment_cli `all`-style: the guidance sweep on the tuning clip writes tuning.json, video-sr reads it and
    reports on a different held-out clip, with the input rows (bicubic, + back-projection), the truth floor, exact
    and estimated warping errors, grad ratio and blockiness, n = 3 seeds and "–" for n = 1 (real MLflow)."""
    import argparse
    import json

    calls = stand_in
    monkeypatch.setattr(experiments, "CLIP_SIZE", 64)
    monkeypatch.setattr(experiments, "METHODS", ("warped-diffusion", "gp", "integral"))
    monkeypatch.setattr(experiments, "LAMBDAS", (0.0, 1.0, 2.0))
    doc = tmp_path / "EXPERIMENTS.md"
    doc.write_text("# Experiments\n\nprose\n\n<!-- BEGIN experiment:video-sr -->\nold table\n<!-- END experiment:video-sr -->\n\nmore prose\n")
    base = dict(input=None, frames=4, steps=2, work_root=str(tmp_path), json=False, guidance=None,
                tune_image="rocket", update_doc=str(doc))
    sweep = argparse.Namespace(name="guidance-sweep", seeds=1, guidance_space="pixel", report_images=None, **base)
    assert experiments.experiment_cli(sweep) == 0
    tuning = json.loads((tmp_path / "experiments" / "tuning.json").read_text())
    assert tuning["clip"] == "rocket" and tuning["steps"] == 2 and tuning["guidance_space"] == "pixel"
    assert tuning["guidance"] in experiments.LAMBDAS
    assert {c.input for c in calls} == {str(tmp_path / "experiments" / "clips" / "rocket_64_4f.mkv")}
    calls.clear()
    report = argparse.Namespace(name="video-sr", seeds=3, guidance_space=None, report_images="coffee",
                                **{**base, "steps": None})
    assert experiments.experiment_cli(report) == 0
    printed = capsys.readouterr().out
    # tuned on rocket, reported on coffee: no run of video-sr saw the tuning clip
    assert {c.input for c in calls} == {str(tmp_path / "experiments" / "clips" / "coffee_64_4f.mkv")}
    assert {(c.steps, c.guidance, c.guidance_space) for c in calls if c.method == "warped-diffusion"} == {
        (2, tuning["guidance"], "pixel")}
    assert {c.model_name for c in calls if c.method == "integral"} == {"sr8-white"}
    assert {c.model_name for c in calls if c.method != "integral"} == {"sr8-gp"}
    assert "tuned on" not in printed or "rocket" in printed
    assert "λ, steps and guidance space: rocket (guidance-sweep" in printed
    assert "#### clip coffee (report)" in printed

    client, parents, children = _child_runs(tmp_path, "video-sr")
    assert len(parents) == 1
    kids = children[parents[0].info.run_id]
    by_row = {}
    for r in kids:
        by_row.setdefault(r.data.tags[compare.ROW_TAG], []).append(r)
    assert set(by_row) == {"warped-diffusion", "gp", "integral/white", "input: bicubic ×8",
                           "input: bicubic ×8 + back-projection", "truth (floor)"}
    assert {len(v) for k, v in by_row.items() if not k.startswith(("input", "truth"))} == {3}
    assert len(by_row["input: bicubic ×8"]) == 1 and len(by_row["truth (floor)"]) == 1  # deterministic
    for r in kids:
        m = r.data.metrics
        assert {"warping_error_pixel_first", "warping_error_pixel_first_exact",
                "warping_error_latent_prev_exact"} <= set(m)
        assert m["warping_error_pixel_first"] != 1.0  # the stand-in's placeholder was re-scored
        if r.data.tags[compare.ROW_TAG] != "truth (floor)":
            assert {"psnr", "ssim", "grad_ratio", "blockiness"} <= set(m)
    floor = by_row["truth (floor)"][0].data.metrics
    bic = by_row["input: bicubic ×8"][0].data.metrics
    bp = by_row["input: bicubic ×8 + back-projection"][0].data.metrics
    assert floor["warping_error_pixel_first_exact"] < bic["warping_error_pixel_first_exact"]  # the truth is the floor
    assert bp["psnr"] > bic["psnr"] and bic["grad_ratio"] < 1  # bicubic is blurry; back-projection helps PSNR

    table = (tmp_path / "EXPERIMENTS.md").read_text()
    assert table.startswith("# Experiments\n\nprose") and "<!-- END experiment:video-sr -->\n\nmore prose" in table
    assert "old table" not in table and "| truth (floor) | 1 |" in table
    line = next(x for x in table.splitlines() if x.startswith("| input: bicubic ×8 |"))
    assert "± –" in line  # n = 1: no std
    line = next(x for x in table.splitlines() if x.startswith("| gp | 3 |"))
    assert "± –" not in line.split("|")[3]
    assert "grad ratio" in table and "WE pixel first (exact)" in table and "noise σ (NR)" in table
    assert floor["noise_sigma"] > bic["noise_sigma"]  # no-reference: bicubic is smoother than the truth
    assert "## guidance-sweep" in table  # no markers for it yet: appended




@pytest.mark.slow
def test_shift_inpaint_has_telea_rows_per_mask_and_integral_only_white(tmp_path, monkeypatch, capsys, stand_in):
    """shift-inpaint with the stand-in restore: the Telea input row once per seed (the seed draws the hole), hole
    PSNR in every row, the exact flow equals the `shift:` flow, and integral runs only with the white model."""
    import argparse

    calls = stand_in
    monkeypatch.setattr(experiments, "METHODS", ("gp", "integral"))
    args = argparse.Namespace(name="shift-inpaint", input=None, frames=None, steps=2, seeds=2, work_root=str(tmp_path),
                              json=True, guidance=None, guidance_space=None, tune_image=None, report_images=None,
                              update_doc=None)
    assert experiments.experiment_cli(args) == 0
    assert sorted((c.method, c.model_name) for c in calls) == sorted(
        [("gp", "inpaint-gp"), ("gp", "inpaint-white"), ("integral", "inpaint-white")] * 2)
    _, parents, children = _child_runs(tmp_path, "shift-inpaint")
    by_row = {}
    for r in children[parents[0].info.run_id]:
        by_row.setdefault(r.data.tags[compare.ROW_TAG], []).append(r.data.metrics)
    assert set(by_row) == {"truth (floor)", "input: Telea", "gp", "gp/white", "integral/white"}
    assert len(by_row["input: Telea"]) == 2 and len(by_row["truth (floor)"]) == 1
    for row, ms in by_row.items():
        for m in ms:
            assert m["warping_error_pixel_first_exact"] == pytest.approx(m["warping_error_pixel_first"], rel=1e-6)
            if row != "truth (floor)":
                assert "hole_psnr" in m and "blockiness" in m
    assert max(m["warping_error_pixel_prev"] for m in by_row["truth (floor)"]) < 1e-12  # exact shift: no error


def test_score_run_reports_sampling_seconds_per_frame_and_compare_shows_them():
    """The sample artifact's own timing over the frames; the zero-shot grid takes --iterations and the clip --size."""
    import torch
    import xarray as xr

    f, h, w = 3, 32, 32
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 256, (f, h, w, 3), dtype=np.uint8)
    flows = xr.Dataset({"forward": (("p", "y", "x", "xy"), np.zeros((f - 1, h, w, 2), np.float32)),
                        "valid": (("p", "y", "x"), np.ones((f - 1, h, w), bool)),
                        "latent_forward": (("p", "ly", "lx", "xy"), np.zeros((f - 1, 4, 4, 2), np.float32)),
                        "latent_valid": (("p", "ly", "lx"), np.ones((f - 1, 4, 4), bool))})
    outputs = {"frames": truth, "truth": truth, "prepared": xr.Dataset({"cond": (("f", "y", "x", "rgb"), truth)}),
               "flows": flows, "latents": torch.zeros(f, 2, 4, 4).numpy(), "sampling_seconds": 7.5}
    clip = experiments.Clip(path="c.mkv", image="c", role="report", kind="video")
    scores = experiments.score_run(outputs, clip, 8)
    assert scores["seconds_per_frame"] == pytest.approx(2.5) and scores["psnr"] > 100  # the truth itself
    row = {f"{m}_mean": float("nan") for m in compare.METRICS + compare.OPTIONAL_METRICS}
    assert "seconds_per_frame" not in compare.present_metrics([row])
    row["seconds_per_frame_mean"] = 2.5
    assert compare.present_metrics([row])[-1] == "seconds_per_frame"
    specs = experiments.experiment_grid("zero-shot", "clip.mkv", seeds=1, iterations=7)
    assert {s.config.get("iterations") for s in specs} == {7} and {s.config["steps"] for s in specs} == {10}


@pytest.mark.slow
def test_res_family_cli_writes_its_own_section_and_keeps_the_pca_table(tmp_path, monkeypatch, capsys, stand_in):
    """`experiment video-sr --family res --guidance 2 --steps 2 --guidance-space pixel --update-doc`: runs every
    method on sr8-res-gp (integral on sr8-res-white) as MLflow experiment video-sr-res, writes its table between
    the video-sr-res markers and leaves the PCA video-sr table alone; λ/steps/space given on the command line win
    over a tuning.json and the table says so (stand-in sampler, real models' autoencoders, real MLflow)."""
    import argparse
    import json

    calls = stand_in
    monkeypatch.setattr(experiments, "CLIP_SIZE", 64)
    monkeypatch.setattr(experiments, "METHODS", ("warped-diffusion", "gp", "integral"))
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "tuning.json").write_text(json.dumps(
        {"clip": "rocket", "row": "λ=1 steps=7 space=latent", "guidance": 1.0, "steps": 7, "guidance_space": "latent"}))
    doc = tmp_path / "EXPERIMENTS.md"
    doc.write_text("# Experiments\n\n<!-- BEGIN experiment:video-sr -->\npca table\n<!-- END experiment:video-sr -->\n\n"
                   "## res\n\n<!-- BEGIN experiment:video-sr-res -->\nold res table\n<!-- END experiment:video-sr-res -->\n\nend\n")
    args = argparse.Namespace(name="video-sr", family="res", seeds=1, input=None, frames=3, steps=2, guidance=2.0,
                              guidance_space="pixel", work_root=str(tmp_path), json=False, tune_image="rocket",
                              report_images="coffee", update_doc=str(doc))
    assert experiments.experiment_cli(args) == 0
    printed = capsys.readouterr().out
    assert {(c.method, c.model_name) for c in calls} == {
        ("warped-diffusion", "sr8-res-gp"), ("gp", "sr8-res-gp"), ("integral", "sr8-res-white")}
    assert {(c.steps, c.guidance, c.guidance_space) for c in calls if c.method == "warped-diffusion"} == {(2, 2.0, "pixel")}
    assert "given on the command line (λ=2 steps=2 space=pixel)" in printed
    client, parents, children = _child_runs(tmp_path, "video-sr-res")
    assert len(parents) == 1
    assert client.get_experiment_by_name("video-sr") is None  # the PCA experiment is untouched
    rows = {r.data.tags[compare.ROW_TAG] for r in children[parents[0].info.run_id]}
    assert {"warped-diffusion", "gp", "integral/white", "input: bicubic ×8", "truth (floor)"} <= rows
    text = doc.read_text()
    assert "pca table" in text and "old res table" not in text and text.rstrip().endswith("end")
    res = text[text.index("<!-- BEGIN experiment:video-sr-res -->"):text.index("<!-- END experiment:video-sr-res -->")]
    assert "`sr8-res-gp`: warped-diffusion, gp" in res and "`sr8-res-white`: integral/white" in res
    assert "| integral/white | 1 |" in res


def test_each_model_family_is_tuned_on_its_own(tmp_path):
    """The sweep's pick is stored per family (video-sr on the residual models never reads the PCA models' pick)."""
    import json

    assert experiments.tuning_path(str(tmp_path)).endswith("experiments/tuning.json")  # the documented PCA file
    res = experiments.tuning_path(str(tmp_path), "res")
    assert res != experiments.tuning_path(str(tmp_path))
    (tmp_path / "experiments").mkdir()
    with open(experiments.tuning_path(str(tmp_path)), "w") as f:
        json.dump({"guidance": 2.0}, f)
    assert experiments.load_tuning(str(tmp_path), "res") is None
    with open(res, "w") as f:
        json.dump({"guidance": 0.5}, f)
    assert experiments.load_tuning(str(tmp_path), "res") == {"guidance": 0.5}
    assert experiments.load_tuning(str(tmp_path)) == {"guidance": 2.0}


def test_real_clips_are_wide_held_out_pans_with_film_damage_and_run_the_shipped_defaults(tmp_path):
    """real-clips: 640x272-shaped (here 80x34) pans of the report photographs, one damage mask video per seed; the
    grid is tasks x (warped-diffusion, gp) x seeds with the product's default models and lambda."""
    from flows.config import RestoreSettings
    from storage.models import DEFAULT_MODELS
    from storage.video import read_video

    clips = experiments.prepare_clips("real-clips", None, str(tmp_path), 3, 2, report_images=("coffee",), size=80)
    [clip] = clips
    frames, _ = read_video(clip.path)
    assert frames.shape == (3, 34, 80, 3) and (clip.size, clip.height) == (80, 34)
    masks = [read_video(experiments.mask_path(clip.path, s))[0] for s in (0, 1)]
    assert all(m.shape == (3, 34, 80, 3) for m in masks) and not np.array_equal(masks[0], masks[1])
    assert 0 < (masks[0] > 127).mean() < 0.2  # thin damage, not a blank frame
    fwd = clip.exact_forward(34, 80)  # the wide clip's exact motion
    assert fwd.shape == (2, 34, 80, 2) and fwd.abs().max() > 0.1
    specs = experiments.experiment_grid("real-clips", clips, seeds=2, work_root=str(tmp_path))
    assert len(specs) == len(experiments.REAL_TASKS) * len(experiments.REAL_METHODS) * 2
    for s in specs:
        task = s.config["task"]
        assert s.config["model"] == DEFAULT_MODELS[task] and s.config["mode"] == "benchmark"
        assert s.config["steps"] == experiments.REAL_STEPS  # the committed table's scale
        assert s.config["guidance"] == RestoreSettings.model_fields["guidance"].default
        assert (s.config.get("mask") == experiments.mask_path(clip.path, s.config["seed"])) == (task == "inpaint")
    assert {s.row for s in specs} == {f"{t}/{m}" for t in experiments.REAL_TASKS for m in experiments.REAL_METHODS}
