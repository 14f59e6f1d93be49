"""A real Prefect server + process worker on 127.0.0.1: deploy from prefect.yaml, run with --watch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from infra._proc import group_alive
from infra.prefect_server import PrefectServer, ProcessWorker, deploy_all, run_deployment

pytestmark = pytest.mark.slow

FLOW = '''
from pathlib import Path
from prefect import flow

from helpers.mathx import double  # a package at the project root, beside pipeline/: must be importable


@flow(log_prints=True)
def write_value(out: str, value: int = 1, fail: bool = False) -> int:
    """Write 2 * value to `out` (the test's side effect); raise if `fail`."""
    if fail:
        raise ValueError("asked to fail")
    Path(out).write_text(str(double(value)))
    print(f"wrote {2 * value} to {out}")
    return 2 * value
'''

PREFECT_YAML = '''
name: infra-test
prefect-version: 3.8.7
build: null
push: null
# The process worker runs each flow run in a subprocess; this step makes it cd into the project
# so that `entrypoint` (a path relative to it) and the packages beside it are importable.
# {{{{ $PWD }}}} is resolved when `prefect deploy` runs (in the project dir) and stored as an absolute path.
pull:
  - prefect.deployments.steps.set_working_directory:
      directory: "{{{{ $PWD }}}}"
deployments:
  - name: write
    entrypoint: pipeline/tiny_flow.py:write_value
    parameters:
      out: {project}/default.txt
      value: 1
    work_pool:
      name: test-pool
  - name: nightly
    entrypoint: pipeline/tiny_flow.py:write_value
    parameters:
      out: {project}/nightly.txt
    schedules:
      - cron: "0 3 * * *"
        timezone: UTC
        active: false
    work_pool:
      name: test-pool
'''

READ_DEPLOYMENT = '''
import asyncio, json, sys
from prefect.client.orchestration import get_client

async def main():
    async with get_client() as client:
        d = await client.read_deployment_by_name(sys.argv[1])
        print(json.dumps({
            "work_pool": d.work_pool_name,
            "parameters": d.parameters,
            "schedules": [{"cron": s.schedule.cron, "timezone": s.schedule.timezone, "active": s.active}
                          for s in d.schedules],
            "pull_steps": d.pull_steps,
        }))

asyncio.run(main())
'''


def test_deploy_and_run_with_process_worker(tmp_path):
    project = tmp_path / "project"
    (project / "pipeline").mkdir(parents=True)
    (project / "pipeline" / "tiny_flow.py").write_text(FLOW)
    (project / "helpers").mkdir()
    (project / "helpers" / "__init__.py").write_text("")
    (project / "helpers" / "mathx.py").write_text("def double(x):\n    return 2 * x\n")
    (project / "prefect.yaml").write_text(PREFECT_YAML.format(project=project))
    out = tmp_path / "result.txt"

    with PrefectServer(tmp_path / "prefect-home") as server:
        env = server.env()
        server_pid = server.proc.pid
        deploy_all(project, env)

        # the cron schedule and pull step come back from the API as written in prefect.yaml
        r = subprocess.run([sys.executable, "-c", READ_DEPLOYMENT, "write-value/nightly"],
                           env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        d = json.loads(r.stdout.strip().splitlines()[-1])
        assert d["schedules"] == [{"cron": "0 3 * * *", "timezone": "UTC", "active": False}]
        assert d["work_pool"] == "test-pool"
        assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(project)}}]

        with ProcessWorker("test-pool", env) as worker:
            worker_pid = worker.proc.pid
            state, flow_run_id = run_deployment("write-value/write", {"out": str(out), "value": 21}, env,
                                                timeout=120)
            failed_state, failed_id = run_deployment("write-value/write", {"out": str(out), "fail": True}, env,
                                                     timeout=120)
        assert failed_state == "FAILED" and failed_id != flow_run_id
        assert state == "COMPLETED", worker.log_tail()
        assert len(flow_run_id) == 36
        assert out.read_text() == "42"
        assert not group_alive(worker_pid)
    assert not group_alive(server_pid)
