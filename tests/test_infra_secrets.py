"""No secret reaches the tracker, Prefect or the logs: an S3 restore (moto server) with a distinctive key and secret,
in the environment (the documented way) and, worst case, in `storage_options` of the Python API; then every table
of the MLflow and Prefect sqlite stores, MLflow's artifacts, the Prefect API's flow-run parameters, the outputs and
every captured log are searched for them."""
from __future__ import annotations

import json
import logging
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


def test_s3_restore_leaves_no_secret_in_mlflow_prefect_or_logs(s3_server, s3_bucket, tmp_path, monkeypatch, caplog,
                                                              capfd):
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.config import RestoreConfig
    from flows.restore_archive import restore_archive
    from flows.restore_video import restore

    url, _ = s3_server
    bucket = s3_bucket.removeprefix("s3://")
    clip = make_sample_clip(str(tmp_path / "clip.mp4"), frames=4, size=64)
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").upload_file(clip, bucket, "in/clip.mp4")

    # credentials in the environment; storage_options name only the endpoint
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.delenv("AWS_SECURITY_TOKEN", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RESTORE_VIDEO_MLFLOW_DIR", str(tmp_path / "mlflow"))
    monkeypatch.chdir(tmp_path)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    endpoint_only = {"client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"}}
    with_secrets = {"key": KEY_ID, "secret": SECRET, **endpoint_only}
    caplog.set_level(logging.DEBUG, logger="prefect")
    caplog.set_level(logging.INFO)

    with PrefectServer(tmp_path / "prefect") as server, temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        summary = restore_archive(f"{s3_bucket}/in", f"{s3_bucket}/out", mode="benchmark", steps=2, frames="0:4",
                                  executor="inline", work_root=f"{s3_bucket}/work", storage_options=endpoint_only)
        assert summary["restored"] == 1, summary["rows"]
        # the Python API with credentials inside storage_options (the case issue 11 found in the params)
        report = restore(RestoreConfig(input=f"{s3_bucket}/in/clip.mp4", out=f"{s3_bucket}/out2", mode="benchmark",
                                       steps=2, frames="0:4", executor="inline", work_root=f"{s3_bucket}/work",
                                       storage_options=with_secrets))
        APILogHandler().flush()  # the flow runs' logs are in the API before it is read
        runs = _flow_runs(server.api_url)
        server_log = server.log_tail(1 << 24)
    prefect_db = _sqlite_text(tmp_path / "prefect" / "prefect.db")

    # the stores searched are the ones written: the runs and their params are there
    mlflow_dir = tmp_path / "mlflow"
    mlflow_db = _sqlite_text(mlflow_dir / "mlflow.db")
    assert report["mlflow_tracking_uri"] == f"sqlite:///{mlflow_dir.resolve()}/mlflow.db"
    assert not (tmp_path / "s3:").exists()  # a remote work root no longer makes a local `s3:` folder
    assert "restore-archive" in mlflow_db and report["mlflow_run_id"] in mlflow_db and "guidance_space" in mlflow_db
    assert any(r.name and r.parameters.get("input_prefix") == f"{s3_bucket}/in" for r in runs)
    assert "restore-archive" in prefect_db and "input_prefix" in prefect_db

    _assert_clean("MLflow sqlite store", mlflow_db)
    _assert_clean("MLflow artifacts", _files_text(mlflow_dir))
    _assert_clean("Prefect flow-run parameters", json.dumps([r.parameters for r in runs]))
    _assert_clean("Prefect sqlite store (every table, logs included)", prefect_db)
    _assert_clean("Prefect server log", server_log)
    _assert_clean("captured log records", "\n".join(r.getMessage() for r in caplog.records))
    out, err = capfd.readouterr()
    _assert_clean("stdout/stderr", out + err)
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    for key in ("out/manifest.jsonl", "out/clip.mp4/metrics.json", "out2/metrics.json"):
        text = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        _assert_clean(f"s3://{bucket}/{key}", text)
