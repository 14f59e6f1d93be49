"""Measurement operators: adjoints to float precision, the sr kernel is the sr tasks' one, blur and noise facts."""

import pytest
import torch

from ops import degrade, operators


def _rand(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _inner(a, b):
    return float((a * b).sum())


def _assert_adjoint(forward, adjoint, x, y):
    lhs, rhs = _inner(forward(x), y), _inner(x, adjoint(y))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs)), (lhs, rhs)


@pytest.mark.parametrize("factor", [4, 8])
def test_downsample_adjoint(factor):
    x = _rand(2, 3, 8 * factor, 5 * factor)  # odd multiple: non-square, not a power of two
    y = _rand(2, 3, 8, 5, seed=1)
    _assert_adjoint(lambda v: operators.downsample(v, factor), lambda v: operators.downsample_adjoint(v, factor), x, y)


def test_downsample_is_the_sr_kernel():
    x = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(2))
    assert torch.equal(operators.downsample(x, 8).clamp(0, 1), degrade.downsample(x, 8))
    # and it is linear (the clamp is what makes degrade.downsample not)
    y = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(operators.downsample(2 * x - 3 * y, 4), 2 * operators.downsample(x, 4) - 3 * operators.downsample(y, 4), atol=1e-5)


def test_mask_adjoint_and_projection():
    keep = (torch.rand(2, 1, 9, 7, generator=torch.Generator().manual_seed(4)) > 0.5).double()
    x, y = _rand(2, 3, 9, 7), _rand(2, 3, 9, 7, seed=1)
    _assert_adjoint(lambda v: operators.mask(v, keep), lambda v: operators.mask_adjoint(v, keep), x, y)
    assert torch.equal(operators.mask(operators.mask(x, keep), keep), operators.mask(x, keep))


@pytest.mark.parametrize("kernel", [operators.gaussian_kernel(7, 1.5), operators.motion_kernel(9, 7.0, 30.0),
                                    _rand(5, 3, seed=9)])  # an asymmetric kernel catches a missing flip
def test_blur_adjoint(kernel):
    x, y = _rand(2, 3, 17, 12), _rand(2, 3, 17, 12, seed=1)
    _assert_adjoint(lambda v: operators.blur(v, kernel), lambda v: operators.blur_adjoint(v, kernel), x, y)
    # the explicit adjoint equals autograd's vector-Jacobian product
    xg = x.clone().requires_grad_(True)
    (vjp,) = torch.autograd.grad(operators.blur(xg, kernel), xg, grad_outputs=y)
    assert torch.allclose(vjp, operators.blur_adjoint(y, kernel), atol=1e-12)


def test_blur_is_a_convolution():
    """An impulse reproduces the kernel centred on it (convolution, not correlation), and the sum is preserved."""
    kernel = _rand(5, 3, seed=9).abs()
    x = torch.zeros(1, 1, 11, 11, dtype=torch.float64)
    x[0, 0, 5, 5] = 1.0
    out = operators.blur(x, kernel)
    assert torch.allclose(out[0, 0, 3:8, 4:7], kernel, atol=1e-14)
    assert out.sum() == pytest.approx(kernel.sum().item())


def test_kernels_normalised_and_shaped():
    g = operators.gaussian_kernel(9, 2.0)
    assert g.sum().item() == pytest.approx(1.0) and torch.equal(g, g.T) and g[4, 4] == g.max()
    m = operators.motion_kernel(9, 7.0, 0.0)
    assert m.sum().item() == pytest.approx(1.0)
    assert m[4].sum().item() == pytest.approx(1.0)  # horizontal motion stays on the centre row
    assert m[4].nonzero().numel() >= 7
    with pytest.raises(ValueError, match="odd"):
        operators.gaussian_kernel(8, 2.0)
    with pytest.raises(ValueError, match="does not fit"):
        operators.motion_kernel(5, 9.0, 0.0)


def test_noise_level_known_and_estimated():
    smooth = torch.linspace(0, 1, 128, dtype=torch.float64).view(1, 1, 1, -1).expand(2, 3, 128, 128)
    gen = torch.Generator().manual_seed(5)
    y = operators.add_noise(smooth, 0.05, gen)
    assert (y - smooth).std().item() == pytest.approx(0.05, rel=0.02)
    assert torch.allclose(operators.estimate_noise_level(y), torch.full((2,), 0.05, dtype=torch.float64), rtol=0.05)
    assert operators.estimate_noise_level(smooth).max() < 1e-12
    # the same seed gives the same noise
    assert torch.equal(y, operators.add_noise(smooth, 0.05, torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="noise level"):
        operators.add_noise(smooth, -1.0, gen)


def test_tone_curve_is_nonlinear_and_invertible():
    x = torch.linspace(0, 1, 101, dtype=torch.float64)
    y = operators.tone_curve(x, 4.0)
    assert y[0] == 0 and y[-1] == pytest.approx(1.0) and (y[1:] > y[:-1]).all()
    assert y[50] > 0.8  # saturating: mid-grey maps well above 0.5
    assert torch.allclose(operators.tone_curve_inverse(y, 4.0), x, atol=1e-12)


def test_deblur_and_denoise_degradations():
    frames = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(6))
    k = operators.gaussian_kernel(9, 2.0)
    clean = operators.deblur(frames, k, 0.0, torch.Generator().manual_seed(0))
    assert torch.allclose(clean, operators.blur(frames, k).clamp(0, 1))
    assert clean.std() < frames.std()  # blur removes variance
    noisy = operators.denoise(frames, 0.1, torch.Generator().manual_seed(0))
    assert noisy.min() >= 0 and noisy.max() <= 1 and not torch.equal(noisy, frames)
    with pytest.raises(ValueError, match="divisible"):
        operators.downsample(frames, 5)
