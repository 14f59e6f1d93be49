"""Zero-shot solvers on a Gaussian toy prior with closed-form posteriors, determinism, and video-level sources."""

import math

import numpy as np
import pytest
import torch

from ops import flow, gp, noise_warp, operators, sampling, solvers
from tests.ops.test_sampling import PositionalDenoiser  # the same non-equivariant toy denoiser (S = 0.5)

S, MU = 0.5, 0.3  # data ~ N(MU, S^2) per element
GAMMA = 0.05  # measurement noise std


def gaussian_denoiser(x, sigma, cond=None):
    """Exact E[x0 | x] for x0 ~ N(MU, S^2): D(x, sigma) = (S^2 x + sigma^2 MU) / (S^2 + sigma^2)."""
    a = (S**2 / (S**2 + sigma**2)).view(-1, *([1] * (x.ndim - 1)))
    return MU + a * (x - MU)



def _masked_problem(frames, c=1, h=4, w=4):
    """One measurement y = keep * (x + GAMMA n) repeated over `frames` independent runs, and its exact posterior."""
    keep = (torch.rand(1, 1, h, w, generator=torch.Generator().manual_seed(1)) > 0.5).double()
    x = MU + S * torch.randn(1, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y1 = keep * (x + GAMMA * torch.randn(1, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    post_var = 1 / (1 / S**2 + keep / GAMMA**2)
    post_mean = post_var * (MU / S**2 + y1 / GAMMA**2)  # (1, c, h, w)
    noise = torch.randn(frames, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    return keep, y1.expand(frames, -1, -1, -1), post_mean, post_var, noise, lambda v, j: operators.mask(v, keep)


def _euler_affine(sigmas):
    """The Euler sampler on the toy is affine: R(z) = a + b z (see test_ops_sampling's closed form) -> (a, b)."""
    c = float(torch.prod(1 + (sigmas[1:] - sigmas[:-1]) * sigmas[:-1] / (S**2 + sigmas[:-1] ** 2)))
    return MU * (1 - c), c * float(sigmas[0])


# ---- DPS ----


def test_dps_mean_approaches_the_posterior_mean():
    keep, y, post_mean, post_var, noise, op = _masked_problem(512)
    sigmas = sampling.karras_sigmas(20, 0.002, 80.0)
    x, hist = solvers.dps(gaussian_denoiser, noise, sigmas, y, op, zeta=0.3)
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True)
    observed = keep.bool().expand_as(mean)
    gap = (MU - post_mean)[observed].abs().max()  # how far the prior mean is from the posterior mean
    assert gap > 0.5
    assert (mean - post_mean)[observed].abs().max() < 0.1 * gap
    assert std[observed].max() < 3 * GAMMA  # observed pixels are pinned down to about the noise level ...
    # ... while unobserved ones are the prior's own Euler samples: the mask's gradient never reaches them
    plain = sampling.sample_euler(gaussian_denoiser, noise * sigmas[0], sigmas)
    hidden = ~keep.bool().expand_as(x)
    assert torch.allclose(x[hidden], plain[hidden], atol=1e-12)
    assert hist["residual"][-1] < 0.3 * hist["residual"][0]


def test_dps_measurement_step_scales_with_zeta():
    keep, y, *_, noise, op = _masked_problem(64)
    sigmas = sampling.karras_sigmas(20, 0.002, 80.0)
    plain = sampling.sample_euler(gaussian_denoiser, noise * sigmas[0], sigmas)
    errors = [float(((solvers.dps(gaussian_denoiser, noise, sigmas, y, op, zeta=z)[0] - y) * keep).norm()) for z in (1e-6, 0.3)]
    assert errors[1] < 0.5 * errors[0]
    assert errors[0] == pytest.approx(float(((plain - y) * keep).norm()), rel=1e-3)


# ---- D-Flow / DMPlug ----


@pytest.mark.parametrize("optimizer,lr,iterations,tol", [("lbfgs", 1.0, 12, 1e-6), ("adam", 0.05, 400, 1e-5)])
def test_dflow_reaches_the_closed_form_optimum(optimizer, lr, iterations, tol):
    """min_z ||y - keep * R(z)||^2 + lam |z|^2 / 2 with R(z) = a + b z: z* = 2 b keep (y - a) / (2 b^2 + lam)."""
    keep, y, *_, noise, op = _masked_problem(3, c=2)
    sigmas = sampling.karras_sigmas(8, 0.002, 80.0)
    a, b = _euler_affine(sigmas)
    lam = 0.3
    z_star = keep * 2 * b * (y - a) / (2 * b**2 + lam)
    x, hist = solvers.dflow(gaussian_denoiser, noise, sigmas, y, op, iterations=iterations, optimizer=optimizer, lr=lr,
                            reg="gaussian", reg_weight=lam)
    assert (hist["z"] - z_star).abs().max() < tol
    assert (x - (a + b * z_star)).abs().max() < tol  # the returned sample is R(z*)
    assert hist["loss"][-1] < 0.5 * hist["loss"][0]


def test_dflow_without_regulariser_fits_observed_and_keeps_unobserved():
    keep, y, *_, noise, op = _masked_problem(3, c=2)
    sigmas = sampling.karras_sigmas(8, 0.002, 80.0)
    x, hist = solvers.dflow(gaussian_denoiser, noise, sigmas, y, op, iterations=10)
    assert ((x - y) * keep).abs().max() < 1e-8
    assert torch.equal(hist["z"] * (1 - keep), noise * (1 - keep))  # no gradient reaches the unobserved source


def test_dflow_early_stopping_stops_once_the_iterates_settle():
    keep, y, *_, noise, op = _masked_problem(3, c=2)
    sigmas = sampling.karras_sigmas(8, 0.002, 80.0)
    a, b = _euler_affine(sigmas)
    z_star = keep * 2 * b * (y - a) / (2 * b**2 + 0.3)
    x, hist = solvers.dflow(gaussian_denoiser, noise, sigmas, y, op, iterations=100, reg="gaussian", reg_weight=0.3,
                            patience=3, window=3)
    assert hist["iterations"] < 30 and hist["best"] <= hist["iterations"] - 3
    assert len(hist["loss"]) == hist["iterations"]
    assert (hist["z"] - z_star).abs().max() < 1e-6


def test_chi_regulariser_minimum():
    d = 50
    r = torch.linspace(1.0, 12.0, 2001, dtype=torch.float64)
    z = r[:, None] * torch.nn.functional.normalize(torch.ones(1, d, dtype=torch.float64), dim=1)
    values = torch.stack([solvers.regularizer("chi", row[None]) for row in z])
    assert r[values.argmin()].item() == pytest.approx(math.sqrt(d - 1), abs=0.01)
    with pytest.raises(ValueError, match="regularizer"):
        solvers.regularizer("l1", z)


# ---- VIPaint ----


def test_vipaint_posterior_matches_the_exact_posterior_at_its_last_level():
    """For Gaussian data the fitted q at sigma_K has the exact p(x_sK | y) = N(post_mean, post_var + sigma_K^2)."""
    keep, y, post_mean, post_var, noise, op = _masked_problem(256)
    sigmas = sampling.karras_sigmas(20, 0.002, 80.0)
    draw, fresh, levels, hist = solvers.vipaint_posterior(gaussian_denoiser, noise, sigmas, y, op,
                                                          torch.Generator().manual_seed(5), iterations=100, lr=0.1,
                                                          noise_level=GAMMA, sigma_data=S)
    assert levels == (0, 5, 10)
    s_k = float(sigmas[levels[-1]])
    with torch.no_grad():
        xs = torch.cat([draw([fresh() for _ in levels])[0] for _ in range(8)])  # (8 * 256, 1, 4, 4)
    observed = keep.bool().expand(1, *xs.shape[1:])
    mean = xs.mean(0, keepdim=True)
    gap = (MU - post_mean)[observed].abs().max()
    assert (mean - post_mean)[observed].abs().max() < 0.15 * gap
    true_std = (post_var + s_k**2).sqrt().expand_as(mean)
    assert torch.allclose(xs.std(0, keepdim=True)[observed], true_std[observed], rtol=0.08)
    assert np.mean(hist["loss"][-10:]) < np.mean(hist["loss"][:10])


def test_vipaint_restores_like_the_posterior():
    keep, y, post_mean, _, noise, op = _masked_problem(256)
    x, hist = solvers.vipaint(gaussian_denoiser, noise, sampling.karras_sigmas(20, 0.002, 80.0), y, op,
                              torch.Generator().manual_seed(5), iterations=50, lr=0.1, noise_level=GAMMA, sigma_data=S,
                              zeta=0.3)
    observed = keep.bool().expand(1, *x.shape[1:])
    gap = (MU - post_mean)[observed].abs().max()
    assert (x.mean(0, keepdim=True) - post_mean)[observed].abs().max() < 0.1 * gap
    assert len(hist["residual"]) == 10 and len(hist["loss"]) == 50


# ---- determinism, video, guidance ----


def _video(frames=4, c=2, h=8, w=8, dx=1.0):
    fwd, bwd = flow.synthetic_flows(h, w, frames, flow.translation_matrix(dx, 0.0))
    return fwd, bwd, flow.occlusion_mask(fwd, bwd)


def _solve(name, denoiser, noise, y, op, **kw):
    sigmas = sampling.karras_sigmas(6, 0.002, 80.0)
    if name == "dps":
        return solvers.dps(denoiser, noise, sigmas, y, op, zeta=0.3, **kw)[0]
    if name == "dflow":
        return solvers.dflow(denoiser, noise, sigmas, y, op, iterations=3, optimizer="adam", lr=0.1, **kw)[0]
    return solvers.vipaint(denoiser, noise, sigmas, y, op, torch.Generator().manual_seed(11), iterations=3, **kw)[0]


@pytest.mark.parametrize("name", ["dps", "dflow", "vipaint"])
@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_solvers_are_deterministic_and_work_with_self_guidance(name, guidance):
    fwd, bwd, valid = _video()
    noise = noise_warp.warp_noise("gp", np.random.default_rng(0), (4, 2, 8, 8), backward=bwd).double()
    model = PositionalDenoiser(2, 8, 8)
    keep = (torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.3).double()
    y = keep * torch.rand(4, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    op = lambda v, j: operators.mask(v, keep)
    kw = dict(forward=fwd, valid=valid, guidance=guidance)
    first, second = _solve(name, model, noise, y, op, **kw), _solve(name, model, noise, y, op, **kw)
    assert torch.equal(first, second) and torch.isfinite(first).all()
    if guidance:
        unguided = _solve(name, model, noise, y, op, forward=fwd, valid=valid, guidance=0.0)
        assert not torch.equal(first, unguided)


@pytest.mark.parametrize("method", noise_warp.METHODS)
def test_solvers_take_every_noise_method(method):
    """The noise is the solvers' input: every warping baseline feeds DPS, D-Flow and VIPaint with guidance on."""
    fwd, bwd, valid = _video()
    noise = noise_warp.warp_noise(method, np.random.default_rng(0), (4, 2, 8, 8), backward=bwd.float(),
                                  forward=fwd.float()).double()
    model = PositionalDenoiser(2, 8, 8)
    keep = (torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.3).double()
    y = (keep * 0.5).expand(4, 2, 8, 8)
    op = lambda v, j: operators.mask(v, keep)
    for name in ("dps", "dflow", "vipaint"):
        x = _solve(name, model, noise, y, op, forward=fwd, valid=valid, guidance=1.0)
        assert x.shape == noise.shape and torch.isfinite(x).all(), (method, name)


def test_dflow_checkpointing_changes_memory_not_results():
    keep, y, *_, noise, op = _masked_problem(3, c=2)
    model = PositionalDenoiser(2, 4, 4)
    sigmas = sampling.karras_sigmas(6, 0.002, 80.0)
    runs = [solvers.dflow(model, noise, sigmas, y, op, iterations=3, optimizer="adam", lr=0.1, checkpoint=c) for c in (False, True)]
    assert torch.allclose(runs[0][0], runs[1][0], atol=1e-12) and runs[0][1]["loss"] == pytest.approx(runs[1][1]["loss"], rel=1e-12)


def test_solve_dispatches_and_dmplug_is_dflow_with_early_stopping():
    keep, y, *_, noise, op = _masked_problem(3, c=2)
    sigmas = sampling.karras_sigmas(8, 0.002, 80.0)
    x, hist = solvers.solve("dmplug", gaussian_denoiser, noise, sigmas, y, op, iterations=300, lr=0.05)
    assert len(hist["variance"]) > 0 and ((x - y) * keep).abs().max() < 1e-3  # ES-WMV tracked (it stops on stalls:
    # see test_dflow_early_stopping_stops_once_the_iterates_settle; this convex toy's variance keeps falling)
    x_dps, _ = solvers.solve("dps", gaussian_denoiser, noise, sigmas, y, op, zeta=0.3)
    assert torch.equal(x_dps, solvers.dps(gaussian_denoiser, noise, sigmas, y, op, zeta=0.3)[0])
    with pytest.raises(ValueError, match="unknown solver"):
        solvers.solve("ddrm", gaussian_denoiser, noise, sigmas, y, op)
    with pytest.raises(ValueError, match="generator"):
        solvers.solve("vipaint", gaussian_denoiser, noise, sigmas, y, op)


def test_run_sampler_equals_the_video_sampler():
    """Without a correction, the solvers' sampler is ops.sampling's: guided sequential and plain batched."""
    fwd, bwd, valid = _video()
    noise = noise_warp.warp_noise("gp", np.random.default_rng(0), (4, 2, 8, 8), backward=bwd).double()
    model = PositionalDenoiser(2, 8, 8)
    sigmas = sampling.karras_sigmas(6, 0.002, 80.0)
    for guidance in (0.0, 1.0):
        ours = solvers.run_sampler(model, noise * sigmas[0], sigmas, forward=fwd, valid=valid, guidance=guidance)
        ref = sampling.sample_video(model, noise, sigmas, None, fwd, valid, guidance=guidance, schedule="sequential")
        assert torch.allclose(ours, ref, atol=1e-12), guidance
    # pixel-space guidance: a decoder (nearest x2 to 3 channels) and the flows on the decoded grid
    decode = lambda z: torch.nn.functional.interpolate(z[:, :1].expand(-1, 3, -1, -1), scale_factor=2)
    fwd2, bwd2, valid2 = _video(4, 2, 16, 16, dx=2.0)
    ours = solvers.run_sampler(model, noise * sigmas[0], sigmas, forward=fwd2, valid=valid2, guidance=1.0, decode=decode)
    ref = sampling.sample_video(model, noise, sigmas, None, fwd2, valid2, guidance=1.0, schedule="sequential",
                                decode=decode, decoded_size=(16, 16))
    assert torch.allclose(ours, ref, atol=1e-12)
    assert not torch.allclose(ours, solvers.run_sampler(model, noise * sigmas[0], sigmas), atol=1e-6)


def test_dps_operator_sees_each_frames_index():
    """Per-frame operators: frame j's measurement is compared with frame j's prediction, with or without guidance."""
    fwd, bwd, valid = _video(frames=3)
    noise = torch.randn(3, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    keeps = (torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5).double()
    y = keeps * 0.9
    op = lambda v, j: operators.mask(v, keeps[j])
    sigmas = sampling.karras_sigmas(20, 0.002, 80.0)
    for guidance in (0.0, 0.5):
        x, _ = solvers.dps(gaussian_denoiser, noise, sigmas, y, op, zeta=1.0, forward=fwd, valid=valid, guidance=guidance)
        observed = keeps.bool().expand_as(x)
        assert (x[observed] - 0.9).abs().mean() < 0.15 and (x[~observed] - 0.9).abs().mean() > 0.3


def test_video_source_is_the_gp_noise_and_stays_consistent_under_integer_shifts():
    f, c, h, w = 4, 2, 8, 8
    fwd, bwd, valid = _video(f, c, h, w, dx=1.0)
    positions = flow.chain_positions(bwd)  # (F, h, w, 2): frame j's pixel x sits at x - j in frame 0
    features = gp.draw_rff(np.random.default_rng(0), c, max(h, w), num_features=256)
    source, w0 = solvers.video_source(features, positions, dtype=torch.float64)
    dense = gp.rff_eval_dense(features, gp.pixel_to_unit(positions.numpy(), h, w))  # (C, F, h, w)
    assert np.allclose(source(w0).numpy(), dense.transpose(1, 0, 2, 3), atol=1e-12)
    # a measurement of content that does not move with the flow: per-frame sources can fit it, frames disagree
    keep = (torch.rand(1, 1, h, w, generator=torch.Generator().manual_seed(1)) > 0.5).double()
    y = keep * torch.rand(f, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    op = lambda v, j: operators.mask(v, keep)
    sigmas = sampling.karras_sigmas(6, 0.002, 80.0)
    x, hist = solvers.dflow(gaussian_denoiser, w0, sigmas, y, op, source=source, iterations=30, optimizer="adam", lr=0.1)
    assert hist["z"].shape == (c, 256) and hist["data"][-1] < 0.5 * hist["data"][0]
    z = source(hist["z"])
    # frame j's source at x equals frame j-1's at x - 1 to float precision: consistent by construction
    assert (z[1:, ..., 1:] - z[:-1, ..., :-1]).abs().max() < 1e-12
    assert (x[1:, ..., 1:] - x[:-1, ..., :-1]).abs().max() < 1e-12  # and so are the (pointwise-prior) outputs
    x_frame, hist_frame = solvers.dflow(gaussian_denoiser, source(w0), sigmas, y, op, iterations=30, optimizer="adam", lr=0.1)
    assert (hist_frame["z"][1:, ..., 1:] - hist_frame["z"][:-1, ..., :-1]).abs().max() > 0.1


def test_bad_inputs_raise_clear_errors():
    keep, y, *_, noise, op = _masked_problem(2)
    sigmas = sampling.karras_sigmas(4, 0.002, 80.0)
    with pytest.raises(ValueError, match="forward flows"):
        solvers.dps(gaussian_denoiser, noise, sigmas, y, op, guidance=1.0)
    with pytest.raises(ValueError, match="one row per frame"):
        solvers.dps(gaussian_denoiser, noise, sigmas, y[:1], op)
    with pytest.raises(ValueError, match="optimizer"):
        solvers.dflow(gaussian_denoiser, noise, sigmas, y, op, optimizer="sgd")
    with pytest.raises(ValueError, match="levels"):
        solvers.vipaint(gaussian_denoiser, noise, sigmas, y, op, torch.Generator(), levels=(2, 1))


def test_nufft_video_source_and_its_gradient_match_the_dense_one():
    f, c, h, w = 3, 2, 8, 6
    _, bwd, _ = _video(f, c, h, w, dx=0.7)
    positions = flow.chain_positions(bwd)
    features = gp.draw_rff(np.random.default_rng(1), c, max(h, w), num_features=300)
    dense, w0 = solvers.video_source(features, positions, dtype=torch.float64)
    fast, _ = solvers.video_source(features, positions, dtype=torch.float64, backend="nufft")
    target = torch.randn(f, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = []
    for source in (dense, fast):
        weights = w0.clone().requires_grad_(True)
        z = source(weights)
        (z * target).sum().backward()
        grads.append((z.detach(), weights.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-7)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)
    assert grads[0][1].abs().max() > 0.1


# ---- D-Flow's initialisation: ODE inversion, MAP weights of the video source, the blend ----


def test_invert_is_the_backward_euler_ode_in_closed_form_and_undoes_the_sampler():
    """On the toy every Euler step is affine: the inversion is MU + (x0 - MU) prod_k (1 + (s_{k-1} - s_k) s_k /
    (S^2 + s_k^2)) over k = K-1..1, divided by sigma_max; sampling from it comes back to x0."""
    x0 = MU + S * torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigmas = sampling.karras_sigmas(8, 0.002, 80.0)
    gain = 1.0
    for k in range(len(sigmas) - 2, 0, -1):
        gain *= float(1 + (sigmas[k - 1] - sigmas[k]) * sigmas[k] / (S**2 + sigmas[k] ** 2))
    z = solvers.invert(gaussian_denoiser, x0, sigmas)
    assert torch.allclose(z, (MU + (x0 - MU) * gain) / sigmas[0], atol=1e-12)
    fine = sampling.karras_sigmas(400, 0.002, 80.0)
    back = solvers.ode_sample(gaussian_denoiser, solvers.invert(gaussian_denoiser, x0, fine), fine)
    assert (back - x0).abs().max() < 0.02 * (x0 - MU).abs().max()  # Euler's O(1/steps) gap only


def test_video_source_fit_is_the_ridge_solution_and_recovers_representable_fields():
    f, c, h, w = 3, 2, 6, 6
    _, bwd, _ = _video(f, c, h, w, dx=1.0)
    features = gp.draw_rff(np.random.default_rng(3), c, max(h, w), num_features=40)  # J < F*h*w: full column rank
    source, w0 = solvers.video_source(features, flow.chain_positions(bwd), dtype=torch.float64)
    field = source(w0)
    assert torch.allclose(source(source.fit(field, ridge=1e-10)), field, atol=1e-6)  # a GP field is fitted exactly
    target = torch.randn(f, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    b = source.basis.flatten(0, 1).numpy()  # (F*h*w, J)
    rhs = target.transpose(0, 1).flatten(1).numpy().T  # (F*h*w, C)
    expected = np.linalg.solve(b.T @ b + 0.7 * np.eye(b.shape[1]), b.T @ rhs).T
    assert np.allclose(source.fit(target, ridge=0.7).numpy(), expected, atol=1e-10)
    with pytest.raises(ValueError, match="dense"):
        solvers.video_source(features, flow.chain_positions(bwd), backend="nufft")[0].fit(target)


def test_dflow_start_blends_and_keeps_video_sources_consistent_under_integer_shifts():
    f, c, h, w = 4, 2, 8, 8
    _, bwd, _ = _video(f, c, h, w, dx=1.0)
    features = gp.draw_rff(np.random.default_rng(0), c, max(h, w), num_features=256)
    source, w0 = solvers.video_source(features, flow.chain_positions(bwd), dtype=torch.float64)
    latents = MU + S * torch.randn(f, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigmas = sampling.karras_sigmas(6, 0.002, 80.0)
    assert solvers.dflow_start(gaussian_denoiser, latents, sigmas, w0, 0.0, source) is w0  # alpha 0: the draw itself
    start = solvers.dflow_start(gaussian_denoiser, latents, sigmas, w0, 0.9, source)  # (C, J) weights
    inverted = solvers.invert(gaussian_denoiser, latents, sigmas)
    assert torch.allclose(start, math.sqrt(0.9) * source.fit(inverted) + math.sqrt(0.1) * w0, atol=1e-12)
    z = source(start)
    assert (z[1:, ..., 1:] - z[:-1, ..., :-1]).abs().max() < 1e-12  # still one GP at shifted positions
    noise = torch.randn(f, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    frame = solvers.dflow_start(gaussian_denoiser, latents, sigmas, noise, 1.0)
    assert torch.allclose(frame, inverted)  # alpha 1: the inversion itself
    a, b = torch.randn(2, 20000, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert solvers.blend_source(a, b, 0.3).var().item() == pytest.approx(1.0, abs=0.03)
    with pytest.raises(ValueError, match="alpha"):
        solvers.blend_source(a, b, 1.5)


# ---- video-level D-Flow: temporal coupling along the flow, residual sources around the warped GP field ----


def test_temporal_coupling_is_zero_along_the_flow_and_pulls_frames_together():
    f, c, h, w = 4, 2, 8, 8
    fwd, _, valid = _video(f, c, h, w, dx=1.0)  # frame t's pixel x + 1 shows what frame t-1 shows at x
    base = torch.randn(c, h, w + f, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    clip = torch.stack([base[..., f - t : f - t + w] for t in range(f)])  # content moving +1 px per frame
    assert float(solvers.temporal_coupling(clip, fwd, valid)) < 1e-20
    assert float(solvers.temporal_coupling(clip, torch.zeros_like(fwd), valid)) > 1.0  # the wrong flow: it disagrees
    # two frames that disagree: a gradient step on the coupling moves both towards each other
    pair = torch.randn(2, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    still = torch.zeros(1, h, w, 2, dtype=torch.float64)
    loss = solvers.temporal_coupling(pair, still)
    (grad,) = torch.autograd.grad(loss, pair)
    assert torch.allclose(grad[0], -grad[1]) and loss.item() == pytest.approx(float((pair[1] - pair[0]).pow(2).sum()))
    moved = (pair - 0.25 * grad).detach()
    assert torch.allclose(moved[0], moved[1])  # step 1/4 of the gradient 2 (a - b) meets in the middle
    with pytest.raises(ValueError, match="forward"):
        solvers.temporal_coupling(pair, torch.zeros(2, h, w, 2, dtype=torch.float64))


def _residual_source(f: int, c: int, h: int, w: int, seed: int = 0, features: int = 64, bwd=None):
    """(field, its weights w0, ResidualSource) of one GP draw over a clip panning 1 px per frame (or `bwd`)."""
    if bwd is None:
        _, bwd, _ = _video(f, c, h, w, dx=1.0)
    rff = gp.draw_rff(np.random.default_rng(seed), c, max(h, w), num_features=features)
    field, w0 = solvers.video_source(rff, flow.chain_positions(bwd), dtype=torch.float64)
    return field, w0, solvers.ResidualSource(field, w0)


def test_residual_source_starts_at_the_given_noise_around_a_fixed_field():
    f, c, h, w = 3, 2, 8, 8
    field, w0, source = _residual_source(f, c, h, w)
    noise = torch.randn(f, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    delta = source.start(noise)
    assert delta.shape == (f, c, h, w) and torch.allclose(delta, noise - field(w0))
    assert torch.allclose(source(delta), noise, atol=1e-12)
    assert torch.equal(source(torch.zeros_like(delta)), field(w0))  # no residual: the consistent field itself
    d = delta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(source(d).pow(2).sum(), d)
    assert torch.allclose(g, 2 * source(delta))  # differentiable in the residuals only: the field is a constant
    with pytest.raises(ValueError, match="noise"):
        source.start(noise[:2])


def test_video_dflow_with_no_video_terms_is_per_frame_dflow():
    """z = field + delta, delta optimised with no penalty: Adam's iterates are those of per-frame D-Flow exactly."""
    f, c, h, w = 3, 2, 8, 8
    *_, source = _residual_source(f, c, h, w)
    keep = (torch.rand(1, 1, h, w, generator=torch.Generator().manual_seed(1)) > 0.5).double()
    y = keep * torch.rand(f, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    op = lambda v, j: operators.mask(v, keep)
    sigmas = sampling.karras_sigmas(6, 0.002, 80.0)
    noise = torch.randn(f, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    kw = dict(iterations=8, optimizer="adam", lr=0.1)
    x_frame, h_frame = solvers.dflow(gaussian_denoiser, noise, sigmas, y, op, **kw)
    x_video, h_video = solvers.dflow(gaussian_denoiser, source.start(noise), sigmas, y, op, source=source,
                                     penalty=solvers.video_objective(), **kw)
    assert torch.allclose(x_frame, x_video, atol=1e-10)
    assert h_frame["data"] == pytest.approx(h_video["data"], rel=1e-9)


def test_video_objective_without_terms_is_per_frame_dflow_and_checks_its_weights():
    keep, y, *_, noise, op = _masked_problem(3, c=2)
    sigmas = sampling.karras_sigmas(6, 0.002, 80.0)
    kw = dict(iterations=5, optimizer="adam", lr=0.1)
    plain, hist = solvers.dflow(gaussian_denoiser, noise, sigmas, y, op, **kw)
    same, hist_same = solvers.dflow(gaussian_denoiser, noise, sigmas, y, op, penalty=solvers.video_objective(), **kw)
    assert torch.equal(plain, same) and hist["loss"] == hist_same["loss"] and hist_same["penalty"] == [0.0] * 5
    for bad, match in ((dict(coupling=-1.0), "coupling"), (dict(coupling=1.0), "forward flows"),
                       (dict(residual=1.0), "ResidualSource"), (dict(residual=math.inf), "residual"),
                       (dict(reg="l1", reg_weight=1.0), "regularizer")):
        with pytest.raises(ValueError, match=match):
            solvers.video_objective(**bad)


def test_video_dflow_shares_what_the_flow_says_is_shared():
    """Content moving 1 px per frame, each frame measured with its own noise: per-frame D-Flow fits every frame's
    noise; the coupled objective makes the outputs agree along the flow and, averaging the noise, lands closer to
    the truth; a large residual weight keeps the sources on the consistent GP field."""
    f, c, h, w = 4, 1, 8, 8
    fwd, bwd, valid = _video(f, c, h, w, dx=1.0)
    base = MU + S * torch.randn(c, h, w + f, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    truth = torch.stack([base[..., f - t : f - t + w] for t in range(f)])  # (F, C, h, w)
    y = truth + 0.2 * torch.randn(truth.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    op = lambda v, j: v
    sigmas = sampling.karras_sigmas(6, 0.002, 80.0)
    *_, source = _residual_source(f, c, h, w, seed=2, features=128, bwd=bwd)
    kw = dict(iterations=60, optimizer="adam", lr=0.1)
    noise = torch.randn(truth.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))  # one start
    x_frame, _ = solvers.dflow(gaussian_denoiser, noise, sigmas, y, op, **kw)
    x_video, hist = solvers.dflow(gaussian_denoiser, source.start(noise), sigmas, y, op, source=source,
                                  penalty=solvers.video_objective(3.0, fwd, valid), **kw)
    coupled = [float(solvers.temporal_coupling(x, fwd, valid)) for x in (x_frame, x_video)]
    assert coupled[1] < 0.2 * coupled[0]
    assert float((x_video - truth).pow(2).mean()) < 0.8 * float((x_frame - truth).pow(2).mean())
    assert hist["penalty"][-1] < hist["penalty"][0]
    tied = dict(source=source, penalty=solvers.video_objective(residual=1e4, source=source), iterations=10,
                optimizer="lbfgs", lr=1.0)
    _, hist_tied = solvers.dflow(gaussian_denoiser, source.start(noise), sigmas, y, op, **tied)
    z = source(hist_tied["z"])  # the residuals are pulled to ~0: the sources become the one field moving with the content
    assert hist_tied["penalty"][-1] < 1e-2 * hist_tied["penalty"][0]
    assert (z[1:, ..., 1:] - z[:-1, ..., :-1]).abs().max() < 0.1 * (noise[1:, ..., 1:] - noise[:-1, ..., :-1]).abs().max()
