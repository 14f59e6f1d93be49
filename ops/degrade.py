"""Degradations for training and benchmarks: x8 antialiased bicubic super-resolution and free-form inpainting masks.

Images are (B, 3, H, W) float in [0, 1]; masks are (B, 1, H, W) float with 1 = hole. Randomness comes
from an injected `torch.Generator`, so a seed reproduces the same masks on any run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check_images(name: str, images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"{name} must be a (B, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")


def downsample(images: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """Antialiased bicubic downsampling by `factor`: (B, C, H, W) -> (B, C, H/f, W/f), clamped to [0, 1]."""
    _check_images("images", images)
    b, c, h, w = images.shape
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} is not divisible by the factor {factor}")
    out = F.interpolate(images, size=(h // factor, w // factor), mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(0, 1)


def upsample(lr: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """Bicubic upsampling back to full size: (B, C, h, w) -> (B, C, h*f, w*f), clamped to [0, 1]."""
    _check_images("lr", lr)
    return F.interpolate(lr, scale_factor=factor, mode="bicubic", align_corners=False).clamp(0, 1)


def back_project(images: torch.Tensor, low_res: torch.Tensor, factor: int = 8, iterations: int = 5) -> torch.Tensor:
    """Data consistency for x`factor` SR: iterative back-projection (Irani & Peleg 1991) -> (B, C, H, W) in [0, 1].

    x <- x + up(y - down(x)) until down(x) reproduces the low-res input y (B, C, H/f, W/f): the restoration's
    low frequencies come from the input, its high frequencies from the generative model (the range/null-space
    split of DDNM, Wang et al. 2023). `down` is `downsample` without the clamp, `up` bicubic.
    """
    _check_images("images", images)
    _check_images("low_res", low_res)
    if images.shape[-2:] != (low_res.shape[-2] * factor, low_res.shape[-1] * factor) or images.shape[:2] != low_res.shape[:2]:
        raise ValueError(f"images {tuple(images.shape)} must be low_res {tuple(low_res.shape)} upscaled by {factor}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    x = images
    for _ in range(iterations):
        residual = low_res - F.interpolate(x, size=low_res.shape[-2:], mode="bicubic", antialias=True, align_corners=False)
        x = x + F.interpolate(residual, scale_factor=factor, mode="bicubic", align_corners=False)
    return x.clamp(0, 1)


def _segment_distance(py: torch.Tensor, px: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance of grid points (H, W) to segments a->b (S, 2) as (y, x) -> (S, H, W)."""
    d = b - a  # (S, 2)
    len2 = (d * d).sum(-1).clamp_min(1e-6)  # (S,)
    ry = py[None] - a[:, 0, None, None]
    rx = px[None] - a[:, 1, None, None]
    t = ((ry * d[:, 0, None, None] + rx * d[:, 1, None, None]) / len2[:, None, None]).clamp(0, 1)
    return torch.sqrt((ry - t * d[:, 0, None, None]) ** 2 + (rx - t * d[:, 1, None, None]) ** 2)


