"""Restoration and temporal-consistency metrics (paper Sec. 4.2; How I Warped Your Noise's self-warping error)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf

from . import flow as flowops
from ._checks import check_choice, check_shape

REFERENCES = ("first", "prev")


def _check_video(name: str, frames: torch.Tensor) -> None:
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4:
        raise ValueError(f"{name} must be a (F, C, H, W) tensor, got {getattr(frames, 'shape', type(frames).__name__)}")


def warping_error(
    frames: torch.Tensor, forward: torch.Tensor, valid: torch.Tensor | None = None, reference: str = "first"
) -> torch.Tensor:
    """Self-warping error per frame j >= 1 -> (F-1,): mean squared difference, over valid pixels, between
    frame j warped onto the reference frame's grid (frame 0, or j-1) and the reference frame.

    frames: (F, C, H, W); forward: (F-1, H, W, 2) flows j-1 -> j; valid: (F-1, H, W) occlusion masks.
    Warping samples frame j at the reference pixels' positions in frame j (bilinear), the same map the
    self-guidance uses, so guidance and metric measure one thing.
    """
    _check_video("frames", frames)
    check_choice("reference", reference, REFERENCES)
    f, c, h, w = frames.shape
    flowops.check_flow("forward", forward)
    check_shape("forward", forward, (f - 1, h, w, 2), "(flows j-1 -> j on the frames' grid)")
    if valid is None:
        valid = torch.ones(f - 1, h, w, dtype=torch.bool, device=frames.device)
    check_shape("valid", valid, (f - 1, h, w))
    forward = forward.to(torch.float64)
    frames64 = frames.to(torch.float64)
    if reference == "prev":
        grid = flowops.identity_grid(h, w, torch.float64, frames.device)
        points = grid + forward  # (F-1, H, W, 2)
        ok = valid & flowops.inside(points, h, w)
        refs = frames64[:-1]
    else:
        positions, ok = flowops.chain_forward(forward, valid)
        points, ok = positions[1:], ok[1:]
        refs = frames64[:1].expand(f - 1, -1, -1, -1)
    warped = flowops.sample_bilinear(frames64[1:], points)  # (F-1, C, H, W)
    sq = (warped - refs).pow(2).mean(1)  # (F-1, H, W)
    count = ok.sum((1, 2))
    err = (sq * ok).sum((1, 2)) / count.clamp(min=1)
    return torch.where(count > 0, err, torch.full_like(err, float("nan")))


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image of (B, C, H, W) batches -> (B,) in dB; with `mask` (broadcastable to
    (B, C, H, W), 1 = counted) over the masked pixels only."""
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    err = (a.double() - b.double()).pow(2)  # (B, C, H, W)
    if mask is None:
        mse = err.flatten(1).mean(1)
    else:
        m = mask.double().expand_as(err)
        mse = (err * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-20))


