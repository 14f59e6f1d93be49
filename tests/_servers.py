"""Helpers for tests that start real servers on 127.0.0.1 (re-exported from infra._proc), and the suite's
leftover-process check: every process the suite starts inherits a marker in its environment, so the ones still
running at the end are found even after they were re-parented to init."""
from __future__ import annotations

import os
import re
import time


__all__ = ["free_port", "wait_http", "stop_group", "SUITE_ENV", "SERVICE_PATTERN", "marked_processes", "read_runs",
           "stop_in_process_services", "wait_gone"]

SUITE_ENV = "RESTORE_VIDEO_TEST_SUITE"  # its value: one id per pytest session
SERVICE_PATTERN = re.compile(r"prefect|mlflow|uvicorn|gunicorn|huey|raylet|gcs_server|ray::|[/\s]ray[/\s.]",
                             re.IGNORECASE)


def marked_processes(mark: str, pattern: re.Pattern = SERVICE_PATTERN, env_name: str = SUITE_ENV) -> list:
    """psutil Processes (not this one, not zombies) whose environment has `env_name=mark` and whose command line
    matches `pattern`."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if not pattern.search(" ".join(p.info["cmdline"] or [])):
                continue
            if p.environ().get(env_name) == mark:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def wait_gone(procs: list, timeout: float) -> list:
    """The processes of `procs` still running (not zombies) after up to `timeout` s."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def stop_in_process_services() -> list[str]:
    """Stop what this (pytest) process itself started and would otherwise stop only in atexit handlers: Ray's
    local cluster, Prefect's temporary servers (also those Prefect lost track of: `infra._proc.reap_children`, as a
    command's `install_cleanup` does), processes from infra._proc.spawn. Returns what spawn() still held (a test
    that did not stop its server)."""
    import sys

    from infra import _proc

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    if "infra.prefect_server" in sys.modules:  # `restore-video run`'s temporary server (prefect_api)
        from infra.prefect_server import stop_temporary_server

        stop_temporary_server()
    if "prefect.server.api.server" in sys.modules:
        from prefect.server.api.server import SubprocessASGIServer

        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()
    held = [" ".join(map(str, p.args)) if isinstance(p.args, (list, tuple)) else str(p.args) for p in _proc.live()]
    _proc.stop_all()
    _proc.reap_children()  # what a command's install_cleanup() does at exit (Prefect's temporary servers)
    return held


def read_runs(api_url: str) -> dict:
    """Everything a Prefect server holds about its runs, as plain dicts: flow runs (id, name, state, parameters),
    task runs (name, flow_run_id, state) and artifacts (key, type, data, flow_run_id)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as client:
            flow_runs = await client.read_flow_runs()
            task_runs = await client.read_task_runs()
            artifacts = await client.read_artifacts()
        return {
            "flow_runs": [{"id": str(r.id), "name": r.name, "state": r.state.type.value if r.state else None,
                           "parameters": r.parameters, "deployment_id": str(r.deployment_id or "")} for r in flow_runs],
            "task_runs": [{"name": r.name, "flow_run_id": str(r.flow_run_id or ""),
                           "state": r.state.type.value if r.state else None} for r in task_runs],
            "artifacts": [{"key": a.key, "type": a.type, "data": a.data, "flow_run_id": str(a.flow_run_id or "")}
                          for a in artifacts],
        }

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return asyncio.run(read())
