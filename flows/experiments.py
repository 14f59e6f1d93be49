"""The paper's comparisons as MLflow experiments: one parent run per experiment, one nested run per configuration.

    shift-inpaint   (Table 2) a still photo translated by a known whole number of pixels per frame, inpainted with
                    a fixed mask; every method x {GP-trained, white-noise-trained} model; exact flow (`shift:DX,DY`)
    video-sr        (Table 3) 8x super-resolution of a video (default: the embedded clip), estimated flow (DIS),
                    every method
    guidance-sweep  warped-diffusion, lambda in {0, 0.25, 0.5, 1, 2} x steps in {25, 50}, 8x SR

`--seeds N` repeats every configuration with seeds 0..N-1 (mean ± std in `restore-video compare`). Sampling runs
in-process (`executor="inline"`, one model load per process); every stage is cached, so an interrupted
experiment resumes and methods share their flow, encoding and noise artifacts.

Shift-inpaint clip: `skimage.data.coffee()` (a held-out picture of the embedded models, see DESIGN), downscaled
by 2 to 200x300, a 128x128 window moving by SHIFT_PX = 2 px per frame (a quarter of a latent pixel: the
non-integer latent shift is where nearest/bilinear/integral warping differ from the exact GP warp), written
losslessly so the known translation is exact. 128x128 rather than 256x256 keeps the 14-run grid within CPU
minutes; the per-frame cost of sampling scales with the pixel count.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field

from prefect import flow

from flows.config import DEFAULT_WORK_ROOT, METHODS

EXPERIMENTS = ("shift-inpaint", "video-sr", "guidance-sweep")
SHIFT_PX = (2, 0)  # (dx, dy) pixels per frame of the shift-inpaint clip
SHIFT_SIZE = 128
SHIFT_FRAMES = 8
INPAINT_MODELS = ("inpaint-gp", "inpaint-white")
LAMBDAS = (0.0, 0.25, 0.5, 1.0, 2.0)
SWEEP_STEPS = (25, 50)
SWEEP_FRAMES = 8  # guidance-sweep uses the first 8 frames of the clip (10 configurations)
DEFAULT_STEPS = 50


@dataclass
class RunSpec:
    """One configuration of an experiment: its table row, tags, and RestoreConfig fields."""

    row: str
    config: dict
    tags: dict = field(default_factory=dict)


def make_shift_clip(path: str, size: int = SHIFT_SIZE, frames: int = SHIFT_FRAMES, shift=SHIFT_PX, fps: int = 8) -> str:
    """A still photo translated by `shift` = (dx, dy) pixels per frame (content moves by +dx, +dy), lossless."""
    import cv2
    from skimage import data

    from storage.video import write_video

    dx, dy = (int(v) for v in shift)
    img = data.coffee()  # (400, 600, 3) uint8
    img = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)  # (200, 300, 3)
    span_x, span_y = abs(dx) * (frames - 1), abs(dy) * (frames - 1)
    if size + span_x > img.shape[1] or size + span_y > img.shape[0]:
        raise ValueError(f"a {size}px window moving {shift} px/frame for {frames} frames leaves the {img.shape[1]}x{img.shape[0]} photo")
    # window origin of frame j is o_j = o_0 - j*(dx, dy): a fixed scene point p appears at p - o_j = p - o_0 + j*(dx, dy)
    x0 = (img.shape[1] - size - span_x) // 2 + (span_x if dx > 0 else 0)
    y0 = (img.shape[0] - size - span_y) // 2 + (span_y if dy > 0 else 0)
    clip = [img[y0 - j * dy: y0 - j * dy + size, x0 - j * dx: x0 - j * dx + size] for j in range(frames)]
    write_video(path, clip_array(clip), fps, lossless=True)
    return path


def clip_array(frames):
    import numpy as np

    return np.ascontiguousarray(np.stack(frames))  # (F, H, W, 3) uint8


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text)


def experiment_grid(name: str, input: str, frames: int | None = None, steps: int | None = None, seeds: int = 1,
                    work_root: str = DEFAULT_WORK_ROOT, shift=SHIFT_PX) -> list[RunSpec]:
    """Every configuration of experiment `name` on clip `input` (pure: builds dicts, runs nothing)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; expected one of {', '.join(EXPERIMENTS)}")
    if seeds < 1:
        raise ValueError("--seeds must be >= 1")
    out_root = f"{work_root.rstrip('/')}/experiments/{name}"
    frame_range = f"0:{frames}" if frames else None
    base = dict(input=input, mode="benchmark", executor="inline", work_root=work_root, frames=frame_range,
                steps=steps or DEFAULT_STEPS)
    cells: list[tuple[str, dict]] = []
    if name == "shift-inpaint":
        for model in INPAINT_MODELS:
            for method in METHODS:
                row = f"{method}/white" if model.endswith("white") else method
                cells.append((row, dict(task="inpaint", method=method, model=model, flow_backend=f"shift:{shift[0]},{shift[1]}")))
    elif name == "video-sr":
        for method in METHODS:
            cells.append((method, dict(task="sr8", method=method, flow_backend="dis")))
    else:
        if frames is None:
            base["frames"] = f"0:{SWEEP_FRAMES}"
        for n_steps in ((steps,) if steps else SWEEP_STEPS):
            for lam in LAMBDAS:
                cells.append((f"λ={lam:g} steps={n_steps}",
                              dict(task="sr8", method="warped-diffusion", guidance=lam, steps=n_steps, flow_backend="dis")))
    specs = []
    for row, cfg in cells:
        for seed in range(seeds):
            config = {**base, **cfg, "seed": seed, "out": f"{out_root}/{_slug(row)}/seed{seed}"}
            specs.append(RunSpec(row=row, config=config, tags={"restore_video.row": row, "restore_video.experiment": name,
                                                               "seed": seed}))
    return specs


