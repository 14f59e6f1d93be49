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
