"""restore-archive against a real S3 API (moto server on 127.0.0.1, through s3fs): isolated failures, safe names,
nothing written outside the output prefix, idempotent and cheap reruns, only new clips restored."""

from __future__ import annotations

import json

import boto3
import pytest

from flows.restore_archive import archive
from storage.sample import make_sample_clip

SETTINGS = {"task": "sr8", "mode": "benchmark", "steps": 2, "frames": "0:4"}


def _put(s3_server, bucket: str, key: str, data: bytes) -> None:
    url, _ = s3_server
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    client.put_object(Bucket=bucket, Key=key, Body=data)


def _keys(s3_server, bucket: str) -> list[str]:
    url, _ = s3_server
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("archive-clips")
    return [open(make_sample_clip(str(d / f"c{i}.mp4"), frames=4, size=64, seed=i), "rb").read() for i in range(5)]


@pytest.mark.slow
def test_archive_on_s3(s3_server, s3_bucket, clips, tmp_path):
    _, opts = s3_server
    bucket = s3_bucket.removeprefix("s3://")
    good = {"in/a.mp4": clips[0], "in/b.mp4": clips[1], "in/sub/c.mp4": clips[2], "in/../evil name with spaces.mp4": clips[3]}
    for key, data in good.items():
        _put(s3_server, bucket, key, data)
    _put(s3_server, bucket, "in/empty.mp4", b"")
    _put(s3_server, bucket, "in/truncated.mp4", clips[4][: len(clips[4]) // 2])
    run = lambda: archive(f"{s3_bucket}/in", f"{s3_bucket}/out", SETTINGS, executor="ray", work_root=str(tmp_path / "work"),
                          storage_options=opts, concurrency=2)

    first = run()
    status = {r["input"].rsplit("/", 1)[-1]: r for r in first["rows"]}
    assert first["restored"] == 4 and first["failed"] == 2 and first["skipped"] == 0, "\n".join(f"{r['input']}: {r['status']} {r.get('reason', '')[:80]}" for r in first["rows"])
    assert "empty" in status["empty.mp4"]["reason"].lower()
    assert "truncated" in status["truncated.mp4"]["reason"] or "corrupt" in status["truncated.mp4"]["reason"]
    keys = _keys(s3_server, bucket)
    written = [k for k in keys if k not in good and k not in ("in/empty.mp4", "in/truncated.mp4")]
    assert written and all(k.startswith("out/") and ".." not in k.split("/") for k in written), written
    outputs = [r["output"] for r in first["rows"] if r["status"] == "restored"]
    evil = next(r for r in first["rows"] if "evil" in r["input"])
    assert "evil name with spaces" in evil["output"] and evil["output"].startswith(f"{s3_bucket}/out/")
    for out in outputs:
        key = out.removeprefix(f"{s3_bucket}/") + "/restored.mp4"
        assert key in keys, (key, keys)
    manifest = [json.loads(line) for line in _read(s3_server, bucket, "out/manifest.jsonl").splitlines()]
    assert sorted(m["status"] for m in manifest) == ["failed", "failed", "restored", "restored", "restored", "restored"]

    second = run()
    assert second["restored"] == 0 and second["skipped"] == 4 and second["failed"] == 2
    assert second["seconds"] <= 0.2 * first["seconds"], (second["seconds"], first["seconds"])

    _put(s3_server, bucket, "in/new clip.mp4", clips[4])
    third = run()
    restored = [r["input"] for r in third["rows"] if r["status"] == "restored"]
    assert restored == [f"{s3_bucket}/in/new clip.mp4"] and third["skipped"] == 4


def _read(s3_server, bucket: str, key: str) -> str:
    url, _ = s3_server
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    return client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
