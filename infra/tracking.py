"""MLflow: where runs are tracked, the run of one restoration, params with no secrets, per-frame series, a local UI.

MLflow 3 refuses the ./mlruns file store by default, so a local work root tracks in
`sqlite:///{work_root}/mlflow.db` with artifacts next to it in `{work_root}/mlartifacts`. A remote work root
(`s3://bucket/work`) tracks in a local sqlite too (see `tracking_uri`); MLFLOW_TRACKING_URI overrides both.

    with restoration_run("restore-video", "clip.mp4:warped-diffusion", params=cfg.model_dump(),
                         uri=tracking_uri(work_root), weights_hash=sha, input_url=cfg.input) as run:
        ...                             # a raise ends the run FAILED with the error as tag `error`
        log_series("psnr", per_frame)   # step = frame index

Secrets: everything recorded goes through `redact` (one place): `storage_options` and any key named like a
secret (key, secret, token, password, credentials...) are dropped, credentials in URLs are cut, and the values
of dropped secrets are scrubbed from every other string. Credentials belong in the environment (AWS_*),
fsspec's config or a Prefect block, never in parameters.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from infra._proc import free_port, release, spawn, stop_group, wait_http

__all__ = ["tracking_uri", "use_tracking_uri", "start_run", "restoration_run", "log_config", "log_output_files", "redact", "scrub",
           "is_secret_name", "check_no_secrets", "flatten", "log_series", "log_restoration", "git_commit", "source_tags", "MlflowUI",
           "ensure_experiment", "content_digest", "run_url"]

MAX_PARAM_CHARS = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH: longer values are refused, so they are cut
NEVER_RECORDED = ("storage_options",)  # whole subtrees never logged (fsspec options carry credentials)
_SECRET_NAME = re.compile(r"secret|passw|token|credential|private|signature|(^|_)(api_?|access_?|session_?)?key(_?id)?$"
                          r"|(^|_)key_|^auth", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
REDACTED = "***"
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm")


# --- where runs are tracked ----------------------------------------------------------------------------------------

def _local_path(url: str | os.PathLike) -> Path | None:
    """The local path of `url` (plain path or file://), or None for a remote URL (s3://, gs://, http://...)."""
    text = str(url)
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://", text)
    if m is None:
        return Path(text).expanduser()
    if m.group(1).lower() in ("file", "local"):
        return Path(text[m.end():]).expanduser()
    return None


def default_local_dir() -> Path:
    """Where a remote work root's runs are tracked: $RESTORE_VIDEO_MLFLOW_DIR or $XDG_DATA_HOME/restore-video."""
    env = os.environ.get("RESTORE_VIDEO_MLFLOW_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "restore-video"


def tracking_uri(work_root: str | os.PathLike, local_dir: str | os.PathLike | None = None) -> str:
    """MLFLOW_TRACKING_URI if set; else a sqlite DB on this machine (its directory is created):

    - local work root (a path or file:// URL): `sqlite:///{work_root}/mlflow.db`;
    - remote work root (s3://bucket/work...): `sqlite:///{local_dir}/mlflow.db`, `local_dir` defaulting to
      `default_local_dir()`; tracking never writes a `s3:` folder into the current directory.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = _local_path(work_root)
    if root is None:
        root = Path(local_dir).expanduser() if local_dir is not None else default_local_dir()
        if _local_path(root) is None:
            raise ValueError(f"MLflow needs a local directory for its sqlite DB, got {local_dir!r}; "
                             "pass a local path or set MLFLOW_TRACKING_URI")
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root}/mlflow.db"


def _artifact_root(uri: str) -> str | None:
    """`{dir of the sqlite DB}/mlartifacts` for a sqlite URI, else None (let the server decide)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def use_tracking_uri(uri: str) -> None:
    """`mlflow.set_tracking_uri(uri)` for this process without its side effect on the environment.

    MLflow also writes the URI into os.environ["MLFLOW_TRACKING_URI"] (for subprocesses); `tracking_uri()` would
    then return the first run's store for every later work root in the process (and every later test).
    """
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def ensure_experiment(name: str, uri: str | None = None) -> str:
    """Experiment id of `name`, created if missing; on sqlite its artifacts go next to the DB, not ./mlruns."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = _artifact_root(uri or client._tracking_client.tracking_uri)
    location = f"{root}/{name}" if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# --- no secret is ever recorded -----------------------------------------------------------------------------------

def is_secret_name(name: str) -> bool:
    """True for names that hold credentials: key, secret, token, password, aws_access_key_id, api_key, ..."""
    return bool(_SECRET_NAME.search(str(name)))


def _dropped(name: str) -> bool:
    parts = str(name).split(".")  # flattened keys: "storage_options.secret"
    return any(p in NEVER_RECORDED or is_secret_name(p) for p in parts)


def _secret_values(config: Any, inside: bool = False) -> set[str]:
    """String values stored under secret-named keys (at any depth, flattened or nested)."""
    found: set[str] = set()
    if isinstance(config, Mapping):
        for k, v in config.items():
            secret = inside or any(is_secret_name(p) for p in str(k).split("."))
            found |= _secret_values(v, secret)
    elif isinstance(config, (list, tuple)):
        for v in config:
            found |= _secret_values(v, inside)
    elif inside and config is not None and len(str(config)) >= 4:
        found.add(str(config))
    return found


def scrub(text: str, config: Any = None) -> str:
    """`text` with credentials in URLs (`scheme://user:pass@`) cut and the secret values of `config` replaced."""
    text = _URL_USERINFO.sub(lambda m: m.group("scheme") + REDACTED + "@", str(text))
    for value in sorted(_secret_values(config), key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text


def redact(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `config` (nested or flattened) that is safe to record: MLflow params and config.json, tags, logs.

    Drops `storage_options` and every secret-named key (`is_secret_name`), cuts credentials out of URLs, and
    replaces the dropped secrets' values wherever else they appear.
    """
    secrets = sorted(_secret_values(config), key=len, reverse=True)

    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items() if not _dropped(k)}
        if isinstance(value, (list, tuple)):
            return type(value)(clean(v) for v in value)
        if isinstance(value, str):
            value = _URL_USERINFO.sub(lambda m: m.group("scheme") + REDACTED + "@", value)
            for secret in secrets:
                value = value.replace(secret, REDACTED)
        return value

    return clean(config)


def check_no_secrets(options: Mapping[str, Any] | None, where: str = "storage_options") -> None:
    """ValueError naming the credential keys in `options` (e.g. fsspec storage options that become Prefect
    parameters, which Prefect stores and shows as they are), with the way out: the environment or fsspec config."""
    names = [k for k in flatten(dict(options or {})) if any(is_secret_name(p) for p in k.split("."))]
    if names:
        raise ValueError(
            f"{where} must not hold credentials ({', '.join(sorted(names))}): they would be stored with the run's "
            "parameters. Set them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for "
            "S3), in fsspec's config (~/.config/fsspec/*.json) or a Prefect block, and keep only options such as "
            "client_kwargs.endpoint_url here")


# --- runs, params, metrics, artifacts -----------------------------------------------------------------------------

@contextlib.contextmanager
def start_run(experiment: str, run_name: str | None = None, tags: Mapping[str, Any] | None = None,
              nested: bool = False, parent_run_id: str | None = None, uri: str | None = None) -> Iterator:
    """`mlflow.start_run` in `experiment` (created if missing); yields the ActiveRun.

    `uri`: tracking URI to set first (default: whatever mlflow is set to / MLFLOW_TRACKING_URI).
    `nested=True` nests under the active run; `parent_run_id` nests under that run (e.g. from
    another process) — both set the `mlflow.parentRunId` tag. Tags are redacted like params.
    """
    import mlflow

    if uri:
        use_tracking_uri(uri)
    exp_id = ensure_experiment(experiment, mlflow.get_tracking_uri())
    tags = {k: str(v) for k, v in redact(tags or {}).items()}
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags,
                          nested=nested or parent_run_id is not None, parent_run_id=parent_run_id) as run:
        yield run


