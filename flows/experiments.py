"""The paper's comparisons as MLflow experiments: one parent run per experiment, one nested run per configuration.

    guidance-sweep  warped-diffusion, lambda x steps x guidance space (pixel/latent), SR, on the TUNING clip; picks
                    (choose_tuning) and writes work_root/experiments/tuning.json
    video-sr        (Table 3) SR of the REPORT clips, every method, with the sweep's lambda/steps/space; DIS flow
    shift-inpaint   (Table 2) a still photo translated by a known whole number of pixels per frame, inpainted with
                    a fixed mask; every method x {GP, white-noise} model; exact flow (`shift:DX,DY`)
    all             the three in that order (`make experiments`; `--update-doc EXPERIMENTS.md` writes the tables)
    real-clips      what a user gets on ordinary footage: the shipped default models (storage.models.DEFAULT_MODELS)
                    with the product's own settings on wide 640x272 clips of the report photographs, sr8, sr4 and
                    inpaint of old-film damage (scratches that persist and wander, fresh dust every frame;
                    ops.degrade.film_damage_masks, one mask video per seed), warped-diffusion and gp, next to the
                    input (bicubic, bicubic + back-projection, Telea) (`make experiments-real`)

Clips are storage/sample.py's pan + zoom over held-out photographs (scikit-image `rocket` to tune, `coffee` and
`motorcycle_right` to report), so their exact motion is known; a photograph on any model card's training list is
refused (`check_held_out`). Every run is scored here (`score`) against the estimated flow (the pipeline's warping
errors) and the exact one (`*_exact`), with PSNR, SSIM, grad_ratio, blockiness and a no-reference noise level;
the input itself (bicubic xS with / without back-projection; Telea for inpainting) and the ground truth (the floor
of every warping error) are scored by the same function as rows of their own. Methods map to models in one place,
`model_for`: white-noise baselines (`integral`) always run with the white-noise model, as in the paper.

`--seeds N` (default 3) repeats every configuration with seeds 0..N-1 (mean ± std in `restore-video compare`).
Sampling runs in-process (`executor="inline"`, one model load per process); every stage is cached, so an
interrupted experiment resumes and methods share their flow, encoding and noise artifacts.

Shift-inpaint, as in the paper (Sec. 5.1, Fig. 1/3): the *masked* still image is shifted by a whole number of
latent pixels per frame, so the hole moves with the content and an equivariant restorer gives an exactly
shifted output. Photo: `skimage.data.coffee()` (held out of the embedded models' training), downscaled by 2 to
300x200; a 128x128 window panning SHIFT_PX = 8 px (one latent pixel) per frame, so every noise warp except
fixed/resample is exact and the gap between gp and warped-diffusion is self-guidance alone (paper: "the benefit
strictly comes from enforcing the equivariance property"). The hole is a rectangle attached to the scene
(position drawn from the seed), written with the clip as lossless FFV1 video. These runs use restore mode with
the truth clip + mask video; the truth metrics are computed here from the decoded frames.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from dataclasses import dataclass, field

from prefect import flow

from flows.config import DEFAULT_WORK_ROOT, METHODS

PAPER_EXPERIMENTS = ("shift-inpaint", "video-sr", "guidance-sweep")
EXPERIMENTS = PAPER_EXPERIMENTS + ("zero-shot", "real-clips")
ALL = "all"  # guidance-sweep (tunes on the tuning clip), then video-sr (reports on the report clips), then shift-inpaint
SHIFT_PX = (8, 0)  # (dx, dy) pixels per frame of the shift-inpaint clip: one latent pixel
SHIFT_SIZE = 128
SHIFT_FRAMES = 8
SHIFT_IMAGE = "coffee"  # held out of every shipped model's training (checked against the cards, `check_held_out`)
NOISES = ("gp", "white")
FAMILIES = ("pca", "res")  # model family: "pca" = {task}-{noise} (PCA 8x8 latent; the tables of `make experiments`),
# "res" = {task}-res-{noise} (lapped latent + regression mean + residual diffusion: the shipped defaults)
WHITE_ONLY = ("integral",)  # How I Warped Your Noise is white noise by construction: run with the white-noise model
LAMBDAS = (0.0, 0.25, 0.5, 1.0, 2.0)  # the sweep's full grid; `--lambdas` / `--sweep-steps` set a smaller one
SWEEP_STEPS = (25, 50, 100)  # (the Makefile's EXPERIMENT_SCALE: the scale EXPERIMENTS.md's tables were made at)
SWEEP_SPACES = ("pixel", "latent")
SWEEP_FRAMES = 8  # guidance-sweep uses 8-frame clips (30 configurations x seeds)
CLIP_FRAMES = 16
CLIP_SIZE = 256
TUNE_IMAGE = "rocket"  # the guidance-sweep's clip: lambda, steps and guidance space are chosen here ...
REPORT_IMAGES = ("coffee", "motorcycle_right")  # ... and video-sr reports on these (all held out of training)
DEFAULT_SEEDS = 3
DEFAULT_STEPS = 50
VIDEO_SR_STEPS = 100  # untuned defaults (no guidance-sweep run yet): guidance needs steps to act
VIDEO_SR_GUIDANCE = 2.0
VIDEO_SR_SPACE = "auto"
PSNR_SLACK_DB = 0.5  # the sweep's pick may cost at most this much PSNR against lambda = 0 at the same steps/space
INPUT_ROW = "input"  # rows of the input itself (prefix); TRUTH_ROW: the ground truth scored against the flows
TRUTH_ROW = "truth (floor)"
REAL_SIZE = (640, 272)  # real-clips: (width, height) of an ordinary wide frame, 272 not a multiple of the models' 32 px
REAL_FRAMES = 12  # real-clips' scale (the committed table): 12 frames ...
REAL_STEPS = 16  # ... of 16 sampler steps (the residual models start at sigma_max 0.1 / 0.05; the product default is 50)
REAL_TASKS = ("sr8", "sr4", "inpaint")
REAL_METHODS = ("warped-diffusion", "gp")
CLIP_TAG = "restore_video.clip"
ROLE_TAG = "restore_video.clip_role"


def model_for(task: str, method: str, noise: str = "gp", family: str = "pca") -> str:
    """The embedded model a (task, method) runs with: the `noise` model of `family` (FAMILIES), but white-noise
    baselines (WHITE_ONLY) always with the white-noise model, as in the paper. The one place methods are mapped
    to models."""
    if noise not in NOISES:
        raise ValueError(f"unknown noise {noise!r}; expected one of {', '.join(NOISES)}")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    return f"{task}-{'res-' if family == 'res' else ''}{'white' if method in WHITE_ONLY else noise}"


def experiment_label(name: str, family: str = "pca") -> str:
    """MLflow experiment, output folder and EXPERIMENTS.md marker of experiment `name` run with model `family`:
    `name` for the PCA family (the documented tables), `name-family` otherwise, so the two never mix."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    return name if family == "pca" else f"{name}-{family}"


