"""Zero-shot inverse-problem solvers with one unconditional prior: DPS, D-Flow / DMPlug, VIPaint (simplified).

Conventions (k-diffusion style, EDM/Karras parameterisation, see ops.sampling):

- denoiser D(x, sigma, cond) -> x0_hat, x (B, C, h, w), sigma (B,), frames treated independently.
- noise: the unit-variance source (F, C, h, w) of any noise-warping method (ops.noise_warp); x_T = sigmas[0] * noise.
- operator(x0_hat, frames) -> measurement (B, ...): the forward model A applied to a batch of predictions whose
  frame indices are `frames` (B,) long, so that per-frame masks or kernels can be looked up; y (F, ...) holds the
  measurements. For a latent prior A includes the decoder (e.g. lambda x, j: ops.operators.downsample(decode(x), 4)).
- guidance = lambda of the equivariance self-guidance (paper Algorithm 1): > 0 needs the forward flows (F-1, h, w, 2)
  and masks (F-1, h, w) of ops.sampling.sample_video (or pixel flows with `decode`); 0 runs all frames as one batch.
  Every step is `ops.sampling.guided_update`; a solver's measurement step is computed on the same denoiser call.
- Every solver returns (clean latents (F, C, h, w), history dict of per-step or per-iteration losses).

Solvers:

- `dps` (Chung et al. 2023, Alg. 1): x_next = Euler(x) - zeta_t * grad_x ||y - A(D(x))||. DPS's VP step
  zeta * grad_{x_vp} written in our VE coordinates (x_ve = x_vp / sqrt(abar), 1/abar = 1 + sigma^2) is
  zeta * (1 + sigma^2) * grad_{x_ve}: that is the step used, so `zeta` keeps the paper's meaning.
- `dflow` (Ben-Hamu et al. 2024; DMPlug, Wang et al. 2024): x = R(z), the deterministic Euler sampler from source z,
  differentiated end to end; minimise ||y - A(R(z))||^2 + reg_weight * reg(z) with L-BFGS or Adam. reg = 'chi' is
  D-Flow's negative log-likelihood of ||z|| under the chi distribution, 'gaussian' is ||z||^2 / 2 (MAP).
  DMPlug's early stopping (ES-WMV) stops when the running variance of the iterates over a window has not
  decreased for `patience` iterations and returns the iterate where it was lowest. `source` maps the optimised
  parameters to the noise: identity (per-frame sources), `video_source` (the RFF weights of one GP shared by
  all frames, evaluated at their flow-chained positions: the sources stay consistent by construction) or
  `ResidualSource` (that field at fixed weights plus a residual per frame).
  Video-level D-Flow (`video_objective`, the pipeline's `--source video`) optimises all frames jointly:
  sum_t ||y_t - A(x_t)||^2 + gamma sum_t ||M_t (x_t o (id + G_t) - x_{t-1})||^2 + beta/2 sum_t ||delta_t||^2
  + w_chi sum_t chi(z_t), x = R(z), z_t = source(w)_t + delta_t: the data term of D-Flow; a temporal coupling
  along the flow G_t (t-1 -> t, masks M_t; the self-guidance's and the warping error's map, Warped Diffusion,
  Daras et al. 2024), the video prior the per-frame objective lacks; a pull of every source towards the warped GP
  field that is consistent by construction, which a frame leaves only where its measurement pays for it; and
  D-Flow's chi prior, so the sources stay plausible noise. Optimising the shared GP weights alone (the first
  `--source video`) cannot fit every frame under sub-latent-pixel motion (EXPERIMENTS.md, zero-shot): hence a
  source per frame, the field fixed at the MAP fit of the start. The defaults (VIDEO_DEFAULTS) use the coupling
  alone: on the tuning clip the residual and chi terms cost PSNR.
  Self-guidance is not differentiated through (its own gradient would need second-order autograd): the
  optimisation runs the unguided R, and the final sample from the optimised source runs with guidance.
  The start (`dflow_start`, D-Flow Sec. 4): R^-1 of the encoded back-projection of y (`invert`, the ODE run
  backwards), blended with the prior draw (`blend_source`); a video source starts from the MAP GP weights of that
  inversion (`VideoSource.fit`), so it stays consistent by construction.
- `vipaint` (Agarwal et al. 2024), simplified: Gaussian posteriors over K noise levels of our schedule
  (sigmas[levels]), a top level q(x_{s1}) = N(m_1, diag v_1) against the prior N(0, (s1^2 + sigma_data^2) I),
  and transitions q(x_{s_i} | x_{s_{i-1}}) = N(mu_p + m_i, diag v_i) where N(mu_p, v_p) is the prior's ancestral
  step (mu_p = x0 + (s_i/s_{i-1})^2 (x - x0), v_p = s_i^2 (1 - (s_i/s_{i-1})^2), x0 = D(x, s_{i-1})); fitted by
  minimising the negative ELBO ||y - A(D(x_{sK}))||^2 / (2 gamma^2) + sum_i KL_i with reparameterised samples
  and Adam, then a draw from q and DPS from s_K to the end. The paper's q means are free per level too; its
  schedule-specific times are replaced by indices into our schedule, and the KL terms are the closed-form
  Gaussian ones given the sampled parent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import gp
from . import sampling
from ._checks import check_choice, check_finite, check_positive, check_shape

Measurement = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SOLVERS = ("dps", "dflow", "dmplug", "vipaint")
OPTIMIZERS = ("lbfgs", "adam")
REGULARIZERS = ("chi", "gaussian")


# ---- shared pieces ----


def _sigma(value, batch: int, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).expand(batch).clone()  # (B,)


def residual_norms(y: torch.Tensor, operator: Measurement, x0: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """||y_j - A(x0_j)|| per frame of the batch -> (B,)."""
    return (y[frames] - operator(x0, frames)).flatten(1).norm(dim=1)


def _check_common(noise, sigmas, y, guidance, forward, valid, decode):
    sampling.check_sigmas(sigmas)
    if not isinstance(noise, torch.Tensor) or noise.ndim != 4:
        raise ValueError(f"noise must be a (F, C, h, w) tensor, got {getattr(noise, 'shape', type(noise).__name__)}")
    check_finite("noise", noise)
    if not isinstance(y, torch.Tensor) or y.shape[0] != noise.shape[0]:
        raise ValueError(f"y must be a tensor of measurements with one row per frame ({noise.shape[0]}), got "
                         f"{getattr(y, 'shape', type(y).__name__)}")
    if not (isinstance(guidance, (int, float)) and math.isfinite(guidance) and guidance >= 0):
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}")
    if guidance > 0:
        if forward is None:
            raise ValueError("guidance > 0 needs the forward flows (F-1, h, w, 2); pass forward= or set guidance=0")
        f = noise.shape[0]
        h, w = forward.shape[1:3]
        if decode is None:
            check_shape("forward", forward, (f - 1,) + tuple(noise.shape[-2:]) + (2,), "(latent flows j-1 -> j)")
        else:
            check_shape("forward", forward, (f - 1, None, None, 2), "(pixel flows j-1 -> j)")
        if valid is not None:
            check_shape("valid", valid, (f - 1, h, w), "(masks on frame j-1's grid)")


def _step(denoiser, x, sigma, sigma_next, frames, cond, target, forward, valid, has_target, guidance, decode, correction):
    """guided_update plus the solver's correction, computed on the same denoiser call: x_next - correction."""
    stash = []

    def wrapped(x_in, s, c):
        denoised = denoiser(x_in, s, c)
        if correction is not None:
            stash.append(correction(x_in, denoised, s, frames))
        return denoised

    x_next, prediction, _ = sampling.guided_update(wrapped, x, sigma, sigma_next, cond, target, forward, valid, has_target,
                                                guidance, decode)
    return (x_next - stash[0] if stash else x_next), prediction


