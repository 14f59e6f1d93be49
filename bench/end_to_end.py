"""End to end: the demo configuration (embedded clip, 8x SR benchmark, warped-diffusion, 50 steps, inline sampler)
on a fresh temporary work root, stage by stage; then the same run again, served from the artifact cache.

python -m bench.end_to_end --json [--steps 50] [--frames N]
"""

from __future__ import annotations

import os
import tempfile
import time

from bench._util import emit, parser


def run(steps: int | None = None, frames: int | None = None, method: str | None = None) -> dict:
    """steps / method: None = RestoreSettings' defaults (the demo's)."""
    import torch

    from flows.config import RestoreConfig, RestoreSettings

    steps = steps or RestoreSettings.model_fields["steps"].default
    method = method or RestoreSettings.model_fields["method"].default
    from flows.restore_video import ensure_sample_clip, restore

    clip = ensure_sample_clip()
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        old_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "RESTORE_VIDEO_EXPERIMENT")}
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # sqlite under the temporary work root: nothing shared is touched
        os.environ["RESTORE_VIDEO_EXPERIMENT"] = "bench-end-to-end"
        try:
            cfg = RestoreConfig(input=clip, mode="benchmark", method=method, steps=steps,
                                frames=f"0:{frames}" if frames else None, executor="inline",
                                work_root=f"{tmp}/work", out=f"{tmp}/out")
            start = time.perf_counter()
            first = restore(cfg)
            first_s = time.perf_counter() - start
            start = time.perf_counter()
            second = restore(cfg)
            rerun_s = time.perf_counter() - start
        finally:
            for k, v in old_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    n = first["frames"]
    sample_s = first["timings_s"].get("sample", 0.0)
    return {
        "clip": os.path.basename(clip),
        "frames": n,
        "steps": steps,
        "method": method,
        "model": first["model"],
        "stage_s": first["timings_s"],
        "first_run_s": round(first_s, 2),
        "sample_ms_per_frame_step": round(1000 * sample_s / max(n * steps, 1), 2),
        "rerun_s": round(rerun_s, 2),
        "rerun_all_cached": all(second["cached"].values()),
        "rerun_speedup": round(first_s / max(rerun_s, 1e-9), 1),
        "warping_error_pixel_first": round(first["warping_error"]["pixel_first"], 6),
        "psnr": round(first.get("psnr", float("nan")), 3),
        "torch_threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: RestoreSettings' default)")
    p.add_argument("--frames", type=int, default=None)
    args = p.parse_args()
    emit(run(steps=args.steps, frames=args.frames), args.json)
