"""The paper's comparisons as MLflow experiments: one parent run per experiment, one nested run per configuration.

    shift-inpaint   (Table 2) a still photo translated by a known whole number of pixels per frame, inpainted with
                    a fixed mask; every method x {GP-trained, white-noise-trained} model; exact flow (`shift:DX,DY`)
    video-sr        (Table 3) 8x super-resolution of a video (default: the embedded clip), estimated flow (DIS),
                    every method, 100 steps, lambda = 2 (what guidance-sweep picks for pixel-space guidance; the
                    paper likewise raises the step count for guidance, App. F.3)
    guidance-sweep  warped-diffusion, lambda in {0, 0.25, 0.5, 1, 2} x steps in {25, 50, 100}, 8x SR

`--seeds N` repeats every configuration with seeds 0..N-1 (mean ± std in `restore-video compare`). Sampling runs
in-process (`executor="inline"`, one model load per process); every stage is cached, so an interrupted
experiment resumes and methods share their flow, encoding and noise artifacts.

Shift-inpaint, as in the paper (Sec. 5.1, Fig. 1/3): the *masked* still image is shifted by a whole number of
latent pixels per frame, so the hole moves with the content and an equivariant restorer gives an exactly
shifted output. Photo: `skimage.data.coffee()` (held out from the embedded models' training, see DESIGN),
downscaled by 2 to 300x200; a 128x128 window panning SHIFT_PX = 8 px (one latent pixel) per frame, so every
noise warp except fixed/resample is exact and the gap between gp and warped-diffusion is self-guidance alone
(paper: "the benefit strictly comes from enforcing the equivariance property"). The hole is a rectangle
attached to the scene (position drawn from the seed), written with the clip as lossless FFV1 video. Because the
pipeline's benchmark mode draws a mask fixed in the frame, these runs use restore mode with the truth clip +
mask video, and PSNR/SSIM/hole PSNR against the truth are computed here from the decoded frames and logged to
the same MLflow run. 128x128 rather than 256x256 keeps the 14-run grid within CPU minutes.
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

EXPERIMENTS = ("shift-inpaint", "video-sr", "guidance-sweep", "zero-shot")
SHIFT_PX = (8, 0)  # (dx, dy) pixels per frame of the shift-inpaint clip: one latent pixel
SHIFT_SIZE = 128
SHIFT_FRAMES = 8
INPAINT_MODELS = ("inpaint-gp", "inpaint-white")
LAMBDAS = (0.0, 0.25, 0.5, 1.0, 2.0)
SWEEP_STEPS = (25, 50, 100)
SWEEP_FRAMES = 8  # guidance-sweep uses the first 8 frames of the clip (15 configurations)
DEFAULT_STEPS = 50
VIDEO_SR_STEPS = 100  # guidance needs steps to act (each step is one guided correction); gp etc. get the same
VIDEO_SR_GUIDANCE = 2.0


@dataclass
class RunSpec:
    """One configuration of an experiment: its table row, tags, and RestoreConfig fields."""

    row: str
    config: dict
    tags: dict = field(default_factory=dict)


def _photo(image: str | None = None):
    """The still image: `image` (a path/URL readable by imageio) or skimage's coffee downscaled by 2 -> (H, W, 3) uint8."""
    import cv2

    if image:
        import imageio.v3 as iio

        img = iio.imread(image)[..., :3]
        return img if img.dtype == "uint8" else (img / img.max() * 255).astype("uint8")
    from skimage import data

    img = data.coffee()  # (400, 600, 3) uint8
    return cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)  # (200, 300, 3)


def shift_windows(img_shape, size: int, frames: int, shift) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of the frames' windows: origin o_j = o_0 - j*(dx, dy), so content moves by +(dx, dy)."""
    dx, dy = (int(v) for v in shift)
    span_x, span_y = abs(dx) * (frames - 1), abs(dy) * (frames - 1)
    if size + span_x > img_shape[1] or size + span_y > img_shape[0]:
        raise ValueError(f"a {size}px window moving {tuple(shift)} px/frame for {frames} frames leaves the "
                         f"{img_shape[1]}x{img_shape[0]} image; use fewer frames or a larger image")
    x0 = (img_shape[1] - size - span_x) // 2 + (span_x if dx > 0 else 0)
    y0 = (img_shape[0] - size - span_y) // 2 + (span_y if dy > 0 else 0)
    return [(y0 - j * dy, x0 - j * dx) for j in range(frames)]