def _restore(cfg, parent_run_id: str) -> dict:
    """flows.restore_video.restore, imported late (its stages import torch, zarr, the models)."""
    from flows.restore_video import restore

    return restore(cfg, parent_run_id=parent_run_id)


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def default_input(name: str, work_root: str, frames: int | None) -> str:
    """The experiment's default clip: the shift clip (made under work_root) or the embedded sample clip."""
    if name == "shift-inpaint":
        n = frames or SHIFT_FRAMES
        path = f"{work_root.rstrip('/')}/experiments/shift-inpaint/coffee_{SHIFT_SIZE}_shift{SHIFT_PX[0]}x{SHIFT_PX[1]}_{n}f.mkv"
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            make_shift_clip(path, frames=n)
        return path
    from flows.restore_video import ensure_sample_clip

    return ensure_sample_clip()


def run_experiment(name: str, input: str | None = None, frames: int | None = None, steps: int | None = None,
                   seeds: int = 1, work_root: str | None = None, log=print) -> dict:
    """Run every configuration of `name` nested under one parent MLflow run, then log compare's table and plots."""
    from mlflow.tracking import MlflowClient

    from flows import compare
    from flows.config import RestoreConfig
    from infra import tracking

    work_root = work_root or DEFAULT_WORK_ROOT
    if name == "shift-inpaint" and input is None and frames is not None and frames < 8:
        log(f"note: shift-inpaint with {frames} frames; the paper's comparison uses >= 8")
    clip = input or default_input(name, work_root, frames)
    specs = experiment_grid(name, clip, frames if (input or name != "shift-inpaint") else None, steps, seeds, work_root)
    configs = [RestoreConfig(**s.config) for s in specs]  # validate the whole grid before any work
    uri = tracking.tracking_uri(work_root)
    t0 = time.perf_counter()
    runs = []
    with _env("RESTORE_VIDEO_EXPERIMENT", name), tracking.start_run(
        name, run_name=f"{name} {time.strftime('%Y-%m-%d %H:%M')}",
        tags={compare.ROLE_TAG: "experiment-parent", "git_commit": tracking.git_commit(), "input": clip}, uri=uri,
    ) as parent:
        tracking.log_config({"experiment": name, "input": clip, "frames": frames, "steps": steps, "seeds": seeds,
                             "configurations": len(specs), "shift_px": list(SHIFT_PX) if name == "shift-inpaint" else None})
        client = MlflowClient(tracking_uri=uri)
        for i, (spec, cfg) in enumerate(zip(specs, configs), 1):
            t = time.perf_counter()
            report = _restore(cfg, parent.info.run_id)
            for k, v in spec.tags.items():
                client.set_tag(report["mlflow_run_id"], k, str(v))
            seconds = time.perf_counter() - t
            we = report["warping_error"]
            log(f"[{i}/{len(specs)}] {spec.row:28s} seed {cfg.seed}  WE pixel first {we['pixel_first']:.5f} prev "
                f"{we['pixel_prev']:.5f}  PSNR {report.get('psnr', float('nan')):.2f}  SSIM {report.get('ssim', float('nan')):.4f}"
                f"  ({seconds:.1f} s{', cached' if all(report['cached'].values()) else ''})")
            runs.append({"row": spec.row, "seed": cfg.seed, "run_id": report["mlflow_run_id"], "seconds": round(seconds, 2)})
        import mlflow

        mlflow.log_metric("experiment_seconds", time.perf_counter() - t0)
        parent_id = parent.info.run_id
    result = compare.compare(name, uri, "md")
    return {"experiment": name, "parent_run_id": parent_id, "tracking_uri": uri, "input": clip,
            "seconds": round(time.perf_counter() - t0, 1), "runs": runs, "rows": result["rows"],
            "table": result["text"], "artifacts": result["artifacts"], "summary": compare.summary_json(result["rows"])}


@flow(name="experiments", log_prints=True)
def experiments(name: str = "video-sr", input: str | None = None, frames: int | None = None, steps: int | None = None,
                seeds: int = 1, work_root: str | None = None) -> dict:
    """Run one of the paper's comparisons (shift-inpaint, video-sr, guidance-sweep) as nested MLflow runs."""
    result = run_experiment(name, input, frames, steps, seeds, work_root)
    print(result["table"])
    return {k: v for k, v in result.items() if k != "rows"}


def experiment_cli(args) -> int:
    """`restore-video experiment NAME [--input URL] [--frames N] [--steps N] [--seeds N] [--work-root DIR] [--json]`."""
    from pydantic import ValidationError

    if args.name not in EXPERIMENTS:
        print(f"error: unknown experiment {args.name!r}; expected one of {', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    try:
        result = run_experiment(args.name, args.input, args.frames, args.steps, args.seeds, args.work_root, log=log)
    except (ValueError, ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({row: {k: v[k] for k in ("warping_error_pixel_first", "warping_error_pixel_prev", "psnr", "ssim")}
                          for row, v in result["summary"].items()}, indent=2))
    else:
        print(result["table"], end="")
        print(f"{args.name}: {len(result['runs'])} runs in {result['seconds']:.0f} s; parent MLflow run "
              f"{result['parent_run_id']} ({result['tracking_uri']}); artifacts {', '.join(result['artifacts'])}")
    return 0
