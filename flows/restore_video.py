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

from flows.config import Plan, RestoreConfig, RestoreSettings, RunOptions, parameters_from, plan, sample_clip_path, split_parameters
from flows.preflight import preflight
from storage.artifacts import write_json_atomic
from storage.video import VideoError
from tasks import metrics as metrics_stage
from tasks._stage import StageCall, StageRecord, store_for
from tasks.models import model_identity, model_info
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


def stage_args(cfg: RestoreConfig, p: Plan, tile: int | None = None, window: int | None = None) -> dict:
    """Every stage's arguments from the settings and the plan, in one place (each stage's `identity` picks what enters
    its key). tile / window: preflight's (None = whole frames / all frames)."""
    args = {
        "extract_frames": {"input": cfg.input, "range": list(cfg.frame_range)},
        "prepare": {"task": cfg.task, "mode": cfg.mode, "seed": cfg.seed, "mask": cfg.mask, "multiple": p.multiple},
        "estimate_flow": {"backend": cfg.flow_backend, "factor": p.factor, "multiple": None},  # prepare pads already
        "generate_noise": {"method": p.noise_method, "seed": cfg.seed, "channels": p.latent_channels,
                           "base": p.base_noise},
        "sample": {"model": cfg.model_name, "steps": cfg.steps, "guidance": p.guidance, "guidance_space": p.sample_space,
                   "text": cfg.text, "dtype": cfg.dtype, "tile": tile, "max_batch": cfg.max_batch, "window": window,
                   "device": cfg.device, "executor": cfg.executor},
        "decode": {"model": cfg.model_name, "dtype": cfg.dtype, "device": cfg.device},
        "metrics": {},
        "outputs": {"out": cfg.out, "input": cfg.input, "first_frame": cfg.frame_range[0], "chroma": cfg.chroma},
    }
    if p.zero_shot:  # zero-shot solvers read their measurement from the prepare artifact: no conditioning latents
        args["sample"].update(solver=cfg.solver_params(), task=cfg.task, seed=cfg.seed)
    else:
        args["encode"] = {"model": cfg.model_name, "dtype": cfg.dtype, "device": cfg.device}
    return args


def derive_calls(cfg: RestoreConfig, tile: int | None = None, window: int | None = None,
                 p: Plan | None = None) -> tuple[dict[str, StageCall], Plan]:
    """Every stage's call (its content key computed once, from the settings alone: keys hash parameters and upstream
    keys, never data) -> (calls by stage name, the plan). The plan is read from the card or configs, so a fully
    cached run never loads the network."""
    p = p or plan(cfg, model_info(cfg.model_name))
    args = stage_args(cfg, p, tile, window)
    calls: dict[str, StageCall] = {}
    for name in ORDER:
        if name in args:
            calls[name] = STAGES[name].call(args[name], {n: c.key for n, c in calls.items()}, cfg.storage_options)
    return calls, p


def derive_keys(cfg: RestoreConfig, tile: int | None = None, p: Plan | None = None) -> dict:
    """Every artifact stage's content key (None: a stage this job skips), plus `_plan` (flows.config.Plan), `_model`
    (model_info incl. the pad multiple, base noise) and `_space` (the guidance space the sampler is given), for
    restore()'s callers that open its artifacts (bench.memory, flows.experiments)."""
    calls, p = derive_calls(cfg, tile, p=p)
    keys = {name: calls[name].key if name in calls else None for name in ARTIFACT_STAGES}
    model = {**model_info(cfg.model_name), "base": p.base_noise, "multiple": p.multiple, "factor": p.factor}
    return {**keys, "_plan": p, "_model": model, "_space": p.sample_space}


def per_run_out(input_url: str, method: str, run_id: str | None = None) -> str:
    """Where a run writes when no --out is given: `{RESTORE_VIDEO_OUT_ROOT or out}/{input stem}-{method}-{run id}`,
    one folder per run (the Prefect flow run's id inside a flow run, else a fresh one): runs never overwrite each other."""
    root = os.environ.get("RESTORE_VIDEO_OUT_ROOT", "out").rstrip("/")
    return f"{root}/{input_stem(input_url)}-{method}-{str(run_id or uuid.uuid4().hex).replace('-', '')[:8]}"


