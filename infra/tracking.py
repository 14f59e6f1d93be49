"""MLflow setup: sqlite tracking URI, runs, flattened config params, per-frame series, a local UI server.

MLflow 3 refuses the ./mlruns file store by default, so the default backend is
`sqlite:///{work_root}/mlflow.db`, with artifacts next to it in `{work_root}/mlartifacts`.

    uri = tracking_uri(work_root)
    with start_run("restore-video", "clip-001", tags={"git_commit": git_commit()}, uri=uri) as run:
        log_config(config)              # {"sampler": {"steps": 50}} -> param "sampler.steps" = "50"
        log_series("psnr", per_frame)   # step = frame index
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from infra._proc import free_port, stop_group, wait_http

__all__ = ["tracking_uri", "start_run", "log_config", "flatten", "log_series", "git_commit", "MlflowUI",
           "ensure_experiment"]

MAX_PARAM_CHARS = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000


def tracking_uri(work_root: str | os.PathLike) -> str:
    """MLFLOW_TRACKING_URI if set, else `sqlite:///{work_root}/mlflow.db` (work_root is created)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = Path(work_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root}/mlflow.db"


def _artifact_root(uri: str) -> str | None:
    """`{dir of the sqlite DB}/mlartifacts` for a sqlite URI, else None (let the server decide)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


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


@contextlib.contextmanager
def start_run(experiment: str, run_name: str | None = None, tags: Mapping[str, Any] | None = None,
              nested: bool = False, parent_run_id: str | None = None, uri: str | None = None) -> Iterator:
    """`mlflow.start_run` in `experiment` (created if missing); yields the ActiveRun.

    `uri`: tracking URI to set first (default: whatever mlflow is set to / MLFLOW_TRACKING_URI).
    `nested=True` nests under the active run; `parent_run_id` nests under that run (e.g. from
    another process) — both set the `mlflow.parentRunId` tag.
    """
    import mlflow

    if uri:
        mlflow.set_tracking_uri(uri)
    exp_id = ensure_experiment(experiment, mlflow.get_tracking_uri())
    tags = {k: str(v) for k, v in (tags or {}).items()}
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags,
                          nested=nested or parent_run_id is not None, parent_run_id=parent_run_id) as run:
        yield run


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


def log_config(config: Mapping[str, Any], run_id: str | None = None, prefix: str = "") -> dict[str, str]:
    """Log a nested config as flattened `a.b.c` params, 100 per batch, values cut to 6000 chars.

    Returns the params as logged. `run_id`: default the active run.
    """
    import mlflow
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    run_id = run_id or mlflow.active_run().info.run_id
    params = {k: _param_value(v) for k, v in flatten(config, prefix).items()}
    items = [Param(k, v) for k, v in params.items()]
    client = MlflowClient()
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i: i + MAX_PARAMS_PER_BATCH])
    return params


def log_series(name: str, values: Iterable[float], run_id: str | None = None, start_step: int = 0) -> None:
    """Log `values` as metric `name` with step = index (+ start_step), e.g. per-frame metrics."""
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    run_id = run_id or mlflow.active_run().info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(name, float(v), now, start_step + i) for i, v in enumerate(values)]
    client = MlflowClient()
    for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i: i + MAX_METRICS_PER_BATCH])


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """Short hash of HEAD of the repository at `cwd` (default: this package's), or "unknown"."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True,
                           timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "unknown"


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
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, cwd=log_dir)
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
            self.proc = None
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def __enter__(self) -> "MlflowUI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
