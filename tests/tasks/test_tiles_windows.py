"""Temporal windows and spatial tiles of the sampler: same numbers as one pass, one noise field, no seams."""

import numpy as np
import pytest
import torch

from ops import flow, gp, metrics, sampling
from tests.ops.test_sampling import PositionalDenoiser, _sub_cell_video, _video


def _windowed(model, noise, sigmas, cond, fwd, valid, window, **kw):
    """Sample window after window, each first frame guided by the previous window's carry."""
    out, carry = [], None
    for span in sampling.window_spans(noise.shape[0], window):
        rows, frames = sampling.window_flow_rows(span), slice(*span)
        latents, carry = sampling.sample_window(
            model, noise[frames], sigmas, None if cond is None else cond[frames], fwd[rows], valid[rows],
            guidance=1.0, previous=carry, **kw)
        out.append(latents)
    return torch.cat(out)


def test_window_spans_and_flow_rows():
    assert sampling.window_spans(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert sampling.window_spans(7, None) == [(0, 7)] == sampling.window_spans(7, 10)
    assert [sampling.window_flow_rows(s) for s in [(0, 3), (3, 6)]] == [slice(0, 2), slice(2, 5)]
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        sampling.window_spans(7, 0)


@pytest.mark.parametrize("window", [1, 2, 3])
def test_windowed_wavefront_equals_unwindowed_in_latent_space(window):
    noise, cond, fwd, valid = _video(frames=7)
    model = PositionalDenoiser(4, 16, 16)
    sigmas = sampling.karras_sigmas(6, 0.002, 80.0)
    whole = sampling.sample_video(model, noise, sigmas, cond, fwd, valid, guidance=1.0)
    windowed = _windowed(model, noise, sigmas, cond, fwd, valid, window)
    assert (windowed - whole).abs().max() <= 1e-12
    unguided = sampling.sample_video(model, noise, sigmas, cond, fwd, valid, guidance=0.0)
    assert (whole - unguided).abs().max() > 1e-3  # the carry carried guidance that matters
    # without the carry, a window's first frame is unguided: the numbers differ, so the carry is what's used
    cut = torch.cat([sampling.sample_video(model, noise[s:e], sigmas, cond[s:e], fwd[s : e - 1], valid[s : e - 1])
                     for s, e in sampling.window_spans(7, window)])
    assert (cut - whole).abs().max() > 1e-3


def test_windowed_wavefront_equals_unwindowed_in_pixel_space_and_sequential_carry_matches():
    ae, decode, noise, fwd, valid, lfwd, lvalid = _sub_cell_video(frames=5)
    model = PositionalDenoiser(noise.shape[1], *noise.shape[-2:])
    sigmas = sampling.karras_sigmas(5, 0.002, 80.0)
    pixel = dict(decode=decode, decoded_size=tuple(fwd.shape[1:3]))
    whole = sampling.sample_video(model, noise, sigmas, None, fwd, valid, guidance=1.0, **pixel)
    windowed = _windowed(model, noise, sigmas, None, fwd, valid, 2, **pixel)
    assert (windowed - whole).abs().max() <= 1e-12
    # the carry is the last frame's latent prediction at every step (decoded where used), whichever schedule made it
    _, wave = sampling.sample_window(model, noise[:2], sigmas, None, fwd[:1], valid[:1], **pixel)
    _, seq = sampling.sample_window(model, noise[:2], sigmas, None, fwd[:1], valid[:1], schedule="sequential", **pixel)
    assert wave.shape == (5, *noise.shape[1:]) and (wave - seq).abs().max() <= 1e-12
    # and the sequential schedule carries across windows as well
    seq_windowed = _windowed(model, noise, sigmas, None, fwd, valid, 2, schedule="sequential", **pixel)
    assert (seq_windowed - whole).abs().max() <= 1e-9


def test_window_checks_its_carry():
    noise, cond, fwd, valid = _video(frames=4)
    model = PositionalDenoiser(4, 16, 16)
    sigmas = sampling.karras_sigmas(3, 0.01, 10.0)
    with pytest.raises(ValueError, match=r"forward has shape .* previous window's last frame"):
        sampling.sample_window(model, noise[1:], sigmas, cond[1:], fwd[1:], valid[1:], previous=torch.zeros(3, 4, 16, 16))
    with pytest.raises(ValueError, match="previous has shape"):
        sampling.sample_window(model, noise[1:], sigmas, cond[1:], fwd, valid, previous=torch.zeros(2, 4, 16, 16))


class LocalConv(torch.nn.Module):
    """Translation-equivariant and local: two 3x3 convs (receptive radius 2) with conditioning and sigma."""

    def __init__(self, c, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Conv2d(2 * c, 8, 3, padding=1, dtype=torch.float64)
        self.b = torch.nn.Conv2d(8, c, 3, padding=1, dtype=torch.float64)
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.2, generator=g)
        self.calls = []

    def forward(self, x, sigma, cond=None):
        self.calls.append(tuple(x.shape[-2:]))
        a = (0.25 / (0.25 + sigma**2)).view(-1, 1, 1, 1)
        return a * x + (1 - a) * self.b(torch.tanh(self.a(torch.cat([x, cond], 1))))


def test_tile_spans_cover_with_full_tiles():
    assert sampling.tile_spans(40, 16, 4) == [(0, 16), (12, 28), (24, 40)]
    assert sampling.tile_spans(16, 16, 4) == [(0, 16)] == sampling.tile_spans(16, 32, 4)
    for size in (17, 33, 50):
        spans = sampling.tile_spans(size, 16, 8)
        assert all(e - s == 16 for s, e in spans) and spans[0][0] == 0 and spans[-1][1] == size
        assert all(b[0] <= a[1] - 8 for a, b in zip(spans, spans[1:]))  # at least `overlap` shared
    with pytest.raises(ValueError, match="overlap must be"):
        sampling.tiled_denoiser(LocalConv(2), 16, 16)


@pytest.mark.parametrize("size", [(40, 36), (23, 48)])
def test_tiled_prediction_equals_untiled_for_a_local_equivariant_denoiser(size):
    """The blend gives no weight to the outer quarter of each overlap, so a denoiser that looks no further than
    that (radius 2 here, overlap 8) is reproduced exactly; each tile is a separate call."""
    model = LocalConv(4)
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(2, 4, *size, generator=g, dtype=torch.float64), torch.randn(2, 4, *size, generator=g, dtype=torch.float64)
    sigma = torch.tensor([3.0, 0.5], dtype=torch.float64)
    whole = model(x, sigma, cond)
    model.calls.clear()
    tiled = sampling.tiled_denoiser(model, 16, 8)(x, sigma, cond)
    assert len(model.calls) > 2 and all(c[0] <= 16 and c[1] <= 16 for c in model.calls)
    assert (tiled - whole).abs().max() <= 1e-12
    # a wider receptive field than the zero band (hard tiles) breaks the equality: the test can fail
    hard = sampling.tiled_denoiser(model, 16, 0)(x, sigma, cond)
    assert (hard - whole).abs().max() > 1e-3


def test_guided_sampling_through_tiles_equals_untiled():
    """Guidance differentiates through the blended (and checkpointed) tiles: same numbers as one frame-wide call."""
    noise, cond, fwd, valid = _video(frames=3, h=24, w=20)
    model = LocalConv(4)
    sigmas = sampling.karras_sigmas(4, 0.01, 10.0)
    whole = sampling.sample_video(model, noise, sigmas, cond, fwd, valid, guidance=1.0)
    tiled = sampling.sample_video(sampling.tiled_denoiser(model, 12, 8), noise, sigmas, cond, fwd, valid, guidance=1.0)
    unguided = sampling.sample_video(model, noise, sigmas, cond, fwd, valid, guidance=0.0)
    assert (tiled - whole).abs().max() <= 1e-10 < (whole - unguided).abs().max()


def test_tiles_share_one_gp_noise_field():
    """GP noise is one continuous function of global position: evaluating it at a tile's (warped) positions
    gives exactly the crop of the full frame's noise, so tiles need no noise of their own and cannot disagree."""
    h, w, frames = 20, 28, 3
    _, bwd = flow.synthetic_flows(h, w, frames, flow.translation_matrix(0.7, -0.4))
    positions = flow.chain_positions(bwd.double()).numpy()  # (F, h, w, 2) in frame 0
    full = gp.gp_noise_at(np.random.default_rng(4), positions, 4, h, w, backend="dense")
    for ys, xs in [((0, 16), (0, 16)), ((4, 20), (12, 28)), ((7, 11), (3, 25))]:
        crop = positions[:, ys[0] : ys[1], xs[0] : xs[1]]
        tile = gp.gp_noise_at(np.random.default_rng(4), crop, 4, h, w, backend="dense")
        assert np.abs(tile - full[:, :, ys[0] : ys[1], xs[0] : xs[1]]).max() <= 1e-6
        nufft = gp.gp_noise_at(np.random.default_rng(4), crop, 4, h, w)
        assert np.abs(nufft - full[:, :, ys[0] : ys[1], xs[0] : xs[1]]).max() <= 1e-4
    # the default length scale eps = 2 / (pi res) cancels the unit-square scale 1 / res: the field is a function
    # of pixel positions alone, so even a tile that calls itself a 16 x 16 frame draws the same noise
    alone = gp.gp_noise_at(np.random.default_rng(4), positions[:, :16, :16], 4, 16, 16, backend="dense")
    assert np.abs(alone - full[:, :, :16, :16]).max() <= 1e-5
    other = gp.gp_noise_at(np.random.default_rng(5), crop, 4, h, w, backend="dense")  # another draw does differ
    assert np.abs(other - full[:, :, 7:11, 3:25]).max() > 0.5


def test_seam_ratio_detects_a_step_at_a_border():
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(2, 3, 68, 68, generator=g), 5, 1)  # (2, 3, 64, 64)
    assert metrics.seam_ratio(smooth, rows=[32], cols=[32], cell=8) == pytest.approx(1.0, abs=0.25)
    stepped = smooth.clone()
    stepped[..., 32:] += 0.1
    assert metrics.seam_ratio(stepped, cols=[32], cell=8) > 3
    with pytest.raises(ValueError, match="multiples of cell"):
        metrics.seam_ratio(smooth, cols=[30], cell=8)


