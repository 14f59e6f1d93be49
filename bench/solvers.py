"""Zero-shot solvers with the shipped unconditional prior (prior-gp: PCA latent f=8, 32 channels, 3.8M-parameter
UNet): seconds per frame and peak memory per solver for deblurring 256x256 frames (the deblur task's 9x9 Gaussian
through the linear decoder), each solver in its own process so that its peak RSS is its own, next to
flows.preflight's estimate of the same run (the refusal threshold must not be below what a run really needs).

python -m bench.solvers --json [--frames 4] [--steps 10] [--iterations 3] [--threads 2]
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import time

from bench._util import emit, parser

SOLVERS = ("dps", "dps_guided", "dflow_frame", "dflow_video", "vipaint")
SIZE = 256


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize()


def _one(name: str, frames: int, steps: int, iterations: int, threads: int, queue) -> None:
    """Build the problem, run one solver, put (seconds, peak bytes above the loaded model, residual, threads)."""
    import numpy as np
    import torch

    from ops import flow, gp, noise_warp, operators, sampling, solvers
    from storage.models import load_model
    from tasks.degrade import deblur_kernel

    torch.set_num_threads(threads)
    model = load_model("prior-gp")
    for p in model.parameters():
        p.requires_grad_(False)
    channels, factor = model.latent_channels, model.factor
    h = w = SIZE // factor
    fwd, bwd = flow.synthetic_flows(h, w, frames, flow.translation_matrix(0.5, 0.25))
    fwd, bwd = fwd.float(), bwd.float()
    valid = flow.occlusion_mask(fwd, bwd)
    noise = noise_warp.warp_noise("gp", np.random.default_rng(0), (frames, channels, h, w), backward=bwd)
    kernel = deblur_kernel()
    truth = torch.rand(frames, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    y = operators.deblur(truth, kernel, 0.01, torch.Generator().manual_seed(2))  # (F, 3, 256, 256)
    op = lambda x, j: operators.blur(model._decode_linear(x), kernel)
    den = lambda x, s, c=None: model.denoise(x, s)
    sigmas = sampling.karras_sigmas(steps, float(model.sigma_min), float(model.sigma_max))
    adam = dict(iterations=iterations, **solvers.DFLOW_DEFAULTS)
    base = _rss_bytes()
    start = time.perf_counter()
    with torch.enable_grad():
        if name in ("dps", "dps_guided"):
            guided = dict(forward=fwd, valid=valid, guidance=1.0) if name == "dps_guided" else {}
            x, _ = solvers.dps(den, noise, sigmas, y, op, zeta=1.0, **guided)
        elif name == "dflow_frame":
            x, _ = solvers.dflow(den, noise, sigmas, y, op, **adam)
        elif name == "dflow_video":  # as tasks.sample runs it: residuals around the GP field, pixel coupling
            features = gp.draw_rff(np.random.default_rng(0), channels, max(h, w))
            field, w0 = solvers.video_source(features, flow.chain_positions(bwd.double()))
            source = solvers.ResidualSource(field, w0)
            pixel_fwd, pixel_bwd = flow.synthetic_flows(SIZE, SIZE, frames, flow.translation_matrix(0.5 * factor, 0.25 * factor))
            pixel_fwd = pixel_fwd.float()
            penalty = solvers.video_objective(
                solvers.VIDEO_DEFAULTS["coupling"], pixel_fwd, flow.occlusion_mask(pixel_fwd, pixel_bwd.float()),
                model._decode_linear, source, solvers.VIDEO_DEFAULTS["residual"], "chi", solvers.VIDEO_DEFAULTS["source_reg"])
            x, _ = solvers.dflow(den, source.start(noise), sigmas, y, op, source=source, penalty=penalty, **adam)
        else:
            x, _ = solvers.vipaint(den, noise, sigmas, y, op, torch.Generator().manual_seed(2), iterations=iterations)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB -> bytes, high-water mark
    residual = float((y - op(x, None)).flatten(1).norm(dim=1).mean())
    queue.put((seconds, max(peak - base, 0), residual, torch.get_num_threads()))


def predicted(name: str, frames: int, steps: int) -> int:
    """flows.preflight's solver graph for the same run, above BASE_BYTES and the resident frames (bytes)."""
    from flows import preflight as pf
    from ops.gp import DEFAULT_FEATURES

    spec = pf.model_spec("prior-gp")
    lat = SIZE // spec.factor
    solver = name.split("_")[0]
    features = DEFAULT_FEATURES if name == "dflow_video" else 0
    total = pf.solver_peak_bytes(spec, solver, SIZE * SIZE, lat, lat, frames, steps, name == "dps_guided", features)
    return total - pf.BASE_BYTES - frames * pf.FRAME_BYTES_PER_PX * SIZE * SIZE


def run(frames: int = 4, steps: int = 10, iterations: int = 3, threads: int = 2) -> dict:
    ctx = mp.get_context("spawn")
    out = {"frames": frames, "size": [SIZE, SIZE], "model": "prior-gp", "latent": [32, SIZE // 8, SIZE // 8],
           "steps": steps, "iterations": iterations, "task": "deblur (9x9 Gaussian, std 2, noise 0.01)"}
    for name in SOLVERS:
        queue = ctx.Queue()
        proc = ctx.Process(target=_one, args=(name, frames, steps, iterations, threads, queue))
        proc.start()
        seconds, peak, residual, used = queue.get()
        proc.join()
        out[name] = {"s_per_frame": round(seconds / frames, 2), "peak_mb": round(peak / 2**20, 1),
                     "preflight_mb": round(predicted(name, frames, steps) / 2**20, 1), "residual": round(residual, 3)}
        out["torch_threads"] = used
    return out


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--iterations", type=int, default=3, help="D-Flow optimiser iterations and VIPaint fitting iterations")
    p.add_argument("--threads", type=int, default=2, help="torch threads per solver process")
    args = p.parse_args()
    emit(run(frames=args.frames, steps=args.steps, iterations=args.iterations, threads=args.threads), args.json)
