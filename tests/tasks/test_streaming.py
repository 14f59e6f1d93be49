"""Real clips of any size through the streamed stages: padding to the model's multiple and cropping back, streamed ==
whole-clip results, shot cuts, the chunked artifact writer."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import xarray as xr

from ops import flow as flowops
from ops import metrics
from ops.images import to_float
from ops import noise_warp
from storage.artifacts import ArtifactStore
from storage.video import write_video
from tasks import _stage
from tasks import decode as decode_stage
from tasks import encode as encode_stage
from tasks import extract as extract_stage
from tasks import optical_flow as flow_stage
from tasks import noise as noise_stage
from tasks import degrade as prepare_stage
from tasks.models import get_model, model_geometry, model_info, pad_multiple


def _photo(name: str, size: int) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC)  # (S, S, 3)


def _pan(photo: np.ndarray, width: int, height: int, frames: int, dx: float, dy: float, x0=20.0, y0=20.0):
    """A camera pan over a photograph with subpixel steps -> (F, H, W, 3) uint8."""
    out = []
    for i in range(frames):
        a = np.float32([[1, 0, x0 + dx * i], [0, 1, y0 + dy * i]])
        out.append(cv2.warpAffine(photo, a, (width, height), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                                  borderMode=cv2.BORDER_REFLECT))
    return np.stack(out)


def _clip(path, width, height, frames=4, photo="astronaut"):
    size = max(512, 2 * max(width, height))
    return write_video(str(path), _pan(_photo(photo, size), width, height, frames, 2.5, 1.25), 8, lossless=True)


def _stages(tmp_path, clip, task, mode, model, seed=0, backend="dis", method="gp"):
    """extract -> prepare -> flow -> encode -> noise through the stage code (no Prefect) -> (store, keys)."""
    store = ArtifactStore(str(tmp_path / "work"))
    k = {"extract": "e", "prepare": "p", "flow": "f", "encode": "c", "noise": "n"}
    _stage.run_stage_chunked(store, "extract_frames", k["extract"], lambda w: extract_stage.produce(w, clip, (0, None), None))
    _stage.run_stage(store, "prepare", k["prepare"], lambda: prepare_stage.compute(
        store.open("extract_frames", k["extract"]).load(), task, mode, seed, None, None, pad_multiple(model)))
    prepared = store.open("prepare", k["prepare"])
    _stage.run_stage_chunked(store, "estimate_flow", k["flow"], lambda w: flow_stage.produce(
        w, prepared["cond"].data, backend, flow_stage.geometry_for(task, model_geometry(model)["factor"], pad_multiple(model))))
    mask = prepared["mask"].data if "mask" in prepared else None
    _stage.run_stage_chunked(store, "encode", k["encode"], lambda w: encode_stage.produce(w, prepared["cond"].data, mask, model))
    channels = model_info(model)["latent_channels"]
    _stage.run_stage_chunked(store, "generate_noise", k["noise"], lambda w: noise_stage.produce(
        w, store.open("estimate_flow", k["flow"]), method, seed, channels, "gp"))
    return store, k


def _decode(store, k, latents_key="s", model="sr8"):
    _stage.run_stage_chunked(store, "decode", "d", lambda w: decode_stage.produce(
        w, store.open("sample", latents_key)["latents"].data, store.open("prepare", k["prepare"]), model))
    return store.open("decode", "d")["frames"].values


def _psnr(a, b) -> float:
    """PSNR in dB of two uint8 videos (F, H, W, 3) taken as one signal."""
    return float(metrics.psnr(to_float(a).reshape(1, -1), to_float(b).reshape(1, -1)))


# ---------------------------------------------------------------- the model's own multiple


def test_pad_multiple_is_read_from_the_card_and_from_diffusers_configs(tmp_path):
    assert model_geometry("sr8-gp") == {"factor": 8, "downsampling": 4, "multiple": 32}  # 3-level UNet at f=8
    assert model_geometry("sr8") == {"factor": 8, "downsampling": 2, "multiple": 16}  # the default: residual, 2 levels
    assert pad_multiple("inpaint-gp") == 32 and pad_multiple("vae-pca") == 8  # no denoiser: the latent factor
    d = tmp_path / "sd-like"
    for sub, cfg in (("unet", {"_class_name": "UNet2DModel", "down_block_types": ["DownBlock2D"] * 4,
                               "block_out_channels": [32, 64, 64, 64]}),
                     ("vae", {"_class_name": "AutoencoderKL", "block_out_channels": [32, 64, 64, 64]}),
                     ("scheduler", {})):
        (d / sub).mkdir(parents=True)
        (d / sub / ("scheduler_config.json" if sub == "scheduler" else "config.json")).write_text(json.dumps(cfg))
    assert model_geometry(str(d)) == {"factor": 8, "downsampling": 8, "multiple": 64}


# ---------------------------------------------------------------- odd sizes, pad and crop


@pytest.mark.parametrize("width,height,task,mode", [
    (177, 145, "sr8", "benchmark"), (176, 144, "sr8", "benchmark"), (16, 16, "sr8", "benchmark"),
    (17, 33, "sr8", "benchmark"), (17, 33, "sr8", "restore"), (177, 145, "inpaint", "benchmark"),
    (16, 16, "inpaint", "benchmark"), (17, 33, "inpaint", "benchmark"),
])
def test_odd_sizes_are_padded_to_the_models_multiple_and_cropped_back(tmp_path, width, height, task, mode):
    clip = _clip(tmp_path / "clip.mkv", width, height, frames=3)
    model = task
    store, k = _stages(tmp_path, clip, task, mode, model)
    m, f = pad_multiple(model), model_geometry(model)["factor"]
    prepared = store.open("prepare", k["prepare"])
    ph, pw = prepared["cond"].shape[1:3]
    hp, wp = -(-ph // m) * m, -(-pw // m) * m
    flows = store.open("estimate_flow", k["flow"])
    cond = store.open("encode", k["encode"])["cond_latents"]
    noise = store.open("generate_noise", k["noise"])["noise"]
    assert flows["forward"].shape == (2, hp, wp, 2) and flows["latent_positions"].shape == (3, hp // f, wp // f, 2)
    assert cond.shape[2:] == noise.shape[2:] == (hp // f, wp // f) and hp % m == 0 and wp % m == 0
    assert (flows.attrs["height"], flows.attrs["width"]) == (ph, pw)
    # the denoiser runs on that grid (the 176x144 crash was a latent of 18 rows for a UNet that needs 4k)
    net = get_model(model)
    with torch.no_grad():
        out = net.denoise(torch.from_numpy(noise[:1].values), torch.tensor([1.0]), torch.from_numpy(cond[:1].values))
    assert out.shape == noise[:1].shape
    # decode crops back: the clean latents of the conditioning itself decode to the prepared frames, cropped
    c = net.latent_channels  # residual models: cond = [mu, ...]; PCA inpaint: [pooled mask, encoded image]
    latents = cond.values[:, 1 : 1 + c] if task == "inpaint" and cond.shape[1] == 1 + c else cond.values[:, :c]
    store.write("sample", "s", xr.Dataset({"latents": (("frame", "c", "ly", "lx"), latents)}))
    frames = _decode(store, k, model=model)
    out_h, out_w = (height, width) if mode == "benchmark" else (8 * height, 8 * width)
    assert frames.shape == (3, out_h, out_w, 3)
    reference = prepared["truth"].values[:, :out_h, :out_w] if mode == "benchmark" else prepared["cond"].values[:, :out_h, :out_w]
    if task == "sr8":
        assert _psnr(frames, reference) > 20  # an autoencoder round trip of the right pixels, not of the padding
    else:  # the known pixels come back exactly, where they were
        known = prepared["mask"].values[:, :out_h, :out_w] == 0
        assert known.mean() > 0.3 and np.array_equal(frames[known], reference[known])


def test_frames_below_the_minimum_size_are_refused_with_the_way_out(tmp_path):
    from storage.video import VideoError

    clip = _clip(tmp_path / "tiny.mkv", 24, 12, frames=2)
    store = ArtifactStore(str(tmp_path / "work"))
    with pytest.raises(VideoError, match=r"24x12 px.*at least 16 px.*upscale"):
        _stage.run_stage_chunked(store, "extract_frames", "e", lambda w: extract_stage.produce(w, clip, (0, None), None))
    assert not store.exists("extract_frames", "e")


# ---------------------------------------------------------------- streamed == whole clip


def test_streamed_stages_equal_the_whole_clip_results(tmp_path, monkeypatch):
    clip = _clip(tmp_path / "clip.mkv", 70, 50, frames=7)
    whole, kw = _stages(tmp_path / "whole", clip, "sr8", "benchmark", "sr8")
    monkeypatch.setattr(_stage, "BATCH_BYTES", 1)  # one frame per batch: every carry across batches is exercised
    streamed, ks = _stages(tmp_path / "streamed", clip, "sr8", "benchmark", "sr8")
    for stage, key in (("extract_frames", "extract"), ("estimate_flow", "flow"), ("encode", "encode")):
        a, b = whole.open(stage, kw[key]), streamed.open(stage, ks[key])
        for name in a.data_vars:
            if stage == "encode":  # the default (residual) model's regressor convolutions round differently per batch size
                np.testing.assert_allclose(a[name].values, b[name].values, rtol=0, atol=1e-4, err_msg=f"{stage}.{name}")
            else:
                np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=f"{stage}.{name}")
    a, b = whole.open("generate_noise", kw["noise"])["noise"].values, streamed.open("generate_noise", ks["noise"])["noise"].values
    # NUFFT type 3 picks its grid from the points' extent: tol 1e-6 per value; over the default model's 48 channels
    # the largest of ~27k differences reaches 1.01e-5
    np.testing.assert_allclose(a, b, atol=2e-5)
    flows = whole.open("estimate_flow", kw["flow"])
    # and both equal the whole-clip ops: chained positions, GP noise at them
    bwd = torch.from_numpy(flows["latent_backward"].values).double()
    np.testing.assert_allclose(flows["latent_positions"].values, flowops.chain_positions(bwd).numpy(), atol=1e-12)
    gp = noise_warp.warp_noise("gp", np.random.default_rng(0), a.shape, positions=torch.from_numpy(flows["latent_positions"].values))
    np.testing.assert_allclose(a, gp.numpy(), atol=2e-5)
    assert np.asarray(flows.attrs["cuts"]).size == 0 and (flows["shot"].values == 0).all()  # a smooth pan: no cut
    c = get_model("sr8").latent_channels  # a residual model's condition is [mu, regressor input]: mu is a latent
    latents = whole.open("encode", kw["encode"])["cond_latents"].values[:, :c]
    for store in (whole, streamed):
        store.write("sample", "s", xr.Dataset({"latents": (("frame", "c", "ly", "lx"), latents)}))
    np.testing.assert_array_equal(_decode(whole, kw), _decode(streamed, ks))


@pytest.mark.parametrize("method", ["fixed", "resample", "bilinear"])
def test_streamed_baseline_noise_equals_the_whole_clip_draw(tmp_path, monkeypatch, method):
    clip = _clip(tmp_path / "clip.mkv", 64, 64, frames=5)
    monkeypatch.setattr(_stage, "BATCH_BYTES", 1)
    store, k = _stages(tmp_path, clip, "sr8", "benchmark", "sr8", method=method)
    noise = store.open("generate_noise", k["noise"])["noise"].values
    flows = store.open("estimate_flow", k["flow"])
    whole = noise_warp.warp_noise(method, np.random.default_rng(0), noise.shape, base="gp",
                                  backward=torch.from_numpy(flows["latent_backward"].values).double(),
                                  forward=torch.from_numpy(flows["latent_forward"].values).double())
    np.testing.assert_allclose(noise, whole.numpy(), atol=1e-5)


# ---------------------------------------------------------------- shot cuts


def test_a_hard_cut_starts_a_fresh_gp_chain(tmp_path):
    a = _pan(_photo("astronaut", 512), 96, 80, 5, 2.5, 1.0)
    b = _pan(_photo("coffee", 512), 96, 80, 5, -1.5, 2.0, x0=200, y0=150)
    clip = write_video(str(tmp_path / "cut.mkv"), np.concatenate([a, b]), 8, lossless=True)
    store, k = _stages(tmp_path, clip, "sr8", "benchmark", "sr8")
    flows = store.open("estimate_flow", k["flow"])
    assert list(flows.attrs["cuts"]) == [5]
    assert flows["shot"].values.tolist() == [0] * 5 + [1] * 5
    assert not flows["valid"][4].values.any() and not flows["latent_valid"][4].values.any()  # no guidance across it
    # > 0.7, not 0.8: prepare reflect-pads 96x80 to 96x96, and the mirrored band does not follow the camera
    assert (flows["valid_fraction"].values[[0, 1, 2, 3, 5, 6, 7, 8]] > 0.7).all() and flows["valid_fraction"][4] < 0.15
    lpos = flows["latent_positions"].values
    grid = flowops.identity_grid(*lpos.shape[1:3], torch.float64).numpy()
    np.testing.assert_array_equal(lpos[5], grid)  # reset at the cut
    assert np.abs(lpos[4] - grid).max() > 0.2 and np.abs(lpos[7] - grid).max() > 0.2  # both shots chain their motion
    noise = store.open("generate_noise", k["noise"])["noise"].values  # (F, C, h, w)
    fresh = noise_warp.warp_noise("gp", noise_stage.shot_rng(0, 1), (1,) + noise.shape[1:], positions=torch.from_numpy(lpos[5:6]))
    np.testing.assert_allclose(noise[5:6], fresh.numpy(), atol=1e-5)  # a re-seeded field, evaluated from identity
    corr = lambda x, y: float(np.corrcoef(x.ravel(), y.ravel())[0, 1])  # noqa: E731
    assert abs(corr(noise[4], noise[5])) < 0.1 < corr(noise[5], noise[6])  # independent across, coherent within


def test_chained_positions_restart_at_cuts_and_carry_across_batches():
    _, backward = flowops.synthetic_flows(12, 16, 6, flowops.translation_matrix(0.75, -0.5))
    cuts = torch.tensor([False, False, True, False, False])
    whole = flowops.chain_positions(backward, cuts)  # (6, 12, 16, 2)
    grid = flowops.identity_grid(12, 16, backward.dtype)
    assert torch.equal(whole[3], grid) and not torch.allclose(whole[2], grid)
    np.testing.assert_allclose(whole[5], flowops.chain_positions(backward[3:])[2])  # the second shot on its own
    carried = [grid]
    for j in range(5):  # one frame at a time, as the streamed flow stage does
        carried.append(grid if cuts[j] else flowops.chain_step(carried[-1], backward[j]))
    assert torch.equal(torch.stack(carried), whole)


def test_shot_cut_rule_on_measured_statistics():
    assert flowops.is_shot_cut(0.02, 0.9)  # two different photographs
    assert flowops.is_shot_cut(0.05, 0.1)  # same colours but nothing corresponds
    assert not flowops.is_shot_cut(0.92, 0.85)  # a brightness flash: colours jump, the flow holds
    assert not flowops.is_shot_cut(0.97, 0.03)  # a pan
    h = flowops.colour_histogram(torch.from_numpy(_photo("astronaut", 64)))
    assert abs(float(h.sum()) - 1) < 1e-12 and flowops.histogram_distance(h, h) == 0.0


# ---------------------------------------------------------------- the chunked writer


def test_chunked_writer_publishes_atomically_and_leaves_nothing_on_error(tmp_path):
    store = ArtifactStore(str(tmp_path))
    x = np.arange(5 * 3 * 2, dtype=np.float32).reshape(5, 3, 2)
    with pytest.raises(RuntimeError):
        with store.writer("s", "k") as w:
            w.create("x", ("frame", "a", "b"), x.shape, np.float32)
            w.write("x", 0, x[:2])
            raise RuntimeError("killed")
    assert not store.exists("s", "k") and list((tmp_path / "s").iterdir()) == []
    with store.writer("s", "k", attrs={"cuts": [3]}) as w:
        w.create("x", ("frame", "a", "b"), x.shape, np.float32, chunk_frames=2)
        for start in (0, 2, 4):
            assert not store.exists("s", "k")
            w.write("x", start, x[start : start + 2])
        with pytest.raises(ValueError, match="cannot write"):
            w.write("x", 4, x[:2])
    ds = store.open("s", "k")
    assert ds["x"].dims == ("frame", "a", "b") and ds.attrs["cuts"] == [3]
    np.testing.assert_array_equal(ds["x"].values, x)


def test_chunked_writer_on_s3(s3_server, s3_bucket):
    _, opts = s3_server
    store = ArtifactStore(f"{s3_bucket}/work", opts)
    x = np.arange(12, dtype=np.uint8).reshape(4, 3)
    with store.writer("s", "k") as w:
        w.create("x", ("frame", "c"), x.shape, np.uint8)
        w.write("x", 0, x[:3])
        assert not store.exists("s", "k")  # no marker until published
        w.write("x", 3, x[3:])
    assert store.exists("s", "k")
    np.testing.assert_array_equal(store.open("s", "k")["x"].values, x)


@pytest.mark.slow
def test_qcif_sr8_benchmark_end_to_end(tmp_path):
    """The issue's crash: a 176x144 clip, --task sr8 --mode benchmark, died in the UNet (latent of 18 rows)."""
    from flows.cli import main
    from storage.video import probe_video

    clip = _clip(tmp_path / "qcif.mp4", 176, 144, frames=5)
    code = main(["run", clip, "--task", "sr8", "--mode", "benchmark", "--steps", "2", "--executor", "inline",
                 "--out", str(tmp_path / "out"), "--work-root", str(tmp_path / "work"), "--json"])
    assert code == 0
    info = probe_video(str(tmp_path / "out" / "restored.mp4"))
    assert (info.frames, info.width, info.height) == (5, 176, 144)
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["psnr"] > 20
