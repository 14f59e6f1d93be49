"""GP noise warping: exact NUFFT evaluation vs the dense cos-matrix reference, same draw, same points.

python -m bench.noise_warp --json
"""

from __future__ import annotations

import numpy as np
import torch

from bench._util import emit, parser, timeit
from ops import flow, gp


def run(resolution=128, channels=4, features=3000, frames=16, dense_frames=2, tol=1e-6) -> dict:
    rng = np.random.default_rng(0)
    feats = gp.draw_rff(rng, channels, resolution, features)
    # chained positions of a real-looking motion: slow zoom + rotation + pan
    matrix = torch.tensor(flow.rotation_matrix(resolution, resolution, 0.7), dtype=torch.float64)
    matrix[:, :2] *= 1.01
    matrix[:, 2] += torch.tensor([0.6, -0.3], dtype=torch.float64)
    _, backward = flow.synthetic_flows(resolution, resolution, frames, matrix)
    positions = flow.chain_positions(backward).numpy()  # (F, H, W, 2)
    points = gp.pixel_to_unit(positions, resolution, resolution)
    fast = gp.rff_eval_nufft(feats, points, tol=tol)  # (C, F, H, W)
    nufft_s = timeit(lambda: gp.rff_eval_nufft(feats, points, tol=tol), repeat=5)
    dense = gp.rff_eval_dense(feats, points[:dense_frames])
    dense_s = timeit(lambda: gp.rff_eval_dense(feats, points[:dense_frames]), repeat=2, warmup=0)
    nufft_ms, dense_ms = 1000 * nufft_s / frames, 1000 * dense_s / dense_frames
    return {
        "resolution": [resolution, resolution],
        "channels": channels,
        "features": features,
        "frames": frames,
        "nufft_ms_per_frame": round(nufft_ms, 3),
        "dense_ms_per_frame": round(dense_ms, 3),
        "speedup": round(dense_ms / nufft_ms, 1),
        "max_abs_error": float(np.abs(fast[:, :dense_frames] - dense).max()),
        "tol": tol,
        "torch_threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    emit(run(), args.json)
