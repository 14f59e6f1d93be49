"""Forward time of every shipped denoiser at a 32x32 latent (256x256 frames), batch 1 and 16, on the CPU.

    python -m bench.models --json      # median of several runs, torch threads = 2; target <= 20 ms at batch 1
"""

from __future__ import annotations

import json

import torch

from bench._util import machine, parser, timeit


def main(argv=None) -> dict:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from storage.models import list_models, load_model

    out = {"machine": machine(), "latent": [32, 32], "target_ms_batch1": 20.0, "models": {}}
    for name, info in list_models().items():
        if info["task"] == "vae":
            continue
        m = load_model(name)
        res = {}
        for b in (1, 16):
            x = torch.randn(b, m.latent_channels, 32, 32)
            cond = m.condition(torch.rand(b, 3, 256, 256), torch.zeros(b, 1, 256, 256) if m.task == "inpaint" else None)
            sigma = torch.full((b,), 1.0)
            with torch.no_grad():
                res[f"forward_ms_batch{b}"] = round(1000 * timeit(lambda: m.denoise(x, sigma, cond), repeat=args.repeat if b == 1 else 3), 2)
        res["params"] = info["params"]
        res["meets_target"] = res["forward_ms_batch1"] <= 20.0
        out["models"][name] = res
    print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out["models"].items()))  # one line
    return out


if __name__ == "__main__":
    main()
