"""A real, isolated Prefect server and process worker on 127.0.0.1, plus deploy/run helpers.

Used by tests and by scripts that need the deployment path (`prefect deploy`, `prefect deployment run`)
without touching the user's ~/.prefect: every process gets PREFECT_HOME = a given directory, whose
sqlite DB (`prefect.db`) is the server's database.

    with PrefectServer(tmp / "prefect") as server, ProcessWorker("local", server.env()):
        deploy_all(project_dir, server.env())
        state, flow_run_id = run_deployment("flow/deployment", {"x": 1}, server.env())

A prefect.yaml that a process worker can run from the local checkout (tested in
tests/infra/test_prefect.py):

    name: restore-video
    prefect-version: 3.8.7
    build: null
    push: null
    pull:                                  # run by the worker before each flow run
      - prefect.deployments.steps.set_working_directory:
          directory: "{{ $PWD }}"          # resolved at deploy time -> absolute path of the checkout
    deployments:
      - name: default
        entrypoint: flows/restore_video.py:restore_video   # file path relative to that dir : function
        parameters: {steps: 20}            # defaults; `--params` / `--param` override per run
        work_pool: {name: local}           # must exist before `prefect --no-prompt deploy` (deploy_all creates it)
      - name: nightly
        entrypoint: flows/restore_archive.py:restore_archive
        schedules:
          - cron: "0 3 * * *"
            timezone: UTC
            active: true
        work_pool: {name: local}

The flow name in `run_deployment("<flow name>/<deployment name>")` is the @flow's name
(function name with `_` -> `-` unless `@flow(name=...)`). Without a `pull` section, `prefect deploy`
adds the same set_working_directory step with its own cwd. The worker's flow-run subprocess has
that directory on sys.path, so packages beside the entrypoint (ops/, tasks/) import.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from infra._proc import free_port, release, spawn, stop_group, wait_http

__all__ = ["PrefectServer", "ProcessWorker", "deploy_all", "run_deployment", "prefect_cmd", "base_env", "prefect_api",
           "temporary_server", "stop_temporary_server"]

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def prefect_cmd() -> list[str]:
    """The `prefect` CLI of this interpreter's environment (the venv's script, else `python -m prefect`)."""
    exe = Path(sys.executable).with_name("prefect")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]


def base_env(home: str | os.PathLike, api_url: str | None = None) -> dict[str, str]:
    """Prefect settings (strings) that isolate a process in `home` and keep it offline and quick."""
    home = str(Path(home).resolve())
    env = {
        "PREFECT_HOME": home,
        "PREFECT_PROFILES_PATH": os.path.join(home, "profiles.toml"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # default 10: a deployment run would wait up to 10 s
        "PREFECT_CLI_COLORS": "false",
        "PREFECT_CLI_WRAP_LINES": "false",
        "PYTHONUNBUFFERED": "1",
        # the venv's bin first, so the worker's flow-run subprocess finds this interpreter's prefect
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _child_env(env: dict[str, str] | None) -> dict[str, str]:
    merged = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_KEY", "PREFECT_PROFILE")}
    merged.update(env or {})
    return merged


class PrefectServer:
    """`prefect server start` on 127.0.0.1:<free port> with its own PREFECT_HOME and sqlite DB.

    `with PrefectServer(home) as s:` waits for `{s.api_url}/health`; `s.env()` is what a child
    process (CLI, worker, flow) needs to talk to it. Stop: SIGINT to the process group, then
    SIGTERM, then SIGKILL.
    """

    def __init__(self, home: str | os.PathLike, port: int | None = None, startup_timeout: float = 90.0,
                 ui: bool = False, stop_timeout: float = 15.0, ephemeral: bool = False):
        self.ephemeral = ephemeral  # Prefect's own temporary-server command (uvicorn, no background services): quicker
        self.home = Path(home).resolve()
        self.port = port
        self.startup_timeout = startup_timeout
        self.ui = ui
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path = self.home / "server.log"
        self.startup_seconds: float | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def env(self) -> dict[str, str]:
        """Environment variables (on top of os.environ) for a process that uses this server."""
        env = base_env(self.home, self.api_url)
        env["PREFECT_SERVER_UI_ENABLED"] = "true" if self.ui else "false"
        return env

    def start(self) -> "PrefectServer":
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        env = self.env()
        env["PREFECT_SERVER_API_HOST"] = "127.0.0.1"
        env["PREFECT_SERVER_API_PORT"] = str(self.port)
        t0 = time.monotonic()
        self._log = open(self.log_path, "ab")
        if self.ephemeral:  # what prefect.server.api.server.SubprocessASGIServer runs, in a process group of ours
            import prefect

            env.update({"PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"})
            cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory",
                   "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                   "--log-level", "error", "--lifespan", "on"]
        else:
            cmd = [*prefect_cmd(), "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
                   "--analytics-off", "--ui" if self.ui else "--no-ui"]
        self.proc = spawn(
            cmd,
            env=_child_env(env), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.home,
        )
        try:
            wait_http(f"{self.api_url}/health", timeout=self.startup_timeout, proc=self.proc)
        except Exception as e:
            self.stop()
            raise RuntimeError(f"Prefect server did not start: {e}\n{self.log_tail()}") from e
        self.startup_seconds = time.monotonic() - t0
        return self

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, signals=(signal.SIGINT,), grace=self.stop_timeout)
            release(self.proc)
            self.proc = None
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def __enter__(self) -> "PrefectServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def prefect_api(announce=None):
    """The Prefect API that flow runs of this process report to, for the duration of the block; yields its URL.

    - configured (PREFECT_API_URL, or the active profile of the user's PREFECT_HOME, Prefect Cloud included): used
      as it is;
    - none: this process's temporary local server (`temporary_server`: Prefect's own temporary-server command, its
      sqlite DB in PREFECT_HOME as Prefect has it), in a process group of its own that is stopped at exit, on
      SIGTERM, and also when this process is SIGKILLed (spawn's parent-death signal; Prefect's own temporary server
      outlives that). Later blocks of the same process reuse it.

    `announce(message)`: told when a temporary server was started (e.g. print to stderr).
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    settings = get_current_settings()
    if settings.api.url:
        yield str(settings.api.url)
        return
    server, started = temporary_server(settings.home)
    if started and announce:
        announce(f"Prefect: no API configured (PREFECT_API_URL / profile); temporary server on {server.api_url} "
                 f"(database {settings.home}/prefect.db), stopped when this command ends")
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        try:
            yield server.api_url
        finally:
            _drain_to_api()  # logs and events still queued reach the server (also before it stops at exit)


