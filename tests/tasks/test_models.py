"""Adapters on tiny random diffusers models, the safetensors-only loader, a short training run, shipped models."""

import json

import pytest
import torch
import torch.nn as nn

from ops import degrade, training
from ops.autoencoders import fit_pca_autoencoder, image_patches
from ops.denoisers import DiffusersAutoencoder, EDMDenoiser, RestorationModel, VPDenoiser, build_unet
from storage import models as store


def _alphas(T=100):
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def _tiny_unet(cin=8, cout=4):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=cin, out_channels=cout, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4).eval()


class ConstUNet(nn.Module):
    """Returns a known output c * ones and records its inputs."""

    class Cfg(dict):
        __getattr__ = dict.get

    def __init__(self, cin, cout, c=0.7):
        super().__init__()
        self.config = self.Cfg(in_channels=cin, out_channels=cout)
        self.c, self.cout = c, cout

    def forward(self, x, t, **kw):
        self.seen = (x, t)
        return type("O", (), {"sample": torch.full((x.shape[0], self.cout) + x.shape[2:], self.c)})()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_vp_to_ve_exact_on_known_schedule(prediction):
    abar = _alphas()
    unet = ConstUNet(8, 4)
    den = VPDenoiser(unet, abar, prediction)
    k = torch.tensor([5, 40, 99])
    sigma = ((1 - abar[k]) / abar[k]).sqrt().float()
    x = torch.randn(3, 4, 8, 8)
    cond = torch.randn(3, 4, 8, 8)
    d = den(x, sigma, cond)
    s = sigma.view(-1, 1, 1, 1)
    if prediction == "epsilon":
        expect = x - s * 0.7
    else:  # x0 = sqrt(abar) x_vp - sqrt(1 - abar) v with x_vp = sqrt(abar) x_ve
        a = abar[k].float().view(-1, 1, 1, 1)
        expect = a.sqrt() * (a.sqrt() * x) - (1 - a).sqrt() * 0.7
    torch.testing.assert_close(d, expect, rtol=1e-5, atol=1e-5)
    inp, t = unet.seen
    torch.testing.assert_close(t, k.float(), atol=1e-3, rtol=0)  # table sigmas map back to their integer steps
    torch.testing.assert_close(inp[:, :4], x * abar[k].float().sqrt().view(-1, 1, 1, 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inp[:, 4:], cond)


def test_sigma_to_t_interpolates_in_log_sigma():
    den = VPDenoiser(ConstUNet(4, 4), _alphas(), "epsilon")
    s10, s11 = den.sigmas[10], den.sigmas[11]
    mid = torch.exp((s10.log() + s11.log()) / 2)
    assert abs(float(den.sigma_to_t(mid.view(1))) - 10.5) < 1e-3


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_real_tiny_unet2d_wrapper_batch_independent_and_differentiable(prediction):
    den = VPDenoiser(_tiny_unet(), _alphas(), prediction)
    x = torch.randn(3, 4, 8, 8, requires_grad=True)
    cond = torch.randn(3, 4, 8, 8)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    d = den(x, sigma, cond)
    d1 = den(x[1:2], sigma[1:2], cond[1:2])
    torch.testing.assert_close(d[1:2], d1, rtol=1e-4, atol=1e-5)
    d.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_unet2d_condition_model_cross_attention_and_concat():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=9, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                attention_head_dim=4, norm_num_groups=4).eval()
    den = VPDenoiser(unet, _alphas(), "epsilon")
    x, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8, 8)
    ehs = torch.randn(1, 7, 12)
    with pytest.raises(ValueError, match="encoded prompt"):  # no silent zero prompt
        den(x, torch.tensor([1.0, 2.0]), cond)
    d0 = den(x, torch.tensor([1.0, 2.0]), cond, encoder_hidden_states=torch.zeros_like(ehs))
    d1 = den(x, torch.tensor([1.0, 2.0]), cond, encoder_hidden_states=ehs)
    assert d0.shape == x.shape and not torch.allclose(d0, d1)
    with pytest.raises(ValueError, match="input channels"):
        den(x, torch.tensor([1.0, 2.0]), cond[:, :4])