def method_row(method: str, model: str) -> str:
    """Table row of a method run: `<method>/white` when it ran with a white-noise model."""
    return f"{method}/white" if model.endswith("white") else method


# ---------------------------------------------------------------------------------------------------------------
# clips: held-out photographs with known motion


@dataclass
class Clip:
    """A synthetic clip with known motion: `kind` "pan" (storage.sample's pan + zoom, `seed`) or "shift"."""

    path: str
    image: str
    role: str  # "tuning" | "report"
    kind: str = "pan"
    frames: int = CLIP_FRAMES
    size: int = CLIP_SIZE  # width (and height, unless `height`)
    seed: int = 0
    height: int | None = None

    def exact_forward(self, height: int, width: int):
        """The exact forward flows (F-1, H, W, 2) float64 of the rendered motion."""
        import torch

        from ops import flow as flowops

        if self.kind == "shift":
            fwd, _ = flowops.synthetic_flows(height, width, self.frames, flowops.translation_matrix(*SHIFT_PX))
            return fwd
        from storage.sample import sample_clip_affines, true_forward_flow

        affines = sample_clip_affines(self.frames, self.size, self.seed, self.height)
        return torch.from_numpy(true_forward_flow(affines, height, width)).double()


def _image_name(image: str) -> str:
    return os.path.splitext(os.path.basename(image))[0]


def training_images(models_root=None) -> dict[str, set[str]]:
    """Model name -> the images its card says it was trained on: every name in a list under a key containing
    "train" anywhere in the card's `data` (`data.train`, `data.photographs.train`, ...; `skimage:` prefixes and
    file extensions dropped)."""
    from pathlib import Path

    from flows.config import PROJECT_ROOT

    def listed(node, under_train: bool) -> set[str]:  # every name in a list under a key containing "train"
        if isinstance(node, dict):
            return set().union(*(listed(v, under_train or "train" in str(k).lower()) for k, v in node.items()))
        if isinstance(node, (list, tuple)) and under_train:
            return {_image_name(str(v).split(":")[-1]) for v in node if isinstance(v, str)}
        return set()

    root = Path(models_root) if models_root else PROJECT_ROOT / "assets" / "models"
    return {p.parent.name: listed(json.loads(p.read_text()).get("data") or {}, False)
            for p in sorted(root.glob("*/card.json"))}


def check_held_out(image: str, models_root=None) -> None:
    """Refuse a clip rendered from a photograph any shipped model was trained on (its card's training list)."""
    name = _image_name(image)
    seen = sorted(m for m, names in training_images(models_root).items() if name in names)
    if seen:
        raise ValueError(f"image {name!r} is a training image of {', '.join(seen)} (assets/models/*/card.json); "
                         "experiments must report on held-out photographs: pick another --report-images/--tune-image")


def load_photo(image: str):
    """A photograph -> (H, W, 3) uint8: a file path, or the name of a scikit-image picture (e.g. rocket)."""
    import numpy as np

    if os.path.exists(image):
        import imageio.v3 as iio

        img = iio.imread(image)
        img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
        return img if img.dtype == np.uint8 else (img / img.max() * 255).astype(np.uint8)
    from storage.models import skimage_image

    return (skimage_image(image).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)  # (H, W, 3)