def random_masks(
    generator: torch.Generator,
    batch: int,
    height: int,
    width: int,
    max_strokes: int = 4,
    max_vertices: int = 8,
    max_boxes: int = 2,
    device=None,
) -> torch.Tensor:
    """Free-form brush strokes plus boxes (SD / LaMa-style inpainting training masks), 1 = hole -> (B, 1, H, W).

    Geometry is drawn from `generator` (any device) and rasterised in one vectorised pass on `device`.
    Stroke widths, lengths and box sizes scale with the image size; every mask has at least one stroke or box.
    """
    size = float(min(height, width))

    def u(*shape):
        return torch.rand(*shape, generator=generator, device=generator.device).cpu()

    seg_a, seg_b, seg_w, seg_i, boxes, box_i = [], [], [], [], [], []
    for i in range(batch):
        n_strokes = int(u(1) * (max_strokes + 1))
        n_boxes = int(u(1) * (max_boxes + 1))
        if n_strokes + n_boxes == 0:
            n_strokes = 1
        # 1. strokes: a random walk of thick segments.
        for _ in range(n_strokes):
            n_vert = 2 + int(u(1) * (max_vertices - 1))
            width_px = size * (0.03 + 0.09 * float(u(1)))
            start = u(2) * torch.tensor([height, width], dtype=torch.float32)
            angles = u(n_vert - 1) * 2 * math.pi
            lengths = size * (0.05 + 0.2 * u(n_vert - 1))
            steps = torch.stack([torch.sin(angles), torch.cos(angles)], -1) * lengths[:, None]  # (V-1, 2)
            pts = torch.cat([start[None], start[None] + torch.cumsum(steps, 0)])  # (V, 2) as (y, x)
            seg_a.append(pts[:-1]); seg_b.append(pts[1:])
            seg_w += [width_px] * (n_vert - 1); seg_i += [i] * (n_vert - 1)
        # 2. boxes (y0, x0, y1, x1).
        for _ in range(n_boxes):
            bh, bw = (size * (0.1 + 0.3 * u(2))).tolist()
            y0 = float(u(1)) * max(height - bh, 1)
            x0 = float(u(1)) * max(width - bw, 1)
            boxes.append([y0, x0, y0 + bh, x0 + bw]); box_i.append(i)
    py, px = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32) + 0.5,
                            torch.arange(width, device=device, dtype=torch.float32) + 0.5, indexing="ij")
    hits = torch.zeros(batch, height * width, device=device)
    if seg_i:
        a, b = torch.cat(seg_a).to(device), torch.cat(seg_b).to(device)  # (S, 2)
        w = torch.tensor(seg_w, device=device)
        inside = (_segment_distance(py, px, a, b) <= w[:, None, None] / 2).float()  # (S, H, W)
        hits.index_add_(0, torch.tensor(seg_i, device=device), inside.view(len(seg_i), -1))
    if box_i:
        bx = torch.tensor(boxes, device=device)  # (K, 4)
        inside = ((py[None] >= bx[:, 0, None, None]) & (py[None] < bx[:, 2, None, None])
                  & (px[None] >= bx[:, 1, None, None]) & (px[None] < bx[:, 3, None, None])).float()
        hits.index_add_(0, torch.tensor(box_i, device=device), inside.view(len(box_i), -1))
    return (hits > 0).float().view(batch, 1, height, width)


def film_damage_masks(generator: torch.Generator, frames: int, height: int, width: int, scratches: int = 6,
                      dust: int = 8) -> torch.Tensor:
    """Damage of an old film print over a shot, 1 = hole -> (F, 1, H, W): `scratches` near-vertical scratches 1-3 px
    wide over the whole height that persist from frame to frame (a scratch is made once, along the print) while
    wandering sideways by up to ~2 px and dropping out in ~10 % of frames, plus up to `dust` round dust spots of
    radius 1-4 px drawn afresh in every frame. Geometry from `generator` (any device), rasterised on the CPU."""
    if frames < 1 or height < 1 or width < 1 or scratches < 0 or dust < 0:
        raise ValueError(f"film_damage_masks needs frames, height, width >= 1 and counts >= 0, got {frames}, {height}, "
                         f"{width}, {scratches}, {dust}")

    def u(*shape):
        return torch.rand(*shape, generator=generator, device=generator.device).cpu()

    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij")
    lines = u(scratches, 5)  # per scratch: position, slant, half-width, wander phase, wander rate
    x0 = (0.05 + 0.9 * lines[:, 0]) * width
    slant, half = (lines[:, 1] - 0.5) * 0.02, 0.5 + lines[:, 2]
    out = torch.zeros(frames, 1, height, width)
    for f in range(frames):
        m = torch.zeros(height, width, dtype=torch.bool)
        shown = u(scratches) > 0.1
        for k in range(scratches):
            if shown[k]:
                centre = x0[k] + slant[k] * ys[:, :1] + 2 * torch.sin(6.28 * lines[k, 3] + (0.2 + lines[k, 4]) * f)  # (H, 1)
                m |= (xs - centre).abs() <= half[k]
        spots = u(int(u(1) * (dust + 1)), 3)  # per spot: y, x, radius
        for cy, cx, r in zip(spots[:, 0] * height, spots[:, 1] * width, 1 + 3 * spots[:, 2]):
            m |= (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
        out[f, 0] = m.float()
    return out


def apply_mask(images: torch.Tensor, mask: torch.Tensor, fill: float = 0.5) -> torch.Tensor:
    """Masked input: holes (mask = 1) replaced by `fill` (0.5 = 0 in SD's [-1, 1] convention)."""
    _check_images("images", images)
    _check_images("mask", mask)
    if mask.shape[1] != 1 or mask.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape)} must be (B, 1, H, W) matching images {tuple(images.shape)}")
    return images * (1 - mask) + fill * mask
