"""The restore-video flow: a DAG of cached stages, sampling on a model worker (Ray actor or inline), MLflow run.

    extract_frames -> prepare -> estimate_flow -> encode -> generate_noise -> sample -> decode -> metrics -> outputs

Every stage (tasks.stages) runs as a Prefect task run; its artifact is content-addressed in `work_root`, so a rerun
(or a run killed mid-way) recomputes only what is missing; metrics.json says which stages were reused (`cached`).
"""

from __future__ import annotations

import os
import sys
import time
import uuid

import fsspec
from prefect import flow, get_run_logger

from flows.config import DEFAULT_MAX_OUTPUT_PIXELS, RestoreConfig, sample_clip_path
from flows.preflight import preflight
from storage.artifacts import write_json_atomic
from storage.video import VideoError
from tasks import metrics as metrics_stage
from tasks._stage import StageCall, StageRecord, store_for
from tasks.models import model_identity, model_info, resolve_guidance_space
from tasks.stages import ORDER, STAGES, run_task, timeout_s

ARTIFACT_STAGES = tuple(name for name in ORDER if STAGES[name].artifact)  # those whose keys and `cached` the report lists


def check_output_writable(out: str, storage_options: dict) -> None:
    """Fail before any work if --out cannot be written; the probe leaves nothing behind."""
    try:
        fs, path = fsspec.core.url_to_fs(out, **storage_options)
        created = not fs.exists(path)
        fs.makedirs(path, exist_ok=True)
        probe = f"{path.rstrip('/')}/.write-probe-{uuid.uuid4().hex}"
        with fs.open(probe, "wb") as f:
            f.write(b"")
        fs.rm(probe)
        if created and fs.isdir(path) and not fs.ls(path):
            fs.rmdir(path)
    except OSError as exc:
        raise VideoError(f"output directory {out!r} is not writable ({exc.__class__.__name__}: {exc}); choose another --out") from exc


def ensure_sample_clip() -> str:
    """The embedded sample clip, rendered by our own code on first use."""
    path = sample_clip_path()
    if not os.path.exists(path):
        from storage.sample import make_sample_clip

        os.makedirs(os.path.dirname(path), exist_ok=True)
        make_sample_clip(path)
    return path


def stage_args(cfg: RestoreConfig, model: dict, space: str, tile: int | None = None, window: int | None = None) -> dict:
    """Every stage's arguments from the settings, in one place (each stage's `identity` picks what enters its key).
    model: model_info plus `base` (the base noise); space: the resolved guidance space; tile / window: preflight's."""
    zero_shot = cfg.zero_shot
    args = {
        "extract_frames": {"input": cfg.input, "range": list(cfg.frame_range)},
        "prepare": {"task": cfg.task, "mode": cfg.mode, "seed": cfg.seed, "mask": cfg.mask, "multiple": model["multiple"]},
        "estimate_flow": {"backend": cfg.flow_backend, "factor": model["factor"], "multiple": None},  # prepare pads already
        "generate_noise": {"method": cfg.noise_method, "seed": cfg.seed, "channels": model["latent_channels"],
                           "base": model["base"]},
        "sample": {"model": cfg.model_name, "steps": cfg.steps, "guidance": cfg.guidance_strength, "guidance_space": space,
                   "text": cfg.text, "dtype": cfg.dtype, "tile": tile, "max_batch": cfg.max_batch, "window": window,
                   "device": cfg.device, "executor": cfg.executor},
        "decode": {"model": cfg.model_name, "dtype": cfg.dtype, "device": cfg.device},
        "metrics": {},
        "outputs": {"out": cfg.out, "input": cfg.input, "first_frame": cfg.frame_range[0]},
    }
    if zero_shot:  # zero-shot solvers read their measurement from the prepare artifact: no conditioning latents
        args["sample"].update(solver=cfg.solver_params(), task=cfg.task, seed=cfg.seed)
    else:
        args["encode"] = {"model": cfg.model_name, "dtype": cfg.dtype, "device": cfg.device}
    return args