def make_clip(image: str, role: str, work_root: str, frames: int = CLIP_FRAMES, size: int | None = None,
              models_root=None, height: int | None = None) -> Clip:
    """storage.sample's pan + zoom over a held-out photograph (refused if any card trained on it), lossless;
    size x size frames, or size wide and `height` high."""
    from storage.sample import make_sample_clip

    check_held_out(image, models_root)
    size = size or CLIP_SIZE
    shape = f"{size}x{height}" if height and height != size else f"{size}"
    clip = Clip(path=f"{work_root.rstrip('/')}/experiments/clips/{_slug(_image_name(image))}_{shape}_{frames}f.mkv",
                image=_image_name(image), role=role, frames=frames, size=size, height=height)
    if not os.path.exists(clip.path):
        os.makedirs(os.path.dirname(clip.path), exist_ok=True)
        make_sample_clip(clip.path, frames, size, clip.seed, image=load_photo(image), height=height)
    return clip


def make_damage_masks(clip: Clip, seeds) -> dict[int, str]:
    """One old-film damage video per seed (ops.degrade.film_damage_masks, white = hole) at mask_path(clip, seed)."""
    import numpy as np
    import torch

    from ops.degrade import film_damage_masks
    from storage.video import write_video

    height, width, out = clip.height or clip.size, clip.size, {}
    for seed in seeds:
        out[seed] = mask_path(clip.path, seed)
        if not os.path.exists(out[seed]):
            holes = film_damage_masks(torch.Generator().manual_seed(seed), clip.frames, height, width)  # (F, 1, H, W)
            u8 = (holes[:, 0].numpy() * 255).astype(np.uint8)
            write_video(out[seed], np.repeat(u8[..., None], 3, -1), 8, lossless=True)
    return out


@dataclass
class RunSpec:
    """One configuration of an experiment: its table row, tags, and RestoreConfig fields."""

    row: str
    config: dict
    tags: dict = field(default_factory=dict)
    clip: object = None  # the Clip it runs on


def _photo(image: str | None = None):
    """The still image: `image` (a path or scikit-image name) or SHIFT_IMAGE downscaled by 2 -> (H, W, 3) uint8."""
    import cv2

    img = load_photo(image or SHIFT_IMAGE)
    if image:
        return img
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
    """The hole video of `clip` for `seed` (shift-inpaint, real-clips)."""
    return f"{os.path.splitext(clip)[0]}.mask{seed}.mkv"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text)


# zero-shot (issue 14): tasks x solvers x noise; the solvers backpropagate through the sampler, so fewer steps.
ZERO_SHOT_TASKS = ("sr4", "inpaint", "deblur")
ZERO_SHOT_NOISE = {"gp": "warped-diffusion", "independent": "resample"}  # GP noise warped + guidance / fresh per frame
ZERO_SHOT_STEPS = 10


def zero_shot_cells(guidance: float) -> list[tuple[str, dict]]:
    """The zero-shot grid as (row, RestoreConfig fields): every task of ZERO_SHOT_TASKS with the conditional model
    where one exists (inpaint), dps, dflow on per-frame sources, dflow with all frames optimised jointly
    (`--source video`, ops.solvers.video_objective; gp noise only: its sources are written around that GP's warped
    field) and vipaint (inpaint), each under both noises of ZERO_SHOT_NOISE."""
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


