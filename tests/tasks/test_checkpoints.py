"""Bring your own checkpoint: tiny random snapshots of each layout (tests/_tiny_pipelines.py, saved with diffusers'
and transformers' own save_pretrained, a stray pickle beside every weights file) load, condition, follow their
own scheduler, encode prompts, and restore a clip from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ops import sampling
from storage import models as store
from tasks.models import model_info
from tests._tiny_pipelines import BUILDERS, TEXT_DIM, build_concat, build_sd_inpaint, build_sd_upscale

LAYOUTS = tuple(BUILDERS)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("snapshots")
    return {name: build(root / name) for name, (build, _) in BUILDERS.items()}


def _inputs(model, batch=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(batch, 3, size, size, generator=g)
    mask = (torch.rand(batch, 1, size, size, generator=g) > 0.5).float()
    if model.task == "sr4":
        cond = model.condition(img[..., :: model.factor, :: model.factor].contiguous())
    else:
        cond = model.condition(img, mask if model.task == "inpaint" else None)
    x = torch.randn(batch, model.latent_channels, size // model.factor, size // model.factor, generator=g)
    return x, cond


# ---------------------------------------------------------------- loading
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_detected_with_stray_pickles_beside(snapshots, layout):
    d = snapshots[layout]
    assert list(d.rglob("*.bin")), "the snapshot has stray pickles beside its safetensors"
    info = model_info(str(d))  # from the configs, nothing loaded
    m = store.load_model(str(d))
    task = BUILDERS[layout][1]
    assert info["layout"] == m.card["layout"] == layout and info["task"] == m.task == task
    assert info["factor"] == m.factor == (4 if layout == "sd-upscale" else 8)  # read from the VAE config
    assert (m.prompt_encoder is not None) == (layout != "concat") == info["text"]
    x, cond = _inputs(m)
    den = m.text_denoiser() if m.prompt_encoder is not None else m.denoise
    out = den(x, torch.tensor([0.5, 3.0]), cond)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_pickle_refused_only_when_it_would_be_loaded(tmp_path):
    d = build_sd_inpaint(tmp_path / "sd")
    (d / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"refusing to load pickle checkpoint .*unet/diffusion_pytorch_model\.bin.*safetensors"):
        store.load_model(str(d))
    d = build_sd_inpaint(tmp_path / "sd2")
    (d / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"text_encoder/pytorch_model\.bin"):
        store.load_model(str(d))
    d = build_concat(tmp_path / "concat")
    (d / "junk").mkdir()
    (d / "junk" / "optimizer.pt").write_bytes(b"\x80\x04N.")  # never read: does not stop the load
    assert store.load_model(str(d)).task == "sr8"


def test_restoration_json_overrides_and_is_checked(tmp_path):
    d = build_sd_upscale(tmp_path / "up")
    x, _ = _inputs(store.load_model(str(d)))
    low = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    a = store.load_model(str(d))
    (d / "restoration.json").write_text(json.dumps({"noise_level": 300, "noise": "white", "sigmas": "karras"}))
    b = store.load_model(str(d))
    assert a.denoiser.class_labels == 20 and b.denoiser.class_labels == 300 and b.noise == "white"
    assert not torch.equal(a.condition(low), b.condition(low))  # the low-res image is noised to its level
    assert torch.allclose(b.sigmas(4), sampling.karras_sigmas(4, b.sigma_min, b.sigma_max))
    (d / "restoration.json").write_text(json.dumps({"layout": "sd-outpaint"}))
    with pytest.raises(ValueError, match="layout 'sd-outpaint' is not one of"):
        store.load_model(str(d))
    (d / "restoration.json").write_text(json.dumps({"memory": {"vae_tilling": True}}))
    with pytest.raises(ValueError, match="unknown memory options"):
        store.load_model(str(d))


# ---------------------------------------------------------------- scheduler from the directory
def _tiny_vp_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


@pytest.mark.parametrize("kind,prediction", [("DDIMScheduler", "epsilon"), ("DDIMScheduler", "v_prediction"),
                                             ("EulerDiscreteScheduler", "epsilon"), ("EulerDiscreteScheduler", "v_prediction")])
def test_converted_denoiser_reproduces_the_directory_scheduler(tmp_path, kind, prediction):
    """Euler steps of the VE probability-flow ODE at the converted sigmas = diffusers' own DDIM / Euler loop."""
    import diffusers

    unet = _tiny_vp_unet()
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
               timestep_spacing="leading", prediction_type=prediction)
    if kind == "DDIMScheduler":
        cfg.update(set_alpha_to_one=True, clip_sample=False)
    sched = getattr(diffusers, kind)(**cfg)
    sched.save_pretrained(tmp_path / "scheduler")
    abar, _ = store._alphas_cumprod(tmp_path / "scheduler")
    from ops.denoisers import VPDenoiser

    den = VPDenoiser(unet, abar, prediction)
    sigmas = store.scheduler_schedule(tmp_path / "scheduler", den)(5)
    steps = 5
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64).float()
    t0 = int(sched.timesteps[0])
    # diffusers: DDIM starts at x_vp = noise; Euler at x_ve = noise * its init_noise_sigma
    latents = noise * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(sched.scale_model_input(latents, t), t).sample
            latents = sched.step(out, t, latents).prev_sample
        # the same start in VE variables (x_ve = x_vp / sqrt(abar); Euler's latents already are VE)
        x = noise / abar[t0].float().sqrt() if kind == "DDIMScheduler" else noise * sched.init_noise_sigma
        assert abs(float(sigmas[0]) - float(((1 - abar[t0]) / abar[t0]).sqrt())) < 1e-4
        for k in range(steps):
            d = den(x, sigmas[k].float().expand(1))
            x = sampling.euler_step(x, d, sigmas[k].float(), sigmas[k + 1].float())
    assert sigmas[-1] == 0 and len(sigmas) == steps + 1
    torch.testing.assert_close(x, latents, rtol=1e-3, atol=2e-4)


