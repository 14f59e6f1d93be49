"""Shared fixtures: a real local S3 server (moto server mode) and sample clips."""

from __future__ import annotations

import os
import uuid

import pytest

from infra._proc import free_port

_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1: yields (endpoint_url, s3fs storage_options)."""
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for k, v in _AWS_ENV.items():
            mp.setenv(k, v)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        opts = {"key": "testing", "secret": "testing",
                "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"}}
        try:
            yield url, opts
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the session S3 server: yields 's3://<name>'."""
    import boto3
    import s3fs

    url, _ = s3_server
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()  # no stale listings across buckets
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def sample_clip(tmp_path_factory) -> str:
    """Lossless 16-frame 64x64 sample clip at 8 fps (session-wide, read-only)."""
    from storage.sample import make_sample_clip

    return make_sample_clip(str(tmp_path_factory.mktemp("clips") / "sample.mp4"), frames=16, size=64)


@pytest.fixture(scope="session")
def sample_clip_audio(tmp_path_factory) -> str:
    """Lossless 16-frame 64x64 sample clip at 8 fps with a 440 Hz AAC track."""
    from storage.sample import make_sample_clip_with_audio

    return make_sample_clip_with_audio(str(tmp_path_factory.mktemp("clips") / "sample_audio.mp4"),
                                       frames=16, size=64)


def pytest_sessionstart(session):
    """Keep botocore from looking for real credentials/metadata endpoints in tests. Import prefect now: its console
    log handler binds the sys.stderr of the moment prefect is first imported, and a test's capsys stream is closed
    after that test (later flow runs would log into a closed file)."""
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    import prefect.main  # noqa: F401  (`import prefect` alone is lazy: prefect.main sets logging up)


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests need CUDA: skipped, saying so, where torch sees no GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- nothing the suite starts outlives it (issue 11, item 7) ----------------------------------------------------
# Every process started from here on inherits RESTORE_VIDEO_TEST_SUITE=<session id>. At the end of the session the
# in-process services are stopped (Ray, Prefect's temporary server: normally at interpreter exit), then any
# Prefect / MLflow / uvicorn / Ray process still carrying the id fails the run (and is killed).

@pytest.fixture(scope="session", autouse=True)
def _nothing_left_running():
    import uuid as _uuid

    from tests._servers import SUITE_ENV, marked_processes, stop_in_process_services, wait_gone

    mark = _uuid.uuid4().hex
    previous = os.environ.get(SUITE_ENV)
    os.environ[SUITE_ENV] = mark
    yield
    held = stop_in_process_services()
    leftovers = wait_gone(marked_processes(mark), timeout=20.0)
    described = [f"pid {p.pid}: {' '.join(p.cmdline())[:200]}" for p in leftovers if p.is_running()]
    for p in leftovers:
        try:
            p.kill()
        except Exception:
            pass
    if previous is None:
        os.environ.pop(SUITE_ENV, None)
    else:
        os.environ[SUITE_ENV] = previous
    problems = ([f"servers started with infra._proc.spawn and never stopped: {held}"] if held else []) + \
        ([f"processes started by the suite still running after it (killed now): {described}"] if described else [])
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.fixture(autouse=True)
def _mlflow_tracking_uri_restored():
    """`mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI; a test that sets it back to MLflow's default
    (`sqlite:///mlflow.db`) would send every later run of the session into ./mlflow.db of the checkout."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if os.environ.get("MLFLOW_TRACKING_URI") != before:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
