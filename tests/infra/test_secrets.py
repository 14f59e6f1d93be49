"""No secret reaches the tracker, Prefect or the logs: an S3 restore (moto server) with a distinctive key and secret,
in the environment (the documented way) and, worst case, in `storage_options` of the Python API; then every table
of the MLflow and Prefect sqlite stores, MLflow's artifacts, the Prefect API's flow-run parameters, the outputs and
every captured log are searched for them."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import boto3
import pytest

from infra.prefect_server import PrefectServer
from storage.sample import make_sample_clip

pytestmark = pytest.mark.slow

KEY_ID = "AKIAQZX7DISTINCTKEY42"
SECRET = "sEcReT/9f3Kq+UniqueMotoSecretValue0xC0FFEE"
NEEDLES = (KEY_ID, SECRET, SECRET.encode().hex(), KEY_ID.encode().hex())


def _sqlite_text(db: Path) -> str:
    """Every row of every table (`.dump`), read through sqlite (so a WAL not yet checkpointed is included)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return "\n".join(con.iterdump())
    finally:
        con.close()


def _files_text(root: Path) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in sorted(root.rglob("*")) if p.is_file())


def _assert_clean(where: str, text: str) -> None:
    for needle in NEEDLES:
        assert needle.lower() not in text.lower(), f"{where} contains a credential ({needle[:6]}...)"


def _flow_runs(api_url: str) -> list:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as client:
            return await client.read_flow_runs()

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return asyncio.run(read())


# Run as a command would: in its own process, so every thread (restore-archive's workers too) talks to the test's
# Prefect server and nothing reaches a temporary one.
SCRIPT = r"""
import json, sys
from flows.config import RestoreConfig
from flows.restore_archive import restore_archive
from flows.restore_video import restore

bucket, endpoint_only, with_secrets = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
summary = restore_archive(f"{bucket}/in", f"{bucket}/out", settings=dict(mode="benchmark", steps=2, frames="0:4"),
                          executor="inline", work_root=f"{bucket}/work", storage_options=endpoint_only)
print("ARCHIVE", json.dumps({k: summary[k] for k in ("restored", "failed")}), flush=True)
# the Python API with credentials inside storage_options (the case issue 11 found in the params)
report = restore(RestoreConfig(input=f"{bucket}/in/clip.mp4", out=f"{bucket}/out2", mode="benchmark", steps=2,
                               frames="0:4", executor="inline", work_root=f"{bucket}/work", storage_options=with_secrets))
print("REPORT", json.dumps({k: report[k] for k in ("mlflow_run_id", "mlflow_tracking_uri")}), flush=True)
# credentials passed as a flow parameter: refused, with the way out
try:
    restore_archive(f"{bucket}/in", f"{bucket}/out3", executor="inline", storage_options={"key": "k", "secret": "s"})
except ValueError as exc:
    print("REFUSED", exc, flush=True)
"""


def test_s3_restore_leaves_no_secret_in_mlflow_prefect_or_logs(s3_server, s3_bucket, tmp_path):
    import os
    import subprocess
    import sys

    url, _ = s3_server
    bucket = s3_bucket.removeprefix("s3://")
    clip = make_sample_clip(str(tmp_path / "clip.mp4"), frames=4, size=64)
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").upload_file(clip, bucket, "in/clip.mp4")
    root = Path(__file__).resolve().parents[2]
    endpoint_only = {"client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"}}
    with_secrets = {"key": KEY_ID, "secret": SECRET, **endpoint_only}

    with PrefectServer(tmp_path / "prefect") as server:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_")) and k != "RESTORE_VIDEO_MLFLOW_DIR"}
        env.update(server.env())
        env.update({"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,  # credentials: the environment
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                    "RESTORE_VIDEO_MLFLOW_DIR": str(tmp_path / "mlflow"), "PYTHONPATH": str(root),
                    "PREFECT_LOGGING_LEVEL": "DEBUG", "OMP_NUM_THREADS": "1"})
        done = subprocess.run([sys.executable, "-c", SCRIPT, s3_bucket, json.dumps(endpoint_only),
                               json.dumps(with_secrets)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600, stdin=subprocess.DEVNULL)
        logs = done.stdout + done.stderr
        assert done.returncode == 0, logs[-4000:]
        runs = _flow_runs(server.api_url)
        server_log = server.log_tail(1 << 24)
    prefect_db = _sqlite_text(tmp_path / "prefect" / "prefect.db")
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in done.stdout.splitlines()
             if line.startswith(("ARCHIVE ", "REPORT ", "REFUSED "))}
    assert json.loads(lines["ARCHIVE"]) == {"restored": 1, "failed": 0}, logs[-4000:]
    assert "must not hold credentials (key, secret)" in lines["REFUSED"] and "AWS_ACCESS_KEY_ID" in lines["REFUSED"]
    report = json.loads(lines["REPORT"])

    # the stores searched are the ones written: the runs and their params are there
    mlflow_dir = tmp_path / "mlflow"
    mlflow_db = _sqlite_text(mlflow_dir / "mlflow.db")
    assert report["mlflow_tracking_uri"] == f"sqlite:///{mlflow_dir.resolve()}/mlflow.db"
    assert not (tmp_path / "s3:").exists()  # a remote work root no longer makes a local `s3:` folder
    assert "restore-archive" in mlflow_db and report["mlflow_run_id"] in mlflow_db and "guidance_space" in mlflow_db
    assert any(r.parameters.get("input_prefix") == f"{s3_bucket}/in" for r in runs)
    assert "restore-archive" in prefect_db and "extract_frames" in prefect_db  # flow and task runs
    assert "restore-archive: 1 restored" in logs and "Finished in state" in logs  # the logs searched are the run's

    _assert_clean("MLflow sqlite store", mlflow_db)
    _assert_clean("MLflow artifacts", _files_text(mlflow_dir))
    _assert_clean("Prefect flow-run parameters", json.dumps([r.parameters for r in runs]))
    _assert_clean("Prefect sqlite store (every table, logs included)", prefect_db)
    _assert_clean("Prefect server log", server_log)
    _assert_clean("the command's stdout/stderr (Prefect, MLflow, botocore logs)", logs)
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    for key in ("out/manifest.jsonl", "out/clip.mp4/metrics.json", "out2/metrics.json"):
        text = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        _assert_clean(f"s3://{bucket}/{key}", text)