_TEMPORARY: PrefectServer | None = None
_TEMPORARY_LOCK = threading.Lock()


def temporary_server(home: str | os.PathLike) -> tuple[PrefectServer, bool]:
    """(this process's temporary API server with its DB in `home`, whether it was started now); stopped at exit."""
    global _TEMPORARY
    with _TEMPORARY_LOCK:
        server = _TEMPORARY
        if server is not None and server.proc is not None and server.proc.poll() is None \
                and server.home == Path(home).resolve():
            return server, False
        if server is not None:
            server.stop()
        _TEMPORARY = PrefectServer(home, ephemeral=True).start()
        if server is None:  # registered after spawn's own atexit handler, so it runs first: a graceful stop
            atexit.register(stop_temporary_server)
        return _TEMPORARY, True


def stop_temporary_server() -> None:
    """Stop the temporary server of `prefect_api` (at exit; tests call it when their session ends)."""
    global _TEMPORARY
    with _TEMPORARY_LOCK:
        server, _TEMPORARY = _TEMPORARY, None
    if server is not None:
        server.stop()


def _drain_to_api(timeout: float = 15.0) -> None:
    """Send what Prefect's background workers still hold (flow-run logs, events) and stop them."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout, at_exit=False)
        except Exception:  # a worker that never started, or a server that went away: nothing more to send
            pass


def create_work_pool(name: str, env: dict[str, str], pool_type: str = "process") -> None:
    """Create work pool `name` of `pool_type` unless it exists (`prefect work-pool create`)."""
    r = subprocess.run([*prefect_cmd(), "--no-prompt", "work-pool", "inspect", name], env=_child_env(env),
                       capture_output=True, text=True)
    if r.returncode == 0:
        return
    r = subprocess.run([*prefect_cmd(), "--no-prompt", "work-pool", "create", name, "--type", pool_type],
                       env=_child_env(env), capture_output=True, text=True)
    if r.returncode != 0 and "already exists" not in (r.stdout + r.stderr):
        raise RuntimeError(f"prefect work-pool create {name} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")


class ProcessWorker:
    """`prefect worker start --pool NAME --type process` against the server described by `env`.

    Creates the pool if missing. `ready` = the worker logged that it started (it polls every
    PREFECT_WORKER_QUERY_SECONDS, 1 s in `base_env`). Stop: SIGINT, wait, a second SIGINT (a
    process worker only exits on the second one), then SIGTERM/SIGKILL to the whole group, which
    also takes down flow-run subprocesses still running.
    """

    def __init__(self, pool: str, env: dict[str, str], name: str | None = None, cwd: str | os.PathLike | None = None,
                 log_path: str | os.PathLike | None = None, startup_timeout: float = 60.0,
                 stop_timeout: float = 10.0, limit: int | None = None):
        self.pool = pool
        self.env = dict(env)
        self.name = name or f"{pool}-worker-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.cwd = Path(cwd) if cwd else Path(self.env.get("PREFECT_HOME", "."))
        self.log_path = Path(log_path) if log_path else Path(self.env.get("PREFECT_HOME", ".")) / f"worker-{pool}.log"
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.limit = limit
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    def start(self) -> "ProcessWorker":
        t0 = time.monotonic()
        create_work_pool(self.pool, self.env, "process")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = open(self.log_path, "ab")
        cmd = [*prefect_cmd(), "--no-prompt", "worker", "start", "--pool", self.pool, "--type", "process",
               "--name", self.name, "--install-policy", "never"]
        if self.limit:
            cmd += ["--limit", str(self.limit)]
        self.proc = spawn(cmd, env=_child_env(self.env), stdout=self._log, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, cwd=self.cwd)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            text = self.log_tail(offset=offset)
            if "started!" in text:  # "Worker '<name>' started!"
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Prefect worker did not start:\n{text[-4000:]}")
            time.sleep(0.2)
        self.startup_seconds = time.monotonic() - t0
        return self

    def log_tail(self, n: int = 1 << 20, offset: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, signals=(signal.SIGINT, signal.SIGINT), grace=self.stop_timeout)
            release(self.proc)
            self.proc = None
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def __enter__(self) -> "ProcessWorker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def work_pools_in(prefect_yaml: str | os.PathLike) -> list[str]:
    """Work pool names referenced by the deployments of a prefect.yaml."""
    import yaml

    doc = yaml.safe_load(Path(prefect_yaml).read_text()) or {}
    names = [((d or {}).get("work_pool") or {}).get("name") for d in doc.get("deployments") or []]
    return sorted({n for n in names if n and "{{" not in n})


def deploy_all(project_dir: str | os.PathLike, env: dict[str, str], timeout: float = 300.0,
               create_pools: str | None = "process") -> str:
    """`prefect --no-prompt deploy --all` in `project_dir` (reads its prefect.yaml); returns the output.

    With --no-prompt, deploy refuses a work pool that does not exist yet, so the pools named in
    prefect.yaml are first created with type `create_pools` (None: don't).
    """
    if create_pools:
        for pool in work_pools_in(Path(project_dir) / "prefect.yaml"):
            create_work_pool(pool, env, create_pools)
    # PWD as a shell would set it, so prefect.yaml can say `directory: "{{ $PWD }}"` (resolved at deploy time)
    env = {**env, "PWD": str(Path(project_dir).resolve())}
    r = subprocess.run([*prefect_cmd(), "--no-prompt", "deploy", "--all"], cwd=project_dir, env=_child_env(env),
                       capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    if r.returncode != 0 or "Traceback" in out:
        raise RuntimeError(f"prefect deploy --all failed in {project_dir} ({r.returncode}):\n{out}")
    return out


def run_deployment(name: str, parameters: dict | None, env: dict[str, str], timeout: float = 600.0,
                   watch_interval: int = 1) -> tuple[str, str]:
    """`prefect deployment run NAME --params JSON --watch`; returns (final state type, flow-run id).

    The state type is e.g. "COMPLETED", "FAILED", "CRASHED", read from the API after the watch
    ends; a failed flow run is returned, not raised. Raises if no flow run was created.
    """
    cmd = [*prefect_cmd(), "--no-prompt", "deployment", "run", name, "--watch",
           "--watch-interval", str(watch_interval), "--watch-timeout", str(int(timeout))]
    if parameters:
        cmd += ["--params", json.dumps(parameters)]
    r = subprocess.run(cmd, env=_child_env(env), capture_output=True, text=True, timeout=timeout + 60)
    out = r.stdout + r.stderr
    m = re.search(r"UUID:\s*(" + _UUID.pattern + ")", out)
    if not m:
        raise RuntimeError(f"prefect deployment run {name} created no flow run ({r.returncode}):\n{out}")
    flow_run_id = m.group(1)
    if r.returncode == 0 and "Flow run finished successfully" in out:
        return "COMPLETED", flow_run_id  # the CLI exits 0 only when state.is_completed()
    return read_flow_run_state(flow_run_id, env), flow_run_id


def read_flow_run_state(flow_run_id: str, env: dict[str, str]) -> str:
    """State type name of a flow run, read with the Prefect client (in a subprocess, so `env` applies)."""
    code = ("import asyncio,sys\n"
            "from prefect.client.orchestration import get_client\n"
            "async def main():\n"
            "    async with get_client() as c:\n"
            "        fr = await c.read_flow_run(sys.argv[1])\n"
            "        print(fr.state.type.value if fr.state else 'UNKNOWN')\n"
            "asyncio.run(main())\n")
    r = subprocess.run([sys.executable, "-c", code, flow_run_id], env=_child_env(env), capture_output=True,
                       text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"reading flow run {flow_run_id} failed:\n{r.stdout}\n{r.stderr}")
    return r.stdout.strip().splitlines()[-1]
