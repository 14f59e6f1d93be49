"""restore-archive: restore every video under a prefix (local, s3://, any fsspec URL), unattended.

- one Prefect task run per video, all in the archive's flow run (logs, progress artifacts, the MLflow
  `prefect_flow_run_id` tag), `concurrency` at a time on a Prefect ThreadPoolTaskRunner;
- a manifest (`manifest.jsonl` in the output prefix) says what is restored: a video whose identity (`ukey`: see
  `input_ukey`, the file's metadata, not its bytes) and settings hash (`config_hash`: the settings and the weights
  of the model they resolve to) are already in it is skipped,
  so reruns are cheap and idempotent; the manifest is replaced atomically after every video (one writer: the flow);
- each video is isolated: a failure is recorded with its reason (manifest, summary table) and the others go on;
  a failed video whose output folder is new leaves none behind; transient I/O errors are retried by the stage tasks;
  the flow run ends Failed ("N of M videos failed") after the whole batch, so a nightly run with a bad file shows red;
- output names are derived safely from input names (no traversal, readable, collisions resolved), an input keeps
  its output name across runs, and everything is written under the output prefix;
- with `executor="ray"` the videos share one Ray actor pool (one actor per GPU of the cluster, started lazily);
- reporting: a Prefect table artifact, an MLflow parent run with one nested run per video, the manifest.

The `nightly` deployment (prefect.yaml) runs at most one flow run at a time (deployment concurrency limit 1), so
two runs never race on the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.config import RestoreConfig, RestoreSettings, result_fields
from storage.artifacts import canonical_json, write_bytes_atomic
from storage.names import list_videos, safe_output_name

MANIFEST = "manifest.jsonl"
RUN_FIELDS = ("out", "executor", "work_root")  # RestoreConfig fields the archive decides per video or per run
# info() fields that change when an object is rewritten: with none of them, fs.ukey() would only hash name and size
CHANGE_MARKERS = ("mtime", "LastModified", "last_modified", "updated", "modified", "generation", "version_id",
                  "VersionId", "md5Hash", "crc32c", "checksum")


# --- identity ------------------------------------------------------------------------------------------------------

def content_hash(url: str, storage_options: dict | None = None, chunk: int = 1 << 20) -> str:
    """sha256 of the file's bytes, streamed: the identity of last resort (see `input_ukey`)."""
    digest = hashlib.sha256()
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def input_ukey(url: str, storage_options: dict | None = None) -> str:
    """Identity of the current version of `url` from its metadata, without reading its bytes:

    - local file: `local:{size}:{mtime_ns}:{inode}` (touching or rewriting it changes it; a rename keeps it);
    - object stores: `etag:{ETag}:{size}` (s3, gcs, azure: the ETag changes with every write);
    - other fsspec filesystems: `ukey:` + `fs.ukey(path)` when their info() carries a change marker (mtime,
      generation, checksum...);
    - none of these (e.g. an HTTP server without ETag or Last-Modified): `sha256:` + the content hash, the only
      identity that then tells a rewritten file from the old one (its bytes are read, every run).

    Why not `fs.ukey` everywhere: it hashes `str(fs.info(path))`, which for a local file also holds ctime and the
    link count (a chmod or a hard link would re-restore a video) and for s3fs depends on whether the info came
    from a listing or a HEAD request (different keys), so it is not stable from one run to the next.
    """
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        st = os.stat(path)
        return f"local:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    info = fs.info(path)
    etag = next((info[k] for k in ("ETag", "etag", "e_tag") if info.get(k)), None)
    if etag:
        return f"etag:{str(etag).strip(chr(34))}:{info.get('size')}"
    if any(info.get(k) is not None for k in CHANGE_MARKERS):
        return "ukey:" + fs.ukey(path)
    return "sha256:" + content_hash(url, storage_options)


def config_hash(settings: dict) -> str:
    """Hash of what changes the restored frames: the settings (RestoreConfig's result fields) and the identity of
    the model they resolve to (storage.models.model_identity: its weights), so a video restored by a model that has
    since been retrained or replaced is restored again, while unchanged ones are skipped; and restored.mp4's chroma."""
    from storage.models import model_identity

    cfg = RestoreConfig(input="x", **settings)
    identity = {"settings": cfg.model_dump(include=set(result_fields())), "model": model_identity(cfg.model_name),
                "chroma": cfg.chroma}  # restored.mp4's encoding: a run with another --chroma rewrites the files
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:16]