def scene_mask(img_shape, size: int, frames: int, shift, seed: int):
    """A rectangular hole in scene coordinates, inside the part of the scene every frame sees -> (H, W) bool."""
    import numpy as np

    wins = shift_windows(img_shape, size, frames, shift)
    y_lo, y_hi = max(y for y, _ in wins), min(y for y, _ in wins) + size  # seen by all frames
    x_lo, x_hi = max(x for _, x in wins), min(x for _, x in wins) + size
    rng = np.random.default_rng(seed)

    def span(lo: int, hi: int, frac: float) -> tuple[int, int]:  # (start, length) of a hole side within [lo, hi)
        margin = (hi - lo) // 8
        length = max(1, int((hi - lo - 2 * margin) * frac))
        return int(rng.integers(lo + margin, hi - margin - length + 1)), length

    (y, hh), (x, hw) = span(y_lo, y_hi, 0.5), span(x_lo, x_hi, 0.6)
    mask = np.zeros(img_shape[:2], bool)
    mask[y: y + hh, x: x + hw] = True
    return mask


def make_shift_clip(path: str, size: int = SHIFT_SIZE, frames: int = SHIFT_FRAMES, shift=SHIFT_PX, fps: int = 8,
                    image: str | None = None, mask_seeds=()) -> dict:
    """The still image panned by `shift` = (dx, dy) px per frame (lossless), plus one hole video per seed that
    moves with the content (white = hole) at `mask_path(path, seed)`; returns {"clip": path, "masks": {seed: url}}."""
    import numpy as np

    from storage.video import write_video

    img = _photo(image)
    wins = shift_windows(img.shape, size, frames, shift)
    crop = lambda a: np.ascontiguousarray(np.stack([a[y: y + size, x: x + size] for y, x in wins]))  # (F, S, S, ...)
    write_video(path, crop(img), fps, lossless=True)
    masks = {}
    for seed in mask_seeds:
        hole = crop(scene_mask(img.shape, size, frames, shift, seed)).astype(np.uint8) * 255  # (F, S, S)
        masks[seed] = write_video(mask_path(path, seed), np.repeat(hole[..., None], 3, -1), fps, lossless=True)
    return {"clip": path, "masks": masks}


def mask_path(clip: str, seed: int) -> str:
    """The hole video of `clip` for `seed` (shift-inpaint)."""
    return f"{os.path.splitext(clip)[0]}.mask{seed}.mkv"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text)


# zero-shot (issue 14): tasks x solvers x noise; the solvers backpropagate through the sampler, so fewer steps.
ZERO_SHOT_TASKS = ("sr4", "inpaint", "deblur")
ZERO_SHOT_NOISE = {"gp": "warped-diffusion", "independent": "resample"}  # GP noise warped + guidance / fresh per frame
ZERO_SHOT_STEPS = 10


def zero_shot_cells(guidance: float) -> list[tuple[str, dict]]:
    """The zero-shot grid as (row, RestoreConfig fields): every task of ZERO_SHOT_TASKS with the conditional model
    where one exists (inpaint), dps, dflow on per-frame sources, dflow on the video-level GP source (gp noise only:
    it optimises that GP's weights) and vipaint (inpaint), each under both noises of ZERO_SHOT_NOISE."""
    cells = []
    for task in ZERO_SHOT_TASKS:
        solvers = (["conditional"] if task == "inpaint" else []) + ["dps", "dflow-frame", "dflow-video"]
        solvers += ["vipaint"] if task == "inpaint" else []
        for noise, method in ZERO_SHOT_NOISE.items():
            for solver in solvers:
                if solver == "dflow-video" and noise != "gp":
                    continue
                name, _, source = solver.partition("-")
                cfg = dict(task=task, method=method, solver=name, guidance=guidance, flow_backend="dis")
                if source:
                    cfg["source"] = source
                cells.append((f"{task}/{solver}/{noise}", cfg))
    return cells