def run_sampler(
    denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond=None, forward=None, valid=None, guidance: float = 0.0,
    decode=None, correction=None, callback=None,
) -> torch.Tensor:
    """Euler (+ self-guidance, + a solver's correction) from x (F, C, h, w) at sigmas[0] to sigmas[-1].

    guidance 0: all frames in one batch per step. guidance > 0: frame by frame, each step guided towards the
    previous frame's prediction at the same step (ops.sampling's sequential schedule). correction(x_in, denoised,
    sigma, frames) -> (B, C, h, w) is subtracted from every step's result.
    """
    f = x.shape[0]
    sigmas = sigmas.to(x)
    steps = len(sigmas) - 1
    if guidance == 0:
        frames = torch.arange(f, device=x.device)
        h, w = x.shape[-2:]
        fw, ok = x.new_zeros(f, h, w, 2), torch.zeros(f, h, w, dtype=torch.bool, device=x.device)
        none = torch.zeros(f, dtype=torch.bool, device=x.device)
        for k in range(steps):
            x, _ = _step(denoiser, x, _sigma(sigmas[k], f, x), _sigma(sigmas[k + 1], f, x), frames, cond,
                         torch.zeros_like(x), fw, ok, none, 0.0, None, correction)
            if callback is not None:
                callback({"step": k, "total": steps})
        return x.detach()
    h, w = forward.shape[1:3]
    forward = forward.to(x)
    if valid is None:
        valid = torch.ones(f - 1, h, w, dtype=torch.bool, device=x.device)
    channels = 3 if decode is not None else x.shape[1]
    out, previous = [], None
    for j in range(f):
        xj, current = x[j : j + 1], []
        frames = torch.tensor([j], device=x.device)
        fw = forward[j - 1 : j] if j else forward.new_zeros(1, h, w, 2)
        ok = valid[j - 1 : j] if j else torch.zeros(1, h, w, dtype=torch.bool, device=x.device)
        cj = None if cond is None else cond[j : j + 1]
        for k in range(steps):
            target = previous[k] if previous is not None else x.new_zeros(1, channels, h, w)
            xj, prediction = _step(denoiser, xj, _sigma(sigmas[k], 1, x), _sigma(sigmas[k + 1], 1, x), frames, cj, target,
                                   fw, ok, torch.tensor([j > 0], device=x.device), guidance, decode, correction)
            current.append(prediction)
            if callback is not None:
                callback({"frame": j, "step": k, "total": f * steps})
        out.append(xj[0].detach())
        previous = current
    return torch.stack(out)