def input_stem(url: str) -> str:
    """The file name of an input URL without its extension (and without credentials): `s3://b/x/clip.mp4` -> clip."""
    from infra.tracking import scrub

    return os.path.splitext(os.path.basename(scrub(url).rstrip("/")))[0] or "input"


def restore(cfg: RestoreConfig | RestoreSettings, options: RunOptions | None = None, pool=None,
            parent_run_id: str | None = None) -> dict:
    """Run every stage for one video; returns the metrics.json report. `cfg`: a RestoreConfig, or the RestoreSettings
    with `options`. Without an `out`, the outputs go to `per_run_out`."""
    from infra import tracking

    if options is not None:
        cfg = RestoreConfig.of(cfg, options)
    if cfg.out is None:
        cfg = cfg.model_copy(update={"out": per_run_out(cfg.input, cfg.method, tracking._flow_run_id())})
    logger = _logger()
    opts = cfg.storage_options
    t_total = time.perf_counter()
    p = plan(cfg, model_info(cfg.model_name))  # decided once; also checks that the model fits, before any work
    estimate = preflight(cfg, plan=p)  # header probe + card arithmetic: refuses what cannot fit before anything is written
    if tracking._flow_run_id() is None:  # inside a flow run the logger reaches the console and the API
        print(estimate.summary(), file=sys.stderr, flush=True)
    logger.info(estimate.summary())
    check_output_writable(cfg.out, opts)
    with tracking.restoration_run(
        os.environ.get("RESTORE_VIDEO_EXPERIMENT", "restore-video"),
        f"{input_stem(cfg.input)}:{cfg.method}",
        params=cfg.model_dump(mode="json"),
        tags={"model": cfg.model_name, "method": cfg.method, "task": cfg.task, "input": cfg.input},
        uri=tracking.tracking_uri(cfg.work_root),
        parent_run_id=parent_run_id,
        weights_hash=str(model_identity(cfg.model_name).get("weights")),
        input_url=cfg.input,
        storage_options=opts,
    ) as run:  # opened before the stages: running and failed restorations show up too
        store = store_for(cfg.work_root, opts)
        # Windows and tiles only when the job needs them (None = all frames / whole frames: the sampler's default).
        calls, _ = derive_calls(cfg, estimate.tile, estimate.window if estimate.window < estimate.frames else None, p)
        timeout = timeout_s(estimate.seconds)
        records: dict[str, StageRecord] = {}
        for name, call in calls.items():  # in ORDER; every stage a Prefect task run
            if name == "sample" and not store.exists("sample", call.key):
                logger.info(f"sampling {cfg.steps} steps, guidance {p.guidance} ({p.guidance_space} space), executor {cfg.executor}")
            records[name] = run_task(call, cfg.work_root, opts, pool=pool if name == "sample" else None, timeout=timeout)

        computed = metrics_stage.read(store, calls["metrics"].key)
        restored = store.open("decode", calls["decode"].key)
        report = {
            "task": cfg.task,
            "method": cfg.method,
            "mode": cfg.mode,
            "model": cfg.model_name,
            "guidance_space": p.guidance_space,
            "frames": int(restored.sizes["frame"]),
            "fps": float(store.open("extract_frames", calls["extract_frames"].key).attrs["fps"]),
            "preflight": estimate.to_dict(),
            "plan": p.to_dict(),
            **computed["summary"],
            "timings_s": {name: round(r.seconds, 3) for name, r in records.items()},
            "cached": {name: r.cached for name, r in records.items() if STAGES[name].artifact},
            "keys": {name: r.key for name, r in records.items() if STAGES[name].artifact},
        }
        report["mlflow_run_id"] = run.info.run_id
        report["mlflow_experiment_id"] = run.info.experiment_id
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


