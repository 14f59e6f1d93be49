"""The restore-video flow: a DAG of cached stages, sampling on a model worker (Ray actor or inline), MLflow run.

    extract_frames -> prepare -> estimate_flow -> encode -> generate_noise -> sample -> decode -> outputs + metrics

Every stage's artifact is content-addressed in `work_root`, so a rerun (or a run killed mid-way) recomputes
only what is missing; metrics.json says which stages were reused (`cached`).
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
from storage.video import VideoError
from tasks import decode as decode_stage
from tasks import encode as encode_stage
from tasks import extract as extract_stage
from tasks import flow as flow_stage
from tasks import noise as noise_stage
from tasks import outputs
from tasks import prepare as prepare_stage
from tasks import sample as sample_stage
from tasks._stage import StageRecord, store_for
from tasks.models import model_identity, model_info

STAGES = ("extract_frames", "prepare", "estimate_flow", "encode", "generate_noise", "sample", "decode", "metrics")


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


class _Progress:
    """Sampling progress to a tqdm bar and a Prefect progress artifact."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="sampling", unit="tick")
        self.artifact = None
        try:
            from prefect.artifacts import create_progress_artifact

            self.artifact = create_progress_artifact(progress=0.0, description="restore-video sampling")
        except Exception:  # outside a flow run there is nowhere to publish it
            self.artifact = None

    def __call__(self, info: dict) -> None:
        done, total = info.get("tick", 0), max(info.get("total_ticks", 0), 1)
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()
        if self.artifact is not None:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact, progress=100.0 * done / total)

    def close(self) -> None:
        self.bar.close()


def run_sampling(cfg: RestoreConfig, request: dict, pool=None) -> StageRecord:
    """Sample on the given actor pool, on a fresh Ray actor, or in-process (`executor='inline'`)."""
    progress = _Progress(total=cfg.steps)
    try:
        if pool is not None:
            return StageRecord(**pool.submit("sample", progress=progress, **request))
        if cfg.executor == "inline":
            worker = sample_stage.SamplerWorker(cfg.model_name, device=cfg.device, dtype=cfg.dtype)
            worker._external_callback = progress
            return StageRecord(**worker.sample(**request))
        with sample_stage.sampler_pool(cfg.model_name, num_actors=1, device=cfg.device, dtype=cfg.dtype) as ray_pool:
            return StageRecord(**ray_pool.submit("sample", progress=progress, **request))
    finally:
        progress.close()