def ode_sample(denoiser, noise: torch.Tensor, sigmas: torch.Tensor, cond=None, checkpoint: bool = False) -> torch.Tensor:
    """R(z): the deterministic Euler sampler from unit noise (F, C, h, w), differentiable w.r.t. the noise.

    checkpoint=True recomputes each step's activations in the backward pass (memory ~ one step instead of all).
    """
    sigmas = sigmas.to(noise)
    x = noise * sigmas[0]
    for k in range(len(sigmas) - 1):
        def step(x, k=k):
            denoised = denoiser(x, _sigma(sigmas[k], x.shape[0], x), cond)
            return sampling.euler_step(x, denoised, sigmas[k], sigmas[k + 1])
        x = torch.utils.checkpoint.checkpoint(step, x, use_reentrant=False) if checkpoint and x.requires_grad else step(x)
    return x


def invert(denoiser, x0: torch.Tensor, sigmas: torch.Tensor, cond=None) -> torch.Tensor:
    """R^-1: the probability-flow ODE run backwards (explicit Euler, the DDIM-inversion approximation) from clean
    latents x0 (F, C, h, w), taken as the state at sigmas[-2], up to sigmas[0] -> the unit source (F, C, h, w).

    D-Flow's initialisation (Ben-Hamu et al. 2024, Sec. 4): the source whose sample is (close to) a back-projection
    of the measurement, so the optimisation starts near the data instead of at an unrelated prior sample.
    """
    sigmas = sigmas.to(x0)
    x = x0
    with torch.no_grad():
        for k in range(len(sigmas) - 2, 0, -1):  # sigmas[-1] = 0 is not invertible: x0 stands at sigmas[-2]
            x = sampling.euler_step(x, denoiser(x, _sigma(sigmas[k], x.shape[0], x), cond), sigmas[k], sigmas[k - 1])
    return x / sigmas[0]


def blend_source(inverted: torch.Tensor, prior: torch.Tensor, alpha: float) -> torch.Tensor:
    """D-Flow's initial point sqrt(alpha) * inverted + sqrt(1 - alpha) * prior draw (unit variance kept for
    independent inputs): alpha = 1 starts at the inversion, 0 at the prior draw."""
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise ValueError(f"init blend alpha must be in [0, 1], got {alpha!r}")
    return math.sqrt(alpha) * inverted + math.sqrt(1 - alpha) * prior


def dflow_start(denoiser, latents: torch.Tensor, sigmas: torch.Tensor, prior: torch.Tensor, alpha: float,
                source: VideoSource | None = None, cond=None) -> torch.Tensor:
    """D-Flow's initial parameters: blend_source(R^-1(latents), prior, alpha), latents (F, C, h, w) the encoded
    back-projection of the measurement (the blurred / upsampled / masked input). prior: the noise (F, C, h, w), or
    with a video `source` its GP draw's weights (C, J); the inversion then enters through its MAP weights
    (`VideoSource.fit`), so the start stays consistent across frames by construction."""
    if alpha == 0:
        return prior
    inverted = invert(denoiser, latents, sigmas, cond)  # (F, C, h, w)
    return blend_source(source.fit(inverted) if source is not None else inverted, prior, alpha)


# ---- DPS ----


def dps_correction(y: torch.Tensor, operator: Measurement, zeta: float, history: list | None = None):
    """The DPS measurement step zeta * (1 + sigma^2) * grad_x ||y - A(D(x))|| per frame (VP step in VE coordinates)."""
    def correction(x_in, denoised, sigma, frames):
        norms = residual_norms(y, operator, denoised, frames)  # (B,)
        (grad,) = torch.autograd.grad(norms.sum(), x_in, retain_graph=True)
        if history is not None:
            history.append(float(norms.detach().mean()))
        return zeta * (1 + sigma.detach() ** 2).view(-1, *([1] * (x_in.ndim - 1))) * grad
    return correction


def dps(
    denoiser, noise: torch.Tensor, sigmas: torch.Tensor, y: torch.Tensor, operator: Measurement, zeta: float = 1.0,
    cond=None, forward=None, valid=None, guidance: float = 0.0, decode=None, callback=None,
) -> tuple[torch.Tensor, dict]:
    """Diffusion posterior sampling with the Euler sampler -> (latents (F, C, h, w), {'residual': per step})."""
    _check_common(noise, sigmas, y, guidance, forward, valid, decode)
    check_positive("zeta", zeta)
    history: list[float] = []
    x = run_sampler(denoiser, noise * sigmas[0].to(noise), sigmas, cond, forward, valid, guidance, decode,
                    dps_correction(y, operator, zeta, history), callback)
    return x, {"residual": history}


