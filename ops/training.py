"""Training and evaluation math for the embedded denoisers (pure torch; RNG injected as torch.Generator).

Data: random crops with rescales and horizontal flips of a list of (3, H, W) images. Loss: EDM (Karras et
al. 2022, Sec. 5) with log-normal sigma, ln s ~ N(P_mean, P_std^2), weight (s^2 + sd^2) / (s sd)^2. Noise is
GP (`ops.gp.gp_noise_torch`) or white. Sampling: Euler over Karras sigmas (`ops.sampling`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from . import degrade
from .gp import gp_noise_torch
from .metrics import mean_gradient, psnr
from .sampling import karras_sigmas, sample_euler


def random_crops(generator: torch.Generator, images: list[torch.Tensor], batch: int, crop: int,
                 min_scale: float = 0.5) -> torch.Tensor:
    """Random crops of random images, rescaled by s ~ U(min_scale, 1) (antialiased) and h-flipped -> (B, 3, crop, crop)."""
    out = []
    for _ in range(batch):
        i = int(torch.randint(len(images), (1,), generator=generator))
        img = images[i]  # (3, H, W)
        h, w = img.shape[-2:]
        lo = max(min_scale, crop / min(h, w))
        s = lo + (1 - lo) * float(torch.rand(1, generator=generator))
        size = min(int(round(crop / s)), h, w)
        y = int(torch.randint(h - size + 1, (1,), generator=generator))
        x = int(torch.randint(w - size + 1, (1,), generator=generator))
        patch = img[None, :, y : y + size, x : x + size]
        if size != crop:
            patch = F.interpolate(patch, size=(crop, crop), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        if float(torch.rand(1, generator=generator)) < 0.5:
            patch = patch.flip(-1)
        out.append(patch)
    return torch.cat(out)  # (B, 3, crop, crop)


def make_noise(kind: str, generator: torch.Generator, shape, device=None) -> torch.Tensor:
    """Unit-variance noise (B, C, h, w): 'gp' (RFF Gaussian process, paper defaults) or 'white'."""
    b, c, h, w = shape
    if kind == "gp":
        return gp_noise_torch(generator, b, c, h, w, device=device)
    if kind == "white":
        return torch.randn(b, c, h, w, generator=generator, device=device)
    raise ValueError(f"noise must be 'gp' or 'white', got {kind!r}")


def scratch_masks(generator: torch.Generator, batch: int, height: int, width: int, max_scratches: int = 6,
                  max_dust: int = 12) -> torch.Tensor:
    """Damaged-film masks, 1 = hole -> (B, 1, H, W): near-vertical scratches 1-4 px wide over the whole height
    (slightly slanted and wavy) and round dust spots of radius 1-4 px."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij")
    out = torch.zeros(batch, 1, height, width)

    def u(*shape):
        return torch.rand(*shape, generator=generator, device=generator.device).cpu()

    for i in range(batch):
        m = torch.zeros(height, width, dtype=torch.bool)
        for _ in range(1 + int(u(1) * max_scratches)):
            x0, slope, amp, half = float(u(1)) * width, (float(u(1)) - 0.5) * 0.1, float(u(1)) * 3, 0.5 + 1.5 * float(u(1))
            phase, freq = float(u(1)) * 6.28, 2 * math.pi / (height * (0.5 + float(u(1))))
            centre = x0 + slope * ys[:, :1] + amp * torch.sin(freq * ys[:, :1] + phase)  # (H, 1)
            m |= (xs - centre).abs() <= half
        for _ in range(int(u(1) * (max_dust + 1))):
            cy, cx, r = float(u(1)) * height, float(u(1)) * width, 1 + 3 * float(u(1))
            m |= (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
        out[i, 0] = m.float()
    return out


def degrade_batch(task: str, images: torch.Tensor, generator: torch.Generator, factor: int = 8, masks: str = "free"):
    """Degraded input for a task -> (degraded (B,3,H,W), mask (B,1,H,W) or None); sr8 / sr4 give the bicubic upsampling.

    masks (inpaint): 'free' (strokes + boxes, `degrade.random_masks`), 'scratch' (`scratch_masks`) or 'mixed'
    (each image one family or the other, 50/50).
    """
    if task in ("sr8", "sr4"):
        f = 4 if task == "sr4" else factor
        return degrade.upsample(degrade.downsample(images, f), f), None
    if task == "inpaint":
        b, _, h, w = images.shape
        if masks not in ("free", "scratch", "mixed"):
            raise ValueError(f"masks must be 'free', 'scratch' or 'mixed', got {masks!r}")
        mask = degrade.random_masks(generator, b, h, w, device=images.device) if masks != "scratch" else None
        if masks != "free":
            scratch = scratch_masks(generator, b, h, w).to(images.device)
            pick = (torch.rand(b, generator=generator, device=generator.device).cpu() < 0.5).to(images.device)
            mask = scratch if mask is None else torch.where(pick.view(-1, 1, 1, 1), scratch, mask)
        return degrade.apply_mask(images, mask), mask
    raise ValueError(f"task must be 'sr8', 'sr4' or 'inpaint', got {task!r}")


def edm_loss(model, x0: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor, generator: torch.Generator,
             sigma_data: float = 1.0, p_mean: float = -1.2, p_std: float = 1.2, penalty=None) -> torch.Tensor:
    """EDM loss: E_sigma w(sigma) |D(x0 + sigma n, sigma, cond) - x0|^2, ln sigma ~ N(p_mean, p_std^2);
    + penalty(denoised) when given (e.g. the block pattern of the decoded prediction)."""
    sigma = torch.exp(p_mean + p_std * torch.randn(x0.shape[0], generator=generator, device=x0.device))  # (B,)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    denoised = model.denoise(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, cond)  # (B, C, h, w)
    loss = (weight.view(-1, 1, 1, 1) * (denoised - x0) ** 2).mean()
    return loss if penalty is None else loss + penalty(denoised)


def sample(model, cond: torch.Tensor, noise: torch.Tensor, steps: int = 32, sigma_min: float | None = None,
           sigma_max: float | None = None) -> torch.Tensor:
    """Euler sampling over Karras sigmas from unit noise (B, C, h, w) -> latents (B, C, h, w); x_T = sigma_max noise,
    plus the model's `start(cond)` when it starts from a mean (a residual model's truncated schedule)."""
    sigmas = karras_sigmas(steps, sigma_min or model.sigma_min, sigma_max or model.sigma_max).to(noise.device)
    x = noise * sigmas[0].to(noise.dtype)
    mean = model.start(cond)
    if mean is not None:
        x = x + mean.to(x.dtype)
    return sample_euler(lambda x, s, c: model.denoise(x, s, c), x, sigmas.to(noise.dtype), cond)


def telea_inpaint(images: torch.Tensor, mask: torch.Tensor, radius: int = 5) -> torch.Tensor:
    """OpenCV Telea inpainting baseline per image -> (B, 3, H, W) in [0, 1]."""
    import cv2

    out = []
    for img, m in zip(images, mask):
        u8 = (img.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        mm = (m[0].cpu().numpy() > 0.5).astype(np.uint8)
        res = cv2.inpaint(np.ascontiguousarray(u8), mm, radius, cv2.INPAINT_TELEA)
        out.append(torch.from_numpy(res).permute(2, 0, 1).float() / 255)
    return torch.stack(out).to(images.device)


@torch.no_grad()
def evaluate(model, views: torch.Tensor, seed: int = 0, steps: int = 32, mismatch: str | None = None) -> dict:
    """Held-out metrics for a RestorationModel on views (N, 3, H, W); one sample per view, fixed seed -> (dict, outputs).

    vae: psnr. sr8: psnr, bicubic_psnr, grad_ratio, bicubic_grad_ratio. inpaint: psnr, known_psnr, hole_psnr,
    telea_hole_psnr. `mismatch` ('gp' | 'white') adds mismatch_psnr (the same main metric, other noise).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    dev = views.device
    if model.task == "vae":
        recon = model.decode(model.encode(views))
        return {"psnr": float(psnr(recon, views).mean())}, recon
    degraded, mask = degrade_batch(model.task, views.cpu(), g)
    degraded = degraded.to(dev)
    mask = None if mask is None else mask.to(dev)
    cond = model.condition(degraded, mask)
    shape = (views.shape[0], model.latent_channels, views.shape[-2] // model.factor, views.shape[-1] // model.factor)

    low_res = degrade.downsample(views, model.factor) if model.task == "sr8" else None  # what the pipeline's decode sees

    def run(kind):
        gn = torch.Generator(device="cpu").manual_seed(seed + 1)
        noise = make_noise(kind, gn, shape).to(dev)
        out = model.decode(sample(model, cond, noise, steps))
        return out if low_res is None else degrade.back_project(out, low_res, model.factor)  # as tasks/decode.py does

    out = run(model.noise)
    res = {"psnr": float(psnr(out, views).mean()), "views": int(views.shape[0]), "steps": steps}
    if model.task == "sr8":
        res.update(bicubic_psnr=float(psnr(degraded, views).mean()),
                   grad_ratio=float((mean_gradient(out) / mean_gradient(views)).mean()),
                   bicubic_grad_ratio=float((mean_gradient(degraded) / mean_gradient(views)).mean()),
                   ae_psnr=float(psnr(model.decode(model.encode(views)), views).mean()))
        main = "psnr"
    else:
        telea = telea_inpaint(degraded, mask)
        res.update(known_psnr=float(psnr(out, views, 1 - mask).mean()), hole_psnr=float(psnr(out, views, mask).mean()),
                   telea_hole_psnr=float(psnr(telea, views, mask).mean()), telea_psnr=float(psnr(telea, views).mean()),
                   hole_fraction=float(mask.mean()))
        main = "psnr"
    if mismatch:
        out_mm = run(mismatch)
        res["mismatch_noise"] = mismatch
        res["mismatch_psnr"] = float(psnr(out_mm, views).mean())
        if model.task == "inpaint":
            res["mismatch_hole_psnr"] = float(psnr(out_mm, views, mask).mean())
        else:
            res["mismatch_grad_ratio"] = float((mean_gradient(out_mm) / mean_gradient(views)).mean())
    res["main_metric"] = main
    return res, out
