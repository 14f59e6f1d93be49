"""Metrics: PSNR/SSIM against scikit-image, warping error zero on a perfectly warped video, flicker."""

import numpy as np
import pytest
import torch

from ops import flow, metrics


def test_psnr_and_ssim_match_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, (2, 3, 40, 48))
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ours_psnr = metrics.psnr(ta, tb)
    ours_ssim = metrics.ssim(ta, tb)
    for i in range(2):
        assert ours_psnr[i].item() == pytest.approx(peak_signal_noise_ratio(a[i], b[i], data_range=1.0), abs=1e-6)
        ref = structural_similarity(a[i], b[i], channel_axis=0, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert ours_ssim[i].item() == pytest.approx(ref, abs=2e-3)


def test_warping_error_zero_for_exactly_moving_video_and_large_for_static():
    h, w, f = 24, 32, 5
    fwd, bwd = flow.synthetic_flows(h, w, f, flow.translation_matrix(2, 1))
    base = torch.rand(1, 3, h + 2 * f, w + 2 * f, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # frame j shows the scene moved by (2j, j): pixel x of frame j = scene at x - (2j, j)
    frames = torch.stack([base[0, :, f - j : f - j + h, 2 * f - 2 * j : 2 * f - 2 * j + w] for j in range(f)])
    valid = flow.occlusion_mask(fwd, bwd)
    for ref in ("first", "prev"):
        assert metrics.summarize(metrics.warping_error(frames, fwd, valid, ref)) < 1e-20
        static = frames[:1].expand(f, -1, -1, -1)
        assert metrics.summarize(metrics.warping_error(static, fwd, valid, ref)) > 0.05


def test_flicker_and_bad_arguments():
    frames = torch.zeros(4, 3, 8, 8, dtype=torch.float64)
    frames[1::2] += 0.1
    assert metrics.flicker(frames).item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown reference"):
        metrics.warping_error(frames, torch.zeros(3, 8, 8, 2), reference="last")
    with pytest.raises(ValueError, match="forward has shape"):
        metrics.warping_error(frames, torch.zeros(2, 8, 8, 2))
    with pytest.raises(ValueError, match="equal shapes"):
        metrics.psnr(frames, frames[:2])
