"""Zero-shot solvers (DPS, D-Flow per frame and per video, VIPaint): seconds per frame and peak memory for x4
super-resolution of 256x256 frames through a linear f=8 decoder, with a ~1M-parameter UNet prior (random weights:
cost does not depend on training), each solver in its own process so that its peak RSS is its own.

python -m bench.solvers --json [--frames 4] [--steps 10] [--iterations 3]
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import time

from bench._util import emit, parser

SOLVERS = ("dps", "dps_guided", "dflow_frame", "dflow_video", "vipaint")


def _rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _one(name: str, frames: int, steps: int, iterations: int, queue) -> None:
    """Build the problem, run one solver, put (seconds, peak MiB above the pre-solve RSS, final residual)."""
    import numpy as np
    import torch

    from bench.sampling import TinyEDM
    from ops import flow, gp, noise_warp, operators, sampling, solvers

    size, channels, factor, sr = 256, 4, 8, 4
    h = w = size // factor
    model = TinyEDM(channels)
    for p in model.parameters():
        p.requires_grad_(False)
    decoder = torch.nn.ConvTranspose2d(channels, 3, factor, stride=factor, bias=False)  # linear f=8, like the PCA latent
    torch.nn.init.normal_(decoder.weight, std=0.1, generator=torch.Generator().manual_seed(0))
    decoder.requires_grad_(False)
    fwd, bwd = flow.synthetic_flows(h, w, frames, flow.translation_matrix(0.5, 0.25))
    fwd, bwd = fwd.float(), bwd.float()
    valid = flow.occlusion_mask(fwd, bwd)
    noise = noise_warp.warp_noise("gp", np.random.default_rng(0), (frames, channels, h, w), backward=bwd)
    cond = torch.zeros(frames, channels, h, w)  # the tiny UNet takes a condition; zeros = unconditional
    truth = torch.rand(frames, 3, size, size, generator=torch.Generator().manual_seed(1))
    y = operators.downsample(truth, sr)  # (F, 3, 64, 64)
    op = lambda x, j: operators.downsample(decoder(x), sr)
    sigmas = sampling.karras_sigmas(steps, 0.002, 80.0)
    common = dict(cond=cond)
    base = _rss_mb()
    start = time.perf_counter()
    if name in ("dps", "dps_guided"):
        guided = dict(forward=fwd, valid=valid, guidance=1.0) if name == "dps_guided" else {}
        x, hist = solvers.dps(model, noise, sigmas, y, op, zeta=1.0, **common, **guided)
    elif name == "dflow_frame":
        x, hist = solvers.dflow(model, noise, sigmas, y, op, iterations=iterations, optimizer="adam", lr=0.05, **common)
    elif name == "dflow_video":
        features = gp.draw_rff(np.random.default_rng(0), channels, max(h, w))
        source, w0 = solvers.video_source(features, flow.chain_positions(bwd.double()), backend="nufft")
        x, hist = solvers.dflow(model, w0, sigmas, y, op, source=source, iterations=iterations, optimizer="adam", lr=0.05,
                                **common)
    else:
        x, hist = solvers.vipaint(model, noise, sigmas, y, op, torch.Generator().manual_seed(2), iterations=iterations,
                                  **common)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB, high-water mark of the process
    residual = float((y - op(x, None)).flatten(1).norm(dim=1).mean())
    queue.put((seconds, max(peak - base, 0.0), residual, torch.get_num_threads()))


def run(frames: int = 4, steps: int = 10, iterations: int = 3) -> dict:
    ctx = mp.get_context("spawn")
    out = {"frames": frames, "size": [256, 256], "latent": [4, 32, 32], "steps": steps, "iterations": iterations,
           "task": "sr4 through a linear f=8 decoder"}
    for name in SOLVERS:
        queue = ctx.Queue()
        proc = ctx.Process(target=_one, args=(name, frames, steps, iterations, queue))
        proc.start()
        seconds, peak, residual, threads = queue.get()
        proc.join()
        out[name] = {"s_per_frame": round(seconds / frames, 3), "peak_mb": round(peak, 1), "residual": round(residual, 3)}
        out["torch_threads"] = threads
    return out


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--iterations", type=int, default=3, help="D-Flow optimiser iterations and VIPaint fitting iterations")
    args = p.parse_args()
    emit(run(frames=args.frames, steps=args.steps, iterations=args.iterations), args.json)