def experiment_grid(name: str, clips, steps: int | None = None, seeds: int = DEFAULT_SEEDS,
                    work_root: str = DEFAULT_WORK_ROOT, guidance: float | None = None, space: str | None = None,
                    frames: int | None = None, task: str = "sr8", lambdas=None, sweep_steps=None,
                    iterations: int | None = None, family: str = "pca") -> list[RunSpec]:
    """Every configuration of experiment `name` on `clips` (Clip objects, or one video path) (pure: builds dicts).

    steps / guidance / space override the experiment's defaults (warped-diffusion's lambda and guidance space; the
    sweep has its own grid: lambdas x sweep_steps x spaces, default LAMBDAS x SWEEP_STEPS x SWEEP_SPACES, `steps` /
    `space` pin one). Methods run with `model_for(task, method, family=family)`; shift-inpaint with both noises.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; expected one of {', '.join(EXPERIMENTS)}")
    if seeds < 1:
        raise ValueError("--seeds must be >= 1")
    lambdas = tuple(LAMBDAS if lambdas is None else lambdas)
    sweep_steps = tuple(SWEEP_STEPS if sweep_steps is None else sweep_steps)
    if guidance is not None and not (0 <= guidance <= 100):
        raise ValueError(f"--guidance must be in [0, 100], got {guidance}")
    if any(not (0 <= lam <= 100) for lam in lambdas):
        raise ValueError(f"--lambdas must be in [0, 100], got {lambdas}")
    if not lambdas or not sweep_steps or any(int(n) != n or n < 1 for n in sweep_steps):
        raise ValueError(f"--lambdas and --sweep-steps need at least one value, steps whole numbers >= 1; got "
                         f"lambdas {lambdas}, steps {sweep_steps}")
    if isinstance(clips, (str, Clip)):
        clips = [clips]
    clips = [c if isinstance(c, Clip) else Clip(path=c, image=_image_name(c), role="report", kind="video") for c in clips]
    out_root = f"{work_root.rstrip('/')}/experiments/{experiment_label(name, family)}"
    base = dict(mode="benchmark", executor="inline", work_root=work_root,
                steps=steps or (VIDEO_SR_STEPS if name == "video-sr" else DEFAULT_STEPS))
    lam = guidance if guidance is not None else (VIDEO_SR_GUIDANCE if name == "video-sr" else 1.0)
    space = space or (VIDEO_SR_SPACE if name == "video-sr" else "auto")
    cells: list[tuple[str, dict]] = []
    if name == "shift-inpaint":
        for noise in NOISES:
            for method in METHODS:
                if method in WHITE_ONLY and noise != "white":
                    continue  # runs once, with the white-noise model
                model = model_for("inpaint", method, noise, family)
                cells.append((method_row(method, model), dict(
                    task="inpaint", mode="restore", method=method, model=model, guidance=lam, guidance_space=space,
                    flow_backend=f"shift:{SHIFT_PX[0]},{SHIFT_PX[1]}")))
    elif name == "zero-shot":
        base["steps"] = steps or ZERO_SHOT_STEPS
        if iterations is not None:
            base["iterations"] = iterations
        cells.extend(zero_shot_cells(lam))
    elif name == "real-clips":  # the product as shipped: default models and settings
        from flows.config import RestoreSettings
        from storage.models import DEFAULT_MODELS

        base["steps"] = steps or REAL_STEPS
        lam = guidance if guidance is not None else RestoreSettings.model_fields["guidance"].default
        for t in REAL_TASKS:
            for method in REAL_METHODS:
                cells.append((f"{t}/{method}", dict(task=t, method=method, model=DEFAULT_MODELS[t], flow_backend="dis",
                                                    guidance=lam, guidance_space=space)))
    elif name == "video-sr":
        for method in METHODS:
            model = model_for(task, method, family=family)
            cells.append((method_row(method, model), dict(task=task, method=method, model=model, flow_backend="dis",
                                                          guidance=lam, guidance_space=space)))
    else:
        for n_steps in ((steps,) if steps else sweep_steps):
            for sp in ((space,) if space != "auto" else SWEEP_SPACES):
                for lam in lambdas:
                    cells.append((f"λ={lam:g} steps={n_steps} space={sp}",
                                  dict(task=task, method="warped-diffusion", model=model_for(task, "warped-diffusion", family=family),
                                       guidance=lam, steps=n_steps, guidance_space=sp, flow_backend="dis")))
    specs = []
    for clip in clips:
        for row, cfg in cells:
            for seed in range(seeds):
                config = {**base, **cfg, "input": clip.path, "seed": seed,
                          "frames": f"0:{frames}" if frames and clip.kind == "video" else None,
                          "out": f"{out_root}/{_slug(clip.image)}/{_slug(row)}/seed{seed}"}
                if name == "shift-inpaint" or config.get("task") == "inpaint" and name == "real-clips":
                    config["mask"] = mask_path(clip.path, seed)
                specs.append(RunSpec(row=row, config=config, clip=clip, tags={
                    "restore_video.row": row, "restore_video.experiment": name, "seed": seed,
                    CLIP_TAG: clip.image, ROLE_TAG: clip.role}))
    return specs


def prepare_clips(name: str, input: str | None, work_root: str, frames: int | None, seeds: int,
                  tune_image: str = TUNE_IMAGE, report_images=REPORT_IMAGES, models_root=None,
                  size: int | None = None) -> list[Clip]:
    """The experiment's clips. shift-inpaint: the panned still (`input` = an image, default SHIFT_IMAGE) and its
    hole videos; guidance-sweep: the tuning clip; video-sr: the report clips. `input` = a video replaces the
    rendered clips (no exact flow then)."""
    if name == "shift-inpaint":
        n = frames or SHIFT_FRAMES
        image = input or SHIFT_IMAGE
        check_held_out(image, models_root)
        stem = _slug(_image_name(image))
        path = f"{work_root.rstrip('/')}/experiments/shift-inpaint/{stem}_{SHIFT_SIZE}_shift{SHIFT_PX[0]}x{SHIFT_PX[1]}_{n}f.mkv"
        missing = [s for s in range(seeds) if not os.path.exists(mask_path(path, s))]
        if not os.path.exists(path) or missing:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            make_shift_clip(path, frames=n, image=input, mask_seeds=range(seeds))
        return [Clip(path=path, image=_image_name(image), role="report", kind="shift", frames=n, size=SHIFT_SIZE)]
    if input:
        return [Clip(path=input, image=_image_name(input), role="report", kind="video")]
    if name == "guidance-sweep":
        return [make_clip(tune_image, "tuning", work_root, frames or SWEEP_FRAMES, size, models_root=models_root)]
    if name == "real-clips":  # size: the width; the height keeps REAL_SIZE's aspect
        width = size or REAL_SIZE[0]
        clips = [make_clip(image, "report", work_root, frames or REAL_FRAMES, width, models_root,
                           height=round(width * REAL_SIZE[1] / REAL_SIZE[0])) for image in report_images]
        for clip in clips:
            make_damage_masks(clip, range(seeds))
        return clips
    return [make_clip(image, "report", work_root, frames or CLIP_FRAMES, size, models_root=models_root) for image in report_images]


# ---------------------------------------------------------------------------------------------------------------
# scoring: every row (methods, the input, the truth) through the same metrics, against the estimated and exact flow


def _float(frames):
    """uint8 frames (F, H, W, 3) -> float64 images (F, 3, H, W) in [0, 1]."""
    import torch

    from ops.images import to_float

    return to_float(frames, torch.float64)


def score(frames, truth=None, est=None, exact=None, latents=None, factor: int = 8, hole=None) -> dict:
    """One row's metrics -> {name: float}.

    frames, truth: (F, 3, H, W) in [0, 1] (truth None: no PSNR/SSIM/grad_ratio/blockiness); est: the flow stage's
    dataset (forward/valid/latent_forward/latent_valid, on the padded grid); exact: (F-1, Hp, Wp, 2) exact forward
    flows on the padded grid (None: unknown); latents: (F, C, Hp/f, Wp/f); hole: (F, H, W) bool (hole PSNR).
    Warping errors against the estimated flow keep the pipeline's names; against the exact flow they end in _exact.
    """
    import torch

    from ops import flow as flowops
    from ops import metrics

    f, _, h, w = frames.shape
    out = {"noise_sigma": metrics.noise_sigma(frames)}  # no-reference: the truth row gets the source's own level
    flows = {}
    if est is not None:
        flows[""] = (torch.from_numpy(est["forward"].values), torch.from_numpy(est["valid"].values),
                     torch.from_numpy(est["latent_forward"].values), torch.from_numpy(est["latent_valid"].values))
    if exact is not None:
        exact = exact.float()
        flows["_exact"] = (exact, None, flowops.pixel_to_latent_flow(exact, factor), None)
    for suffix, (fwd, valid, lfwd, lvalid) in flows.items():
        for ref in ("first", "prev"):
            v = None if valid is None else valid[:, :h, :w]
            out[f"warping_error_pixel_{ref}{suffix}"] = metrics.summarize(
                metrics.warping_error(frames, fwd[:, :h, :w], v, ref))
            if latents is not None:
                z = torch.as_tensor(latents).double()
                out[f"warping_error_latent_{ref}{suffix}"] = metrics.summarize(
                    metrics.warping_error(z, lfwd, lvalid, ref))
    if truth is not None:
        out["psnr"] = float(metrics.psnr(frames, truth).mean())
        out["ssim"] = float(metrics.ssim(frames, truth).mean())
        out["grad_ratio"] = metrics.grad_ratio(frames, truth)
        out["blockiness"] = float(metrics.blockiness(frames, truth, factor))
        if hole is not None and hole.any():
            holes = torch.as_tensor(hole).bool()[:, None].expand_as(frames)
            out["hole_psnr"] = float(10 * torch.log10(1 / ((frames - truth)[holes] ** 2).mean().clamp_min(1e-20)))
    return out


def run_outputs(report: dict, cfg, clip: Clip) -> dict:
    """What a finished run left in the store: restored frames, prepared data, flows, latents, and the truth."""
    from storage.video import read_video
    from tasks._stage import store_for

    store = store_for(cfg.work_root, cfg.storage_options)
    keys = report["keys"]
    prepared = store.open("prepare", keys["prepare"]).load()
    out = {"frames": store.open("decode", keys["decode"])["frames"].values,  # (F, H, W, 3) uint8, cropped
           "prepared": prepared, "flows": store.open("estimate_flow", keys["estimate_flow"]).load(),
           "latents": store.open("sample", keys["sample"])["latents"].values, "prepare_key": keys["prepare"],
           "sampling_seconds": float(store.open("sample", keys["sample"]).attrs.get("sampling_seconds", float("nan")))}
    if "truth" in prepared:
        out["truth"] = prepared["truth"].values  # (F, Hp, Wp, 3), padded
    else:  # restore mode on our own clip (shift-inpaint): the clip is the truth
        start, _ = cfg.frame_range
        truth, _ = read_video(clip.path)
        f = out["frames"].shape[0]
        hp, wp = prepared["cond"].shape[1:3]
        out["truth"] = _pad(truth[start: start + f], hp, wp)
    return out


def _pad(frames, hp: int, wp: int):
    import numpy as np

    return np.pad(frames, ((0, 0), (0, hp - frames.shape[1]), (0, wp - frames.shape[2]), (0, 0)), mode="reflect")


def score_run(outputs: dict, clip: Clip, factor: int) -> dict:
    """A method run's row metrics (same function as the input rows), plus the sample stage's seconds per frame
    (stored with the artifact, so a cached run reports the time it took when computed)."""
    frames = _float(outputs["frames"])
    f, _, h, w = frames.shape
    hp, wp = outputs["truth"].shape[1:3]
    mask = outputs["prepared"]["mask"].values[:, :h, :w] > 0 if "mask" in outputs["prepared"] else None
    exact = clip.exact_forward(hp, wp) if clip.kind != "video" else None
    out = score(frames, _float(outputs["truth"][:, :h, :w]), outputs["flows"], exact, outputs["latents"], factor, mask)
    out["seconds_per_frame"] = outputs.get("sampling_seconds", float("nan")) / f  # the sample artifact's own timing
    return out


def input_rows(outputs: dict, clip: Clip, autoencoder, with_truth: bool = True) -> dict[str, dict]:
    """The input itself and the ground truth, scored like a method: row -> metrics.

    SR (scale read off the prepared data): bicubic xS (the model's conditioning), and bicubic + iterative
    back-projection; inpainting: the masked input filled by OpenCV Telea; deblur / denoise: the degraded input
    itself (the blurred / noisy frames the solvers start from). The truth row is the floor of every
    warping error (what a perfect restoration scores) against each flow.
    """
    import torch

    from tasks.degrade import SR_FACTORS
    from tasks.metrics import input_frames

    prepared = outputs["prepared"]
    h, w = outputs["frames"].shape[1:3]
    truth = _float(outputs["truth"])  # (F, 3, Hp, Wp)
    given = input_frames(prepared, 0, truth.shape[0], *truth.shape[-2:])  # the metrics stage's input baseline
    rows = {}
    if "mask" in prepared:
        rows[f"{INPUT_ROW}: Telea"] = given
        hole = prepared["mask"].values[:, :h, :w] > 0
    elif prepared.attrs.get("task") in ("deblur", "denoise"):
        rows[f"{INPUT_ROW}: {'blurred' if prepared.attrs['task'] == 'deblur' else 'noisy'}"] = given
        hole = None
    else:
        scale = SR_FACTORS[prepared.attrs["task"]]
        rows[f"{INPUT_ROW}: bicubic ×{scale}"] = _float(prepared["cond"].values)  # what the model is given
        rows[f"{INPUT_ROW}: bicubic ×{scale} + back-projection"] = given  # the metrics stage's baseline
        hole = None
    if with_truth:
        rows[TRUTH_ROW] = truth
    exact = clip.exact_forward(*truth.shape[-2:]) if clip.kind != "video" else None
    out = {}
    with torch.no_grad():
        for row, x in rows.items():
            z = autoencoder.encode(x.float()).double()  # (F, C, Hp/f, Wp/f)
            t = None if row == TRUTH_ROW else truth[..., :h, :w]
            out[row] = score(x[..., :h, :w].clamp(0, 1), t, outputs["flows"], exact, z, int(autoencoder.factor), hole)
    return out


def input_digest(outputs: dict) -> str:
    """Identity of a run's input (conditioning frames and mask): SR inputs do not depend on the seed."""
    import hashlib

    prepared = outputs["prepared"]
    h = hashlib.sha256(prepared["cond"].values.tobytes())
    if "mask" in prepared:
        h.update(prepared["mask"].values.tobytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=4)
def _autoencoder(model_name: str):
    from storage.models import load_model

    return load_model(model_name).autoencoder


# ---------------------------------------------------------------------------------------------------------------
# tuning: the sweep's pick, used by video-sr


def tuning_path(work_root: str, family: str = "pca") -> str:
    """The guidance sweep's pick for model `family` (each family is tuned on its own models)."""
    return f"{work_root.rstrip('/')}/experiments/{experiment_label('tuning', family)}.json"


def choose_tuning(rows: list[dict], slack_db: float = PSNR_SLACK_DB) -> dict:
    """The sweep's pick: the lowest first-frame pixel warping error (exact flow when known, else estimated) among
    configurations whose PSNR is at most `slack_db` below lambda = 0 at the same steps and space (guidance must not
    buy consistency with blur) -> {guidance, steps, guidance_space, criterion}."""
    import math

    def we(r):
        v = r.get("warping_error_pixel_first_exact_mean", float("nan"))
        return r["warping_error_pixel_first_mean"] if math.isnan(v) else v

    base = {(r["steps"], r["space"]): r["psnr_mean"] for r in rows if r.get("guidance") is not None and float(r["guidance"]) == 0}
    ok = [r for r in rows if r.get("guidance") is not None and not math.isnan(we(r))
          and not (r["psnr_mean"] < base.get((r["steps"], r["space"]), -math.inf) - slack_db)]
    if not ok:
        raise ValueError("the guidance sweep has no finished configuration to choose from")
    best = min(ok, key=lambda r: (we(r), -float(r["guidance"])))
    return {"guidance": float(best["guidance"]), "steps": int(best["steps"]), "guidance_space": best["space"],
            "row": best["row"], "warping_error_pixel_first": we(best), "psnr": best["psnr_mean"],
            "criterion": f"lowest WE pixel first (exact flow) with PSNR >= PSNR(λ=0) - {slack_db:g} dB"}


def load_tuning(work_root: str, family: str = "pca") -> dict | None:
    path = tuning_path(work_root, family)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------------------
# running


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


def _log_row_run(name: str, parent_id: str, uri: str, row: str, clip: Clip, seed: int, model: str, scores: dict):
    """A child run for a row computed here (the input, the truth): tags like a method run, metrics = scores."""
    import mlflow

    from infra import tracking

    with tracking.start_run(name, f"{row} {clip.image}", parent_run_id=parent_id, uri=uri,
                            tags={"restore_video.row": row, "restore_video.experiment": name, "seed": str(seed),
                                  CLIP_TAG: clip.image, ROLE_TAG: clip.role, "model": model}) as run:
        mlflow.log_params({"input": clip.path, "seed": seed, "autoencoder_of": model})
        mlflow.log_metrics({k: v for k, v in scores.items() if v == v})
    return run.info.run_id


def run_experiment(name: str, input: str | None = None, frames: int | None = None, steps: int | None = None,
                   seeds: int = DEFAULT_SEEDS, work_root: str | None = None, log=print, guidance: float | None = None,
                   space: str | None = None, tune_image: str = TUNE_IMAGE, report_images=REPORT_IMAGES,
                   models_root=None, task: str = "sr8", lambdas=None, sweep_steps=None, iterations: int | None = None,
                   size: int | None = None, family: str = "pca") -> dict:
    """Run every configuration of `name` nested under one parent MLflow run, score every run (and the input and
    truth rows) against the estimated and the exact flow, then log compare's table and plots.

    video-sr takes lambda, steps and guidance space from the guidance sweep's tuning.json (made on the tuning clip)
    unless given; guidance-sweep writes it. `family` picks the models (`model_for`); a family other than "pca" runs
    as its own MLflow experiment and output folder (`experiment_label`, e.g. video-sr-res).
    """
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from flows import compare
    from flows.config import RestoreConfig
    from infra import tracking

    work_root = work_root or DEFAULT_WORK_ROOT
    label = experiment_label(name, family)
    if name == "shift-inpaint" and input is None and frames is not None and frames < 8:
        log(f"note: shift-inpaint with {frames} frames; the paper's comparison uses >= 8")
    given = steps is not None and guidance is not None and space is not None
    tuning = load_tuning(work_root, family) if name == "video-sr" and not given else None
    if tuning:
        steps = steps or tuning["steps"]
        guidance = guidance if guidance is not None else tuning["guidance"]
        space = space or tuning["guidance_space"]
    tuned_on = (f"given on the command line (λ={guidance:g} steps={steps} space={space})" if given
                else f"{tuning['clip']} (guidance-sweep, {tuning['row']})" if tuning
                else "untuned defaults (no guidance-sweep run)") if name == "video-sr" else None
    clips = prepare_clips(name, input, work_root, frames, seeds, tune_image, report_images, models_root, size)
    specs = experiment_grid(name, clips, steps, seeds, work_root, guidance=guidance, space=space,
                            frames=frames if input else None, task=task, lambdas=lambdas, sweep_steps=sweep_steps,
                            iterations=iterations, family=family)
    configs = [RestoreConfig(**s.config) for s in specs]  # validate the whole grid before any work
    uri = tracking.tracking_uri(work_root)
    t0 = time.perf_counter()
    runs = []
    with _env("RESTORE_VIDEO_EXPERIMENT", label), tracking.start_run(
        label, run_name=f"{label} {time.strftime('%Y-%m-%d %H:%M')}",
        tags={compare.ROLE_TAG: "experiment-parent", "git_commit": tracking.git_commit(),
              "input": ",".join(c.path for c in clips), "tuned_on": tuned_on or ""}, uri=uri,
    ) as parent:
        tracking.log_config({"experiment": name, "family": family, "clips": {c.image: c.role for c in clips}, "frames": frames,
                             "steps": specs[0].config["steps"],
                             "guidance": None if name == "guidance-sweep" else specs[0].config["guidance"],
                             "guidance_space": None if name == "guidance-sweep" else specs[0].config.get("guidance_space"),
                             "seeds": seeds, "configurations": len(specs), "tuned_on": tuned_on,
                             "iterations": iterations, "clip_size": size,
                             "shift_px": list(SHIFT_PX) if name == "shift-inpaint" else None})
        client = MlflowClient(tracking_uri=uri)
        done_inputs: set = set()
        for i, (spec, cfg) in enumerate(zip(specs, configs), 1):
            t = time.perf_counter()
            report = _restore(cfg, parent.info.run_id)
            run_id = report["mlflow_run_id"]
            for k, v in spec.tags.items():
                client.set_tag(run_id, k, str(v))
            outputs = run_outputs(report, cfg, spec.clip)
            ae = _autoencoder(cfg.model_name)
            scores = score_run(outputs, spec.clip, int(ae.factor))
            stamp = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, stamp, 0) for k, v in scores.items() if v == v])
            # the input and truth rows: once per distinct input (per seed only where the seed draws the mask)
            # zero-shot logs them for every seed too, so that each of its rows has n = seeds (issue 14's table)
            seed_key = cfg.seed if name == "zero-shot" else None
            key = (spec.clip.image, input_digest(outputs), seed_key)
            if name != "guidance-sweep" and key not in done_inputs:
                first = not any(c == spec.clip.image and s == seed_key for c, _, s in done_inputs)
                done_inputs.add(key)
                for row, row_scores in input_rows(outputs, spec.clip, ae, with_truth=first).items():
                    _log_row_run(label, parent.info.run_id, uri, row, spec.clip, cfg.seed, cfg.model_name, row_scores)
            seconds = time.perf_counter() - t
            log(f"[{i}/{len(specs)}] {spec.clip.image:12s} {spec.row:28s} seed {cfg.seed}  WE pixel first "
                f"{scores.get('warping_error_pixel_first', float('nan')):.3g} (exact "
                f"{scores.get('warping_error_pixel_first_exact', float('nan')):.3g})  PSNR {scores.get('psnr', float('nan')):.2f}"
                f"  ({seconds:.1f} s{', cached' if all(report['cached'].values()) else ''})")
            runs.append({"row": spec.row, "clip": spec.clip.image, "seed": cfg.seed, "run_id": run_id,
                         "seconds": round(seconds, 2)})
        import mlflow

        mlflow.log_metric("experiment_seconds", time.perf_counter() - t0)
        parent_id = parent.info.run_id
    result = compare.compare(label, uri, "md")
    out = {"experiment": label, "parent_run_id": parent_id, "tracking_uri": uri, "input": clips[0].path,
           "clips": {c.image: c.role for c in clips}, "tuned_on": tuned_on,
           "seconds": round(time.perf_counter() - t0, 1), "runs": runs, "rows": result["rows"],
           "table": result["text"], "artifacts": result["artifacts"], "summary": compare.summary_json(result["rows"])}
    if name == "guidance-sweep":
        choice = {**choose_tuning(result["rows"]), "clip": clips[0].image, "parent_run_id": parent_id}
        os.makedirs(os.path.dirname(tuning_path(work_root, family)), exist_ok=True)
        with open(tuning_path(work_root, family), "w") as f:
            json.dump(choice, f, indent=2)
        MlflowClient(tracking_uri=uri).log_dict(parent_id, choice, "compare/tuning.json")
        out["tuning"] = choice
        out["table"] += (f"\nPicked on the tuning clip {choice['clip']}: λ = {choice['guidance']:g}, "
                         f"{choice['steps']} steps, {choice['guidance_space']}-space guidance ({choice['criterion']}).\n")
    elif tuned_on:
        out["table"] += f"\nλ, steps and guidance space: {tuned_on}.\n"
    return out