def test_autoencoder_kl_and_tiny_wrappers():
    from diffusers import AutoencoderKL, AutoencoderTiny

    torch.manual_seed(0)
    kl = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                       norm_num_groups=4, scaling_factor=0.5).eval()
    ae = DiffusersAutoencoder(kl)
    img = torch.rand(2, 3, 16, 16)
    z = ae.encode(img)
    assert z.shape == (2, 4, 8, 8) and ae.factor == 2
    raw = kl.encode(img * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(z, raw * 0.5)
    out = ae.decode(z)
    assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), latent_channels=4,
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)).eval()
    t = DiffusersAutoencoder(tiny)
    zt = t.encode(img)
    assert zt.shape[:2] == (2, 4) and t.decode(zt).shape[:2] == (2, 3)


def test_pca_autoencoder_whitened_and_linear():
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(4, 3, 64, 64, generator=g)
    ae = fit_pca_autoencoder(image_patches(imgs), 16)
    z = ae.encode(imgs)
    assert z.shape == (4, 16, 8, 8)
    assert abs(float(z.std()) - 1) < 0.1
    a, b = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    zero = ae.decode(torch.zeros_like(a), clamp=False)
    torch.testing.assert_close(ae.decode(a + b, clamp=False) - zero, (ae.decode(a, clamp=False) - zero) + (ae.decode(b, clamp=False) - zero), rtol=1e-4, atol=1e-5)


def _save_diffusers_dir(root, unet_bin=False):
    from diffusers import AutoencoderKL, DDPMScheduler

    unet = _tiny_unet(cin=8, cout=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4)
    unet.save_pretrained(root / "unet", safe_serialization=not unet_bin)
    vae.save_pretrained(root / "vae")
    DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction").save_pretrained(root / "scheduler")


def test_load_local_diffusers_directory(tmp_path):
    _save_diffusers_dir(tmp_path)
    m = store.load_model(str(tmp_path))
    assert m.task == "sr8" and m.latent_channels == 4 and m.denoiser.prediction_type == "v_prediction"
    img = torch.rand(1, 3, 16, 16)
    cond = m.condition(img)
    x = torch.randn(1, 4, 8, 8)
    assert m.denoise(x, torch.tensor([1.0]), cond).shape == x.shape


def test_pickle_checkpoint_refused(tmp_path):
    _save_diffusers_dir(tmp_path, unet_bin=True)
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.bin.*safetensors"):
        store.load_model(str(tmp_path))
    f = tmp_path / "weights.ckpt"
    f.write_bytes(b"\x80\x04N.")
    with pytest.raises(ValueError, match="weights.ckpt"):
        store.load_model(str(f))


def _tiny_restoration(task="sr8"):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ae = fit_pca_autoencoder(image_patches(torch.rand(2, 3, 64, 64, generator=g)), 8)
    cc = 8 if task == "sr8" else 9
    unet = build_unet(8 + cc, 8, block_out_channels=(32, 32), layers_per_block=1, sample_size=4)
    return RestorationModel(ae, EDMDenoiser(unet), task, "gp", known_replace=task == "inpaint")


def test_few_training_steps_lower_the_loss_and_are_deterministic():
    def run():
        model = _tiny_restoration()
        g = torch.Generator().manual_seed(1)
        images = [torch.rand(3, 48, 48, generator=g) * torch.linspace(0, 1, 48) for _ in range(2)]
        x = training.random_crops(g, images, 8, 32)
        degraded, _ = training.degrade_batch("sr8", x, g)
        x0, cond = model.encode(x), model.condition(degraded)
        noise = training.make_noise("gp", g, x0.shape)
        opt = torch.optim.Adam(model.denoiser.parameters(), lr=2e-3)
        losses = []
        for _ in range(25):
            loss = training.edm_loss(model, x0, cond, noise, torch.Generator().manual_seed(7))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses

    a, b = run(), run()
    assert a == b
    assert sum(a[-5:]) < 0.7 * sum(a[:5])


def test_inpaint_known_replace_keeps_known_cells():
    m = _tiny_restoration("inpaint").eval()
    img = torch.rand(1, 3, 32, 32)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :8, :8] = 1
    cond = m.condition(img, mask)
    d = m.denoise(torch.randn(1, 8, 4, 4), torch.tensor([5.0]), cond)
    torch.testing.assert_close(d[..., 1:, :], m.encode(img)[..., 1:, :], rtol=1e-5, atol=1e-5)


