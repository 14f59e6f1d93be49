"""Flow algebra: warping, chaining, occlusion, latent flows, synthetic motions, noise-warping baselines."""

import numpy as np
import pytest
import torch

from ops import flow, noise_warp


def _translation(h, w, dx, dy, frames=2):
    return flow.synthetic_flows(h, w, frames, flow.translation_matrix(dx, dy))


def test_warp_integer_shift_and_mask():
    img = torch.arange(2 * 8 * 10, dtype=torch.float64).view(1, 2, 8, 10)
    _, backward = _translation(8, 10, 2, 1)
    out, valid = flow.warp(img, backward)
    assert torch.allclose(out[0, :, 1:, 2:], img[0, :, :-1, :-2], atol=1e-9)
    assert valid[0, 1:, 2:].all() and not valid[0, 0].any() and not valid[0, :, :2].any()


def test_two_chained_translations_equal_one():
    h, w = 24, 20
    _, b1 = _translation(h, w, 1.25, -0.5)
    _, b2 = _translation(h, w, 2.5, 1.75)
    _, both = _translation(h, w, 3.75, 1.25)
    chained = flow.chain_positions(torch.cat([b1, b2]))
    direct = flow.chain_positions(both)
    assert torch.allclose(chained[2], direct[1], atol=1e-9)


def test_chain_positions_of_zoom_matches_composed_affine():
    h = w = 32
    _, backward = flow.synthetic_flows(h, w, 3, flow.zoom_matrix(h, w, 1.05))
    positions = flow.chain_positions(backward)
    _, twice = flow.affine_flows(h, w, flow.zoom_matrix(h, w, 1.05**2))
    grid = flow.identity_grid(h, w, torch.float64)
    inner = flow.inside(grid + twice, h, w)  # pixels whose chain stays inside: bilinear is exact there
    assert torch.allclose(positions[2][inner], (grid + twice)[inner], atol=1e-6)


def test_forward_and_backward_are_inverse_for_rotation():
    h = w = 33
    fwd, bwd = flow.affine_flows(h, w, flow.rotation_matrix(h, w, 7.0))
    grid = flow.identity_grid(h, w, torch.float64)
    # following the forward flow then the backward flow (exact, analytic) returns home
    back = flow._displacement_sample(bwd[None], (grid + fwd)[None])[0]
    inner = flow.inside(grid + fwd, h, w)
    assert (fwd + back)[inner].abs().max() < 0.05  # bilinear interpolation of a smooth field


def test_occlusion_check_flags_the_occluder_only():
    h, w = 40, 48
    fwd, bwd = _translation(h, w, 2, 0)
    fwd, bwd = fwd[0].clone(), bwd[0].clone()
    # an occluder: a 8x8 square in frame j that moves by (+8, 0) instead of the background's (+2, 0)
    y0, x0 = 10, 20
    bwd[y0 : y0 + 8, x0 + 8 : x0 + 16] = torch.tensor([-8.0, 0.0], dtype=bwd.dtype)
    fwd[y0 : y0 + 8, x0 : x0 + 8] = torch.tensor([8.0, 0.0], dtype=fwd.dtype)
    valid = flow.occlusion_mask(fwd[None], bwd[None])[0]
    expected = torch.ones(h, w, dtype=torch.bool)
    expected[:, w - 2 :] = False  # leaves the frame
    # background pixels of frame j-1 that land under the square in frame j are occluded
    expected[y0 : y0 + 8, x0 + 6 : x0 + 14] = False
    expected[y0 : y0 + 8, x0 : x0 + 8] = True  # the square itself is consistent
    assert torch.equal(valid, expected), (valid != expected).nonzero()[:10]


def test_pixel_to_latent_flow():
    fwd, _ = _translation(32, 32, 8, -4)
    latent = flow.pixel_to_latent_flow(fwd, 8)
    assert latent.shape == (1, 4, 4, 2)
    assert torch.allclose(latent, torch.tensor([1.0, -0.5], dtype=latent.dtype).expand_as(latent))
    with pytest.raises(ValueError, match="divisible"):
        flow.pixel_to_latent_flow(fwd[:, :30], 8)


@pytest.mark.parametrize("method", noise_warp.METHODS)
def test_warp_methods_unit_variance_and_shape(method):
    h = w = 32
    fwd, bwd = flow.synthetic_flows(h, w, 4, flow.translation_matrix(0.5, 0.25))
    noise = noise_warp.warp_noise(method, np.random.default_rng(0), (4, 4, h, w), backward=bwd, forward=fwd)
    assert noise.shape == (4, 4, h, w) and noise.dtype == torch.float32
    std = noise[-1].std().item()
    if method == "bilinear":
        assert 0.3 < std < 0.9  # bilinear interpolation shrinks variance: the known flaw of the baseline
    else:
        assert abs(std - 1) < 0.08, std


def test_temporal_correlation_by_method():
    h = w = 32
    fwd, bwd = flow.synthetic_flows(h, w, 2, flow.translation_matrix(1, 0))
    corr = {}
    for method in noise_warp.METHODS:
        n = noise_warp.warp_noise(method, np.random.default_rng(0), (2, 4, h, w), backward=bwd, forward=fwd)
        corr[method] = torch.corrcoef(torch.stack([n[1, :, :, 1:].flatten(), n[0, :, :, :-1].flatten()]))[0, 1].item()
    assert corr["resample"] < 0.1
    for method in ("nearest", "bilinear", "integral", "gp"):
        assert corr[method] > 0.99, (method, corr)


def test_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown method 'wavy'"):
        noise_warp.warp_noise("wavy", rng, (2, 4, 8, 8))
    bad = torch.zeros(1, 8, 8, 2)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="backward must be finite"):
        noise_warp.warp_noise("gp", rng, (2, 4, 8, 8), backward=bad)
    with pytest.raises(ValueError, match=r"backward has shape \(1, 8, 8, 2\); expected \(2, 8, 8, 2\)"):
        noise_warp.warp_noise("gp", rng, (3, 4, 8, 8), backward=torch.zeros(1, 8, 8, 2))
    with pytest.raises(ValueError, match="needs the forward flows"):
        noise_warp.warp_noise("integral", rng, (2, 4, 8, 8))
    with pytest.raises(ValueError, match="forward .* and backward"):
        flow.occlusion_mask(torch.zeros(1, 8, 8, 2), torch.zeros(1, 8, 9, 2))
    with pytest.raises(ValueError, match="invertible"):
        flow.affine_flows(8, 8, [[0, 0, 1], [0, 0, 1]])