# ---- D-Flow / DMPlug ----


def regularizer(kind: str, z: torch.Tensor) -> torch.Tensor:
    """Prior penalty on the source, summed over rows of z.flatten(1) (frames, or channels of RFF weights).

    'chi': -log chi_d(|z|) up to a constant = |z|^2 / 2 - (d - 1) log |z| (D-Flow), minimal at |z| = sqrt(d - 1);
    'gaussian': |z|^2 / 2, the negative log-density of N(0, I).
    """
    check_choice("regularizer", kind, REGULARIZERS)
    rows = z.flatten(1)
    sq = rows.pow(2).sum(1)
    if kind == "gaussian":
        return sq.sum() / 2
    d = rows.shape[1]
    return (sq / 2 - (d - 1) / 2 * torch.log(sq)).sum()


class _RFFNufft(torch.autograd.Function):
    """z(p) = sqrt(2/J) sum_j w_j cos(<z_j, p> + b_j) by a type-3 NUFFT, and its adjoint for the gradient:
    dL/dw_j = sqrt(2/J) Re(e^{i b_j} sum_p g(p) e^{i <z_j, p>}), another type-3 NUFFT (points -> frequencies)."""

    @staticmethod
    def forward(ctx, weights, features, points, tol):
        ctx.features, ctx.points, ctx.tol = features, points, tol
        feats = gp.RFFeatures(features.freqs, features.phases, weights.detach().cpu().double().numpy(), features.length_scale)
        out = gp.rff_eval_nufft(feats, points, tol=tol)  # (C, N)
        return torch.from_numpy(out).to(weights)

    @staticmethod
    def backward(ctx, grad):
        import finufft

        feats, pts = ctx.features, ctx.points
        g = np.ascontiguousarray(grad.detach().cpu().double().numpy()).astype(np.complex128)  # (C, N)
        vals = finufft.nufft2d3(pts[:, 0].copy(), pts[:, 1].copy(), g, feats.freqs[:, 0].copy(), feats.freqs[:, 1].copy(),
                                eps=ctx.tol, isign=1)  # (C, J)
        dw = math.sqrt(2.0 / feats.num_features) * np.real(np.exp(1j * feats.phases) * vals)
        return torch.from_numpy(dw).to(grad), None, None, None


@dataclass(frozen=True)
class VideoSource:
    """Noise of every frame as one GP's RFF sum at the frames' chained positions: z = basis @ w, linear in w.

    Calling it with weights (C, J) gives the noise (F, C, h, w), differentiable in the weights. Backends: 'dense'
    holds the cos matrix (F, h*w, J) (exact; memory F*h*w*J values, e.g. 8 frames of 32x32 latents with J = 3000:
    98 MB in float32); 'nufft' evaluates it and its adjoint by type-3 NUFFTs (to `tol`, memory O(F*h*w + J)).
    """

    features: gp.RFFeatures
    points: np.ndarray  # (F*h*w, 2) unit-square positions
    shape: tuple[int, int, int, int]
    backend: str = "dense"
    tol: float = 1e-9
    basis: torch.Tensor | None = None  # dense backend: (F, h*w, J)

    def fit(self, noise: torch.Tensor, ridge: float = 1.0) -> torch.Tensor:
        """The weights (C, J) whose field is closest to `noise` (F, C, h, w): argmin |source(w) - noise|^2 +
        ridge |w|^2, the MAP weights under the GP's own N(0, I) prior with unit-variance misfit (dense backend)."""
        if self.basis is None:
            raise ValueError("fitting weights needs the dense basis; build the source with backend='dense'")
        check_shape("noise", noise, self.shape, "(the source's frames, channels, h, w)")
        b = self.basis.double().flatten(0, 1)  # (F*h*w, J)
        rhs = b.T @ noise.detach().to(b).transpose(0, 1).flatten(1).T  # (J, C)
        gram = b.T @ b + ridge * torch.eye(b.shape[1], dtype=b.dtype, device=b.device)
        return torch.linalg.solve(gram, rhs).T.to(device=noise.device, dtype=self.basis.dtype)  # (C, J)

    def __call__(self, weights: torch.Tensor) -> torch.Tensor:
        f, c, h, w = self.shape
        if self.basis is not None:
            return (weights.to(self.basis) @ self.basis.transpose(1, 2)).view(f, c, h, w)  # (F, C, h*w) -> (F, C, h, w)
        field = _RFFNufft.apply(weights, self.features, self.points, self.tol)  # (C, F*h*w)
        return field.view(c, f, h, w).transpose(0, 1)


