"""Zero-shot restoration end to end: `restore-video run --task deblur --solver dflow --source video` with a tiny
unconditional prior (untrained weights: these tests check the plumbing, determinism and keys, not quality)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory) -> str:
    """A small unconditional prior on the embedded vae-pca latent, saved like a trained one."""
    from flows.train_denoiser import _new_card
    from storage import models as store

    vae = store.load_own(ROOT / "assets" / "models" / "vae-pca")
    args = dict(steps=0, batch=1, crop=64, lr=0.0, ema=0.0, p_mean=-1.2, p_std=1.2, seed=0)
    card = _new_card("prior", "gp", vae, args)
    card["denoiser"]["unet"].update(block_out_channels=[32, 32], attention=False)
    torch.manual_seed(0)
    model = store.build_model(card, model_id="prior-test")
    model.autoencoder.load_state_dict(vae.autoencoder.state_dict())
    out = tmp_path_factory.mktemp("models") / "prior-test"
    store.save_model(model, out, card)
    return str(out)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    from tests._clips import write_clip

    return write_clip(str(tmp_path_factory.mktemp("clip") / "clip.mp4"), 64, 48, 2)


def _run(clip, prior_dir, out, work, *extra) -> dict:
    from flows.cli import main

    code = main(["run", clip, "--task", "deblur", "--mode", "benchmark", "--executor", "inline", "--steps", "2",
                 "--iterations", "2", "--model", prior_dir, "--out", str(out), "--work-root", str(work), "--json", *extra])
    assert code == 0
    return json.loads((Path(out) / "metrics.json").read_text())


@pytest.mark.slow  # two full restores through Prefect: ~45 s on a loaded 2-core machine
def test_deblur_dflow_video_end_to_end_is_deterministic(clip, prior_dir, tmp_path):
    from flows.config import RestoreConfig
    from ops import gp, solvers
    from storage.artifacts import ArtifactStore
    from storage.video import read_video

    a = _run(clip, prior_dir, tmp_path / "a", tmp_path / "w1", "--solver", "dflow", "--source", "video")
    b = _run(clip, prior_dir, tmp_path / "b", tmp_path / "w2", "--solver", "dflow", "--source", "video")
    assert a["keys"]["sample"] == b["keys"]["sample"] and "encode" not in a["keys"]
    assert not any(b["cached"].values())  # separate work roots: computed twice
    va, _ = read_video(str(tmp_path / "a" / "restored.mp4"))
    vb, _ = read_video(str(tmp_path / "b" / "restored.mp4"))
    assert va.shape == (2, 48, 64, 3) and np.array_equal(va, vb)
    assert np.isfinite(a["psnr"]) and set(a["warping_error"]) == {"pixel_first", "pixel_prev", "latent_first", "latent_prev"}
    store = ArtifactStore(str(tmp_path / "w1"))
    sample = store.open("sample", a["keys"]["sample"])
    assert sample.attrs["solver"] == "dflow" and sample.attrs["source"] == "video"
    assert sample["history_loss"].shape[0] >= 1 and np.isfinite(sample["history_loss"].values).all()
    # The video source starts from the noise stage's own GP draw: source(w0) is the stored noise.
    flows = store.open("estimate_flow", a["keys"]["estimate_flow"])
    noise = store.open("generate_noise", a["keys"]["generate_noise"])["noise"].values
    features = gp.draw_rff(np.random.default_rng(0), noise.shape[1], max(noise.shape[-2:]))
    source, w0 = solvers.video_source(features, torch.from_numpy(flows["latent_positions"].values))
    assert np.abs(source(w0).numpy() - noise).max() < 1e-4
    # The solver's per-iteration loss is an MLflow metric series of the run.
    from mlflow.tracking import MlflowClient

    series = MlflowClient(a["mlflow_tracking_uri"]).get_metric_history(a["mlflow_run_id"], "solver_loss")
    assert [m.step for m in series] == list(range(sample["history_loss"].shape[0]))
    assert np.allclose([m.value for m in series], sample["history_loss"].values)
    assert RestoreConfig(input=clip, task="deblur", solver="dflow", source="video").model_name == "prior-gp"


def test_sample_key_changes_with_solver_params():
    from flows.config import RestoreConfig
    from tasks.sample import STAGE

    def key(**kw):
        cfg = RestoreConfig(input="x.mp4", task="deblur", **kw)
        args = {"model": str(ROOT / "assets" / "models" / "vae-pca"), "steps": 2, "guidance": 1.0, "guidance_space": "latent",
                "solver": cfg.solver_params()}
        return STAGE.call(args, {"generate_noise": "n", "prepare": "p", "estimate_flow": "f"}).key

    keys = {key(solver="dflow"), key(solver="dflow", source="video"), key(solver="dflow", iterations=3),
            key(solver="dmplug"), key(solver="dps"), key(solver="dps", zeta=0.5), key(solver="dflow", lr=0.1),
            key(solver="dflow", source="video", coupling=0.5), key(solver="dflow", source="video", residual=0.5)}
    assert len(keys) == 9
    assert key(solver="dflow") == key(solver="dflow")
    # the video terms' defaults are spelled out in the key, and per-frame keys do not carry them at all
    from ops.solvers import INIT_BLEND, VIDEO_DEFAULTS

    assert key(solver="dflow", source="video") == key(solver="dflow", source="video", **VIDEO_DEFAULTS)
    assert RestoreConfig(input="x.mp4", task="deblur", solver="dflow").solver_params() == {
        "solver": "dflow", "source": "frame", "iterations": 20, "init": INIT_BLEND}
    assert key(solver="dps", iterations=5) == key(solver="dps")  # dps has no iterations: not in its key


@pytest.mark.parametrize("kwargs, words", [
    ({"task": "deblur"}, "zero-shot solver"),
    ({"task": "denoise", "solver": "conditional"}, "zero-shot solver"),
    ({"task": "deblur", "solver": "dps", "source": "video"}, "--source frame"),
    ({"task": "deblur", "solver": "dflow", "source": "video", "method": "fixed"}, "--method warped-diffusion"),
    ({"task": "sr8", "source": "video"}, "--source video"),
    ({"task": "deblur", "solver": "dflow", "mask": "m.png"}, "--mask"),
    ({"task": "deblur", "solver": "dflow", "iterations": 0}, "iterations"),
    ({"task": "deblur", "solver": "dflow", "coupling": 1.0}, "add --source video"),
    ({"task": "deblur", "solver": "dflow", "source": "video", "residual": -1.0}, "residual"),
])
def test_bad_solver_combinations_are_clear_errors(kwargs, words):
    from pydantic import ValidationError

    from flows.config import RestoreConfig

    with pytest.raises(ValidationError, match=words.replace("-", r"\-")):
        RestoreConfig(input="x.mp4", **kwargs)


def test_conditional_model_for_a_zero_shot_solver_is_refused(clip, tmp_path, capsys):
    from flows.cli import main

    code = main(["run", clip, "--task", "sr8", "--solver", "dps", "--model", "sr8-gp", "--mode", "benchmark",
                 "--executor", "inline", "--out", str(tmp_path / "o"), "--work-root", str(tmp_path / "w")])
    assert code == 2
    assert "needs an unconditional prior" in capsys.readouterr().err


def test_benchmark_degradation_does_not_depend_on_chunking(clip):
    from storage.video import read_video
    from tasks.degrade import prepare_frames

    frames, _ = read_video(clip)
    whole = prepare_frames(frames, "deblur", "benchmark", 8, seed=3)
    second = prepare_frames(frames[1:], "deblur", "benchmark", 8, seed=3, start=1)
    assert np.array_equal(whole["cond"][1:], second["cond"]) and "mask" not in whole
    assert not np.array_equal(whole["cond"], whole["truth"])
    other = prepare_frames(frames, "deblur", "benchmark", 8, seed=4)
    assert not np.array_equal(whole["cond"], other["cond"])
    restore = prepare_frames(frames, "denoise", "restore", 8)
    assert np.array_equal(restore["cond"], frames) and "truth" not in restore


@pytest.mark.parametrize("task, scale", [("sr4", 4), ("sr8", 8), ("deblur", 1), ("denoise", 1), ("inpaint", 1)])
def test_measurement_operator_reproduces_the_prepared_degradation(clip, task, scale):
    """y and A of tasks.degrade.measurement agree with the benchmark degradation: A(truth) ~ y (up to the noise
    level and uint8 rounding), and super-resolution inputs are 1/scale of the truth."""
    import xarray as xr

    from storage.video import read_video
    from tasks.degrade import DEGRADATIONS, DIMS, measurement, prepare_frames

    frames, _ = read_video(clip)
    mask = np.zeros((1, 48, 64), np.uint8)
    mask[:, 8:24, 16:40] = 1
    data = prepare_frames(frames, task, "benchmark", 8, mask if task == "inpaint" else None, seed=1)
    dims = {**DIMS, "input": ("frame", "ly", "lx", "rgb") if scale > 1 else DIMS["cond"]}
    prepared = xr.Dataset({k: (dims[k], v) for k, v in data.items()})
    y, op = measurement(task, prepared, slice(None))
    truth = torch.from_numpy(data["truth"]).permute(0, 3, 1, 2).float() / 255  # (F, 3, H, W)
    assert y.shape[-2:] == (48 // scale, 64 // scale)
    err = (op(truth, torch.arange(2)) - y).abs().mean().item()
    level = DEGRADATIONS.get(task, {}).get("noise", 0.0)
    assert err < 0.8 * level + 0.01
    assert ("mask" in data) == (task == "inpaint")


def test_zero_shot_experiment_grid_is_valid_and_complete():
    from flows.config import RestoreConfig
    from flows.experiments import experiment_grid

    specs = experiment_grid("zero-shot", "clip.mp4", seeds=3, work_root="/tmp/w")
    configs = [RestoreConfig(**s.config) for s in specs]  # every cell is a valid configuration
    rows = {}
    for spec, cfg in zip(specs, configs):
        rows.setdefault(spec.row, []).append(cfg.seed)
        assert cfg.mode == "benchmark" and cfg.steps == 10
        assert (cfg.source == "video") == spec.row.endswith("dflow-video/gp")
        assert cfg.zero_shot == (cfg.solver != "conditional") and (cfg.solver == "conditional") <= (cfg.task == "inpaint")
    assert all(sorted(seeds) == [0, 1, 2] for seeds in rows.values())
    assert {r.split("/")[0] for r in rows} == {"sr4", "inpaint", "deblur"}
    assert "inpaint/vipaint/gp" in rows and "deblur/vipaint/gp" not in rows and "sr4/dflow-video/independent" not in rows
    assert len({s.config["out"] for s in specs}) == len(specs)


@pytest.mark.parametrize("name", ["prior-gp", "prior-white"])
def test_shipped_prior_denoises_held_out_pictures(name):
    """The shipped unconditional priors: trained without the held-out pictures and the clips' photograph, and their
    one-step denoising of held-out views beats the noisy latent by a margin at sigma = 1 (card: +3.7 / +4.4 dB)."""
    from flows.train_denoiser import evaluate_prior
    from storage import models as store

    model = store.load_model(name)
    assert model.task == "prior" and model.noise == name.split("-")[1] and model.condition(torch.zeros(1, 3, 8, 8)) is None
    train = set(model.card["data"]["train"])
    assert not train & (set(store.HELDOUT_IMAGES) | {"astronaut"})
    res, _ = evaluate_prior(model, store.eval_views()[:2], sigmas=(1.0,))
    assert res["denoise_psnr_s1"] > res["noisy_psnr_s1"] + 2.0


@pytest.mark.slow  # two restores per seed with the shipped prior on a 6-frame 97x81 clip: ~15 s each seed on 2 cores
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_video_sources_lower_the_warping_error_of_a_real_clip(tmp_path, seed):
    """Issue 14's claim 1 on a real PyAV clip (camera pan + zoom over `astronaut`, not the experiment's clips, odd
    size): deblurring with --source video (all frames optimised jointly: temporal coupling along the estimated flow,
    residuals around the warped GP field) gives a lower pixel warping error than per-frame D-Flow, first-frame and
    previous-frame, at a PSNR within 1 dB (measured over seeds 0-2 at these settings: EXPERIMENTS.md, zero-shot)."""
    from flows.cli import main
    from tests._clips import write_clip

    clip = write_clip(str(tmp_path / "clip.mp4"), 97, 81, 6, photo="astronaut")
    reports = {}
    for source in ("frame", "video"):
        out = tmp_path / source
        code = main(["run", clip, "--task", "deblur", "--mode", "benchmark", "--solver", "dflow", "--source", source,
                     "--steps", "6", "--iterations", "8", "--seed", str(seed), "--executor", "inline", "--out", str(out),
                     "--work-root", str(tmp_path / "w"), "--json"])
        assert code == 0
        reports[source] = json.loads((out / "metrics.json").read_text())
    frame, video = reports["frame"], reports["video"]
    for ref in ("pixel_first", "pixel_prev"):
        assert video["warping_error"][ref] < 0.8 * frame["warping_error"][ref], (ref, frame, video)
    assert video["psnr"] > frame["psnr"] - 1.0