def test_inpaint_known_pixels_projects_onto_the_known_pixels():
    m = _tiny_restoration("inpaint").eval()
    z_true = 0.3 * torch.randn(1, 8, 4, 4, generator=torch.Generator().manual_seed(2))
    img = m.autoencoder.decode(z_true, clamp=False)  # (1, 3, 32, 32): a picture the decoder can represent
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :8, :8] = 1  # cell (0, 0): all hole
    mask[..., 8:12, 8:16] = 1  # cell (1, 1): top half hole, bottom half known
    x, sigma = torch.randn(1, 8, 4, 4, generator=torch.Generator().manual_seed(3)), torch.tensor([5.0])
    raw = m.denoise(x, sigma, m.condition(img, mask))  # known_replace only
    m.known_pixels = True
    cond = m.condition(img, mask)
    assert cond.shape[1] == 1 + 8 + 4 * 64  # pooled mask + encoded image + pixel-unshuffled (mask, known pixels)
    d = m.denoise(x, sigma, cond)
    torch.testing.assert_close(d[..., 0, 0], raw[..., 0, 0], rtol=1e-4, atol=1e-4)  # a full hole is left alone
    torch.testing.assert_close(d[..., 2:, :], m.encode(img)[..., 2:, :], rtol=1e-4, atol=1e-4)  # known cells: encoded input
    known = (1 - mask)[..., 8:16, 8:16].bool().expand(1, 3, 8, 8)
    err = lambda z: (m.autoencoder.decode(z, clamp=False)[..., 8:16, 8:16] - img[..., 8:16, 8:16])[known].pow(2).mean()
    assert err(d) < 0.5 * err(raw), (float(err(d)), float(err(raw)))  # the half-known cell keeps its known pixels
    x = x.requires_grad_(True)
    m.denoise(x, sigma, cond).sum().backward()  # still differentiable for self-guidance
    assert x.grad is not None and x.grad[..., 0, 0].abs().sum() > 0


def test_guidance_space_auto_is_pixel_only_for_linear_sr8():
    from tasks.models import model_info, resolve_guidance_space

    assert model_info("sr8-gp")["linear_decoder"] is True and model_info("inpaint-gp")["linear_decoder"] is True
    assert resolve_guidance_space("auto", model_info("sr8-gp")) == "pixel"
    assert resolve_guidance_space("auto", model_info("inpaint-gp")) == "latent"
    assert resolve_guidance_space("auto", {"task": "sr8", "linear_decoder": False}) == "latent"  # a diffusers VAE
    assert resolve_guidance_space("pixel", model_info("inpaint-gp")) == "pixel"
    with pytest.raises(ValueError, match="guidance_space must be auto, pixel or latent"):
        resolve_guidance_space("pixels", {})


def test_list_models_content():
    models = store.list_models()
    for name in ("vae-pca", "sr8-gp", "sr8-white", "inpaint-gp", "inpaint-white"):
        assert name in models
    assert models["sr8-gp"]["task"] == "sr8" and models["sr8-gp"]["noise"] == "gp"
    assert models["vae-pca"]["noise"] is None and models["vae-pca"]["eval"]["psnr"] >= 23
    assert models["inpaint-white"]["params"] > 1e6
    for name in ("sr8-gp", "inpaint-gp"):
        assert "mismatch_psnr" in models[name]["eval"]
    json.dumps(models)


@pytest.mark.parametrize("task", ["sr8", "sr4", "inpaint"])
def test_shipped_model_restores_a_frame(task):
    torch.manual_seed(0)
    m = store.load_model(task)  # the default model for the task
    assert m.model_id == store.DEFAULT_MODELS[task] and m.noise == "gp" and m.factor == 8
    gt = store.eval_views()[:1, :, 64:192, 64:192]  # (1, 3, 128, 128) held-out coffee
    g = torch.Generator().manual_seed(0)
    degraded, mask = training.degrade_batch(task, gt, g)
    if task == "sr4":  # an x4 model takes the low-res frame itself (tasks/encode.py)
        degraded = degrade.downsample(gt, 4)
    cond = m.condition(degraded, mask)
    noise = training.make_noise("gp", g, (1, m.latent_channels, 16, 16))
    with torch.no_grad():
        out = m.decode(training.sample(m, cond, noise, steps=12))
    assert out.shape == gt.shape and torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    gray = torch.full_like(gt, float(gt.mean()))
    if task in ("sr8", "sr4"):
        assert training.psnr(out, gt) > training.psnr(gray, gt) + 3
    else:
        known = 1 - mask
        assert training.psnr(out, gt, known) > 20
        assert training.psnr(out, gt, mask) > training.psnr(gray, gt, mask) - 1