def video_source(features: gp.RFFeatures, positions: torch.Tensor, dtype=torch.float32, backend: str = "dense",
                 tol: float = 1e-9, device=None) -> tuple[VideoSource, torch.Tensor]:
    """The video-level source of `features` at chained latent positions (F, h, w, 2) -> (source, initial weights (C, J)).

    The initial weights are the draw's own, so source(w0) equals ops.gp.gp_noise_at at those positions. device: where
    the dense basis, the initial weights and so the noise live (None: CPU; the nufft backend always runs on the CPU).
    """
    check_choice("backend", backend, ("dense", "nufft"))
    positions = torch.as_tensor(positions)
    check_shape("positions", positions, (None, None, None, 2), "as (frames, h, w, xy) in latent pixels")
    f, h, w, _ = positions.shape
    points = gp.pixel_to_unit(positions.detach().cpu().double().numpy(), h, w).reshape(-1, 2)  # (F*h*w, 2)
    basis = None
    if backend == "dense":  # built frame by frame: the float64 cos matrix of one frame at a time, `dtype` kept
        freqs, phases = torch.from_numpy(features.freqs).T, torch.from_numpy(features.phases)
        basis = torch.empty(f, h * w, features.num_features, dtype=dtype)  # (F, h*w, J)
        for j, frame in enumerate(torch.from_numpy(points).view(f, h * w, 2)):
            basis[j] = math.sqrt(2.0 / features.num_features) * torch.cos(frame @ freqs + phases)
    if basis is not None and device is not None:
        basis = basis.to(device)
    source = VideoSource(features, points, (f, features.channels, h, w), backend, tol, basis)
    return source, torch.from_numpy(features.weights).to(dtype=dtype, device=device if basis is not None else None)


@dataclass(frozen=True)
class ResidualSource:
    """Every frame's source as the warped GP field plus its own residual: z_t = source(w)_t + delta_t.

    The field's weights w (C, J) are fixed (the MAP fit of D-Flow's start, `VideoSource.fit`); the optimised
    parameters are the residuals delta (F, C, h, w). With the residual penalty of `video_objective`
    (beta / 2 |delta|^2) a frame is free to fit its own measurement but pays for departing from the field that is
    consistent under the flow by construction (Warped Diffusion, Daras et al. 2024); beta = 0 (and no other term)
    is per-frame D-Flow exactly (Ben-Hamu et al. 2024): Adam's iterates do not depend on the constant offset.
    Optimising w as well lets Adam move every frame's source through the shared weights at every step (its steps
    are lr-sized whatever the gradient), which cost ~0.8 dB on the tuning clip.
    """

    field: VideoSource
    weights: torch.Tensor  # (C, J)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.field.shape

    def base(self) -> torch.Tensor:
        """The consistent field source(w) (F, C, h, w)."""
        with torch.no_grad():
            return self.field(self.weights)

    def start(self, noise: torch.Tensor) -> torch.Tensor:
        """The residuals whose source is exactly `noise` (F, C, h, w): delta = noise - source(w)."""
        check_shape("noise", noise, self.shape, "(the source's frames, channels, h, w)")
        return noise.detach() - self.base().to(noise)

    def __call__(self, residual: torch.Tensor) -> torch.Tensor:
        return self.base().to(residual) + residual  # (F, C, h, w)