# ---------------------------------------------------------------- text conditioning
def test_prompt_is_encoded_and_cfg_combines_both_halves(snapshots):
    m = store.load_model(str(snapshots["sd-inpaint"]))
    empty = m.encode_prompt("")
    assert empty["hidden"].shape == (1, 16, TEXT_DIM) and empty["hidden"].abs().sum() > 0  # not a zero tensor
    x, cond = _inputs(m)
    sigma = torch.tensor([0.7, 2.0])
    with torch.no_grad():
        cat = m.text_denoiser("a cat")(x, sigma, cond)
        dog = m.text_denoiser("dog")(x, sigma, cond)
        neg = m.text_denoiser("blur")(x, sigma, cond)
        guided = m.text_denoiser("a cat", "blur", 3.0)(x, sigma, cond)
    assert not torch.allclose(cat, dog)
    torch.testing.assert_close(guided, neg + 3.0 * (cat - neg), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no text encoder"):
        store.load_model(str(snapshots["concat"])).text_denoiser("a cat")


def test_sdxl_added_text_embeddings_and_time_ids(snapshots):
    m = store.load_model(str(snapshots["sdxl-inpaint"]))
    text = m.encode_prompt("a cat")
    assert text["hidden"].shape == (1, 16, 2 * TEXT_DIM)  # both encoders' penultimate states
    assert text["pooled"].shape == (1, TEXT_DIM) and text["time_ids"].tolist() == [[1024, 1024, 0, 0, 1024, 1024]]
    x, cond = _inputs(m)
    with torch.no_grad():
        a = m.denoise(x, torch.tensor([1.0, 1.0]), cond, text=text)
        b = m.denoise(x, torch.tensor([1.0, 1.0]), cond, text={**text, "pooled": torch.zeros_like(text["pooled"])})
    assert not torch.allclose(a, b)  # the added embeddings reach the UNet
    with pytest.raises(ValueError, match="pooled prompt embedding"):
        m.denoise(x, torch.tensor([1.0, 1.0]), cond, text={"hidden": text["hidden"]})
    assert m._sized(text, x)["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]]  # the frame's own size (8x8 latent)
    with torch.no_grad():
        c = m.text_denoiser("a cat")(x, torch.tensor([1.0, 1.0]), cond)
    assert not torch.allclose(a, c)  # time ids of a 64x64 frame, not the 1024x1024 default


def test_upscaler_conditions_on_the_noised_low_res_image_at_latent_size(snapshots):
    m = store.load_model(str(snapshots["sd-upscale"]))
    low = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = m.condition(low)
    assert cond.shape == (1, 3, 16, 16) and m.factor == 4  # latent of a 64x64 output is 16x16
    a = m.low_res.abar
    noise = torch.randn(low.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cond, a.sqrt() * (low * 2 - 1) + (1 - a).sqrt() * noise)
    torch.testing.assert_close(m.condition(low), cond)  # deterministic


def test_meta_device_model_side_has_no_cpu_tensors(snapshots):
    """Conditioning, prompt embeddings, class labels and CFG all follow the model to its device."""
    for layout in ("sd-upscale", "sdxl-inpaint"):
        m = store.load_model(str(snapshots[layout]))
        m.encode_prompt("a cat"), m.encode_prompt("")  # encoded on the text encoder's device (CPU offload)
        m._text_cache.clear()
        m = m.to("meta")
        size = 64 // m.factor
        x = torch.randn(2, 4, size, size, device="meta")
        if m.task == "sr4":
            cond = m.condition(torch.rand(2, 3, size, size, device="meta"))
        else:
            cond = m.condition(torch.rand(2, 3, 64, 64, device="meta"), torch.ones(2, 1, 64, 64, device="meta"))
        out = m.text_denoiser("a cat", "", 2.0)(x, torch.ones(2, device="meta"), cond)
        assert out.device.type == "meta" and out.shape == x.shape


def test_reduced_precision_load(snapshots):
    d = str(snapshots["sd-inpaint"])
    full = store.load_model(d)
    half = store.load_model(d, dtype="bfloat16")
    assert half.denoiser.unet.dtype == torch.bfloat16 and half.autoencoder.vae.dtype == torch.bfloat16
    assert half.denoiser.sigmas.dtype == torch.float32  # the sigma table keeps its precision
    x, cond = _inputs(full)
    with torch.no_grad():
        a = full.text_denoiser()(x, torch.tensor([1.0, 2.0]), cond)
        b = half.text_denoiser()(x, torch.tensor([1.0, 2.0]), cond)
    assert b.dtype == torch.float32 and (a - b).abs().max() < 0.1 * a.abs().max()
    with pytest.raises(ValueError, match="dtype must be one of"):
        store.load_model(d, dtype="float8")


def test_device_and_dtype_options_validated():
    from flows.cli import main
    from flows.config import RestoreConfig

    cfg = RestoreConfig(input="x.mp4", device="cuda:1", dtype="float16", prompt="a cat", cfg=4)
    assert cfg.text == {"prompt": "a cat", "negative_prompt": "", "cfg": 4.0}
    assert RestoreConfig(input="x.mp4").text is None
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        RestoreConfig(input="x.mp4", device="gpu")
    assert RestoreConfig(input="x.mp4", task="sr4").model_name == store.DEFAULT_MODELS["sr4"]  # the embedded x4 model
    with pytest.MonkeyPatch.context() as mp:  # a conditional task without an embedded model needs --model
        mp.delitem(store.DEFAULT_MODELS, "sr4")
        with pytest.raises(ValueError, match="needs --model"):
            RestoreConfig(input="x.mp4", task="sr4")
    assert main(["run", "x.mp4", "--dtype", "float64"]) == 2
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            store.resolve_device("cuda")
    assert store.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------- end to end, from the command line
def _run(clip, out, work, layout, d, *extra):
    from flows.cli import main

    task = BUILDERS[layout][1]
    text = ["--prompt", "a cat", "--negative-prompt", "blur", "--cfg", "2"] if layout != "concat" else []
    code = main(["run", clip, "--mode", "benchmark", "--task", task, "--model", str(d), "--executor", "inline",
                 "--steps", "3", "--seed", "3", "--out", str(out), "--work-root", str(work), "--json", *text, *extra])
    assert code == 0
    return json.loads((Path(out) / "metrics.json").read_text())


@pytest.fixture(scope="module")
def odd_clip(tmp_path_factory):
    from storage.sample import make_sample_clip

    return make_sample_clip(str(tmp_path_factory.mktemp("clip") / "clip.mp4"), frames=4, size=64)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cli_restores_a_clip_with_each_layout(snapshots, odd_clip, tmp_path, layout):
    from storage.video import read_video
    from tasks._stage import store_for

    d = snapshots[layout]
    wd = _run(odd_clip, tmp_path / "wd", tmp_path / "work", layout, d, "--method", "warped-diffusion")
    gp = _run(odd_clip, tmp_path / "gp", tmp_path / "work", layout, d, "--method", "gp")
    again = _run(odd_clip, tmp_path / "again", tmp_path / "work2", layout, d, "--method", "warped-diffusion")
    assert not any(again["cached"].values())  # a fresh cache: recomputed from scratch
    for name in ("wd", "gp", "again"):
        assert read_video(str(tmp_path / name / "restored.mp4"))[0].shape == (4, 64, 64, 3)
    # the restored frames themselves (the decode stage's output; the mp4 encoder is not bit-reproducible)
    frames = {name: store_for(str(tmp_path / work), {}).open("decode", rep["keys"]["decode"])["frames"].values
              for name, work, rep in (("wd", "work", wd), ("gp", "work", gp), ("again", "work2", again))}
    assert frames["wd"].shape == (4, 64, 64, 3)
    assert np.array_equal(frames["wd"], frames["again"])  # deterministic for a fixed seed
    assert not np.array_equal(frames["wd"], frames["gp"])  # self-guidance changed the samples
    assert wd["frames"] == gp["frames"] == 4 and wd["model"] == str(d)


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_fp16_warped_diffusion_restores(snapshots, odd_clip, tmp_path):
    from storage.video import read_video

    report = _run(odd_clip, tmp_path / "out", tmp_path / "work", "sd-inpaint", snapshots["sd-inpaint"], "--device", "cuda",
                  "--dtype", "float16")
    frames, _ = read_video(str(tmp_path / "out" / "restored.mp4"))
    assert frames.shape == (4, 64, 64, 3) and report["frames"] == 4
