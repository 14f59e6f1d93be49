"""`restore-video run` starts the `restore-video` flow on the configured Prefect API (a real server here): one flow
run named `{input}:{method}`, every stage a task run attached to it, the outputs in a folder of the run's own, and a
markdown artifact summarising the run with the link to its MLflow run (a real sqlite store)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.prefect_server import PrefectServer
from storage.video import probe_video
from tests._servers import read_runs

ROOT = Path(__file__).resolve().parents[2]
STAGE_TASKS = {"extract_frames", "prepare", "estimate_flow", "encode", "generate_noise", "decode"}


@pytest.mark.slow  # a Prefect server, a CLI subprocess, a 2-step restoration: ~60 s
def test_cli_run_is_a_flow_run_with_task_runs_per_run_out_and_summary(tmp_path):
    import mlflow
    from storage.sample import make_sample_clip

    clip = make_sample_clip(str(tmp_path / "holiday.mp4"), frames=4, size=16)
    ui = "http://127.0.0.1:5000"  # where `mlflow ui --backend-store-uri ...` serves the store
    with PrefectServer(tmp_path / "prefect") as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env.update(server.env())  # PREFECT_API_URL: the user's configured API
        env.update({"RESTORE_VIDEO_OUT_ROOT": str(tmp_path / "out"), "RESTORE_VIDEO_MLFLOW_UI": ui,
                    "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        done = subprocess.run([sys.executable, "-m", "flows.cli", "run", clip, "--steps", "2", "--executor", "inline",
                               "--work-root", str(tmp_path / "work"), "--json"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        logs = done.stdout + done.stderr
        assert done.returncode == 0, logs[-4000:]
        runs = read_runs(server.api_url)
    assert "Starting temporary server" not in logs  # the configured API was used
    [flow_run] = runs["flow_runs"]
    assert flow_run["name"] == "holiday:warped-diffusion" and flow_run["state"] == "COMPLETED"
    assert flow_run["parameters"]["input"] == clip and flow_run["parameters"]["steps"] == 2
    tasks = {t["name"].split(":")[0]: t for t in runs["task_runs"]}
    assert STAGE_TASKS <= set(tasks), sorted(tasks)
    assert all(t["flow_run_id"] == flow_run["id"] and t["state"] == "COMPLETED" for t in runs["task_runs"])

    # outputs: a folder of this run's own, the user's clip restored at 8x (restore mode)
    out = tmp_path / "out" / f"holiday-warped-diffusion-{flow_run['id'].replace('-', '')[:8]}"
    report = json.loads((out / "metrics.json").read_text())
    assert report["mode"] == "restore" and report["outputs"]["restored.mp4"] == str(out / "restored.mp4")
    info = probe_video(str(out / "restored.mp4"))
    assert (info.width, info.height, info.frames) == (128, 128, 4)
    assert report["plan"]["guidance_space"] == report["guidance_space"] == "pixel"

    # the markdown summary links the MLflow run, which ran in this flow run
    [summary] = [a for a in runs["artifacts"] if a["key"] == "restore-video-summary"]
    assert summary["type"] == "markdown" and summary["flow_run_id"] == flow_run["id"]
    link = f"{ui}/#/experiments/{report['mlflow_experiment_id']}/runs/{report['mlflow_run_id']}"
    assert f"[{report['mlflow_run_id']}]({link})" in summary["data"]
    assert str(out / "restored.mp4") in summary["data"] and "warping error" in summary["data"]
    assert "| score | restored | input: bicubic x8 + back-projection |" in summary["data"]  # restore mode: its own warping error
    assert report["input"]["name"] == "bicubic x8 + back-projection" and "psnr" not in report["input"]  # no truth here
    client = mlflow.MlflowClient(tracking_uri=report["mlflow_tracking_uri"])
    run = client.get_run(report["mlflow_run_id"])
    assert run.data.metrics["input_warping_error_pixel_first"] == pytest.approx(report["input"]["warping_error"]["pixel_first"])
    assert run.info.status == "FINISHED" and run.data.tags["prefect_flow_run_id"] == flow_run["id"]
    [dataset] = run.inputs.dataset_inputs
    from infra.tracking import content_digest

    assert dataset.dataset.name == "holiday.mp4" and dataset.dataset.digest == content_digest(clip)


def test_summary_puts_every_score_next_to_the_input_baseline():
    from flows.restore_video import quality_rows, summary_markdown

    we = {"pixel_first": 2e-3, "pixel_prev": 1e-3, "latent_first": 0.5, "latent_prev": 0.25}
    report = {"frames": 3, "task": "inpaint", "method": "gp", "model": "m", "guidance_space": "latent",
              "warping_error": we, "psnr": 30.0, "ssim": 0.9, "hole_psnr": 21.5, "grad_ratio": 0.9, "blockiness": 1.02,
              "input": {"name": "Telea fill (OpenCV) of the holes", "warping_error": {"pixel_first": 1e-3, "pixel_prev": 5e-4},
                        "psnr": 31.0, "ssim": 0.95, "hole_psnr": 22.25, "grad_ratio": 0.8, "blockiness": 1.0},
              "cached": {"sample": False}, "timings_s": {"total": 1.0}, "outputs": {"restored.mp4": "/x/restored.mp4"},
              "mlflow_run_id": "abc", "mlflow_experiment_id": "1", "mlflow_tracking_uri": "sqlite:///x.db"}
    header, rows = quality_rows(report)
    assert header == ["score", "restored", "input: Telea fill (OpenCV) of the holes"]
    table = {r[0]: r[1:] for r in rows}
    assert table["hole PSNR (dB)"] == ("21.50", "22.25") and table["warping error, pixel first"] == ("0.00200", "0.00100")
    assert table["warping error, latent first"] == ("0.5000", "–")  # the input has no latents
    md = summary_markdown(report)
    assert "| PSNR (dB) | 30.00 | 31.00 |" in md and "| blockiness (1 = no 8-px blocks) | 1.020 | 1.000 |" in md
    del report["input"], report["psnr"]
    header, rows = quality_rows(report)
    assert header == ["score", "restored"] and "PSNR (dB)" not in {r[0] for r in rows}


@pytest.mark.slow  # one flow run on Prefect's temporary server
def test_cli_bad_input_inside_the_flow_prints_one_line_and_exits_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL",))}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"})
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(tmp_path / "gone.mp4"), "--executor", "inline",
                           "--work-root", str(tmp_path / "work")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    logs = done.stdout + done.stderr
    assert done.returncode == 2, logs[-4000:]
    assert logs.count("gone.mp4: file not found") == 1 and "Traceback" not in logs
    assert "temporary server on http://127.0.0.1:" in logs  # no API configured: a temporary server, stopped at exit
    assert (tmp_path / "prefect-home" / "prefect.db").is_file()  # in the PREFECT_HOME the user set, not the repository's


@pytest.mark.slow  # a CLI with no API, SIGKILLed while it samples
def test_sigkilled_cli_leaves_no_temporary_server(tmp_path):
    import re
    import signal
    import time
    import uuid

    from infra._proc import wait_http
    from storage.sample import make_sample_clip
    from tests._servers import SUITE_ENV, marked_processes, wait_gone

    clip = make_sample_clip(str(tmp_path / "long.mp4"), frames=8, size=32)
    mark = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
                "OMP_NUM_THREADS": "1", SUITE_ENV: mark})
    log = tmp_path / "cli.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", clip, "--executor", "inline", "--steps", "400",
                                 "--work-root", str(tmp_path / "work"), "--out", str(tmp_path / "out")], cwd=tmp_path,
                                env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline, api = time.monotonic() + 240, None
        while time.monotonic() < deadline and "sampling" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()[-4000:]
            time.sleep(0.5)
        api = re.search(r"temporary server on (http://127\.0\.0\.1:\d+/api)", log.read_text()).group(1)
        wait_http(f"{api}/health", timeout=10)  # up while the command runs
        proc.send_signal(signal.SIGKILL)  # no atexit, no finally: only the parent-death signal is left
        proc.wait(timeout=30)
        left = wait_gone(marked_processes(mark), timeout=30)
        assert not left, [" ".join(p.cmdline()) for p in left]
        with pytest.raises(Exception):
            wait_http(f"{api}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in marked_processes(mark):
            p.kill()