def _flow_run_id() -> str | None:
    """The Prefect flow run this code runs in, if any: also from inside one of its task runs (a TaskRunContext has
    no `flow_run`, only `task_run.flow_run_id`; restore-archive restores each video in a task run)."""
    try:
        from prefect.runtime import flow_run

        return flow_run.get_id()
    except Exception:
        return None


def content_digest(url: str, storage_options: Mapping | None = None, chunk: int = 1 << 20) -> str | None:
    """First 16 hex digits of the sha256 of the file's bytes (streamed), or None when it cannot be read."""
    import hashlib

    import fsspec

    digest = hashlib.sha256()
    try:
        with fsspec.open(url, "rb", **dict(storage_options or {})) as f:
            while block := f.read(chunk):
                digest.update(block)
    except (OSError, ValueError):
        return None
    return digest.hexdigest()[:16]


def _log_input(url: str, storage_options: Mapping | None = None) -> None:
    """`mlflow.log_input` of the input video as a dataset: its source = the URL (credentials cut), its digest = the
    content's sha256 (`content_digest`), so runs on the same bytes share one dataset in the UI."""
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    safe = scrub(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "can be interpreted in multiple ways" for local paths
        source = resolve_dataset_source(safe)
    digest = content_digest(url, storage_options)
    mlflow.log_input(MetaDataset(source, name=os.path.basename(safe.rstrip("/")) or safe,
                                 **({"digest": digest} if digest else {})), context="input")


def run_url(run_id: str, experiment_id: str, uri: str | None = None) -> str | None:
    """The MLflow UI page of a run: on the tracking server when the tracking URI is http(s), else on the UI named by
    RESTORE_VIDEO_MLFLOW_UI (`restore-video serve` sets it); None when no UI is known (a local sqlite store)."""
    base = uri if uri and re.match(r"^https?://", uri) else os.environ.get("RESTORE_VIDEO_MLFLOW_UI")
    if not base:
        return None
    return f"{scrub(base).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


@contextlib.contextmanager
def restoration_run(experiment: str, run_name: str | None = None, *, params: Mapping[str, Any] | None = None,
                    tags: Mapping[str, Any] | None = None, uri: str | None = None, parent_run_id: str | None = None,
                    weights_hash: str | None = None, input_url: str | None = None,
                    system_metrics: bool = True, storage_options: Mapping | None = None) -> Iterator:
    """The MLflow run of one restoration, opened when the flow starts; yields the ActiveRun.

    - params: `log_config(params)` (redacted, flattened) and the same dict as `config.json`;
    - tags: `mlflow.source.git.commit`, `weights_sha256` (when given), `prefect_flow_run_id` (inside a flow run),
      then `tags` (redacted);
    - the input (`input_url`, read with `storage_options`) as an MLflow dataset input with its content digest;
    - system metrics (CPU, memory, GPU), unless `system_metrics=False`;
    - ends FINISHED; FAILED when the body raises, with tag `error` = "<Type>: <message>" (secrets scrubbed);
      KILLED on KeyboardInterrupt/SystemExit. The exception propagates.
    """
    import mlflow

    if uri:
        use_tracking_uri(uri)
    exp_id = ensure_experiment(experiment, mlflow.get_tracking_uri())
    all_tags = dict(source_tags())
    if weights_hash:
        all_tags["weights_sha256"] = weights_hash
    flow_run = _flow_run_id()
    if flow_run:
        all_tags["prefect_flow_run_id"] = flow_run
    all_tags.update(tags or {})
    all_tags = {k: scrub(str(v), params) for k, v in redact(all_tags).items()}
    run = mlflow.start_run(experiment_id=exp_id, run_name=scrub(run_name, params) if run_name else None,
                           tags=all_tags, nested=parent_run_id is not None, parent_run_id=parent_run_id,
                           log_system_metrics=system_metrics)
    try:
        if params:
            log_config(params, run.info.run_id, artifact_file="config.json")
        if input_url:
            _log_input(input_url, storage_options)
        yield run
    except BaseException as exc:
        from mlflow.tracking import MlflowClient

        status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
        message = scrub(f"{exc.__class__.__name__}: {exc}", params)
        MlflowClient().set_tag(run.info.run_id, "error", message[:MAX_PARAM_CHARS])
        mlflow.end_run(status)
        raise
    else:
        mlflow.end_run("FINISHED")


def flatten(config: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """`{"a": {"b": {"c": 1}}}` -> `{"a.b.c": 1}`; empty dicts become `"{}"`."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key, sep))
        elif isinstance(v, Mapping):
            out[key] = "{}"
        else:
            out[key] = v
    return out


def _param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= MAX_PARAM_CHARS else s[: MAX_PARAM_CHARS - 3] + "..."


def log_config(config: Mapping[str, Any], run_id: str | None = None, prefix: str = "",
               artifact_file: str | None = None) -> dict[str, str]:
    """Log a config as flattened `a.b.c` params (values cut to 6000 chars), redacted first (`redact`).

    `artifact_file` (e.g. "config.json"): also log the redacted config as that JSON artifact. Returns the
    params as logged. `run_id`: default the active run. (MLflow's client splits large batches itself.)
    """
    import mlflow
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    run_id = run_id or mlflow.active_run().info.run_id
    safe = redact(config)
    params = {k: _param_value(v) for k, v in flatten(safe, prefix).items()}
    client = MlflowClient()
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    if artifact_file:
        client.log_dict(run_id, safe, artifact_file)
    return params


def log_series(name: str, values: Iterable[float], run_id: str | None = None, start_step: int = 0) -> None:
    """Log `values` as metric `name` with step = index (+ start_step), e.g. per-frame metrics."""
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    run_id = run_id or mlflow.active_run().info.run_id
    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(name, float(v), now, start_step + i) for i, v in enumerate(values)])


def log_output_files(urls: Mapping[str, str], storage_options: Mapping | None = None, log_videos: bool = False,
                     run_id: str | None = None) -> list[str]:
    """Copy the run's output files (any fsspec URL) into its artifacts; videos only when `log_videos`.

    Videos already live in `--out`; copying them into MLflow doubles the disk an archive uses. Returns the
    artifact names logged.
    """
    import fsspec
    import mlflow
    from mlflow.tracking import MlflowClient

    run_id = run_id or mlflow.active_run().info.run_id
    client = MlflowClient()
    logged = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, url in urls.items():
            if not log_videos and str(url).lower().endswith(VIDEO_SUFFIXES):
                continue
            local = os.path.join(tmp, os.path.basename(name))
            with fsspec.open(url, "rb", **dict(storage_options or {})) as src, open(local, "wb") as dst:
                dst.write(src.read())
            client.log_artifact(run_id, local)
            logged.append(os.path.basename(name))
    return logged


def log_restoration(report: Mapping[str, Any], per_frame: Mapping[str, Iterable[float]], urls: Mapping[str, str],
                    storage_options: Mapping | None = None, log_videos: bool = False) -> None:
    """Into the active MLflow run (its params were logged, redacted, when it opened): the guidance space used, the
    report's numbers (summary, warping errors, timings; the input baseline's as input_*) as metrics, per-frame series (step = frame index), and the
    output files as artifacts (videos only with `log_videos`)."""
    import mlflow

    mlflow.log_param("guidance_space_used", report["guidance_space"])
    def numbers(record: Mapping, prefix: str = "") -> dict:
        out = {}
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[prefix + key] = value
            elif key in ("warping_error", "timings_s") and isinstance(value, Mapping):
                out.update({f"{prefix}{key}_{k}": v for k, v in value.items() if isinstance(v, (int, float))})
        return out

    flat = numbers(report)
    if isinstance(report.get("input"), Mapping):  # the input baseline's scores: input_psnr, input_warping_error_...
        flat.update(numbers(report["input"], "input_"))
    mlflow.log_metrics({k: float(v) for k, v in flat.items() if v == v})  # NaN-free
    for name, values in per_frame.items():
        log_series(f"per_frame_{name}", values)
    log_output_files(urls, storage_options, log_videos=log_videos)


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """Full hash of HEAD of the repository at `cwd` (default: this package's), or "unknown" (MLflow's own lookup)."""
    from mlflow.utils.git_utils import get_git_commit

    return get_git_commit(str(cwd or Path(__file__).resolve().parent)) or "unknown"


def source_tags(cwd: str | os.PathLike | None = None) -> dict[str, str]:
    """MLflow's own source tag for the code that ran: `mlflow.source.git.commit` (absent outside a git checkout)."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    commit = git_commit(cwd)
    return {MLFLOW_GIT_COMMIT: commit} if commit != "unknown" else {}


class MlflowUI:
    """`mlflow server` on 127.0.0.1:<free port> over a sqlite backend (for `restore-video serve`).

    `with MlflowUI(work_root) as ui: print(ui.url)`; stop: SIGTERM, then SIGKILL to its process group.
    The server's job runner (GenAI jobs, 7 extra processes) is off unless `jobs=True`.
    """

    def __init__(self, work_root: str | os.PathLike | None = None, backend_store_uri: str | None = None,
                 port: int | None = None, host: str = "127.0.0.1", startup_timeout: float = 60.0,
                 jobs: bool = False):
        if backend_store_uri is None:
            if work_root is None:
                raise ValueError("give work_root or backend_store_uri")
            backend_store_uri = tracking_uri(work_root)
        self.backend_store_uri = backend_store_uri
        self.work_root = Path(work_root).resolve() if work_root else None
        self.host, self.port = host, port
        self.startup_timeout = startup_timeout
        self.jobs = jobs
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "MlflowUI":
        self.port = self.port or free_port()
        log_dir = self.work_root or Path.cwd()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / "mlflow-server.log"
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_store_uri,
               "--host", self.host, "--port", str(self.port), "--workers", "1"]
        root = _artifact_root(self.backend_store_uri)
        if root:  # served artifacts (runs logged through this server) land next to the DB, not in ./mlartifacts
            cmd += ["--artifacts-destination", root]
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.backend_store_uri, "PYTHONUNBUFFERED": "1",
               # the job runner (GenAI jobs) adds 7 huey processes; we don't use it
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true" if self.jobs else "false"}
        t0 = time.monotonic()
        self._log = open(self.log_path, "ab")
        self.proc = spawn(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          cwd=log_dir)
        try:
            wait_http(f"{self.url}/health", timeout=self.startup_timeout, proc=self.proc)
        except Exception as e:
            self.stop()
            raise RuntimeError(f"mlflow server did not start: {e}\n{self.log_path.read_text()[-4000:]}") from e
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        if self.proc is not None:
            # SIGTERM: uvicorn shuts down at once (SIGINT to the group left it waiting ~10 s)
            stop_group(self.proc, signals=(signal.SIGTERM,), grace=10)
            release(self.proc)
            self.proc = None
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def __enter__(self) -> "MlflowUI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
