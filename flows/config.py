"""Validated configuration of a restore-video run (pydantic): every bad field gets a message saying what to do."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

METHODS = ("warped-diffusion", "gp", "fixed", "resample", "nearest", "bilinear", "integral")
TASKS = ("sr8", "sr4", "inpaint", "deblur", "denoise")
DTYPES = ("float32", "float16", "bfloat16")
CONDITIONAL_TASKS = ("sr8", "sr4", "inpaint")  # tasks with a conditional model (sr4: embedded, or a --model x4 upscaler); the others need a zero-shot solver
SOLVERS = ("conditional", "dps", "dflow", "dmplug", "vipaint")  # conditional = the task's own model; others: ops.solvers
SOURCE_SOLVERS = ("dflow", "dmplug")  # the solvers that optimise the source noise (--source)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
PRIOR_MODEL = "prior-gp"  # the unconditional prior the zero-shot solvers use by default
DEFAULT_MAX_OUTPUT_PIXELS = 3840 * 2160  # 4K UHD per frame: larger targets are refused unless asked for
DEFAULT_WORK_ROOT = os.environ.get("RESTORE_VIDEO_WORK_ROOT", str(PROJECT_ROOT / "work"))


def sample_clip_path() -> str:
    """The embedded sample clip (made by storage.sample on first use)."""
    return str(PROJECT_ROOT / "assets" / "sample" / "sample_256.mp4")


class RunOptions(BaseModel):
    """Where and how a restoration runs: none of these change the restored frames (not part of its identity)."""

    model_config = ConfigDict(extra="forbid")

    input: str | None = Field(None, description="video URL: local path or any fsspec URL (s3://, file://, ...); "
                              "None: the embedded sample clip")
    out: str | None = Field(None, description="output directory URL; None: a folder of its own per run, "
                            "{RESTORE_VIDEO_OUT_ROOT or out}/{input}-{method}-{run id} (runs never overwrite each other)")
    work_root: str = Field(DEFAULT_WORK_ROOT, description="artifact cache root URL")
    executor: Literal["ray", "inline"] = Field("ray", description="ray: sample on a Ray actor (RAY_ADDRESS for a cluster); "
                                               "inline: in this process")
    storage_options: dict = Field(default_factory=dict, description="fsspec options for remote URLs (no credentials: "
                                  "those come from the environment or fsspec's config)")
    max_batch: int | None = Field(None, ge=1, description="largest wavefront batch (memory bound); None = all active frames")
    window: int | None = Field(None, ge=2, description="frames sampled per temporal window; None = chosen by preflight "
                               "from the memory estimate (all frames when they fit)")
    log_videos: bool = Field(False, description="also copy restored.mp4 and comparison.mp4 into the MLflow run's "
                             "artifacts (doubles their disk use; off: metrics.json, plots and config only)")
    max_output_pixels: int = Field(DEFAULT_MAX_OUTPUT_PIXELS, ge=1, description="largest output frame (width x height) "
                                   "preflight accepts; raise it to restore larger targets on purpose")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N: where encode, sample and decode run")
    chroma: Literal["444", "420"] = Field("444", description="colour sampling of restored.mp4 (H.264 crf 18): 444 keeps "
                                          "full colour resolution (High 4:4:4; closest to the decoded frames the "
                                          "metrics score); 420 plays in "
                                          "every browser and phone but halves colour resolution, which itself adds "
                                          "8-px block structure (the demo's ground truth: blockiness 1.12 after a 4:2:0 "
                                          "encode, 1.03 after 4:4:4)")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", value):
            return value
        raise ValueError(f"unknown device {value!r}; expected auto, cpu, cuda or cuda:N")


class RestoreSettings(BaseModel):
    """Everything that changes the restored frames: `model_dump()` is the identity of a restoration (restore-archive's
    "already restored with these settings", its manifest hash)."""

    model_config = ConfigDict(extra="forbid")

    task: Literal[TASKS] = Field(
        "sr8", description="sr8 / sr4: super-resolution x8 / x4; inpaint: fill the holes of --mask; deblur / denoise: "
        "zero-shot only (--solver)")
    mode: Literal["restore", "benchmark"] = Field(
        "restore", description="restore: the input is the degraded video; benchmark: the input is ground truth, degraded first"
    )
    method: Literal[METHODS] = Field("warped-diffusion", description="warped-diffusion (GP noise + self-guidance) or a "
                                     "noise-warping baseline: " + ", ".join(METHODS[1:]))
    mask: str | None = Field(None, description="inpaint: mask image or video URL (white = hole); restore mode: "
                                "the input's holes; benchmark mode: holes cut into the clean input (default: drawn from "
                                "the seed)")
    steps: int = Field(50, ge=1, le=1000, description="sampler steps per frame")
    guidance: float = Field(0.5, ge=0.0, le=100.0, description="self-guidance strength lambda (warped-diffusion only); 0.5 is what the guidance sweep picks for the default models on the tuning clip (EXPERIMENTS.md, guidance-sweep-res): stronger guidance raised their warping error")
    guidance_space: Literal["auto", "pixel", "latent"] = Field(
        "auto", description="where self-guidance compares frames: pixel (decoded frames, pixel flow), latent (the "
        "paper's latent warp), auto = pixel for super-resolution with a linear decoder (the embedded sr8 models), "
        "latent otherwise")
    seed: int = Field(0, ge=0, description="seed of the noise (and of benchmark-mode masks without --mask)")
    model: str | None = Field(None, description="model name in assets/models or a local diffusers directory")
    flow_backend: str = Field("dis", description="dis | farneback | shift:DX,DY (known integer/subpixel translation per frame)")
    frames: str | None = Field(None, description="frame range START:END (END exclusive), e.g. 0:16")
    tile: int | None = Field(None, ge=4, description="latent tile edge in latent pixels (8 frame pixels each for the "
                             "embedded models); None = chosen by preflight (whole frames when they fit)")
    solver: Literal[SOLVERS] = Field(
        "conditional", description="conditional: the task's conditionally trained model; dps | dflow | dmplug | vipaint: "
        "zero-shot with the unconditional prior (ops.solvers), the only way for deblur / denoise")
    source: Literal["frame", "video"] = Field(
        "frame", description="dflow / dmplug: optimise every frame's noise on its own (frame), or all frames jointly "
        "(video): each source = the shared warped GP field + its own residual, with a temporal coupling of the "
        "restored frames along the flow (--coupling) and a penalty on the residuals (--residual); needs method "
        "warped-diffusion or gp")
    coupling: float | None = Field(
        None, ge=0.0, le=1e4, description="--source video: weight gamma of sum_t |warp_t(x_t) - x_(t-1)|^2 over valid "
        "pixels of the restored frames (the estimated flow, as the warping error), against the data term "
        "|y - A(x)|^2 (None: ops.solvers.VIDEO_DEFAULTS)")
    residual: float | None = Field(
        None, ge=0.0, le=1e4, description="--source video: weight beta of beta/2 |delta|^2 on each frame's departure "
        "delta from the shared warped GP field (0: free per-frame sources; None: ops.solvers.VIDEO_DEFAULTS)")
    source_reg: float | None = Field(
        None, ge=0.0, le=1e4, description="--source video: weight of D-Flow's chi regulariser on every frame's source, "
        "keeping it plausible unit noise against the residual penalty's pull towards the smoother GP field (None: "
        "ops.solvers.VIDEO_DEFAULTS)")
    iterations: int = Field(20, ge=1, le=10000, description="dflow / dmplug / vipaint optimisation iterations")
    zeta: float = Field(1.0, gt=0.0, description="dps / vipaint measurement step size (DPS's zeta)")
    lr: float | None = Field(None, gt=0.0, description="dflow / dmplug / vipaint learning rate (None: the solver's default)")
    dtype: Literal[DTYPES] = Field("float32", description="weights/activations of the networks")
    prompt: str = Field("", description="text prompt (Stable Diffusion layouts); the empty prompt is encoded too")
    negative_prompt: str = Field("", description="negative prompt for classifier-free guidance (--cfg != 1)")
    cfg: float = Field(1.0, ge=0.0, le=50.0, description="classifier-free guidance scale (1 = the prompt alone)")

    @field_validator("method", mode="before")
    @classmethod
    def _known_method(cls, value):
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
    def _consistent(self):
        if self.task == "inpaint" and self.mode == "restore" and not self.mask:
            raise ValueError("task 'inpaint' in restore mode needs --mask (an image or video URL, white = hole); "
                             "or use --mode benchmark to generate masks")
        if self.task != "inpaint" and self.mask:
            raise ValueError("--mask is only used by task 'inpaint'")
        if self.solver == "conditional" and not self.model and self.task in CONDITIONAL_TASKS:
            from storage.models import DEFAULT_MODELS

            if self.task not in DEFAULT_MODELS:
                raise ValueError(f"task {self.task!r} needs --model: no embedded model does it")
        if self.solver == "conditional" and self.task not in CONDITIONAL_TASKS:
            raise ValueError(f"task {self.task!r} has no conditionally trained model; pick a zero-shot solver with the "
                             f"unconditional prior: --solver {' | '.join(SOLVERS[1:])}")
        if self.source == "video" and self.solver not in SOURCE_SOLVERS:
            raise ValueError(f"--source video optimises the source noise, which only solvers {' | '.join(SOURCE_SOLVERS)} "
                             f"do; use --source frame with --solver {self.solver}")
        if self.source == "video" and self.noise_method != "gp":
            raise ValueError(f"--source video writes every frame's source around the GP noise's warped field; method "
                             f"{self.method!r} has none: use "
                             "--method warped-diffusion or gp, or --source frame")
        if self.source != "video" and any(v is not None for v in (self.coupling, self.residual, self.source_reg)):
            raise ValueError("--coupling / --residual / --source-reg are the video-level terms of --source video; "
                             "per-frame sources "
                             "(--source frame) are optimised one frame at a time: add --source video or drop them")
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
            if self.source == "video":  # per-frame keys stay as they were: these enter only here
                from ops.solvers import VIDEO_DEFAULTS

                given = {"coupling": self.coupling, "residual": self.residual, "source_reg": self.source_reg}
                params.update({k: VIDEO_DEFAULTS[k] if v is None else v for k, v in given.items()})
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
        """The noise-warping method: warped-diffusion = gp noise + self-guidance (the one place this is decided)."""
        return "gp" if self.method == "warped-diffusion" else self.method

    @property
    def guidance_strength(self) -> float:
        """Self-guidance lambda as sampled: warped-diffusion's `guidance`, 0 (off) for every baseline."""
        return self.guidance if self.method == "warped-diffusion" else 0.0