def plan_model(cfg: RestoreConfig) -> tuple[dict, str]:
    """(model, guidance space): model_info (incl. the pad multiple) plus `base`, the base noise; read from the card or
    configs, so a fully cached run never loads the network."""
    model = model_info(cfg.model_name)
    if not cfg.zero_shot and model["task"] != cfg.task:
        raise ValueError(f"model {cfg.model_name!r} was trained for task {model['task']!r}, not {cfg.task!r}; pick a {cfg.task} model")
    model = {**model, "base": model["noise"] if model["noise"] in ("gp", "white") else "white"}
    space = "latent" if cfg.zero_shot else resolve_guidance_space(cfg.guidance_space, model)
    return model, space


def derive_calls(cfg: RestoreConfig, tile: int | None = None, window: int | None = None) -> tuple[dict[str, StageCall], dict, str]:
    """Every stage's call (its content key computed once, from the settings alone: keys hash parameters and upstream
    keys, never data) -> (calls by stage name, model, guidance space)."""
    model, space = plan_model(cfg)
    args = stage_args(cfg, model, space, tile, window)
    calls: dict[str, StageCall] = {}
    for name in ORDER:
        if name in args:
            calls[name] = STAGES[name].call(args[name], {n: c.key for n, c in calls.items()}, cfg.storage_options)
    return calls, model, space


def derive_keys(cfg: RestoreConfig, tile: int | None = None) -> dict:
    """Every artifact stage's content key (None: a stage this job skips), plus `_model` (model_info incl. the pad
    multiple, base noise) and `_space` (guidance), for restore()'s callers that open its artifacts (bench.memory,
    flows.experiments)."""
    calls, model, space = derive_calls(cfg, tile)
    keys = {name: calls[name].key if name in calls else None for name in ARTIFACT_STAGES}
    return {**keys, "_model": model, "_space": space}


