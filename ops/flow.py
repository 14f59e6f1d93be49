"""Flow algebra on pixel grids (torch, differentiable where it matters).

Conventions (DESIGN.md): positions are pixel coordinates (x, y) with pixel centres at integers; a flow
field has shape (..., H, W, 2). The backward flow F_j maps pixel x of frame j to x + F_j(x) in frame
j-1; the forward flow G_j maps pixel x of frame j-1 to x + G_j(x) in frame j.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf

from ._checks import check_finite, check_positive, check_shape

# Forward-backward consistency thresholds of Lai et al. 2018 (after Sundaram et al. 2010).
OCCLUSION_ALPHA = 0.01
OCCLUSION_BETA = 0.5


def identity_grid(height: int, width: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Pixel-centre coordinates, (H, W, 2) as (x, y)."""
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=device), torch.arange(width, dtype=dtype, device=device), indexing="ij"
    )
    return torch.stack([xs, ys], dim=-1)


def check_flow(name: str, flow: torch.Tensor, height: int | None = None, width: int | None = None) -> None:
    """A flow is a finite (..., H, W, 2) float tensor."""
    if not isinstance(flow, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (..., H, W, 2), got {type(flow).__name__}")
    if flow.ndim < 3 or flow.shape[-1] != 2:
        raise ValueError(f"{name} has shape {tuple(flow.shape)}; expected (..., H, W, 2) holding (dx, dy)")
    if (height is not None and flow.shape[-3] != height) or (width is not None and flow.shape[-2] != width):
        raise ValueError(f"{name} covers {tuple(flow.shape[-3:-1])} pixels; expected ({height}, {width})")
    check_finite(name, flow)


def inside(points: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """True where (x, y) lies within the pixel-centre hull, so bilinear sampling needs no padding."""
    x, y = points[..., 0], points[..., 1]
    return (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)


def sample_bilinear(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Sample (N, C, H, W) at pixel points (N, h, w, 2) -> (N, C, h, w); border values beyond the edge."""
    _, _, height, width = image.shape
    scale = torch.tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)], dtype=points.dtype, device=points.device)
    grid = points * scale - 1.0
    return nnf.grid_sample(image, grid.to(image.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def sample_nearest(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Nearest-pixel sampling of (N, C, H, W) at (N, h, w, 2) -> (N, C, h, w); border beyond the edge."""
    _, _, height, width = image.shape
    x = points[..., 0].round().clamp(0, width - 1).long()
    y = points[..., 1].round().clamp(0, height - 1).long()
    flat = image.flatten(2)  # (N, C, H*W)
    idx = (y * width + x).flatten(1)  # (N, h*w)
    out = torch.gather(flat, 2, idx[:, None, :].expand(-1, image.shape[1], -1))
    return out.view(image.shape[0], image.shape[1], *points.shape[1:3])


def warp(image: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pull `image` (N, C, H, W) along `flow` (N, h, w, 2): out(x) = image(x + flow(x)); also the in-frame mask."""
    check_flow("flow", flow)
    _, _, height, width = image.shape
    points = identity_grid(flow.shape[-3], flow.shape[-2], flow.dtype, flow.device) + flow
    return sample_bilinear(image, points), inside(points, height, width)


def _displacement_sample(displacement: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear sample of a (N, H, W, 2) displacement field at (N, h, w, 2) points -> (N, h, w, 2)."""
    return sample_bilinear(displacement.permute(0, 3, 1, 2), points).permute(0, 2, 3, 1)


def chain_step(previous: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """One link of the chain: P_j = P_{j-1} o (id + F_j) from frame j-1's positions and F_j, both (H, W, 2).

    Displacements (P - id) are sampled bilinearly with border clamping, so a point that leaves the frame keeps
    moving with the edge's motion (exact for global translations); positions may lie outside frame 0 — the GP
    is defined everywhere, so the noise there is still exact.
    """
    height, width = flow.shape[-3:-1]
    grid = identity_grid(height, width, flow.dtype, flow.device)
    points = grid + flow  # where pixels of frame j were in frame j-1
    return grid + flow + _displacement_sample((previous - grid)[None], points[None])[0]


def chain_positions(backward: torch.Tensor, cuts=None) -> torch.Tensor:
    """Positions in frame 0 of every pixel of every frame: P_j = P_{j-1} o (id + F_j), P_0 = id.

    backward: (F-1, H, W, 2) -> (F, H, W, 2). cuts: optional (F-1,) bools, True where frame j starts a new shot;
    there the chain restarts (P_j = id: positions in the shot's own first frame).
    """
    check_flow("backward", backward)
    height, width = backward.shape[-3:-1]
    grid = identity_grid(height, width, backward.dtype, backward.device)
    out = [grid]
    for j, flow in enumerate(backward):
        out.append(grid.clone() if cuts is not None and bool(cuts[j]) else chain_step(out[-1], flow))
    return torch.stack(out)


# ---- shot cuts: flow failure and a colour-histogram jump ----

# Measured on DIS flow (tests/tasks/test_streaming.py; README "Long videos"): smooth pans keep 0.91-0.99 of the pixels
# valid under the forward-backward check with colour-histogram distances <= 0.05; hard cuts between 15 pairs of
# scikit-image photographs keep 0.001-0.071 valid at distances 0.56-0.99; a +40 brightness flash jumps the
# histogram by 0.53-0.95 while 0.83-0.93 stay valid, so a histogram jump alone is not a cut.
CUT_MIN_VALID = 0.5  # below this the flow failed ...
CUT_HIST_JUMP = 0.2  # ... and the colours jumped by more than this: a cut
CUT_FLOW_FAILED = 0.15  # below this the flow failed so badly that the chain restarts whatever the colours
HIST_BINS = 8


def colour_histogram(frame: torch.Tensor, bins: int = HIST_BINS) -> torch.Tensor:
    """Joint RGB histogram of a uint8 frame (H, W, 3) with `bins` per channel, normalised to sum 1 -> (bins**3,)."""
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"frame has shape {tuple(frame.shape)}; expected (H, W, 3)")
    q = (frame.long() * bins) // 256  # (H, W, 3) in [0, bins)
    index = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    counts = torch.bincount(index.flatten(), minlength=bins**3).double()
    return counts / counts.sum()


def histogram_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Total-variation distance of two normalised histograms, in [0, 1] (0: same colours, 1: disjoint)."""
    return float(0.5 * (a - b).abs().sum())


def is_shot_cut(valid_fraction: float, hist_distance: float, min_valid: float = CUT_MIN_VALID,
                hist_jump: float = CUT_HIST_JUMP, flow_failed: float = CUT_FLOW_FAILED) -> bool:
    """Frame j starts a new shot: the flow j-1 <-> j failed (valid fraction < min_valid) and the colours jumped
    (histogram distance > hist_jump), or almost no pixel survived the forward-backward check (< flow_failed)."""
    return bool((valid_fraction < min_valid and hist_distance > hist_jump) or valid_fraction < flow_failed)


def chain_forward(forward: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each pixel of frame 0 is in frame j: Q_j = Q_{j-1} + G_j(Q_{j-1}), and whether it stayed valid.

    forward: (F-1, H, W, 2) flows j-1 -> j on frame j-1's grid; valid: optional (F-1, H, W) masks on the
    same grids (e.g. from `occlusion_mask`). Returns positions (F, H, W, 2) and validity (F, H, W).
    """
    check_flow("forward", forward)
    height, width = forward.shape[-3:-1]
    grid = identity_grid(height, width, forward.dtype, forward.device)
    points, ok = grid, torch.ones(height, width, dtype=torch.bool, device=forward.device)
    out_points, out_ok = [points], [ok]
    for j, flow in enumerate(forward):
        if valid is not None:
            ok = ok & (sample_nearest(valid[j][None, None].float(), points[None])[0, 0] > 0.5)
        points = points + _displacement_sample(flow[None], points[None])[0]
        ok = ok & inside(points, height, width)
        out_points.append(points)
        out_ok.append(ok)
    return torch.stack(out_points), torch.stack(out_ok)


def occlusion_mask(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """Valid pixels of frame j-1 under the forward-backward check (Lai et al. 2018) -> (N, H, W) bool.

    forward: (N, H, W, 2) flows j-1 -> j; backward: (N, H, W, 2) flows j -> j-1. A pixel x is valid
    when x + G(x) lands inside frame j and |G(x) + F(x + G(x))|^2 <= 0.01 (|G|^2 + |F|^2) + 0.5.
    """
    check_flow("forward", forward)
    check_flow("backward", backward)
    if forward.shape != backward.shape:
        raise ValueError(f"forward {tuple(forward.shape)} and backward {tuple(backward.shape)} flows must have the same shape")
    height, width = forward.shape[-3:-1]
    points = identity_grid(height, width, forward.dtype, forward.device) + forward
    back_at_target = _displacement_sample(backward, points)
    mismatch = (forward + back_at_target).pow(2).sum(-1)
    bound = OCCLUSION_ALPHA * (forward.pow(2).sum(-1) + back_at_target.pow(2).sum(-1)) + OCCLUSION_BETA
    return (mismatch <= bound) & inside(points, height, width)


def pixel_to_latent_flow(flow: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool a pixel flow (N, H, W, 2) over factor x factor blocks and divide by factor -> (N, H/f, W/f, 2)."""
    check_flow("flow", flow)
    if not (isinstance(factor, int) and factor >= 1):
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    height, width = flow.shape[-3:-1]
    if height % factor or width % factor:
        raise ValueError(f"flow size ({height}, {width}) must be divisible by the latent factor {factor}")
    pooled = nnf.avg_pool2d(flow.permute(0, 3, 1, 2), factor)
    return pooled.permute(0, 2, 3, 1) / factor


def pixel_to_latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """A latent pixel is valid only if every pixel of its block is: (N, H, W) -> (N, H/f, W/f)."""
    return -nnf.max_pool2d(-(mask.float()[:, None]), factor)[:, 0] > 0.5


# ---- flows of known motions (global maps frame j-1 -> frame j) ----


def affine_flows(height: int, width: int, matrix, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact forward and backward flows (H, W, 2) of x_j = A x_{j-1} + t, with `matrix` = [A | t] (2, 3)."""
    matrix = torch.as_tensor(matrix, dtype=dtype)
    check_shape("matrix", matrix, (2, 3), "as [A | t]")
    check_finite("matrix", matrix)
    lin, shift = matrix[:, :2], matrix[:, 2]
    if abs(float(torch.linalg.det(lin))) < 1e-12:
        raise ValueError("matrix must be invertible (its 2x2 part has zero determinant)")
    grid = identity_grid(height, width, dtype)
    forward = grid @ lin.T + shift - grid
    inv = torch.linalg.inv(lin)
    backward = (grid - shift) @ inv.T - grid
    return forward, backward


def translation_matrix(dx: float, dy: float) -> list[list[float]]:
    return [[1.0, 0.0, dx], [0.0, 1.0, dy]]


def zoom_matrix(height: int, width: int, scale: float) -> list[list[float]]:
    """Zoom by `scale` about the image centre."""
    check_positive("scale", scale)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    return [[scale, 0.0, cx - scale * cx], [0.0, scale, cy - scale * cy]]


def rotation_matrix(height: int, width: int, degrees: float) -> list[list[float]]:
    """Rotate by `degrees` about the image centre."""
    cx, cy = (width - 1) / 2, (height - 1) / 2
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return [[c, -s, cx - c * cx + s * cy], [s, c, cy - s * cx - c * cy]]


def synthetic_flows(height: int, width: int, frames: int, matrix, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The same global motion between every pair of consecutive frames -> forward, backward (F-1, H, W, 2)."""
    forward, backward = affine_flows(height, width, matrix, dtype)
    n = frames - 1
    return forward.expand(n, -1, -1, -1).clone(), backward.expand(n, -1, -1, -1).clone()