def flow_run_name() -> str:
    """`{input stem}:{method}` of the running flow run (Prefect's `flow_run_name`), e.g. `clip:warped-diffusion`."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    method = params.get("method") or RestoreSettings.model_fields["method"].default
    return f"{input_stem(params.get('input') or sample_clip_path())}:{method}"


# No flow-level timeout: a stuck run is caught by its stages' timeouts, sized by preflight from the job's own estimate
# (tasks.stages.timeout_s); a fixed flow timeout would kill a long restoration (a feature film on CPUs) that is progressing.
@flow(name="restore-video", flow_run_name=flow_run_name, log_prints=True)
@parameters_from(RunOptions, RestoreSettings)
def restore_video(**params) -> dict:
    """Restore one video: the input is the degraded clip (mode 'restore'; 'benchmark' degrades a ground truth
    first); default input: the embedded sample clip. Every parameter is a field of flows.config.RunOptions or
    RestoreSettings. Without `out`, the outputs go to a folder of this flow run's own (out/{input}-{method}-{id}).
    Publishes a markdown artifact `restore-video-summary` with the metrics, the outputs and the MLflow run."""
    from infra.tracking import check_no_secrets, scrub

    settings, options = split_parameters(params)
    check_no_secrets(options.storage_options, "restore-video's storage_options parameter")  # Prefect stores parameters
    for name in ("input", "out", "work_root"):
        url = getattr(options, name)
        if url and scrub(url) != url:
            raise ValueError(f"{name} {scrub(url)!r} carries credentials in the URL, which Prefect would store with the "
                             "run's parameters; put them in the environment or fsspec's config instead")
    if options.input is None:
        options = options.model_copy(update={"input": ensure_sample_clip()})
    report = restore(settings, options)
    publish_summary(report)
    return report


def quality_rows(report: dict) -> tuple[list[str], list[tuple[str, ...]]]:
    """The report's scores as a table: header ["score", "restored", "input: <baseline>"] and one row per score, the
    restoration next to the input baseline it has to beat (tasks.metrics.INPUT_BASELINES; no column without one)."""
    base = report.get("input")
    header = ["score", "restored"] + ([f"input: {base['name']}"] if base else [])
    rows = []

    def add(label, key, fmt, sub=None):
        values = [r.get(sub, {}).get(key) if sub else r.get(key) for r in ([report] + ([base] if base else []))]
        if values[0] is not None:
            rows.append((label, *[("–" if v is None else format(v, fmt)) for v in values]))

    add("warping error, pixel first", "pixel_first", ".5f", "warping_error")
    add("warping error, pixel prev", "pixel_prev", ".5f", "warping_error")
    add("warping error, latent first", "latent_first", ".4f", "warping_error")
    add("warping error, latent prev", "latent_prev", ".4f", "warping_error")
    add("PSNR (dB)", "psnr", ".2f")
    add("SSIM", "ssim", ".4f")
    add("hole PSNR (dB)", "hole_psnr", ".2f")
    add("grad ratio (1 = as sharp as the truth)", "grad_ratio", ".3f")
    add("blockiness (1 = no 8-px blocks)", "blockiness", ".3f")
    return header, rows


def summary_markdown(report: dict) -> str:
    """The run in markdown: what was restored, the scores next to the input's own (quality_rows), the output URLs
    and the MLflow run (a link when a UI is known: infra.tracking.run_url)."""
    from infra.tracking import run_url, scrub

    cached = report["cached"]
    facts = [("frames", report["frames"]), ("task / method", f"{report['task']} / {report['method']}"),
             ("model", report["model"]), ("guidance space", report["guidance_space"]),
             ("stages reused", f"{sum(cached.values())}/{len(cached)}"),
             ("total time", f"{report['timings_s'].get('total', 0):.1f} s")]
    header, rows = quality_rows(report)
    url = run_url(report["mlflow_run_id"], report.get("mlflow_experiment_id", "0"), report["mlflow_tracking_uri"])
    mlflow_line = (f"[{report['mlflow_run_id']}]({url})" if url else
                   f"`{report['mlflow_run_id']}` (`mlflow ui --backend-store-uri {report['mlflow_tracking_uri']}`, then "
                   f"#/experiments/{report.get('mlflow_experiment_id', '0')}/runs/{report['mlflow_run_id']})")
    lines = ["# restore-video", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in facts], "",
             "## Scores", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|",
             *["| " + " | ".join(r) + " |" for r in rows], "",
             "## Outputs", "", *[f"- {name}: `{u}`" for name, u in report["outputs"].items()], "",
             f"MLflow run: {mlflow_line}"]
    return scrub("\n".join(lines) + "\n")  # no credentials of a URL in an artifact


def publish_summary(report: dict) -> None:
    """`summary_markdown` as the flow run's markdown artifact `restore-video-summary`."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=summary_markdown(report), key="restore-video-summary",
                             description=f"restore-video: {report['frames']} frames, {report['task']} / {report['method']}")