def temporal_coupling(frames: torch.Tensor, forward: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """sum_{t>=1} sum_{x valid} |frames_t(x + G_t(x)) - frames_{t-1}(x)|^2 -> scalar, differentiable in every frame.

    frames (F, C, H, W); forward (F-1, H, W, 2) the flows t-1 -> t on the frames' grid (the self-guidance's and the
    warping-error metric's convention, ops.sampling.equivariance_error); valid (F-1, H, W) occlusion masks (None: all).
    Zero for a clip that is consistent under the flow; its gradient pulls both frames of a pair towards each other.
    """
    check_shape("forward", forward, (frames.shape[0] - 1,) + tuple(frames.shape[-2:]) + (2,), "(flows t-1 -> t)")
    if valid is None:
        valid = torch.ones(forward.shape[:3], dtype=torch.bool, device=frames.device)
    return sampling.equivariance_error(frames[1:], frames[:-1], forward.to(frames), valid.to(frames.device)).sum()


def video_objective(coupling: float = 0.0, forward: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                    decode: Callable[[torch.Tensor], torch.Tensor] | None = None, source: ResidualSource | None = None,
                    residual: float = 0.0, reg: str | None = None, reg_weight: float = 0.0):
    """The video-level terms of D-Flow over all frames jointly -> penalty(params, noise, x0) for `dflow`:

        coupling * temporal_coupling(decode(x0), forward, valid)     frames agree along the flow (video prior)
      + residual / 2 * |delta|^2                                    sources stay near the shared warped GP field
      + reg_weight * regularizer(reg, noise)                        every frame's source stays plausible noise

    decode: latents -> frames on forward's grid (pixel-space coupling; None: latent space, latent flows). The
    residual term needs `source` (a ResidualSource: params = delta). coupling = residual = reg_weight = 0 is
    per-frame D-Flow's objective.
    """
    for name, value in (("coupling", coupling), ("residual", residual), ("reg_weight", reg_weight)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if coupling and forward is None:
        raise ValueError("coupling > 0 needs the forward flows (F-1, H, W, 2) of the frames it compares")
    if residual and source is None:
        raise ValueError("the residual penalty needs a ResidualSource (params = the per-frame residuals)")
    if reg is not None:
        check_choice("regularizer", reg, REGULARIZERS)

    def penalty(params: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        out = noise.new_zeros(())
        if coupling:
            out = out + coupling * temporal_coupling(decode(x0) if decode is not None else x0, forward, valid)
        if residual:
            out = out + residual / 2 * params.pow(2).sum()
        if reg is not None and reg_weight:
            out = out + reg_weight * regularizer(reg, noise)
        return out

    return penalty


def _window_variance(window: list[torch.Tensor]) -> float:
    stack = torch.stack(window)  # (W, F, C, h, w)
    return float((stack - stack.mean(0)).pow(2).mean())


def dflow(
    denoiser, z: torch.Tensor, sigmas: torch.Tensor, y: torch.Tensor, operator: Measurement,
    source: Callable[[torch.Tensor], torch.Tensor] | None = None, iterations: int = 20, optimizer: str = "lbfgs",
    lr: float = 1.0, reg: str | None = None, reg_weight: float = 0.0, patience: int | None = None, window: int = 5,
    cond=None, forward=None, valid=None, guidance: float = 0.0, decode=None, checkpoint: bool = False, callback=None,
    penalty: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict]:
    """Source-point optimisation: argmin_z ||y - A(R(source(z)))||^2 + reg_weight * reg(z) + penalty(z, source(z),
    R(source(z))), then R from the optimum.

    z: the initial parameters, the noise (F, C, h, w) itself when source is None, RFF weights (C, J) with a
    `video_source`, or the residuals (F, C, h, w) with a `ResidualSource`. penalty: the video-level terms
    (`video_objective`; all frames are optimised jointly, so it may couple them). patience: DMPlug's early stopping
    (None = run all iterations). Returns (latents, {'loss', 'data', 'penalty', 'variance' per iteration,
    'iterations' run, 'best' iteration, 'z' the optimised parameters}).
    """
    noise_of = source if source is not None else (lambda p: p)
    with torch.no_grad():
        noise0 = noise_of(z)
    _check_common(noise0, sigmas, y, guidance, forward, valid, decode)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    if reg is not None:
        check_choice("regularizer", reg, REGULARIZERS)
    if not (isinstance(iterations, int) and iterations >= 1):
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    check_positive("lr", lr)
    if patience is not None and not (isinstance(patience, int) and patience >= 1 and window >= 2):
        raise ValueError(f"early stopping needs patience >= 1 and window >= 2, got patience={patience!r}, window={window!r}")
    frames = torch.arange(noise0.shape[0], device=noise0.device)
    params = z.detach().clone().requires_grad_(True)
    opt = (torch.optim.LBFGS([params], lr=lr, max_iter=1, history_size=10, line_search_fn="strong_wolfe",
                               tolerance_grad=1e-12, tolerance_change=1e-14)
           if optimizer == "lbfgs" else torch.optim.Adam([params], lr=lr))
    last = {}

    def closure():
        opt.zero_grad()
        noise = noise_of(params)
        x0 = ode_sample(denoiser, noise, sigmas, cond, checkpoint)
        data = (y - operator(x0, frames)).pow(2).sum()
        extra = penalty(params, noise, x0) if penalty is not None else data.new_zeros(())
        loss = data + extra + (reg_weight * regularizer(reg, params) if reg is not None and reg_weight else 0.0)
        loss.backward()
        last.update(loss=float(loss.detach()), data=float(data.detach()), penalty=float(extra.detach()), x0=x0.detach())
        return loss

    history = {"loss": [], "data": [], "penalty": [], "variance": []}
    best = (math.inf, 0, params.detach().clone())
    recent: list[torch.Tensor] = []
    it = 0
    for it in range(1, iterations + 1):
        opt.step(closure)
        history["loss"].append(last["loss"])
        history["data"].append(last["data"])
        history["penalty"].append(last["penalty"])
        if callback is not None:
            callback({"iteration": it, "total": iterations, "loss": last["loss"], "data": last["data"]})
        if patience is None:
            continue
        # DMPlug ES-WMV: running variance of the last `window` iterates; stop once it stalls for `patience` iterations.
        recent = (recent + [last["x0"]])[-window:]
        if len(recent) < window:
            continue
        var = _window_variance(recent)
        history["variance"].append(var)
        if var < best[0]:
            best = (var, it, params.detach().clone())
        elif it - best[1] >= patience:
            break
    z_opt = best[2] if patience is not None and best[1] > 0 else params.detach()
    history.update(iterations=it, best=best[1] if patience is not None else it, z=z_opt)
    with torch.no_grad():
        noise = noise_of(z_opt)
    x = run_sampler(denoiser, noise * sigmas[0].to(noise), sigmas, cond, forward, valid, guidance, decode)
    return x, history


# ---- VIPaint (simplified) ----


def default_levels(steps: int) -> tuple[int, ...]:
    """VIPaint's K noise levels as step indices of a `steps`-step schedule: the start, a quarter and half-way."""
    return tuple(sorted({0, steps // 4, steps // 2}))


def _gaussian_kl(mean_offset, log_std, prior_var) -> torch.Tensor:
    """KL(N(mu_p + m, s^2) || N(mu_p, v)) summed over elements, s = exp(log_std)."""
    var = torch.exp(2 * log_std)
    return 0.5 * ((var + mean_offset.pow(2)) / prior_var - 1 - (2 * log_std - math.log(prior_var))).sum()


def vipaint_posterior(
    denoiser, noise: torch.Tensor, sigmas: torch.Tensor, y: torch.Tensor, operator: Measurement,
    generator: torch.Generator, levels: tuple[int, ...] | None = None, iterations: int = 30, lr: float = 0.05,
    noise_level: float = 0.05, sigma_data: float = 0.5, cond=None, callback=None,
):
    """Fit VIPaint's Gaussian hierarchy at sigmas[levels] by its ELBO -> (draw, fresh, levels, history).

    levels: increasing indices into sigmas (default: `default_levels`); q starts as the prior
    and its reparameterisation noise comes from `generator`. noise_level = gamma, the measurement noise std.
    draw(eps) maps K noises like `noise` (F, C, h, w) to a sample at sigmas[levels[-1]] and the summed KL;
    fresh() draws one such noise from `generator`.
    """
    steps = len(sigmas) - 1
    levels = tuple(levels) if levels is not None else default_levels(steps)
    if not levels or any(a >= b for a, b in zip(levels, levels[1:])) or levels[0] < 0 or levels[-1] >= steps:
        raise ValueError(f"levels must be strictly increasing step indices in [0, {steps - 1}], got {levels!r}")
    for name, value in (("noise_level", noise_level), ("sigma_data", sigma_data), ("lr", lr)):
        check_positive(name, value)
    if not (isinstance(iterations, int) and iterations >= 0):
        raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}")
    s = [float(sigmas[i]) for i in levels]
    frames = torch.arange(noise.shape[0], device=noise.device)
    # 1. prior variances: top level N(0, s1^2 + sigma_data^2), transitions the ancestral step's variance.
    prior_vars = [s[0] ** 2 + sigma_data**2] + [b**2 * (1 - (b / a) ** 2) for a, b in zip(s, s[1:])]
    means = [torch.zeros_like(noise, requires_grad=True) for _ in s]  # offsets from the prior means
    log_stds = [torch.full_like(noise, 0.5 * math.log(v), requires_grad=True) for v in prior_vars]
    # 2. likelihood variance: gamma^2 plus Var[x0 | x_sK] of Gaussian data with std sigma_data (PiGDM's
    #    approximation), so the one-step prediction D(x_sK) is not trusted more than it deserves at high noise.
    like_var = noise_level**2 + sigma_data**2 * s[-1] ** 2 / (sigma_data**2 + s[-1] ** 2)

    def fresh():
        return torch.randn(noise.shape, generator=generator, dtype=noise.dtype, device=generator.device).to(noise)

    def draw(eps):
        """x at s_K from q by reparameterisation with eps[i] per level, and the sum of KLs -> ((F, C, h, w), scalar)."""
        x = means[0] + torch.exp(log_stds[0]) * eps[0]
        kl = _gaussian_kl(means[0], log_stds[0], prior_vars[0])
        for i in range(1, len(s)):
            x0 = denoiser(x, _sigma(s[i - 1], x.shape[0], x), cond)
            prior_mean = x0 + (s[i] / s[i - 1]) ** 2 * (x - x0)  # ancestral step s_{i-1} -> s_i given x0
            x = prior_mean + means[i] + torch.exp(log_stds[i]) * eps[i]
            kl = kl + _gaussian_kl(means[i], log_stds[i], prior_vars[i])
        return x, kl

    opt = torch.optim.Adam(means + log_stds, lr=lr)
    history = {"loss": [], "data": [], "kl": []}
    for it in range(iterations):
        opt.zero_grad()
        with torch.enable_grad():
            x, kl = draw([fresh() for _ in s])
            x0 = denoiser(x, _sigma(s[-1], x.shape[0], x), cond)
            data = (y - operator(x0, frames)).pow(2).sum() / (2 * like_var)
            loss = data + kl
            loss.backward()
        opt.step()
        for key, value in (("loss", loss), ("data", data), ("kl", kl)):
            history[key].append(float(value.detach()))
        if callback is not None:
            callback({"iteration": it + 1, "total": iterations, "loss": history["loss"][-1]})
    return draw, fresh, levels, history


def vipaint(
    denoiser, noise: torch.Tensor, sigmas: torch.Tensor, y: torch.Tensor, operator: Measurement,
    generator: torch.Generator, levels: tuple[int, ...] | None = None, iterations: int = 30, lr: float = 0.05,
    noise_level: float = 0.05, sigma_data: float = 0.5, zeta: float = 1.0, level_noise: torch.Tensor | None = None,
    cond=None, forward=None, valid=None, guidance: float = 0.0, decode=None, callback=None,
) -> tuple[torch.Tensor, dict]:
    """Hierarchical Gaussian posteriors at sigmas[levels], fitted by the ELBO (`vipaint_posterior`), then DPS to the end.

    The final draw uses `noise` (F, C, h, w) for the top level and `level_noise` (K-1, F, C, h, w) for the
    transitions (pass warped noise for temporally consistent draws; None draws them from `generator`), so every
    noise-warping method applies. Returns (latents, {'loss', 'data', 'kl' per iteration, 'residual' per DPS step}).
    """
    _check_common(noise, sigmas, y, guidance, forward, valid, decode)
    check_positive("zeta", zeta)
    draw, fresh, levels, history = vipaint_posterior(denoiser, noise, sigmas, y, operator, generator, levels, iterations,
                                                     lr, noise_level, sigma_data, cond, callback)
    if level_noise is not None:
        check_shape("level_noise", level_noise, (len(levels) - 1,) + tuple(noise.shape), "(one noise per transition)")
    with torch.no_grad():
        eps = [noise] + (list(level_noise.to(noise)) if level_noise is not None else [fresh() for _ in levels[1:]])
        x, _ = draw(eps)
    residual: list[float] = []
    x = run_sampler(denoiser, x.detach(), sigmas[levels[-1]:], cond, forward, valid, guidance, decode,
                    dps_correction(y, operator, zeta, residual))
    history["residual"] = residual
    return x, history


# ---- one entry point ----

# D-Flow as the pipeline runs it: Adam instead of the paper's L-BFGS, whose strong-Wolfe line search on the shipped
# prior (prior-gp, coffee deblur, 10 steps) raised the loss 1.5e5 -> 2.2e5 in its first step and stalled there;
# Adam at lr 0.05 lowered it monotonically. INIT_BLEND: the start blend_source(R^-1(back-projection), noise, alpha)
# (D-Flow Sec. 4); measured there after 10 iterations: alpha 1 -> 22.9 dB, 0.5 -> 20.7 dB, 0 (the noise) -> 16.9 dB
# after 15; 0.9 keeps the seed's noise in the start (so seeds and noise methods still differ).
DFLOW_DEFAULTS = {"optimizer": "adam", "lr": 0.05}
INIT_BLEND = 0.9
# --source video (`video_objective` with a ResidualSource, pixel-space coupling): coupling gamma, residual beta and
# the chi regulariser's weight on the sources, picked on the tuning clip (rocket, deblur, 8 frames of 128^2; EXPERIMENTS.md
# zero-shot). gamma 3 against per-frame D-Flow: 10 steps / 15 iterations (seeds 0-2) +0.08 dB, warping error 0.59x;
# the CLI's 50 steps / 20 iterations -0.39 dB, 0.78x (estimated flow; 0.94x exact, seed 0); gamma 10 cost 1.7 dB there. The residual penalty (beta 3) and
# the chi term (0.3) lowered PSNR by a further 1.2 dB at 50 steps (the MAP field is smoother than noise): off.
VIDEO_DEFAULTS = {"coupling": 3.0, "residual": 0.0, "source_reg": 0.0}
# DMPlug = D-Flow's source optimisation with Adam and ES-WMV early stopping (our defaults, not the paper's tuning).
DMPLUG_DEFAULTS = {"optimizer": "adam", "lr": 0.01, "patience": 10, "window": 5}


def solve(name: str, denoiser, noise: torch.Tensor, sigmas: torch.Tensor, y: torch.Tensor, operator: Measurement,
          generator: torch.Generator | None = None, **params) -> tuple[torch.Tensor, dict]:
    """Run solver `name` (one of SOLVERS) with its own keyword parameters -> (latents (F, C, h, w), history).

    For dflow / dmplug `noise` is the initial source parameter (the noise itself, or RFF weights with source=).
    """
    check_choice("solver", name, SOLVERS)
    if name == "dps":
        return dps(denoiser, noise, sigmas, y, operator, **params)
    if name in ("dflow", "dmplug"):
        defaults = DMPLUG_DEFAULTS if name == "dmplug" else DFLOW_DEFAULTS
        return dflow(denoiser, noise, sigmas, y, operator, **{**defaults, **params})
    if generator is None:
        raise ValueError("solver 'vipaint' draws from its posterior: pass generator=torch.Generator().manual_seed(seed)")
    return vipaint(denoiser, noise, sigmas, y, operator, generator, **params)
