"""Validated configuration of a restore-video run (pydantic): every bad field gets a message saying what to do."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

METHODS = ("warped-diffusion", "gp", "fixed", "resample", "nearest", "bilinear", "integral")
TASKS = ("sr8", "sr4", "inpaint", "deblur", "denoise")
DTYPES = ("float32", "float16", "bfloat16")
CONDITIONAL_TASKS = ("sr8", "sr4", "inpaint")  # tasks with a conditional model (sr4: a --model x4 upscaler); the others need a zero-shot solver
SOLVERS = ("conditional", "dps", "dflow", "dmplug", "vipaint")  # conditional = the task's own model; others: ops.solvers
SOURCE_SOLVERS = ("dflow", "dmplug")  # the solvers that optimise the source noise (--source)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
PRIOR_MODEL = "prior-gp"  # the unconditional prior the zero-shot solvers use by default
DEFAULT_MAX_OUTPUT_PIXELS = 3840 * 2160  # 4K UHD per frame: larger targets are refused unless asked for
DEFAULT_WORK_ROOT = os.environ.get("RESTORE_VIDEO_WORK_ROOT", str(PROJECT_ROOT / "work"))


def sample_clip_path() -> str:
    """The embedded sample clip (made by storage.sample on first use)."""
    return str(PROJECT_ROOT / "assets" / "sample" / "sample_256.mp4")


class RestoreConfig(BaseModel):
    """Everything that determines a restoration; the whole object is logged to MLflow as params."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="video URL: local path or any fsspec URL (s3://, file://, ...)")
    task: Literal["sr8", "sr4", "inpaint", "deblur", "denoise"] = Field(
        "sr8", description="sr8 / sr4: super-resolution x8 / x4; inpaint: fill the holes of --mask; deblur / denoise: "
        "zero-shot only (--solver)")
    mode: Literal["restore", "benchmark"] = Field(
        "restore", description="restore: the input is the degraded video; benchmark: the input is ground truth, degraded first"
    )
    method: str = Field("warped-diffusion", description="warped-diffusion (GP noise + self-guidance) or a noise-warping "
                        "baseline: " + ", ".join(METHODS[1:]))
    mask: str | None = Field(None, description="inpaint, restore mode: mask image or video URL (white = hole)")
    steps: int = Field(50, ge=1, le=1000, description="sampler steps per frame")
    guidance: float = Field(1.0, ge=0.0, le=100.0, description="self-guidance strength lambda (warped-diffusion only)")
    guidance_space: Literal["auto", "pixel", "latent"] = Field(
        "auto", description="where self-guidance compares frames: pixel (decoded frames, pixel flow), latent (the "
        "paper's latent warp), auto = pixel for super-resolution with a linear decoder (the embedded sr8 models), "
        "latent otherwise")
    seed: int = Field(0, ge=0, description="seed of the noise (and of benchmark-mode masks)")
    model: str | None = Field(None, description="model name in assets/models or a local diffusers directory")
    flow_backend: str = Field("dis", description="dis | farneback | shift:DX,DY (known integer/subpixel translation per frame)")
    frames: str | None = Field(None, description="frame range START:END (END exclusive), e.g. 0:16")
    out: str = Field("out", description="output directory URL")
    work_root: str = Field(DEFAULT_WORK_ROOT, description="artifact cache root URL")
    executor: Literal["ray", "inline"] = Field("ray", description="ray: sample on a Ray actor (RAY_ADDRESS for a cluster); "
                                               "inline: in this process")
    max_batch: int | None = Field(None, ge=1, description="largest wavefront batch (memory bound); None = all active frames")
    window: int | None = Field(None, ge=2, description="frames sampled per temporal window; None = chosen by preflight "
                               "from the memory estimate (all frames when they fit)")
    tile: int | None = Field(None, ge=4, description="latent tile edge in latent pixels (8 frame pixels each for the "
                             "embedded models); None = chosen by preflight (whole frames when they fit)")
    log_videos: bool = Field(False, description="also copy restored.mp4 and comparison.mp4 into the MLflow run's "
                             "artifacts (doubles their disk use; off: metrics.json, plots and config only)")
    max_output_pixels: int = Field(DEFAULT_MAX_OUTPUT_PIXELS, ge=1, description="largest output frame (width x height) "
                                   "preflight accepts; raise it to restore larger targets on purpose")
    storage_options: dict = Field(default_factory=dict, description="fsspec options for remote URLs")
    solver: Literal["conditional", "dps", "dflow", "dmplug", "vipaint"] = Field(
        "conditional", description="conditional: the task's conditionally trained model; dps | dflow | dmplug | vipaint: "
        "zero-shot with the unconditional prior (ops.solvers), the only way for deblur / denoise")
    source: Literal["frame", "video"] = Field(
        "frame", description="dflow / dmplug: optimise every frame's noise (frame) or the RFF weights of the one GP "
        "shared by all frames (video: sources consistent by construction; needs method warped-diffusion or gp)")
    iterations: int = Field(20, ge=1, le=10000, description="dflow / dmplug / vipaint optimisation iterations")
    zeta: float = Field(1.0, gt=0.0, description="dps / vipaint measurement step size (DPS's zeta)")
    lr: float | None = Field(None, gt=0.0, description="dflow / dmplug / vipaint learning rate (None: the solver's default)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N: where encode, sample and decode run")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="weights/activations of the networks")
    prompt: str = Field("", description="text prompt (Stable Diffusion layouts); the empty prompt is encoded too")
    negative_prompt: str = Field("", description="negative prompt for classifier-free guidance (--cfg != 1)")
    cfg: float = Field(1.0, ge=0.0, le=50.0, description="classifier-free guidance scale (1 = the prompt alone)")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", value):
            return value
        raise ValueError(f"unknown device {value!r}; expected auto, cpu, cuda or cuda:N")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; expected one of {', '.join(METHODS)}")
        return value

    @field_validator("flow_backend")
    @classmethod
    def _known_flow_backend(cls, value: str) -> str:
        if value in ("dis", "farneback") or re.fullmatch(r"shift:-?\d+(\.\d+)?,-?\d+(\.\d+)?", value):
            return value
        raise ValueError(f"unknown flow_backend {value!r}; expected dis, farneback or shift:DX,DY (pixels per frame)")

    @field_validator("frames")
    @classmethod
    def _frame_range(cls, value: str | None) -> str | None:
        if value is None:
            return value
        m = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", value)
        if not m:
            raise ValueError(f"frames {value!r} must look like START:END, e.g. 0:16")
        start, stop = m.group(1), m.group(2)
        if start and stop and int(stop) - int(start) < 2:
            raise ValueError(f"frames {value!r} selects fewer than 2 frames; temporal restoration needs at least 2")
        return value

    @model_validator(mode="after")
    def _inpaint_needs_mask(self):
        if self.task == "inpaint" and self.mode == "restore" and not self.mask:
            raise ValueError("task 'inpaint' in restore mode needs --mask (an image or video URL, white = hole); "
                             "or use --mode benchmark to generate masks")
        if self.task != "inpaint" and self.mask:
            raise ValueError("--mask is only used by task 'inpaint'")
        if self.task == "sr4" and self.solver == "conditional" and not self.model:
            raise ValueError("task 'sr4' needs --model: a Stable Diffusion x4 upscaler directory (unet/, vae/, "
                             "scheduler/, text_encoder/, tokenizer/, low_res_scheduler/); no embedded model does x4")
        if self.solver == "conditional" and self.task not in CONDITIONAL_TASKS:
            raise ValueError(f"task {self.task!r} has no conditionally trained model; pick a zero-shot solver with the "
                             f"unconditional prior: --solver {' | '.join(SOLVERS[1:])}")
        if self.source == "video" and self.solver not in SOURCE_SOLVERS:
            raise ValueError(f"--source video optimises the source noise, which only solvers {' | '.join(SOURCE_SOLVERS)} "
                             f"do; use --source frame with --solver {self.solver}")
        if self.source == "video" and self.noise_method != "gp":
            raise ValueError(f"--source video optimises the weights of the GP noise; method {self.method!r} has none: use "
                             "--method warped-diffusion or gp, or --source frame")
        if self.solver == "conditional" and (self.source != "frame" or self.lr is not None):
            raise ValueError("--source / --lr configure a zero-shot solver; add --solver dflow (or dmplug, dps, vipaint)")
        return self

    @property
    def frame_range(self) -> tuple[int, int | None]:
        if not self.frames:
            return 0, None
        start, stop = self.frames.split(":")
        return int(start or 0), (int(stop) if stop.strip() else None)

    @property
    def model_name(self) -> str:
        if self.model:
            return self.model
        from storage.models import DEFAULT_MODELS

        return PRIOR_MODEL if self.zero_shot else DEFAULT_MODELS[self.task]

    @property
    def zero_shot(self) -> bool:
        """True when an ops.solvers solver restores with the unconditional prior (no encode stage)."""
        return self.solver != "conditional"

    def solver_params(self) -> dict:
        """The zero-shot solver's own parameters (part of the sample key); {} for the conditional path."""
        if not self.zero_shot:
            return {}
        params = {"solver": self.solver}
        if self.solver in SOURCE_SOLVERS:
            from ops.solvers import INIT_BLEND

            params.update(source=self.source, iterations=self.iterations, init=INIT_BLEND)
        if self.solver == "vipaint":
            params["iterations"] = self.iterations
        if self.solver in ("dps", "vipaint"):
            params["zeta"] = self.zeta
        if self.lr is not None and self.solver != "dps":
            params["lr"] = self.lr
        return params

    @property
    def text(self) -> dict | None:
        """Prompt settings for text-conditioned models (None when left at their defaults)."""
        if not self.prompt and not self.negative_prompt and self.cfg == 1.0:
            return None
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "cfg": self.cfg}

    @property
    def noise_method(self) -> str:
        """The noise-warping method: warped-diffusion = gp noise + self-guidance."""
        return "gp" if self.method == "warped-diffusion" else self.method

    @property
    def guidance_strength(self) -> float:
        return self.guidance if self.method == "warped-diffusion" else 0.0


# Fields that say where and how a restoration runs, not what it produces: everything else in RestoreConfig is the
# restoration's identity (restore-archive's "already restored with these settings" and its manifest hash).
RUN_OPTIONS = ("input", "out", "work_root", "executor", "storage_options", "max_batch", "window", "log_videos",
               "max_output_pixels", "device")


def result_fields() -> tuple[str, ...]:
    """RestoreConfig fields that change the restored frames."""
    return tuple(name for name in RestoreConfig.model_fields if name not in RUN_OPTIONS)


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