def update_doc(path: str, name: str, text: str) -> None:
    """Replace experiment `name`'s table in the markdown file `path` (between `<!-- BEGIN experiment:NAME -->` and
    `<!-- END experiment:NAME -->`; appended as a new section when the markers are missing)."""
    begin, end = f"<!-- BEGIN experiment:{name} -->", f"<!-- END experiment:{name} -->"
    doc = open(path).read() if os.path.exists(path) else "# Experiments\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + f"\n\n## {name}\n\n{block}\n"
    with open(path, "w") as f:
        f.write(doc)


@flow(name="experiments", log_prints=True)
def experiments(name: str = "video-sr", input: str | None = None, frames: int | None = None, steps: int | None = None,
                seeds: int = DEFAULT_SEEDS, work_root: str | None = None, guidance: float | None = None) -> dict:
    """Run one of the paper's comparisons (shift-inpaint, video-sr, guidance-sweep) as nested MLflow runs."""
    result = run_experiment(name, input, frames, steps, seeds, work_root, guidance=guidance)
    print(result["table"])
    return {k: v for k, v in result.items() if k != "rows"}


def _numbers(text: str | None, kind, flag: str):
    """A comma-separated CLI list ("0,0.5,1") -> tuple of `kind`; None when not given."""
    if text is None:
        return None
    try:
        return tuple(kind(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated numbers (e.g. 0,0.5,1), got {text!r}") from None


def experiment_cli(args) -> int:
    """`restore-video experiment NAME|all [--input URL] [--frames N] [--steps N] [--guidance L] [--guidance-space S]
    [--seeds N] [--task sr8|sr4] [--family pca|res] [--lambdas L,..] [--sweep-steps N,..] [--tune-image IMG] [--report-images A,B]
    [--iterations N] [--size PX] [--update-doc FILE] [--work-root DIR] [--json]`."""
    from pydantic import ValidationError

    names = PAPER_EXPERIMENTS[::-1] if args.name == ALL else (args.name,)  # guidance-sweep first: video-sr uses its pick
    if args.name != ALL and args.name not in EXPERIMENTS:
        print(f"error: unknown experiment {args.name!r}; expected one of {', '.join(EXPERIMENTS)} or {ALL}", file=sys.stderr)
        return 2
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    report_images = tuple(x for x in (getattr(args, "report_images", None) or ",".join(REPORT_IMAGES)).split(",") if x)
    summaries = {}
    for name in names:
        try:
            result = run_experiment(name, args.input, args.frames, args.steps, args.seeds, args.work_root, log=log,
                                    guidance=getattr(args, "guidance", None), space=getattr(args, "guidance_space", None),
                                    tune_image=getattr(args, "tune_image", None) or TUNE_IMAGE, report_images=report_images,
                                    task=getattr(args, "task", None) or "sr8",
                                    lambdas=_numbers(getattr(args, "lambdas", None), float, "--lambdas"),
                                    sweep_steps=_numbers(getattr(args, "sweep_steps", None), int, "--sweep-steps"),
                                    iterations=getattr(args, "iterations", None), size=getattr(args, "size", None),
                                    family=getattr(args, "family", None) or "pca")
        except (ValueError, ValidationError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if getattr(args, "update_doc", None):
            update_doc(args.update_doc, result["experiment"], result["table"])
        summaries[name] = result["summary"]
        if not args.json:
            print(result["table"], end="")
            print(f"{name}: {len(result['runs'])} runs in {result['seconds']:.0f} s; parent MLflow run "
                  f"{result['parent_run_id']} ({result['tracking_uri']}); artifacts {', '.join(result['artifacts'])}")
    if args.json:
        keys = ("warping_error_pixel_first", "warping_error_pixel_prev", "psnr", "ssim")
        out = {name: {row: {k: v[k] for k in keys} for row, v in s.items()} for name, s in summaries.items()}
        print(json.dumps(out[args.name] if args.name != ALL else out, indent=2))
    return 0