# --- manifest ------------------------------------------------------------------------------------------------------

def read_manifest(url: str, storage_options: dict | None = None) -> list[dict]:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.exists(path):
        return []
    with fs.open(path, "r") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_manifest(url: str, manifest: list[dict], storage_options: dict | None = None) -> None:
    """Replace the manifest so that a reader (or a crash) sees the old one or the whole new one, never a part.

    Local: a temporary file in the same folder, then os.replace. Any other fsspec URL: the whole text is written
    as a new object next to it, then moved over the manifest (on object stores a server-side copy: the old
    object stays complete until the new one replaces it); a failed write leaves the old manifest untouched."""
    data = "".join(json.dumps(m, sort_keys=True, default=str) + "\n" for m in manifest).encode()
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        write_bytes_atomic(url, data, storage_options)  # tmp file + os.replace
        return
    parent, base = path.rsplit("/", 1) if "/" in path else ("", path)
    tmp = f"{parent}/.tmp-{base}-{uuid.uuid4().hex[:12]}" if parent else f".tmp-{base}-{uuid.uuid4().hex[:12]}"
    try:
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def _record(manifest: list[dict], row: dict) -> None:
    """Append a finished video; earlier failures of the same input with the same settings are superseded."""
    manifest[:] = [m for m in manifest if not (m.get("status") == "failed" and m.get("input") == row["input"]
                                               and m.get("config_hash") == row["config_hash"])]
    manifest.append(dict(row))


# --- plan: what is done, what to restore, under which names ---------------------------------------------------------

def _relative_name(url: str, prefix: str) -> str:
    rel = url[len(prefix.rstrip("/")) + 1 :] if url.startswith(prefix.rstrip("/")) else os.path.basename(url)
    return rel.replace("/", " - ")