def experiment_grid(name: str, input: str, frames: int | None = None, steps: int | None = None, seeds: int = 1,
                    work_root: str = DEFAULT_WORK_ROOT, shift=SHIFT_PX, guidance: float | None = None) -> list[RunSpec]:
    """Every configuration of experiment `name` on clip `input` (pure: builds dicts, runs nothing).

    steps / guidance override the experiment's defaults (guidance: warped-diffusion's lambda; the sweep has its own).
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; expected one of {', '.join(EXPERIMENTS)}")
    if seeds < 1:
        raise ValueError("--seeds must be >= 1")
    out_root = f"{work_root.rstrip('/')}/experiments/{name}"
    frame_range = f"0:{frames}" if frames else None
    if guidance is not None and not (0 <= guidance <= 100):
        raise ValueError(f"--guidance must be in [0, 100], got {guidance}")
    base = dict(input=input, mode="benchmark", executor="inline", work_root=work_root, frames=frame_range,
                steps=steps or (VIDEO_SR_STEPS if name == "video-sr" else DEFAULT_STEPS))
    lam = guidance if guidance is not None else (VIDEO_SR_GUIDANCE if name == "video-sr" else 1.0)
    cells: list[tuple[str, dict]] = []
    if name == "shift-inpaint":
        for model in INPAINT_MODELS:
            for method in METHODS:
                row = f"{method}/white" if model.endswith("white") else method
                cells.append((row, dict(task="inpaint", mode="restore", method=method, model=model, guidance=lam,
                                        flow_backend=f"shift:{shift[0]},{shift[1]}")))
    elif name == "zero-shot":
        base["steps"] = steps or ZERO_SHOT_STEPS
        cells.extend(zero_shot_cells(lam))
    elif name == "video-sr":
        for method in METHODS:
            cells.append((method, dict(task="sr8", method=method, flow_backend="dis", guidance=lam)))
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
            if name == "shift-inpaint":
                config["mask"] = mask_path(input, seed)
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


def prepare_input(name: str, input: str | None, work_root: str, frames: int | None, seeds: int) -> str:
    """The experiment's clip. shift-inpaint: the panned still (`input` = an image, default coffee) and its hole
    videos, made under work_root; the others: `input` or the embedded sample clip."""
    if name == "shift-inpaint":
        n = frames or SHIFT_FRAMES
        stem = _slug(os.path.splitext(os.path.basename(input))[0]) if input else "coffee"
        path = f"{work_root.rstrip('/')}/experiments/shift-inpaint/{stem}_{SHIFT_SIZE}_shift{SHIFT_PX[0]}x{SHIFT_PX[1]}_{n}f.mkv"
        missing = [s for s in range(seeds) if not os.path.exists(mask_path(path, s))]
        if not os.path.exists(path) or missing:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            make_shift_clip(path, frames=n, image=input, mask_seeds=range(seeds))
        return path
    if input:
        return input
    from flows.restore_video import ensure_sample_clip

    return ensure_sample_clip()


def truth_metrics(report: dict, cfg, truth_url: str) -> dict:
    """PSNR/SSIM per frame and hole PSNR of the decoded frames against the truth clip (restore-mode runs)."""
    import torch

    from ops import metrics
    from storage.video import read_video
    from tasks._stage import store_for

    store = store_for(cfg.work_root, cfg.storage_options)
    restored = store.open("decode", report["keys"]["decode"])["frames"].values  # (F, H, W, 3) uint8
    hole = store.open("prepare", report["keys"]["prepare"])["mask"].values  # (F, H', W') 1 = hole
    truth, _ = read_video(truth_url)
    start, _ = cfg.frame_range
    f, h, w = restored.shape[:3]
    as_float = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).double() / 255.0  # (F, 3, H, W)
    x, t = as_float(restored), as_float(truth[start: start + f, :h, :w])
    holes = torch.from_numpy(hole[:, :h, :w]).bool()[:, None].expand_as(x)
    psnr, ssim = metrics.psnr(x, t), metrics.ssim(x, t)
    hole_mse = ((x - t)[holes] ** 2).mean().clamp_min(1e-20)
    return {"psnr": float(psnr.mean()), "ssim": float(ssim.mean()), "hole_psnr": float(10 * torch.log10(1 / hole_mse)),
            "per_frame_psnr": psnr.tolist(), "per_frame_ssim": ssim.tolist()}


def run_experiment(name: str, input: str | None = None, frames: int | None = None, steps: int | None = None,
                   seeds: int = 1, work_root: str | None = None, log=print, guidance: float | None = None) -> dict:
    """Run every configuration of `name` nested under one parent MLflow run, then log compare's table and plots."""
    from mlflow.tracking import MlflowClient

    from flows import compare
    from flows.config import RestoreConfig
    from infra import tracking

    work_root = work_root or DEFAULT_WORK_ROOT
    if name == "shift-inpaint" and input is None and frames is not None and frames < 8:
        log(f"note: shift-inpaint with {frames} frames; the paper's comparison uses >= 8")
    clip = prepare_input(name, input, work_root, frames, seeds)
    specs = experiment_grid(name, clip, None if name == "shift-inpaint" else frames, steps, seeds, work_root,
                            guidance=guidance)
    configs = [RestoreConfig(**s.config) for s in specs]  # validate the whole grid before any work
    uri = tracking.tracking_uri(work_root)
    t0 = time.perf_counter()
    runs = []
    with _env("RESTORE_VIDEO_EXPERIMENT", name), tracking.start_run(
        name, run_name=f"{name} {time.strftime('%Y-%m-%d %H:%M')}",
        tags={compare.ROLE_TAG: "experiment-parent", "git_commit": tracking.git_commit(), "input": clip}, uri=uri,
    ) as parent:
        tracking.log_config({"experiment": name, "input": clip, "frames": frames, "steps": specs[0].config["steps"],
                             "guidance": None if name == "guidance-sweep" else specs[0].config["guidance"], "seeds": seeds,
                             "configurations": len(specs), "shift_px": list(SHIFT_PX) if name == "shift-inpaint" else None})
        client = MlflowClient(tracking_uri=uri)
        for i, (spec, cfg) in enumerate(zip(specs, configs), 1):
            t = time.perf_counter()
            report = _restore(cfg, parent.info.run_id)
            run_id = report["mlflow_run_id"]
            for k, v in spec.tags.items():
                client.set_tag(run_id, k, str(v))
            if cfg.mode == "restore" and "psnr" not in report:  # shift-inpaint: the truth is our own clip
                scores = truth_metrics(report, cfg, clip)
                for key in ("psnr", "ssim", "hole_psnr"):
                    report[key] = scores[key]
                    client.log_metric(run_id, key, scores[key])
                tracking.log_series("per_frame_psnr", scores["per_frame_psnr"], run_id=run_id)
                tracking.log_series("per_frame_ssim", scores["per_frame_ssim"], run_id=run_id)
            seconds = time.perf_counter() - t
            we = report["warping_error"]
            log(f"[{i}/{len(specs)}] {spec.row:28s} seed {cfg.seed}  WE pixel first {we['pixel_first']:.3g} prev "
                f"{we['pixel_prev']:.3g}  PSNR {report.get('psnr', float('nan')):.2f}  SSIM {report.get('ssim', float('nan')):.4f}"
                f"  ({seconds:.1f} s{', cached' if all(report['cached'].values()) else ''})")
            runs.append({"row": spec.row, "seed": cfg.seed, "run_id": run_id, "seconds": round(seconds, 2)})
        import mlflow

        mlflow.log_metric("experiment_seconds", time.perf_counter() - t0)
        parent_id = parent.info.run_id
    result = compare.compare(name, uri, "md")
    return {"experiment": name, "parent_run_id": parent_id, "tracking_uri": uri, "input": clip,
            "seconds": round(time.perf_counter() - t0, 1), "runs": runs, "rows": result["rows"],
            "table": result["text"], "artifacts": result["artifacts"], "summary": compare.summary_json(result["rows"])}


@flow(name="experiments", log_prints=True)
def experiments(name: str = "video-sr", input: str | None = None, frames: int | None = None, steps: int | None = None,
                seeds: int = 1, work_root: str | None = None, guidance: float | None = None) -> dict:
    """Run one of the paper's comparisons (shift-inpaint, video-sr, guidance-sweep) as nested MLflow runs."""
    result = run_experiment(name, input, frames, steps, seeds, work_root, guidance=guidance)
    print(result["table"])
    return {k: v for k, v in result.items() if k != "rows"}


def experiment_cli(args) -> int:
    """`restore-video experiment NAME [--input URL] [--frames N] [--steps N] [--guidance L] [--seeds N] [--work-root DIR] [--json]`."""
    from pydantic import ValidationError

    if args.name not in EXPERIMENTS:
        print(f"error: unknown experiment {args.name!r}; expected one of {', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    try:
        result = run_experiment(args.name, args.input, args.frames, args.steps, args.seeds, args.work_root, log=log,
                                guidance=getattr(args, "guidance", None))
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
