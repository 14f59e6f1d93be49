"""The deployment path users run: a real Prefect server and process worker on 127.0.0.1, prefect.yaml deployed,
`prefect deployment run restore-video/default --watch`, and the MLflow run with its artifacts."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from infra.prefect_server import PrefectServer, ProcessWorker, deploy_all, run_deployment

ROOT = Path(__file__).resolve().parents[2]

READ = """
import asyncio, json
from prefect.client.orchestration import get_client
async def main():
    async with get_client() as c:
        d = await c.read_deployment_by_name("restore-archive/nightly")
        print(json.dumps({"schedules": [{"cron": s.schedule.cron, "timezone": s.schedule.timezone} for s in d.schedules],
                          "parameters": d.parameters, "work_pool": d.work_pool_name,
                          "limit": d.global_concurrency_limit.limit if d.global_concurrency_limit else None,
                          "collision": str(d.concurrency_options.collision_strategy.value) if d.concurrency_options else None}))
asyncio.run(main())
"""


def _task_runs(api_url: str, flow_run_id: str) -> list:
    """Task runs of one flow run, read from the server's API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return asyncio.run(read())


@pytest.mark.slow
def test_deploy_all_and_run_default_deployment(tmp_path):
    """`prefect deployment run restore-video/default --param input=...` restores the user's own clip (restore mode, 8x)
    into a folder of the run's own, every stage a task run of the flow run."""
    import subprocess
    import sys

    import mlflow

    from storage.sample import make_sample_clip
    from storage.video import probe_video
    from tests._servers import read_runs

    clip = make_sample_clip(str(tmp_path / "old-film.mp4"), frames=4, size=16)
    work = tmp_path / "work"
    server_home = tmp_path / "prefect"
    with PrefectServer(server_home) as server:
        env = {**server.env(), "RESTORE_VIDEO_ROOT": str(ROOT), "RESTORE_VIDEO_WORK_ROOT": str(work),
               "RESTORE_VIDEO_OUT_ROOT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1",
               "RAY_AUTH_MODE": "disabled", "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore"}
        deploy_all(str(ROOT), env)
        # the nightly archive deployment carries its cron schedule
        r = subprocess.run([sys.executable, "-c", READ], env={**os.environ, **env}, capture_output=True, text=True, check=True)
        nightly = json.loads(r.stdout.strip().splitlines()[-1])
        assert nightly["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC"}]
        assert nightly["work_pool"] == "restore-video-pool" and nightly["parameters"]["concurrency"] == 1
        assert nightly["limit"] == 1 and nightly["collision"] == "ENQUEUE"  # overlapping nightly runs wait: one manifest writer
        with ProcessWorker("restore-video-pool", env, cwd=str(ROOT)):
            # the deployment names no defaults of its own: the user gives the input (+ what makes the test quick)
            params = {"input": clip, "steps": 2, "executor": "inline"}
            state, flow_run_id = run_deployment("restore-video/default", params, env, timeout=300)
            runs = read_runs(server.api_url)
            # the nightly archive, run as the scheduler would: a good clip restored, a corrupt one reported
            (tmp_path / "in").mkdir()
            shutil.copy(clip, tmp_path / "in" / "clip.mp4")
            (tmp_path / "in" / "corrupt.mp4").write_bytes(b"\x00not a video" * 100)
            nightly_params = {"input_prefix": str(tmp_path / "in"), "output_prefix": str(tmp_path / "archive"),
                              "settings": {"steps": 2}, "executor": "inline",
                              "work_root": str(work), "concurrency": 2}
            archive_state, archive_run_id = run_deployment("restore-archive/nightly", nightly_params, env, timeout=300)
            archive_tasks = _task_runs(server.api_url, archive_run_id)
    assert archive_state == "FAILED"  # after the whole batch: one of two videos failed
    assert (tmp_path / "archive" / "clip.mp4" / "restored.mp4").exists() and not (tmp_path / "archive" / "corrupt.mp4").exists()
    manifest = [json.loads(line) for line in (tmp_path / "archive" / "manifest.jsonl").read_text().splitlines()]
    assert sorted((Path(m["input"]).name, m["status"]) for m in manifest) == [("clip.mp4", "restored"), ("corrupt.mp4", "failed")]
    per_video = sorted((t.name, t.state.type.value) for t in archive_tasks if t.name.startswith("restore "))
    assert per_video == [("restore clip.mp4", "COMPLETED"), ("restore corrupt.mp4", "FAILED")]
    assert {str(t.flow_run_id) for t in archive_tasks} == {archive_run_id} and len(archive_tasks) > 2  # the stages too
    assert state == "COMPLETED"
    [flow_run] = runs["flow_runs"]
    assert flow_run["id"] == flow_run_id and flow_run["name"] == "old-film:warped-diffusion"
    assert {t["name"].split(":")[0] for t in runs["task_runs"]} >= {"extract_frames", "prepare", "estimate_flow",
                                                                          "encode", "generate_noise", "decode"}
    assert all(t["flow_run_id"] == flow_run_id for t in runs["task_runs"])
    out = tmp_path / "out" / f"old-film-warped-diffusion-{flow_run_id.replace('-', '')[:8]}"
    report = json.loads((out / "metrics.json").read_text())
    assert report["frames"] == 4 and report["method"] == "warped-diffusion" and report["mode"] == "restore"
    restored, source = probe_video(str(out / "restored.mp4")), probe_video(clip)
    assert (restored.width, restored.height) == (8 * source.width, 8 * source.height)  # the clip itself, at 8x
    mlflow.set_tracking_uri(report["mlflow_tracking_uri"])
    run = mlflow.get_run(report["mlflow_run_id"])
    assert run.data.tags["prefect_flow_run_id"] == flow_run_id
    assert run.data.params["steps"] == "2" and "warping_error_pixel_first" in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"warping_error.png", "metrics.json", "config.json"} <= artifacts
    assert "restored.mp4" not in artifacts  # videos stay in --out unless log_videos
    assert any(a["key"] == "restore-video-summary" and a["flow_run_id"] == flow_run_id for a in runs["artifacts"])