def plan(videos: list[str], manifest: list[dict], input_prefix: str, out_root: str, cfg_hash: str,
         storage_options: dict | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """(rows of videos not to restore: skipped or unreadable, videos to restore, manifest entries to add).

    Skipped: the manifest holds a restoration of the same identity (`input_ukey`) with the same settings. A
    manifest written before identities were ukeys holds content hashes (`input_hash`): such a video is hashed
    once, and when it matches, its ukey is recorded so the next run needs no hash."""
    done = {(m["ukey"], m["config_hash"]): m for m in manifest if m.get("status") == "restored" and "ukey" in m}
    legacy = {(m["input_hash"], m["config_hash"]): m for m in manifest
              if m.get("status") == "restored" and "ukey" not in m and "input_hash" in m}
    names = {m["input"]: m["name"] for m in manifest if "name" in m and "input" in m}  # an input keeps its name
    taken = set(names.values())
    rows, todo, migrated = [], [], []
    for url in videos:
        row = {"input": url, "config_hash": cfg_hash}
        try:
            row["ukey"] = input_ukey(url, storage_options)
            previous = done.get((row["ukey"], cfg_hash))
            if previous is None and any(c == cfg_hash for _, c in legacy):
                previous = legacy.get((content_hash(url, storage_options), cfg_hash))
                if previous is not None:
                    migrated.append({**previous, "input": url, "ukey": row["ukey"]})
        except OSError as exc:
            rows.append({**row, "status": "failed", "reason": f"cannot read input: {exc}", "seconds": 0.0})
            continue
        if previous is not None:
            rows.append({**previous, "input": url, "ukey": row["ukey"], "status": "skipped",
                         "reason": "already restored with the same settings", "seconds": 0.0})
            continue
        name = names.get(url) or safe_output_name(_relative_name(url, input_prefix), taken)
        taken.add(name)
        todo.append({**row, "name": name, "output": f"{out_root}/{name}"})
    return rows, todo, migrated


# --- one video: a Prefect task in the archive's flow run ------------------------------------------------------------

class VideoFailed(Exception):
    """A video of the archive could not be restored; `row` is its summary row (status failed, reason, seconds)."""

    def __init__(self, row: dict):
        super().__init__(row["reason"])
        self.row = row


# NO_CACHE: the stages below are content-addressed in the work root and the manifest records what was restored;
# a Prefect cache would be a third, unsynchronised copy of the same decision (and the pool is no cacheable input).
@task(name="restore-archive-video", task_run_name="restore {item[name]}", cache_policy=NO_CACHE, persist_result=False)
def restore_one(item: dict, settings: dict, run_options: dict, pool=None, parent_run_id: str | None = None) -> dict:
    """Restore one video of the archive; returns its summary row, raises VideoFailed (with the row) on failure."""
    from flows.restore_video import restore

    opts = run_options.get("storage_options") or {}
    t0 = time.perf_counter()
    fs, out_path = fsspec.core.url_to_fs(item["output"], **opts)
    fresh = not fs.exists(out_path)
    try:
        cfg = RestoreConfig(input=item["input"], out=item["output"], **run_options, **settings)
        report = restore(cfg, pool=pool, parent_run_id=parent_run_id)
    except Exception as exc:  # one bad video never stops the batch; Prefect logs it with its cause, once
        if fresh and fs.exists(out_path):  # nothing half-written: a new output folder goes with its failure
            fs.rm(out_path, recursive=True)
        raise VideoFailed({**item, "status": "failed", "reason": f"{exc.__class__.__name__}: {exc}",
                           "seconds": round(time.perf_counter() - t0, 3), "finished_at": _now()}) from exc
    return {**item, "status": "restored", "reason": "", "mlflow_run_id": report["mlflow_run_id"],
            "psnr": report.get("psnr"), "warping_error_pixel_first": report["warping_error"]["pixel_first"],
            "seconds": round(time.perf_counter() - t0, 3), "finished_at": _now()}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --- the archive --------------------------------------------------------------------------------------------------

def archive(
    input_prefix: str,
    output_prefix: str,
    settings: dict | None = None,
    glob: str | None = None,
    concurrency: int = 1,
    actors: int | None = None,
    executor: str | None = None,
    work_root: str | None = None,
    storage_options: dict | None = None,
) -> dict:
    """Restore the archive; returns a summary with one row per video (status restored | skipped | failed).

    settings: RestoreConfig fields except input/out/work_root/executor/storage_options (validated before any
    work: a ValueError names the bad one); executor / work_root None: RestoreConfig's defaults. Run inside the
    `restore-archive` flow (or any flow run) its task runs belong to that flow run."""
    from prefect.futures import as_completed
    from prefect.task_runners import ThreadPoolTaskRunner

    from infra import tracking

    start = time.perf_counter()
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    opts = dict(storage_options or {})
    settings = dict(settings or {})
    if misplaced := sorted(set(settings) & {*RUN_FIELDS, "input", "storage_options"}):
        raise ValueError(f"settings must not hold {', '.join(misplaced)}: pass them as the archive's own arguments")
    run_options = {"storage_options": opts, **({"executor": executor} if executor else {}),
                   **({"work_root": work_root} if work_root else {})}
    base = RestoreConfig(input="x", **run_options, **settings)  # every setting checked before anything is read
    cfg_hash = config_hash(settings)
    out_root = output_prefix.rstrip("/")
    manifest_url = f"{out_root}/{MANIFEST}"
    manifest = read_manifest(manifest_url, opts)
    videos = list_videos(input_prefix, **({"glob": glob} if glob else {}), storage_options=opts)
    rows, todo, migrated = plan(videos, manifest, input_prefix, out_root, cfg_hash, opts)
    for entry in migrated:
        _record(manifest, entry)
    if migrated:
        write_manifest(manifest_url, manifest, opts)

    pool = None
    with tracking.start_run(experiment="restore-archive", run_name=f"archive {input_prefix}",
                            tags={"input_prefix": input_prefix, "output_prefix": output_prefix,
                                  **({"prefect_flow_run_id": fr} if (fr := tracking._flow_run_id()) else {})},
                            uri=tracking.tracking_uri(base.work_root)) as parent:
        tracking.log_config({"input_prefix": input_prefix, "output_prefix": output_prefix, **settings})
        if todo and base.executor == "ray":
            from tasks.sample import sampler_pool

            pool = sampler_pool(base.model_name, actors, base.device, base.dtype)  # lazy: bad videos never start Ray
        if todo and concurrency > 1 and tracking._flow_run_id() is None:
            _api_ready()  # outside a flow run: one temporary Prefect server, not raced for by the worker threads
        try:
            # Prefect's own concurrency: at most `concurrency` task runs at once, each in this flow run's context
            with ThreadPoolTaskRunner(max_workers=concurrency) as runner:
                futures = [runner.submit(restore_one, {"item": item, "settings": settings, "run_options": run_options,
                                                       "pool": pool, "parent_run_id": parent.info.run_id})
                           for item in todo]
                for future in as_completed(futures):  # one writer of the manifest: here, as each video finishes
                    try:
                        row = future.result()
                    except VideoFailed as exc:
                        row = exc.row
                    except Exception as exc:  # the task itself could not run (e.g. the API went away)
                        item = todo[futures.index(future)]
                        row = {**item, "status": "failed", "reason": f"{exc.__class__.__name__}: {exc}", "seconds": 0.0,
                               "finished_at": _now()}
                    rows.append(row)
                    _record(manifest, row)
                    write_manifest(manifest_url, manifest, opts)
        finally:
            if pool is not None:
                pool.shutdown()
        order = {url: i for i, url in enumerate(videos)}
        rows.sort(key=lambda r: order.get(r["input"], len(order)))
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


def _table_artifact(rows: list[dict]) -> None:
    try:
        from prefect.artifacts import create_table_artifact

        table = [{"video": r["input"], "status": r["status"], "reason": r.get("reason", ""), "seconds": r.get("seconds", 0.0),
                  "output": r.get("output", "")} for r in rows]
        create_table_artifact(key="restore-archive-report", table=table, description="restore-archive: one row per video")
    except Exception:
        pass  # outside a flow run there is nowhere to publish it


@flow(name="restore-archive", flow_run_name="archive:{input_prefix}", log_prints=True)
def restore_archive(
    input_prefix: str,
    output_prefix: str,
    settings: RestoreSettings | None = None,
    glob: str | None = None,
    concurrency: int = 1,
    actors: int | None = None,
    executor: str | None = None,
    work_root: str | None = None,
    storage_options: dict | None = None,
):
    """Restore every video under `input_prefix` into `output_prefix` (see the module docstring).

    settings: restore settings (flows.config.RestoreSettings: Prefect shows its fields, enums and descriptions), e.g.
    {"task": "sr8", "steps": 50}; unset fields keep their defaults. concurrency: videos restored at once. Ends Failed when a video failed (after all were tried); the
    summary is the state's result either way."""
    from prefect.states import Failed

    from infra.tracking import check_no_secrets

    check_no_secrets(storage_options, "restore-archive's storage_options parameter")  # credentials: the environment
    if isinstance(settings, RestoreSettings):
        settings = settings.model_dump(exclude_unset=True)
    summary = archive(input_prefix, output_prefix, settings, glob, concurrency, actors, executor, work_root, storage_options)
    print(f"restore-archive: {summary['restored']} restored, {summary['skipped']} skipped, {summary['failed']} failed "
          f"in {summary['seconds']:.1f} s; manifest {summary['manifest']}")
    if summary["failed"]:
        failed = [r for r in summary["rows"] if r["status"] == "failed"]
        return Failed(message=f"{len(failed)} of {summary['videos']} videos failed: " +
                      "; ".join(f"{r['input']}: {r['reason']}" for r in failed)[:2000], data=summary)
    return summary


def archive_cli(args) -> int:
    """`restore-video archive`: runs the restore-archive flow. Exit 0: every video restored or skipped; 1: the batch
    ran and some videos failed (listed); 2: bad arguments (settings, input prefix), nothing restored."""
    import sys

    from pydantic import ValidationError

    from flows.cli import _restore_params

    given = _restore_params(args)  # every restore setting given on the command line is passed through
    run = {k: given.pop(k) for k in RUN_FIELDS if k in given}
    try:
        RestoreConfig(input="x", **run, **given)  # refused here, before a flow run or a server starts
    except ValidationError as exc:
        print("error: " + "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors()), file=sys.stderr)
        return 2
    if args.concurrency < 1:
        print(f"error: --concurrency must be >= 1, got {args.concurrency}", file=sys.stderr)
        return 2
    state = restore_archive(args.input_prefix, run.get("out", RestoreConfig.model_fields["out"].default), given, args.glob,
                            args.concurrency, None, run.get("executor"), run.get("work_root"), return_state=True)
    summary = state.result(raise_on_failure=False)
    if isinstance(summary, BaseException):  # the flow itself failed: bad prefix, unreadable manifest...
        print(f"error: {summary.__class__.__name__}: {summary}", file=sys.stderr)
        return 2 if isinstance(summary, (ValueError, FileNotFoundError)) else 1
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        for r in summary["rows"]:
            print(f"{r['status']:9s} {r['input']}  {r.get('output', '')}  {r.get('reason', '')}")
        print(f"{summary['restored']} restored, {summary['skipped']} skipped, {summary['failed']} failed in {summary['seconds']:.1f} s")
    return 1 if summary["failed"] else 0