def derive_keys(cfg: RestoreConfig, tile: int | None = None, p: Plan | None = None) -> dict:
    """Every stage's content key from the settings alone (keys hash parameters and upstream keys, never data), in one
    place for restore() and bench.memory. Also `_plan` (flows.config.Plan: what the run does, decided once), `_model`
    (model_info incl. the pad multiple, base noise) and `_space` (the guidance space the sampler is given)."""
    opts = cfg.storage_options
    info = model_info(cfg.model_name)  # from the card / configs: a fully cached run never loads the network
    p = p or plan(cfg, info)
    model = {**info, "base": p.base_noise, "multiple": p.multiple, "factor": p.factor}
    mask_ident = extract_stage.source_identity(cfg.mask, opts) if cfg.mask else None
    k = {"extract_frames": extract_stage.extract_key(cfg.input, cfg.frame_range, opts)}
    k["prepare"] = prepare_stage.prepare_key(k["extract_frames"], cfg.task, cfg.mode, cfg.seed, mask_ident, p.multiple)
    k["estimate_flow"] = flow_stage.flow_key(k["prepare"], cfg.flow_backend, p.factor)
    # zero-shot solvers read their measurement from the prepare artifact: no conditioning latents
    k["encode"] = None if p.zero_shot else encode_stage.encode_key(k["prepare"], cfg.model_name, cfg.dtype)
    k["generate_noise"] = noise_stage.noise_key(k["estimate_flow"], p.noise_method, cfg.seed, p.latent_channels,
                                                p.base_noise)
    k["sample"] = sample_stage.sample_key(k["generate_noise"], k["encode"], k["estimate_flow"], cfg.model_name, cfg.steps,
                                          p.guidance, cfg.max_batch, p.sample_space, cfg.text, cfg.dtype, tile=tile,
                                          solver=cfg.solver_params(), prepare=k["prepare"])
    k["decode"] = decode_stage.decode_key(k["sample"], k["prepare"], cfg.model_name, cfg.dtype)
    k["metrics"] = outputs.metrics_key(k["decode"], k["prepare"], k["estimate_flow"], k["sample"])
    return {**k, "_plan": p, "_model": model, "_space": p.sample_space}


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
        records: dict[str, StageRecord] = {}

        # 1-2. frames and conditioning
        k = derive_keys(cfg, estimate.tile, p)  # every stage's content key, from the settings alone
        _, model, space = k.pop("_plan"), k.pop("_model"), k.pop("_space")
        records["extract_frames"] = extract_stage.extract_frames(cfg.work_root, opts, k["extract_frames"], cfg.input, cfg.frame_range)
        records["prepare"] = prepare_stage.prepare(cfg.work_root, opts, k["prepare"], k["extract_frames"], cfg.task, cfg.mode,
                                                   cfg.seed, cfg.mask, model["multiple"])
        # 3. flow (latent flows at the model's latent factor)
        records["estimate_flow"] = flow_stage.estimate_flow(cfg.work_root, opts, k["estimate_flow"], k["prepare"], cfg.flow_backend,
                                                            model["factor"])
        # 4-5. conditioning latents and initial noise
        if not cfg.zero_shot:
            records["encode"] = encode_stage.encode(cfg.work_root, opts, k["encode"], k["prepare"], cfg.model_name, cfg.device,
                                                    cfg.dtype)
        records["generate_noise"] = noise_stage.generate_noise(cfg.work_root, opts, k["generate_noise"], k["estimate_flow"],
                                                               p.noise_method, cfg.seed, p.latent_channels, p.base_noise)
        # 6. sampling (the expensive stage)
        k_sample = k["sample"]
        request = dict(work_root=cfg.work_root, storage_options=opts, key=k_sample, noise=k["generate_noise"], encode=k["encode"],
                       flow=k["estimate_flow"], steps=cfg.steps, guidance=p.guidance, max_batch=cfg.max_batch,
                       guidance_space=space, text=cfg.text)
        if cfg.zero_shot:
            request.update(solver=cfg.solver_params(), zero_shot=dict(prepare=k["prepare"], task=cfg.task, seed=cfg.seed))
        # Windows and tiles only when the job needs them (None = all frames / whole frames: the sampler's default).
        if estimate.window < estimate.frames:
            request["window"] = estimate.window
        if estimate.tile is not None:
            request["tile"] = estimate.tile
        if store.exists("sample", k_sample):
            records["sample"] = StageRecord("sample", k_sample, True)
        else:
            logger.info(f"sampling {cfg.steps} steps, guidance {p.guidance} ({p.guidance_space} space), executor {cfg.executor}")
            records["sample"] = run_sampling(cfg, request, pool)
        # 7. decode
        records["decode"] = decode_stage.decode(cfg.work_root, opts, k["decode"], k_sample, k["prepare"], cfg.model_name,
                                                cfg.device, cfg.dtype)

        # 8. metrics and outputs
        t_out = time.perf_counter()
        restored = store.open("decode", k["decode"])  # lazy: metrics and the writers read chunks of frames
        prepared = store.open("prepare", k["prepare"])
        extracted = store.open("extract_frames", k["extract_frames"])
        computed, records["metrics"] = outputs.cached_metrics(store, k["metrics"], restored, prepared, k["estimate_flow"], k_sample)
        fps = float(extracted.attrs["fps"])
        report = {
            "task": cfg.task,
            "method": cfg.method,
            "mode": cfg.mode,
            "model": cfg.model_name,
            "guidance_space": p.guidance_space,
            "frames": int(restored.sizes["frame"]),
            "fps": fps,
            "preflight": estimate.to_dict(),
            "plan": p.to_dict(),
            **computed["summary"],
            "timings_s": {name: round(r.seconds, 3) for name, r in records.items()},
            "cached": {name: r.cached for name, r in records.items()},
            "keys": {name: r.key for name, r in records.items()},
        }
        report["mlflow_run_id"] = run.info.run_id
        report["mlflow_experiment_id"] = run.info.experiment_id
        report["mlflow_tracking_uri"] = tracking.tracking_uri(cfg.work_root)
        times, start_s = outputs.source_times(cfg.input, cfg.frame_range[0], int(restored.sizes["frame"]), fps, opts)
        audio = cfg.input if extracted.attrs.get("info_has_audio") else None
        urls = outputs.write_outputs(cfg.out, restored["frames"], prepared, fps, audio, computed["per_frame"], opts,
                                     times=times, audio_start=start_s)
        report["timings_s"]["outputs"] = round(time.perf_counter() - t_out, 3)
        report["timings_s"]["total"] = round(time.perf_counter() - t_total, 3)
        report["outputs"] = urls
        from storage.artifacts import write_json_atomic

        write_json_atomic(urls["metrics.json"], report, storage_options=opts)
        outputs.log_to_mlflow(report, computed["per_frame"], urls, opts, log_videos=cfg.log_videos)
        sampled = store.open("sample", k_sample)  # a zero-shot solver's loss curves -> metric series solver_<name>
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


