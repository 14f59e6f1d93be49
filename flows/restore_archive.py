"""restore-archive: restore every video under a prefix (local, s3://, any fsspec URL), unattended.

- a manifest (`manifest.jsonl` in the output prefix) keyed by input content hash + config hash: videos already
  restored with the same settings are skipped, so reruns are cheap and idempotent;
- each video is isolated: a failure is recorded with its reason and the others go on; transient I/O errors
  are retried by the stage tasks;
- output names are derived safely from input names (no traversal, readable, collisions resolved), and
  everything is written under the output prefix;
- videos are spread over Ray sampler actors (one per GPU, a configurable number on CPU), `concurrency` at a time;
- reporting: a Prefect table artifact, an MLflow parent run with one nested run per video, the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import fsspec
from prefect import flow

from flows.config import DEFAULT_WORK_ROOT, RestoreConfig, result_fields
from storage.artifacts import canonical_json, write_bytes_atomic
from storage.names import list_videos, safe_output_name



def content_hash(url: str, storage_options: dict | None = None, chunk: int = 1 << 20) -> str:
    """sha256 of the file's bytes, streamed."""
    digest = hashlib.sha256()
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def config_hash(settings: dict) -> str:
    return hashlib.sha256(canonical_json(RestoreConfig(input="x", **settings).model_dump(include=set(result_fields()))).encode()).hexdigest()[:16]


def read_manifest(url: str, storage_options: dict | None = None) -> list[dict]:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.exists(path):
        return []
    with fs.open(path, "r") as f:
        return [json.loads(line) for line in f if line.strip()]


def _relative_name(url: str, prefix: str) -> str:
    rel = url[len(prefix.rstrip("/")) + 1 :] if url.startswith(prefix.rstrip("/")) else os.path.basename(url)
    return rel.replace("/", " - ")


def archive(
    input_prefix: str,
    output_prefix: str,
    settings: dict | None = None,
    glob: str | None = None,
    concurrency: int = 1,
    actors: int | None = None,
    executor: str = "ray",
    work_root: str | None = None,
    storage_options: dict | None = None,
) -> dict:
    """Restore the archive; returns a summary with one row per video (status restored | skipped | failed)."""
    from infra import tracking

    start = time.perf_counter()
    opts = storage_options or {}
    settings = dict(settings or {})
    cfg_hash = config_hash(settings)
    out_root = output_prefix.rstrip("/")
    manifest_url = f"{out_root}/manifest.jsonl"
    manifest = read_manifest(manifest_url, opts)
    done = {(m["input_hash"], m["config_hash"]): m for m in manifest if m.get("status") == "restored"}
    videos = list_videos(input_prefix, **({"glob": glob} if glob else {}), storage_options=opts)

    # 1. plan: skip what the manifest says is done with these settings; name the rest safely
    taken = {m["name"] for m in manifest if "name" in m}
    rows, todo = [], []
    for url in videos:
        row = {"input": url, "config_hash": cfg_hash}
        try:
            row["input_hash"] = content_hash(url, opts)
        except OSError as exc:
            rows.append({**row, "status": "failed", "reason": f"cannot read input: {exc}", "seconds": 0.0})
            continue
        previous = done.get((row["input_hash"], cfg_hash))
        if previous is not None:
            rows.append({**previous, "input": url, "status": "skipped", "reason": "already restored with the same settings", "seconds": 0.0})
            continue
        name = next((m["name"] for m in manifest if m.get("input_hash") == row["input_hash"] and "name" in m), None)
        name = name or safe_output_name(_relative_name(url, input_prefix), taken)
        taken.add(name)
        todo.append({**row, "name": name, "output": f"{out_root}/{name}"})

    # 2. restore the rest, isolated, `concurrency` at a time, on shared sampler actors
    lock = threading.Lock()
    pool = None
    with tracking.start_run(experiment="restore-archive", run_name=f"archive {input_prefix}",
                            tags={"input_prefix": input_prefix, "output_prefix": output_prefix},
                            uri=tracking.tracking_uri(work_root or DEFAULT_WORK_ROOT)) as parent:
        tracking.log_config({"input_prefix": input_prefix, "output_prefix": output_prefix, **settings})  # flattened there
        if todo and executor == "ray":
            from tasks.sample import sampler_pool

            first = RestoreConfig(input="x", **settings)
            pool = sampler_pool(first.model_name, actors, first.device, first.dtype)  # lazy: bad videos never start Ray

        def restore_one(item: dict) -> dict:
            from flows.restore_video import restore

            t0 = time.perf_counter()
            try:
                cfg = RestoreConfig(input=item["input"], out=item["output"], executor=executor, storage_options=opts,
                                    **({"work_root": work_root} if work_root else {}), **settings)
                report = restore(cfg, pool=pool, parent_run_id=parent.info.run_id)
                result = {**item, "status": "restored", "reason": "", "mlflow_run_id": report["mlflow_run_id"],
                          "psnr": report.get("psnr"), "warping_error_pixel_first": report["warping_error"]["pixel_first"]}
            except Exception as exc:  # one bad video never stops the batch
                from flows.restore_video import _logger

                _logger().warning(f"restore-archive: {item['input']} failed", exc_info=True)
                result = {**item, "status": "failed", "reason": f"{exc.__class__.__name__}: {exc}"}
            result["seconds"] = round(time.perf_counter() - t0, 3)
            result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            with lock:
                manifest.append({k: v for k, v in result.items()})
                _write_manifest(manifest_url, manifest, opts)
            return result

        if todo and concurrency > 1:
            _api_ready()  # one temporary Prefect server, started here, not raced for by the worker threads
        try:
            with ThreadPoolExecutor(max_workers=max(1, concurrency)) as workers:
                rows.extend(workers.map(restore_one, todo))
        finally:
            if pool is not None:
                pool.shutdown()
        counts = {s: sum(r["status"] == s for r in rows) for s in ("restored", "skipped", "failed")}
        import mlflow

        mlflow.log_metrics({f"videos_{k}": v for k, v in counts.items()})
        mlflow.log_dict({"rows": rows}, "archive_report.json")
    summary = {"videos": len(rows), **counts, "seconds": round(time.perf_counter() - start, 3), "manifest": manifest_url,
               "mlflow_run_id": parent.info.run_id, "rows": rows}
    _table_artifact(rows)
    return summary