def restore(cfg: RestoreConfig, pool=None, parent_run_id: str | None = None) -> dict:
    """Run every stage for one video, each as a Prefect task run; returns the metrics.json report."""
    from infra import tracking

    logger = _logger()
    opts = cfg.storage_options
    t_total = time.perf_counter()
    if cfg.zero_shot and (task := model_info(cfg.model_name)["task"]) != "prior":  # before any work
        raise ValueError(f"--solver {cfg.solver} needs an unconditional prior; model {cfg.model_name!r} was trained for "
                         f"task {task!r}: pick a prior model (e.g. prior-gp, `restore-video train --task prior`)")
    plan = preflight(cfg)  # header probe + card arithmetic: refuses what cannot fit before anything is written
    print(plan.summary(), file=sys.stderr, flush=True)
    logger.info(plan.summary())
    check_output_writable(cfg.out, opts)
    with tracking.restoration_run(
        os.environ.get("RESTORE_VIDEO_EXPERIMENT", "restore-video"),
        f"{os.path.basename(cfg.input)}:{cfg.method}",
        params=cfg.model_dump(mode="json"),
        tags={"model": cfg.model_name, "method": cfg.method, "task": cfg.task, "input": cfg.input},
        uri=tracking.tracking_uri(cfg.work_root),
        parent_run_id=parent_run_id,
        weights_hash=str(model_identity(cfg.model_name).get("weights")),
        input_url=cfg.input,
    ) as run:  # opened before the stages: running and failed restorations show up too
        store = store_for(cfg.work_root, opts)
        # Windows and tiles only when the job needs them (None = all frames / whole frames: the sampler's default).
        calls, model, space = derive_calls(cfg, plan.tile, plan.window if plan.window < plan.frames else None)
        timeout = timeout_s(plan.seconds)
        records: dict[str, StageRecord] = {}
        for name, call in calls.items():  # in ORDER; every stage a Prefect task run
            if name == "sample" and not store.exists("sample", call.key):
                logger.info(f"sampling {cfg.steps} steps, guidance {cfg.guidance_strength} ({space} space), executor {cfg.executor}")
            records[name] = run_task(call, cfg.work_root, opts, pool=pool if name == "sample" else None, timeout=timeout)

        computed = metrics_stage.read(store, calls["metrics"].key)
        restored = store.open("decode", calls["decode"].key)
        report = {
            "task": cfg.task,
            "method": cfg.method,
            "mode": cfg.mode,
            "model": cfg.model_name,
            "guidance_space": space if cfg.guidance_strength > 0 else "none",
            "frames": int(restored.sizes["frame"]),
            "fps": float(store.open("extract_frames", calls["extract_frames"].key).attrs["fps"]),
            "preflight": plan.to_dict(),
            **computed["summary"],
            "timings_s": {name: round(r.seconds, 3) for name, r in records.items()},
            "cached": {name: r.cached for name, r in records.items() if STAGES[name].artifact},
            "keys": {name: r.key for name, r in records.items() if STAGES[name].artifact},
        }
        report["mlflow_run_id"] = run.info.run_id
        report["mlflow_tracking_uri"] = tracking.tracking_uri(cfg.work_root)
        urls = records["outputs"].extra["urls"]
        report["timings_s"]["total"] = round(time.perf_counter() - t_total, 3)
        report["outputs"] = urls
        write_json_atomic(urls["metrics.json"], report, storage_options=opts)
        tracking.log_restoration(report, computed["per_frame"], urls, opts, log_videos=cfg.log_videos)
        sampled = store.open("sample", calls["sample"].key)  # a zero-shot solver's loss curves -> metric series solver_<name>
        for name in [v for v in sampled.data_vars if str(v).startswith("history_")]:
            tracking.log_series("solver_" + str(name)[len("history_"):], sampled[name].values.tolist(), run.info.run_id)
        logger.info(f"restored {report['frames']} frames -> {urls['restored.mp4']} (MLflow run {report['mlflow_run_id']})")
        return report


def _logger():
    try:
        return get_run_logger()
    except Exception:
        import logging

        return logging.getLogger("restore-video")


@flow(name="restore-video", log_prints=True)
def restore_video(
    input: str | None = None,
    task: str = "sr8",
    mode: str = "restore",
    method: str = "warped-diffusion",
    mask: str | None = None,
    steps: int = 50,
    guidance: float = 1.0,
    guidance_space: str = "auto",
    seed: int = 0,
    model: str | None = None,
    flow_backend: str = "dis",
    frames: str | None = None,
    out: str = "out",
    work_root: str | None = None,
    executor: str = "ray",
    max_batch: int | None = None,
    window: int | None = None,
    tile: int | None = None,
    max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS,
    device: str = "auto",
    dtype: str = "float32",
    prompt: str = "",
    negative_prompt: str = "",
    cfg: float = 1.0,
    solver: str = "conditional",
    source: str = "frame",
    iterations: int = 20,
    zeta: float = 1.0,
    lr: float | None = None,
) -> dict:
    """Restore one video: the input is the degraded clip (mode 'restore'; 'benchmark' degrades a ground truth
    first). Default input: the embedded sample clip."""
    params = dict(input=input or ensure_sample_clip(), task=task, mode=mode, method=method, mask=mask, steps=steps,
                  guidance=guidance, guidance_space=guidance_space, seed=seed, model=model, flow_backend=flow_backend, frames=frames, out=out,
                  executor=executor, max_batch=max_batch, window=window, tile=tile, max_output_pixels=max_output_pixels,
                  device=device, dtype=dtype, prompt=prompt, negative_prompt=negative_prompt, cfg=cfg,
                  solver=solver, source=source, iterations=iterations, zeta=zeta, lr=lr)
    if work_root:
        params["work_root"] = work_root
    return restore(RestoreConfig(**params))
