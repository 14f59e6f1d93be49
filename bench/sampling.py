"""Sequential vs wavefront-batched guided sampling of a 16-frame video with a ~1M-parameter diffusers UNet.

python -m bench.sampling --json [--steps 50] [--repeat 3]
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bench._util import emit, parser
from ops import flow, noise_warp, sampling


class TinyEDM(torch.nn.Module):
    """EDM-preconditioned diffusers UNet2DModel (random weights: speed does not depend on training)."""

    def __init__(self, channels=4, sigma_data=0.5):
        super().__init__()
        from diffusers import UNet2DModel

        torch.manual_seed(0)
        self.unet = UNet2DModel(
            sample_size=32, in_channels=2 * channels, out_channels=channels, layers_per_block=1,
            block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8,
        ).eval()
        self.sigma_data = sigma_data

    def forward(self, x, sigma, cond):
        s = sigma.view(-1, 1, 1, 1)
        c_skip = self.sigma_data**2 / (s**2 + self.sigma_data**2)
        c_out = s * self.sigma_data / (s**2 + self.sigma_data**2).sqrt()
        c_in = 1 / (s**2 + self.sigma_data**2).sqrt()
        out = self.unet(torch.cat([c_in * x, cond], 1), sigma.log() / 4).sample
        return c_skip * x + c_out * out


def run(frames=16, steps=50, size=32, channels=4, repeat=3) -> dict:
    model = TinyEDM(channels)
    for p in model.parameters():
        p.requires_grad_(False)
    fwd, bwd = flow.synthetic_flows(size, size, frames, flow.translation_matrix(0.5, 0.25))
    fwd, bwd = fwd.float(), bwd.float()
    valid = flow.occlusion_mask(fwd, bwd)
    noise = noise_warp.warp_noise("gp", np.random.default_rng(0), (frames, channels, size, size), backward=bwd)
    cond = torch.randn(frames, channels, size, size, generator=torch.Generator().manual_seed(1))
    sigmas = sampling.karras_sigmas(steps, 0.002, 80.0)
    outputs = {}
    for schedule in ("wavefront", "sequential"):  # warm-up (allocator, oneDNN kernels): neither timing pays it
        sampling.sample_video(model, noise[:3], sampling.karras_sigmas(3, 0.002, 80.0), cond[:3], fwd[:2], valid[:2],
                              guidance=1.0, schedule=schedule)
    runs = {"wavefront": [], "sequential": []}
    for _ in range(repeat):  # interleaved, so drifts in machine speed hit both schedules alike
        for schedule in ("wavefront", "sequential"):
            start = time.perf_counter()
            outputs[schedule] = sampling.sample_video(model, noise, sigmas, cond, fwd, valid, guidance=1.0, schedule=schedule)
            runs[schedule].append(time.perf_counter() - start)
    timings = {k: min(v) for k, v in runs.items()}  # least-disturbed run of each (timeit's advice on noisy machines)
    # cost of one model step at batch 1, with and without the guidance backward pass
    x1, s1, c1 = noise[:1] * 80, torch.full((1,), 10.0), cond[:1]
    has = torch.tensor([True])

    def guided():
        sampling.guided_update(model, x1, s1, s1 / 2, c1, torch.zeros_like(x1), fwd[:1], valid[:1], has, 1.0)

    def unguided():
        with torch.no_grad():
            model(x1, s1, c1)

    from bench._util import timeit

    return {
        "frames": frames,
        "steps": steps,
        "latent": [channels, size, size],
        "params": sum(p.numel() for p in model.parameters()),
        "sequential_s": round(timings["sequential"], 3),
        "wavefront_s": round(timings["wavefront"], 3),
        "speedup": round(timings["sequential"] / timings["wavefront"], 2),
        "repeats": repeat,
        "sequential_runs_s": [round(t, 2) for t in runs["sequential"]],
        "wavefront_runs_s": [round(t, 2) for t in runs["wavefront"]],
        "max_abs_diff": float((outputs["sequential"] - outputs["wavefront"]).abs().max()),
        "guided_step_ms": round(1000 * timeit(guided, repeat=10), 2),
        "unguided_step_ms": round(1000 * timeit(unguided, repeat=10), 2),
        "torch_threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each schedule; the fastest is reported")
    args = p.parse_args()
    emit(run(frames=args.frames, steps=args.steps, repeat=args.repeat), args.json)