def _api_ready() -> None:
    """Reach the Prefect API once from this thread: with no PREFECT_API_URL this starts Prefect's temporary server,
    which the worker threads' task runs then share (several threads starting it at once lost one of its processes:
    "Server process did not start" and a stray uvicorn)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.api_healthcheck()


def _write_manifest(url: str, manifest: list[dict], opts: dict) -> None:
    write_bytes_atomic(url, "".join(json.dumps(m, sort_keys=True) + "\n" for m in manifest).encode(), storage_options=opts)


def _table_artifact(rows: list[dict]) -> None:
    try:
        from prefect.artifacts import create_table_artifact

        table = [{"video": r["input"], "status": r["status"], "reason": r.get("reason", ""), "seconds": r.get("seconds", 0.0),
                  "output": r.get("output", "")} for r in rows]
        create_table_artifact(key="restore-archive-report", table=table, description="restore-archive: one row per video")
    except Exception:
        pass  # outside a flow run there is nowhere to publish it


@flow(name="restore-archive", log_prints=True)
def restore_archive(
    input_prefix: str,
    output_prefix: str,
    glob: str | None = None,
    task: str = "sr8",
    mode: str = "restore",
    method: str = "warped-diffusion",
    steps: int = 50,
    guidance: float = 1.0,
    seed: int = 0,
    model: str | None = None,
    frames: str | None = None,
    concurrency: int = 1,
    actors: int | None = None,
    executor: str = "ray",
    work_root: str | None = None,
    storage_options: dict | None = None,
) -> dict:
    """Restore every video under `input_prefix` into `output_prefix` (see the module docstring)."""
    from infra.tracking import check_no_secrets

    check_no_secrets(storage_options, "restore-archive's storage_options parameter")  # credentials: the environment
    settings = dict(task=task, mode=mode, method=method, steps=steps, guidance=guidance, seed=seed, model=model, frames=frames)
    summary = archive(input_prefix, output_prefix, settings, glob, concurrency, actors, executor, work_root, storage_options)
    print(f"restore-archive: {summary['restored']} restored, {summary['skipped']} skipped, {summary['failed']} failed "
          f"in {summary['seconds']:.1f} s; manifest {summary['manifest']}")
    return summary


def archive_cli(args) -> int:
    from flows.cli import _restore_params

    given = _restore_params(args)  # every restore setting given on the command line is passed through
    run = {k: given.pop(k) for k in ("out", "executor", "work_root") if k in given}
    settings = {k: v for k, v in given.items()}
    summary = archive(args.input_prefix, run.get("out", "out"), settings, args.glob, args.concurrency, None,
                      run.get("executor", "ray"), run.get("work_root"))
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        for r in summary["rows"]:
            print(f"{r['status']:9s} {r['input']}  {r.get('output', '')}  {r.get('reason', '')}")
        print(f"{summary['restored']} restored, {summary['skipped']} skipped, {summary['failed']} failed in {summary['seconds']:.1f} s")
    return 1 if summary["failed"] else 0