class RestoreConfig(RestoreSettings, RunOptions):
    """One restoration as restore() takes it: its settings (`.settings`, the identity) + how it runs (`.options`).

    Attribute access is flat (`cfg.task`, `cfg.out`); `RestoreConfig.of(settings, options)` combines the two models.
    """

    @model_validator(mode="after")
    def _has_input(self):
        if not self.input:
            raise ValueError("input: a video URL is required (restore_video() falls back to the embedded sample clip)")
        return self

    @classmethod
    def of(cls, settings: RestoreSettings, options: RunOptions) -> "RestoreConfig":
        return cls(**settings.model_dump(), **options.model_dump())

    @property
    def settings(self) -> RestoreSettings:
        return RestoreSettings(**self.model_dump(include=set(RestoreSettings.model_fields)))

    @property
    def options(self) -> RunOptions:
        return RunOptions(**self.model_dump(include=set(RunOptions.model_fields)))


# Fields that say where and how a restoration runs, not what it produces (RunOptions); every other field is the
# restoration's identity (RestoreSettings).
RUN_OPTIONS = tuple(RunOptions.model_fields)


def result_fields() -> tuple[str, ...]:
    """RestoreConfig fields that change the restored frames: RestoreSettings' fields."""
    return tuple(RestoreSettings.model_fields)