def _gaussian_taps(size: int = 11, sigma: float = 1.5, dtype=torch.float64) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5, 'valid' borders) per image -> (B,)."""
    if a.shape != b.shape:
        raise ValueError(f"ssim needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    c = a.shape[1]
    taps = _gaussian_taps().to(a.device)
    rows, cols = taps.view(1, 1, 1, -1).expand(c, 1, 1, -1), taps.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    a, b = a.double(), b.double()
    blur = lambda t: nnf.conv2d(nnf.conv2d(t, rows, groups=c), cols, groups=c)  # separable Gaussian
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def flicker(frames: torch.Tensor) -> torch.Tensor:
    """Mean absolute change of mean brightness between consecutive frames (global flicker) -> scalar."""
    _check_video("frames", frames)
    if frames.shape[0] < 2:
        raise ValueError("flicker needs at least 2 frames")
    means = frames.double().mean((1, 2, 3))
    return (means[1:] - means[:-1]).abs().mean()


def summarize(values: torch.Tensor) -> float:
    """Mean over finite entries (NaN where a frame had no valid pixel)."""
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else math.nan


def seam_ratio(frames: torch.Tensor, rows=(), cols=(), cell: int = 1) -> float:
    """Visibility of tile seams: mean |gradient| across the given borders / mean |gradient| across the other
    `cell` boundaries -> ~1 without seams, > 1 with them.

    frames: (F, C, H, W); rows / cols: border coordinates b (between pixels b-1 and b) of horizontal / vertical
    tile borders, in pixels. cell: the grid the borders lie on (the autoencoder's factor for latent tiles), so a
    block decoder's own block edges are compared with block edges, not with smooth block interiors.
    """
    _check_video("frames", frames)
    _, _, h, w = frames.shape
    if not (isinstance(cell, int) and cell >= 1):
        raise ValueError(f"cell must be an integer >= 1, got {cell!r}")
    x = frames.double()
    grad = {"rows": (x[..., 1:, :] - x[..., :-1, :]).abs().mean((0, 1, 3)),  # (H-1,) across row boundary b at b-1
            "cols": (x[..., 1:] - x[..., :-1]).abs().mean((0, 1, 2))}  # (W-1,)
    seams, others = [], []
    for name, borders, size in (("rows", rows, h), ("cols", cols, w)):
        borders = sorted({int(b) for b in borders})
        bad = [b for b in borders if not (0 < b < size and b % cell == 0)]
        if bad:
            raise ValueError(f"{name} borders {bad} must lie strictly inside (0, {size}) on multiples of cell={cell}")
        for b in range(cell, size, cell):
            (seams if b in borders else others).append(grad[name][b - 1])
    if not seams or not others:
        raise ValueError("seam_ratio needs at least one border and one other cell boundary to compare with")
    return float(torch.stack(seams).mean() / torch.stack(others).mean())


def mean_gradient(images: torch.Tensor) -> torch.Tensor:
    """Mean gradient magnitude (forward differences, channel-averaged) per image (B, C, H, W) -> (B,)."""
    gy = images[:, :, 1:, :-1] - images[:, :, :-1, :-1]
    gx = images[:, :, :-1, 1:] - images[:, :, :-1, :-1]
    return torch.sqrt(gx**2 + gy**2 + 1e-12).mean((1, 2, 3))


def grad_ratio(frames: torch.Tensor, truth: torch.Tensor) -> float:
    """Sharpness against the truth: mean gradient magnitude of `frames` / that of `truth` (both (F, C, H, W)) ->
    1 when as sharp as the truth, < 1 blurrier (PSNR rewards blur), > 1 noisier or oversharpened."""
    if frames.shape != truth.shape:
        raise ValueError(f"grad_ratio needs equal shapes, got {tuple(frames.shape)} and {tuple(truth.shape)}")
    return float(mean_gradient(frames.double()).mean() / mean_gradient(truth.double()).mean().clamp_min(1e-12))


def cell_border_stats(images: torch.Tensor, cell: int = 8) -> torch.Tensor:
    """(4,) [sum, count] of |horizontal and vertical pixel differences| across `cell`-px cell borders, then [sum,
    count] of all the others, of images (..., H, W): cell_border_ratio's sufficient statistics (they add up over
    chunks of a video, so a streamed video gets the same ratio as a whole one)."""
    if not (isinstance(cell, int) and cell >= 2):
        raise ValueError(f"cell must be an integer >= 2, got {cell!r}")
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs()  # (..., H, W-1): x[i+1] - x[i]
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs()  # (..., H-1, W)
    bx = torch.arange(1, images.shape[-1], device=images.device) % cell == 0  # a border lies between i and i+1
    by = torch.arange(1, images.shape[-2], device=images.device) % cell == 0
    if not (bx.any() or by.any()):
        raise ValueError(f"images of {images.shape[-1]}x{images.shape[-2]} px have no {cell}-px cell border")
    border = dx[..., bx].sum() + dy[..., by, :].sum()
    inner = dx[..., ~bx].sum() + dy[..., ~by, :].sum()
    counts = [dx[..., bx].numel() + dy[..., by, :].numel(), dx[..., ~bx].numel() + dy[..., ~by, :].numel()]
    return torch.stack([border, border.new_tensor(counts[0]), inner, inner.new_tensor(counts[1])])


def border_ratio(stats: torch.Tensor) -> torch.Tensor:
    """Mean difference across cell borders / the mean elsewhere, from cell_border_stats (summed) -> scalar."""
    return (stats[0] / stats[1]) / (stats[2] / stats[3]).clamp_min(1e-12)


def cell_border_ratio(images: torch.Tensor, cell: int = 8) -> torch.Tensor:
    """Mean |horizontal + vertical pixel difference| across `cell`-px borders / the mean elsewhere -> scalar
    (differentiable: the blockiness penalty of training uses it)."""
    return border_ratio(cell_border_stats(images, cell))


def phase_profile(images: torch.Tensor, cell: int = 8) -> torch.Tensor:
    """Mean |horizontal + vertical pixel difference| at each of the `cell` offsets to the cell grid, over their mean
    -> (cell,); entry p: the boundaries between pixels i and i+1 with (i + 1) % cell == p (p = 0: the cell borders
    that `cell_border_ratio` measures). A photograph is flat (~1 at every p); a decoder with cell-periodic
    structure is not, wherever in the cell its pattern lies."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean(dim=(0, 1, 2))  # (W-1,)
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean(dim=(0, 1, 3))  # (H-1,)
    px = torch.arange(1, images.shape[-1], device=images.device) % cell
    py = torch.arange(1, images.shape[-2], device=images.device) % cell
    prof = torch.stack([dx[px == p].mean() + dy[py == p].mean() for p in range(cell)])  # (cell,)
    return prof / prof.mean().clamp_min(1e-12)


def blockiness(frames: torch.Tensor, truth: torch.Tensor, cell: int = 8) -> torch.Tensor:
    """Block artefacts (issue 13's definition): cell_border_ratio of the restoration over that of the ground truth
    -> scalar, ~1 when no more blocky than the truth (a block-wise latent decoder gives > 1)."""
    if frames.shape != truth.shape:
        raise ValueError(f"blockiness needs equal shapes, got {tuple(frames.shape)} and {tuple(truth.shape)}")
    return cell_border_ratio(frames, cell) / cell_border_ratio(truth, cell)


def noise_sigma(frames: torch.Tensor) -> float:
    """No-reference noise level (Immerkaer 1996, "Fast noise variance estimation"): the standard deviation of
    white noise that would explain the frames' response to the Laplacian-difference mask [[1,-2,1],[-2,4,-2],[1,-2,1]]
    (which cancels locally planar image content), averaged over frames -> sigma on the frames' [0, 1] scale.

    frames: (F, C, H, W); channels are averaged to grey first. Needs no truth, so it applies to real footage: grain
    or diffusion noise left in a restoration raises it, blur lowers it below the source's own level.
    """
    _check_video("frames", frames)
    grey = frames.double().mean(1, keepdim=True)  # (F, 1, H, W)
    _, _, h, w = grey.shape
    if h < 3 or w < 3:
        raise ValueError(f"noise_sigma needs frames of at least 3x3 pixels, got {w}x{h}")
    mask = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]], dtype=torch.float64, device=grey.device)
    response = nnf.conv2d(grey, mask.view(1, 1, 3, 3)).abs()  # (F, 1, H-2, W-2)
    return float(math.sqrt(math.pi / 2) * response.mean() / 6)
