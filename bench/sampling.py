"""Sequential vs wavefront-batched guided sampling of a 16-frame video with a ~1M-parameter diffusers UNet; guided vs
unguided it/s of the embedded sr8 denoiser and a tiny SD-inpaint-layout UNet at 64x64 and 128x128 latents, fp32 vs fp16.

python -m bench.sampling --json [--device auto|cpu|cuda] [--part schedules,throughput] [--steps 50] [--repeat 3]

The paper reports 1.62 (guided) vs 4.32 (unguided) it/s for SDXL at 128x128 latents on an A100. The throughput rows
give peak GPU memory on CUDA (torch.cuda.max_memory_allocated); on the CPU per-case peak memory is not measured.
"""

from __future__ import annotations

import json
import sys
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


def _tiny_sd_unet(cross_dim: int = 64):
    """A small UNet2DConditionModel in SD inpainting's layout (9 input channels, cross-attention on every level but
    the last, as SD's) with random weights: the code path of a real checkpoint at a fraction of its cost."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=64, in_channels=9, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim,
        attention_head_dim=8, norm_num_groups=16,
    ).eval()


def _models(device: str, dtype: str) -> dict:
    """name -> (denoise(x, sigma, cond), latent channels, cond channels, params)."""
    from ops.denoisers import VPDenoiser
    from storage.models import load_model, torch_dtype_of

    out = {}
    embedded = load_model("sr8-gp", device=device, dtype=dtype)
    embedded.requires_grad_(False)
    c = embedded.latent_channels
    out["embedded-sr8"] = (embedded.denoise, c, c, sum(p.numel() for p in embedded.denoiser.parameters()))
    unet = _tiny_sd_unet().to(device).requires_grad_(False)
    if dtype != "float32":
        unet.to(torch_dtype_of(dtype))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled_linear
    den = VPDenoiser(unet, torch.cumprod(1 - betas, 0)).to(device)
    text = {"hidden": torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(0)).to(device)}
    out["tiny-sd-inpaint"] = (lambda x, s, cond: den(x, s, cond, text=text), 4, 5, sum(p.numel() for p in unet.parameters()))
    return out


def throughput(device: str = "auto", sizes=(64, 128), dtypes=("float32", "float16"), repeat: int = 3,
               budget_s: float = 20.0) -> list[dict]:
    """Guided (forward + backward through the UNet, one guided_update) and unguided (no-grad forward) steps at batch 1."""
    from bench._util import timeit
    from storage.models import resolve_device

    device = resolve_device(device)
    cuda = device.startswith("cuda")
    rows = []
    for dtype in dtypes:
        try:
            models = _models(device, dtype)
        except Exception as exc:  # noqa: BLE001 - report what the machine cannot do
            rows.append({"dtype": dtype, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        for name, (den, c, cc, params) in models.items():
            with torch.no_grad():  # one-time kernel selection / allocator warm-up, not charged to the first case
                den(torch.zeros(1, c, 16, 16, device=device), torch.ones(1, device=device), torch.zeros(1, cc, 16, 16, device=device))
            for size in sizes:
                row = {"model": name, "params": params, "latent": size, "dtype": dtype, "device": device}
                g = torch.Generator().manual_seed(0)
                x = (torch.randn(1, c, size, size, generator=g) * 10).to(device)
                cond = torch.randn(1, cc, size, size, generator=g).to(device)
                flows = torch.zeros(1, size, size, 2, device=device)
                valid = torch.ones(1, size, size, dtype=torch.bool, device=device)
                target = torch.zeros_like(x)
                s1, has = torch.full((1,), 10.0, device=device), torch.tensor([True], device=device)

                def guided():
                    sampling.guided_update(den, x, s1, s1 / 2, cond, target, flows, valid, has, 1.0)
                    if cuda:
                        torch.cuda.synchronize()

                def unguided():
                    with torch.no_grad():
                        den(x, s1, cond)
                    if cuda:
                        torch.cuda.synchronize()

                for label, fn in (("unguided", unguided), ("guided", guided)):
                    try:
                        if cuda:
                            torch.cuda.reset_peak_memory_stats()
                        start = time.perf_counter()
                        fn()  # warm-up; a very slow case (fp16 on a CPU) is timed once and not repeated
                        first = time.perf_counter() - start
                        t = first if first > budget_s / (repeat + 1) else timeit(fn, repeat=repeat, warmup=0)
                        row[f"{label}_it_s"] = round(1 / t, 3)
                        if cuda:
                            row[f"{label}_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
                    except Exception as exc:  # noqa: BLE001
                        row[f"{label}_error"] = f"{type(exc).__name__}: {exc}"[:160]
                if "guided_it_s" in row and "unguided_it_s" in row:
                    row["guided_slowdown"] = round(row["unguided_it_s"] / row["guided_it_s"], 2)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)  # progress: slow cases (fp16 on a CPU) take minutes
    return rows


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each schedule; the fastest is reported")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (the throughput part)")
    p.add_argument("--part", default="schedules,throughput", help="schedules, throughput or both (comma-separated)")
    p.add_argument("--sizes", default="64,128", help="latent sides of the throughput part")
    p.add_argument("--dtypes", default="float32,float16", help="dtypes of the throughput part")
    args = p.parse_args()
    parts = args.part.split(",")
    result = run(frames=args.frames, steps=args.steps, repeat=args.repeat) if "schedules" in parts else {}
    if "throughput" in parts:
        from bench._util import machine

        result["throughput"] = throughput(args.device, tuple(int(v) for v in args.sizes.split(",")),
                                          tuple(args.dtypes.split(",")))
        result["machine"] = machine()
    emit(result, args.json)