def _tile_borders(size: int, tile: int, overlap: int, factor: int) -> list[int]:
    """Pixel coordinates of every tile edge inside the frame (latent spans times the autoencoder factor)."""
    return sorted({factor * b for span in sampling.tile_spans(size, tile, overlap) for b in span if 0 < b < size})


def test_blended_tiles_leave_no_seam_on_a_real_decoded_restoration():
    """sr8 restoration of a real photograph by the embedded model, whole-frame vs 16-cell tiles (MultiDiffusion blend,
    overlap 8) vs hard tiles: the blend's tile edges are no more visible than the same lines of the untiled result.
    Measured (coffee 192x256, 8 steps, seeds 0/1): whole 0.969/1.004, blend 0.971/1.003 at the blend's edges;
    at the hard tiles' edges whole 0.927/0.957, hard 1.033/1.036."""
    from ops import degrade
    from storage.models import skimage_image
    from tasks.models import get_model

    model = get_model("sr8-gp")
    image = skimage_image("coffee")[:, :192, :256][None]  # (1, 3, 192, 256), a held-out picture
    cond = model.condition(degrade.upsample(degrade.downsample(image, model.factor), model.factor))
    h, w = cond.shape[-2:]
    noise = torch.randn(1, model.latent_channels, h, w, generator=torch.Generator().manual_seed(0))
    sigmas = sampling.karras_sigmas(8, model.sigma_min, model.sigma_max)
    out = {}
    for name, denoiser in (("whole", model.denoise), ("blend", sampling.tiled_denoiser(model.denoise, 16, 8)),
                           ("hard", sampling.tiled_denoiser(model.denoise, 16, 0))):
        with torch.no_grad():
            out[name] = model.decode(sampling.sample_euler(denoiser, noise * sigmas[0], sigmas, cond))  # (1, 3, 192, 256)
    blend = dict(rows=_tile_borders(h, 16, 8, model.factor), cols=_tile_borders(w, 16, 8, model.factor), cell=model.factor)
    hard = dict(rows=_tile_borders(h, 16, 0, model.factor), cols=_tile_borders(w, 16, 0, model.factor), cell=model.factor)
    seams = {name: (metrics.seam_ratio(o, **blend), metrics.seam_ratio(o, **hard)) for name, o in out.items()}
    assert abs(seams["blend"][0] - seams["whole"][0]) <= 0.03, seams
    assert seams["blend"][1] <= seams["whole"][1] + 0.03, seams
    assert seams["hard"][1] >= seams["whole"][1] + 0.05, seams  # the metric does see a real seam
    assert metrics.psnr(out["blend"], out["whole"]).item() > 25  # tiles change the numbers only a little