FLOW_TIMEOUT_S = 24 * 3600  # a flow run that has not finished in a day is stuck (a long CPU restoration takes hours)


def flow_run_name() -> str:
    """`{input stem}:{method}` of the running flow run (Prefect's `flow_run_name`), e.g. `clip:warped-diffusion`."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    method = params.get("method") or RestoreSettings.model_fields["method"].default
    return f"{input_stem(params.get('input') or sample_clip_path())}:{method}"


@flow(name="restore-video", flow_run_name=flow_run_name, timeout_seconds=FLOW_TIMEOUT_S, log_prints=True)
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


def summary_markdown(report: dict) -> str:
    """The run in markdown: what was restored, the metrics, the output URLs and the MLflow run (a link when a UI is
    known: infra.tracking.run_url)."""
    from infra.tracking import run_url, scrub

    we = report["warping_error"]
    rows = [("frames", report["frames"]), ("task / method", f"{report['task']} / {report['method']}"),
            ("model", report["model"]), ("guidance space", report["guidance_space"]),
            ("warping error, pixel (first / prev)", f"{we['pixel_first']:.5f} / {we['pixel_prev']:.5f}"),
            ("warping error, latent (first / prev)", f"{we['latent_first']:.4f} / {we['latent_prev']:.4f}")]
    if "psnr" in report:
        rows.append(("PSNR / SSIM", f"{report['psnr']:.2f} dB / {report['ssim']:.4f}"))
    cached = report["cached"]
    rows += [("stages reused", f"{sum(cached.values())}/{len(cached)}"),
             ("total time", f"{report['timings_s'].get('total', 0):.1f} s")]
    url = run_url(report["mlflow_run_id"], report.get("mlflow_experiment_id", "0"), report["mlflow_tracking_uri"])
    mlflow_line = (f"[{report['mlflow_run_id']}]({url})" if url else
                   f"`{report['mlflow_run_id']}` (`mlflow ui --backend-store-uri {report['mlflow_tracking_uri']}`, then "
                   f"#/experiments/{report.get('mlflow_experiment_id', '0')}/runs/{report['mlflow_run_id']})")
    lines = ["# restore-video", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
             "## Outputs", "", *[f"- {name}: `{u}`" for name, u in report["outputs"].items()], "",
             f"MLflow run: {mlflow_line}"]
    return scrub("\n".join(lines) + "\n")  # no credentials of a URL in an artifact


def publish_summary(report: dict) -> None:
    """`summary_markdown` as the flow run's markdown artifact `restore-video-summary`."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=summary_markdown(report), key="restore-video-summary",
                             description=f"restore-video: {report['frames']} frames, {report['task']} / {report['method']}")