@dataclass(frozen=True)
class Plan:
    """What a restoration does, decided once from its settings and its model (`plan`): every stage reads it."""

    model: str  # model name
    factor: int  # pixels per latent cell of the autoencoder
    multiple: int  # frame sizes the model takes are multiples of this (latent factor x UNet downsampling)
    latent_channels: int
    noise_method: str  # gp | fixed | resample | nearest | bilinear | integral
    base_noise: str  # the model's training noise as the noise stage draws it: gp | white
    guidance: float  # self-guidance lambda as sampled; 0 = off
    guided: bool  # is self-guidance on (the one place this is answered)
    guidance_space: str  # pixel | latent where guidance compares frames; "none" when it is off
    schedule: str  # wavefront (guided: frame j needs frame j-1's step) | parallel (unguided: all frames per step)
    zero_shot: bool

    @property
    def sample_space(self) -> str:
        """The guidance space the sample stage is given (pixel | latent; 'latent' when unguided, as before)."""
        return self.guidance_space if self.guided else "latent"

    def to_dict(self) -> dict:
        return asdict(self)


def plan(settings: RestoreSettings, info: dict) -> Plan:
    """Decide once, from the settings and the model's `tasks.models.model_info`: noise method and base noise, guidance
    on/off and its space ('auto' resolved), the sampling schedule and the padding multiple. Raises ValueError when the
    model does not fit the task (a conditional model of another task; a zero-shot solver without a prior)."""
    from tasks.models import resolve_guidance_space

    name = settings.model_name
    if settings.zero_shot and info["task"] != "prior":
        raise ValueError(f"--solver {settings.solver} needs an unconditional prior; model {name!r} was trained for "
                         f"task {info['task']!r}: pick a prior model (e.g. prior-gp, `restore-video train --task prior`)")
    if not settings.zero_shot and info["task"] != settings.task:
        raise ValueError(f"model {name!r} was trained for task {info['task']!r}, not {settings.task!r}; pick a "
                         f"{settings.task} model")
    guidance = settings.guidance_strength
    guided = guidance > 0
    # zero-shot solvers guide in latent space (their measurement already lives in pixels)
    space = "latent" if settings.zero_shot else resolve_guidance_space(settings.guidance_space, info)
    return Plan(model=name, factor=int(info["factor"]), multiple=int(info["multiple"]),
                latent_channels=int(info["latent_channels"]), noise_method=settings.noise_method,
                base_noise=info["noise"] if info.get("noise") in ("gp", "white") else "white", guidance=guidance, guided=guided,
                guidance_space=space if guided else "none", schedule="wavefront" if guided else "parallel",
                zero_shot=settings.zero_shot)


