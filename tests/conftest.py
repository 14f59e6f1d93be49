"""Shared fixtures: a real local S3 server (moto server mode) and sample clips."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1: yields (endpoint_url, s3fs storage_options)."""
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for k, v in _AWS_ENV.items():
            mp.setenv(k, v)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
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
    """Keep botocore from looking for real credentials/metadata endpoints in tests."""
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests need CUDA: skipped, saying so, where torch sees no GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
