import torch

from ops import degrade


def test_downsample_upsample_shapes_and_constants():
    x = torch.full((2, 3, 64, 48), 0.3)
    lr = degrade.downsample(x, 8)
    assert lr.shape == (2, 3, 8, 6)
    assert torch.allclose(lr, torch.full_like(lr, 0.3), atol=1e-5)
    up = degrade.upsample(lr, 8)
    assert up.shape == x.shape and torch.allclose(up, x, atol=1e-5)


def test_random_masks_deterministic_and_reasonable():
    a = degrade.random_masks(torch.Generator().manual_seed(3), 8, 64, 64)
    b = degrade.random_masks(torch.Generator().manual_seed(3), 8, 64, 64)
    assert a.shape == (8, 1, 64, 64) and torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    frac = a.mean((1, 2, 3))
    assert (frac > 0).all() and (frac < 0.9).all()


def test_apply_mask_fills_holes():
    x = torch.rand(1, 3, 16, 16)
    m = torch.zeros(1, 1, 16, 16)
    m[..., :4, :] = 1
    y = degrade.apply_mask(x, m)
    assert torch.all(y[..., :4, :] == 0.5) and torch.equal(y[..., 4:, :], x[..., 4:, :])


def _smooth_image(seed: int, size: int = 64) -> torch.Tensor:
    """A natural-ish test image in [0.1, 0.9]: smooth blobs plus fine texture -> (1, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(size, size), mode="bicubic")
    return (0.5 + 0.3 * (coarse - 0.5) + 0.05 * torch.rand(1, 3, size, size, generator=g)).clamp(0.1, 0.9)


def test_back_project_reproduces_the_low_res_input_and_keeps_detail():
    truth = _smooth_image(0)
    low = degrade.downsample(truth, 8)
    # a "generated" restoration: right detail, wrong low frequencies (a brightness ramp)
    ramp = torch.linspace(-0.08, 0.08, 64).view(1, 1, 1, 64)
    guess = (truth + ramp).clamp(0, 1)
    fixed = degrade.back_project(guess, low, 8)
    err_before = (degrade.downsample(guess, 8) - low).abs().max()
    err_after = (degrade.downsample(fixed, 8) - low).abs().max()
    assert err_after < 0.1 * err_before and err_after < 5e-3, (float(err_before), float(err_after))
    assert ((fixed - truth) ** 2).mean() < 0.25 * ((guess - truth) ** 2).mean()
    # high frequencies come from the guess, not from bicubic upsampling
    detail = lambda x: (x - torch.nn.functional.avg_pool2d(x, 3, 1, 1)).abs().mean()
    assert detail(fixed) > 0.9 * detail(guess) and detail(fixed) > 1.5 * detail(degrade.upsample(low, 8))


def test_back_project_rejects_mismatched_sizes():
    import pytest

    with pytest.raises(ValueError, match="upscaled by 8"):
        degrade.back_project(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 4, 4), 8)
    with pytest.raises(ValueError, match="iterations"):
        degrade.back_project(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 8, 8), 8, iterations=-1)