def parameters_from(*models: type[BaseModel], exclude: tuple[str, ...] = ()):
    """Decorator: give a `**params` function one keyword parameter per field of `models` (but `exclude`), typed as
    the field (with its constraints: Prefect's schema shows enums, bounds and defaults) and documented by its
    description in a Google-style `Args:` section (where Prefect reads parameter descriptions). The function's own
    named parameters come first (document them in an `Args:` section that ends its docstring). The fields stay
    written once, in the models; `params` holds the model fields given (the models fill in their defaults)."""
    import inspect
    from typing import Annotated

    def apply(fn):
        own = [p for p in inspect.signature(fn).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        params, docs = list(own), []
        for model in models:
            for name, field in model.model_fields.items():
                if name in exclude:
                    continue
                annotation = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
                params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                                default=field.get_default(call_default_factory=True)))
                docs.append(f"    {name}: {' '.join((field.description or name).split())}")
        doc = inspect.cleandoc(fn.__doc__ or "")
        fn.__signature__ = inspect.Signature(params)
        fn.__doc__ = (doc + "\n" if "\nArgs:\n" in doc else doc + "\n\nArgs:\n") + "\n".join(docs)
        return fn

    return apply


def split_parameters(params: dict) -> tuple[RestoreSettings, RunOptions]:
    """The (settings, options) of a flow's flat parameters (`parameters_from(RunOptions, RestoreSettings)`)."""
    unknown = set(params) - set(RestoreSettings.model_fields) - set(RunOptions.model_fields)
    if unknown:
        raise ValueError(f"unknown parameters {sorted(unknown)}")
    return (RestoreSettings(**{k: v for k, v in params.items() if k in RestoreSettings.model_fields}),
            RunOptions(**{k: v for k, v in params.items() if k in RunOptions.model_fields}))
