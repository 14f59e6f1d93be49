"""GP noise by random Fourier features: statistics, backends, exact warping."""

import math

import numpy as np
import pytest
import torch

from ops import flow, gp, noise_warp

RES = 32


def _draws(n, truncation=gp.DEFAULT_TRUNCATION, points=None, channels=4):
    rng = np.random.default_rng(1234)
    out = []
    for _ in range(n):
        feats = gp.draw_rff(rng, channels, RES, truncation=truncation)
        out.append(gp.rff_eval_dense(feats, gp.pixel_to_unit(points, RES, RES)))  # (C, P)
    return np.concatenate(out, axis=0)  # (n*C, P): channels are independent given (z, b), uncorrelated overall


@pytest.mark.slow  # 8000 draws: ~12 s on 2 cores (the standard error of the variance needs them)
def test_per_pixel_variance_is_one():
    points = gp.grid_points(4, 4).reshape(-1, 2)
    samples = _draws(8000, points=points)
    var = samples.var(axis=0)
    assert np.abs(var - 1).max() < 0.03, var
    assert np.abs(samples.mean(axis=0)).max() < 0.03


@pytest.mark.parametrize("truncation", [gp.DEFAULT_TRUNCATION, None])
def test_covariance_matches_kernel(truncation):
    offsets = [0, 1, 2, 4]
    points = np.array([[8.0 + d, 8.0] for d in offsets] + [[20.0, 20.0 + d] for d in offsets])  # two rows, x and y
    samples = _draws(6000, truncation=truncation, points=points)
    eps = gp.default_length_scale(RES)
    for i, d in enumerate(offsets):
        emp = 0.5 * (np.mean(samples[:, 0] * samples[:, i]) + np.mean(samples[:, 4] * samples[:, 4 + i]))
        if truncation is None:
            kernel = math.exp(-((d / RES) ** 2) / (2 * eps**2))  # the RBF kernel itself
        else:
            kernel = gp.truncated_rbf_kernel(d / RES, eps, truncation)  # RBF with spectrum cut at 2/eps (App. F.2)
        assert abs(emp - kernel) < 0.02, (d, emp, kernel)


def test_truncated_kernel_close_to_rbf_beyond_one_pixel():
    eps = gp.default_length_scale(128)
    assert gp.truncated_rbf_kernel(0.0, eps) == pytest.approx(1.0)
    for d in (2, 4):
        assert abs(gp.truncated_rbf_kernel(d / 128, eps)) < 0.03


def test_dense_and_nufft_agree():
    rng = np.random.default_rng(0)
    feats = gp.draw_rff(rng, 4, 64)
    pts = gp.pixel_to_unit(gp.grid_points(64, 64)[None] + rng.uniform(-5, 5, (2, 64, 64, 2)), 64, 64)
    dense = gp.rff_eval_dense(feats, pts)
    fast = gp.rff_eval_nufft(feats, pts, tol=1e-6)
    assert dense.shape == fast.shape == (4, 2, 64, 64)
    assert np.abs(dense - fast).max() <= 1e-5


def test_integer_shift_equals_rolled_field():
    h = w = 32
    _, backward = flow.synthetic_flows(h, w, 4, flow.translation_matrix(3, -2))
    noise = noise_warp.warp_noise("gp", np.random.default_rng(5), (4, 4, h, w), backward=backward)
    for j in range(1, 4):
        rolled = torch.roll(noise[0], shifts=(-2 * j, 3 * j), dims=(1, 2))
        # pixels whose source stayed inside frame 0
        ys, xs = slice(0, h - 2 * j), slice(3 * j, w)
        assert (noise[j][:, ys, xs] - rolled[:, ys, xs]).abs().max() <= 1e-5
    # and the warped noise is fresh-looking where the source left the frame (not a copy of edge values)
    assert noise[3][:, h - 1, 0].abs().sum() > 0


def test_white_noise_interface_and_determinism():
    a = gp.white_noise(np.random.default_rng(3), 2, 4, 8, 8)
    b = gp.white_noise(np.random.default_rng(3), 2, 4, 8, 8)
    assert a.shape == (2, 4, 8, 8) and a.dtype == np.float32
    assert np.array_equal(a, b)
    c = gp.gp_noise(np.random.default_rng(3), 2, 4, 8, 8)
    assert c.shape == a.shape and c.dtype == np.float32 and not np.allclose(c[0], c[1])


def test_torch_training_sampler_matches_statistics():
    x = gp.gp_noise_torch(torch.Generator().manual_seed(0), 256, 4, 16, 16)
    assert abs(x.var().item() - 1) < 0.05
    lag1 = (x[..., 1:] * x[..., :-1]).mean().item()
    assert abs(lag1 - gp.truncated_rbf_kernel(1 / 16, gp.default_length_scale(16))) < 0.05


def test_bad_arguments_name_the_problem():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="channels"):
        gp.draw_rff(rng, 0, 32)
    with pytest.raises(ValueError, match="length_scale"):
        gp.draw_rff(rng, 1, 32, length_scale=-1.0)
    feats = gp.draw_rff(rng, 1, 32)
    with pytest.raises(ValueError, match="points"):
        gp.rff_eval_nufft(feats, np.array([[0.1, np.nan]]))
    with pytest.raises(ValueError, match="points"):
        gp.rff_eval_dense(feats, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="backend"):
        gp.rff_eval(feats, np.zeros((3, 2)), backend="fft")
    with pytest.raises(ValueError, match="rng"):
        gp.draw_rff(0, 1, 32)
