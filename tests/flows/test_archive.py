"""restore-archive: identity by ukey (metadata, not bytes), an atomic manifest, and the whole command on a real Prefect
server (one task run per video in the archive's flow run, a corrupt file isolated and reported, reruns that skip
without reading a byte, a touched file restored again); and against a real S3 API (moto server on 127.0.0.1,
through s3fs): isolated failures, safe names, nothing written outside the output prefix, cheap reruns."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import fsspec
import pytest

import flows.restore_archive as ra
from flows.restore_archive import archive, config_hash, input_ukey, plan, read_manifest, write_manifest
from storage.sample import make_sample_clip
from tests._clips import write_clip

ROOT = Path(__file__).resolve().parents[2]

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
def test_archive_on_s3(s3_server, s3_bucket, clips, tmp_path, monkeypatch):
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

    assert all(m["ukey"].startswith("etag:") for m in manifest)  # identity: the objects' ETags
    monkeypatch.setattr(ra, "content_hash", _no_hash)  # a rerun reads no video's bytes to know it is done
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


# --- identity: the file's metadata, never its bytes (unless the filesystem offers nothing else) ---------------------

def _no_hash(*args, **kwargs):
    raise AssertionError(f"content_hash called for {args[0]}: the identity must come from metadata")


def test_ukey_reads_no_bytes_and_changes_when_the_file_is_touched(tmp_path, monkeypatch):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 1000)
    monkeypatch.setattr(ra, "content_hash", _no_hash)
    first = input_ukey(str(clip))
    st = clip.stat()
    assert first == f"local:1000:{st.st_mtime_ns}:{st.st_ino}" and input_ukey(str(clip)) == first
    os.utime(clip, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # `touch`: same bytes, newer mtime
    assert input_ukey(str(clip)) != first
    assert input_ukey(f"file://{clip}") == input_ukey(str(clip))  # URL or path: the same file


def test_ukey_falls_back_to_the_content_hash_only_without_change_markers(monkeypatch):
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/ukey-test/a.mp4", b"first version")
    assert not any(k in fs.info("/ukey-test/a.mp4") for k in ra.CHANGE_MARKERS + ("ETag", "etag"))
    key = input_ukey("memory://ukey-test/a.mp4")
    assert key == "sha256:" + ra.content_hash("memory://ukey-test/a.mp4")  # name + size alone would miss a rewrite
    fs.pipe_file("/ukey-test/a.mp4", b"other version")  # same size, other bytes
    assert input_ukey("memory://ukey-test/a.mp4") != key
    fs.rm("/ukey-test", recursive=True)


def test_plan_skips_by_ukey_keeps_names_and_migrates_content_hash_manifests(tmp_path, monkeypatch):
    a, b, c = (tmp_path / "in" / n for n in ("a.mp4", "b.mp4", "c.mp4"))
    a.parent.mkdir()
    for p in (a, b, c):
        p.write_bytes(p.name.encode() * 100)
    h = config_hash({"steps": 2})
    manifest = [
        {"input": str(a), "name": "a.mp4", "ukey": input_ukey(str(a)), "config_hash": h, "status": "restored"},
        {"input": str(b), "name": "b.mp4", "ukey": input_ukey(str(b)), "config_hash": h, "status": "restored"},
        # written before identities were ukeys: a content hash only
        {"input": str(c), "name": "c.mp4", "input_hash": ra.content_hash(str(c)), "config_hash": h, "status": "restored"},
    ]
    st = b.stat()
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: restore again, into its own folder
    hashed = []
    real = {str(p): ra.content_hash(str(p)) for p in (a, b, c)}
    monkeypatch.setattr(ra, "content_hash", lambda url, opts=None: hashed.append(url) or real[url])
    rows, todo, migrated = plan([str(a), str(b), str(c)], manifest, str(tmp_path / "in"), "out", h)
    assert [(r["input"], r["status"]) for r in rows] == [(str(a), "skipped"), (str(c), "skipped")]
    assert [(t["input"], t["name"], t["output"]) for t in todo] == [(str(b), "b.mp4", "out/b.mp4")]
    assert hashed == [str(b), str(c)]  # while legacy entries exist, only videos with an unknown ukey are hashed
    assert migrated == [{**manifest[2], "ukey": input_ukey(str(c))}]
    rows, todo, _ = plan([str(a)], manifest, str(tmp_path / "in"), "out", config_hash({"steps": 3}))
    assert rows == [] and todo[0]["name"] == "a.mp4"  # other settings: restored again, same output name


# --- the manifest is replaced atomically -----------------------------------------------------------------------------

_CRASH = r"""
import sys
sys.path.insert(0, {root!r})
import os
from storage import artifacts
from flows.restore_archive import write_manifest

class Dying:  # the process dies (no finally, no cleanup) after writing part of the new manifest
    def __init__(self, path, mode):
        self.f = open(path, mode)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()
    def write(self, data):
        self.f.write(data[: len(data) // 2]); self.f.flush()
        os._exit(3)

artifacts.open = Dying
write_manifest({url!r}, [{{"input": "new-%d" % i, "status": "restored"}} for i in range(1000)])
"""


def test_a_crash_while_writing_the_manifest_leaves_the_old_one_whole(tmp_path):
    url = str(tmp_path / "out" / "manifest.jsonl")
    old = [{"input": "a.mp4", "status": "restored"}, {"input": "b.mp4", "status": "failed"}]
    write_manifest(url, old)
    done = subprocess.run([sys.executable, "-c", _CRASH.format(root=str(ROOT), url=url)], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 3, done.stderr[-2000:]  # it died inside the write
    assert read_manifest(url) == old
    leftovers = [p.name for p in (tmp_path / "out").iterdir() if p.name != "manifest.jsonl"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-")  # the half-written new one, never read


def test_a_failed_manifest_write_on_an_fsspec_url_leaves_the_old_one(monkeypatch):
    from fsspec.implementations.memory import MemoryFileSystem

    url = "memory://manifest-test/out/manifest.jsonl"
    old = [{"input": "a.mp4", "status": "restored"}]
    write_manifest(url, old)
    assert read_manifest(url) == old
    original = MemoryFileSystem.pipe_file

    def half_then_fail(self, path, value, **kw):
        original(self, path, value[: len(value) // 2], **kw)
        raise OSError("connection reset while uploading")

    monkeypatch.setattr(MemoryFileSystem, "pipe_file", half_then_fail)
    with pytest.raises(OSError, match="connection reset"):
        write_manifest(url, old + [{"input": "b.mp4", "status": "restored"}])
    monkeypatch.undo()
    fs = fsspec.filesystem("memory")
    assert read_manifest(url) == old and fs.ls("/manifest-test/out", detail=False) == ["/manifest-test/out/manifest.jsonl"]
    write_manifest(url, old + [{"input": "b.mp4", "status": "restored"}])  # a new object, moved over the old one
    assert [m["input"] for m in read_manifest(url)] == ["a.mp4", "b.mp4"]
    fs.rm("/manifest-test", recursive=True)


# --- the command on a real Prefect server ----------------------------------------------------------------------------

_SPY = r"""
import builtins, json, sys
sys.path.insert(0, {root!r})
import flows.restore_archive as ra
from fsspec.implementations.local import LocalFileSystem
watched, hashed, opened = {watched!r}, [], []
_open, _fs_open, _hash = builtins.open, LocalFileSystem._open, ra.content_hash

def spy_open(file, *a, **k):
    if str(file) in watched:
        opened.append(str(file))
    return _open(file, *a, **k)

def spy_fs_open(self, path, *a, **k):
    if str(path) in watched:
        opened.append(str(path))
    return _fs_open(self, path, *a, **k)

builtins.open, LocalFileSystem._open = spy_open, spy_fs_open
ra.content_hash = lambda url, *a, **k: hashed.append(url) or _hash(url, *a, **k)
from flows.cli import main
rc = main({argv!r})
print("SPY " + json.dumps({{"rc": rc, "opened": opened, "hashed": hashed}}), flush=True)
sys.exit(rc)
"""


def _prefect_runs(api_url: str):
    """(flow runs of restore-archive, {flow run id: task runs}, {flow run id: artifacts}) from the server's API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowFilter, FlowFilterName, \
        FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["restore-archive"])))
            tasks, artifacts = {}, {}
            for r in runs:
                tasks[r.id] = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id])))
                artifacts[r.id] = await client.read_artifacts(
                    artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[r.id])))
            all_tasks = await client.read_task_runs()
            return sorted(runs, key=lambda r: r.created), tasks, artifacts, all_tasks

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return asyncio.run(read())


@pytest.mark.slow
def test_archive_command_on_a_prefect_server(tmp_path):
    import mlflow

    from infra.prefect_server import PrefectServer

    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    good = [write_clip(str(src / "a clip.mp4"), 23, 17, 6), write_clip(str(src / "sub" / "b.mp4"), 18, 26, 6, photo="astronaut")]
    bad = src / "broken.mp4"
    bad.write_bytes(Path(good[0]).read_bytes()[:40] + b"\x00garbage" * 64)  # an mp4 header, then nothing decodable
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["archive", str(src), "--out", str(out), "--work-root", str(work), "--executor", "inline", "--steps", "2",
            "--frames", "0:4", "--concurrency", "2", "--json"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "RAY_ADDRESS"))}

    def run(server):
        script = _SPY.format(root=str(ROOT), watched=[*good, str(bad)], argv=argv)
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**env, **server.env(), "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        spy = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("SPY "))[4:])
        summary = json.loads(done.stdout[done.stdout.index("{"):done.stdout.index("\nSPY ")])
        return done, spy, {Path(r["input"]).name: r for r in summary["rows"]}, summary

    with PrefectServer(tmp_path / "prefect") as server:
        done, spy, rows, first = run(server)
        logs = done.stdout[-3000:] + done.stderr[-6000:]
        assert done.returncode == 1 and spy["rc"] == 1, logs  # the batch ran; one video failed
        assert {n: r["status"] for n, r in rows.items()} == {"a clip.mp4": "restored", "b.mp4": "restored", "broken.mp4": "failed"}, logs
        assert "broken.mp4" in rows["broken.mp4"]["reason"] and "VideoError" in rows["broken.mp4"]["reason"]
        assert not Path(rows["broken.mp4"]["output"]).exists()  # nothing half-written for the failed one
        for name in ("a clip.mp4", "b.mp4"):
            assert (Path(rows[name]["output"]) / "restored.mp4").stat().st_size > 0
            assert json.loads((Path(rows[name]["output"]) / "metrics.json").read_text())["frames"] == 4
        manifest = read_manifest(str(out / "manifest.jsonl"))
        assert sorted((Path(m["input"]).name, m["status"]) for m in manifest) == [
            ("a clip.mp4", "restored"), ("b.mp4", "restored"), ("broken.mp4", "failed")]

        # second run: the good ones skipped by ukey without a byte read, the broken one tried (and reported) again
        done, spy, rows, second = run(server)
        assert done.returncode == 1 and second["restored"] == 0 and second["skipped"] == 2 and second["failed"] == 1, done.stderr[-4000:]
        assert spy["hashed"] == [] and not set(spy["opened"]) & set(good), spy

        # touching a clip (same bytes, new mtime) restores it again, into the same folder
        st = os.stat(good[1])
        os.utime(good[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        done, spy, rows, third = run(server)
        assert [n for n, r in rows.items() if r["status"] == "restored"] == ["b.mp4"], done.stderr[-4000:]
        assert rows["b.mp4"]["output"] == next(m["output"] for m in manifest if m["input"] == good[1])
        assert rows["a clip.mp4"]["status"] == "skipped" and spy["hashed"] == []

        flow_runs, task_runs, artifacts, all_tasks = _prefect_runs(server.api_url)

    # every task run of the server belongs to one of the three archive flow runs, the per-video ones named after it
    assert [r.state.type.value for r in flow_runs] == ["FAILED"] * 3 and "1 of 3 videos failed" in flow_runs[0].state.message
    assert {t.flow_run_id for t in all_tasks} == {r.id for r in flow_runs}
    per_video = {r.id: sorted((t.name, t.state.type.value) for t in task_runs[r.id] if t.name.startswith("restore "))
                 for r in flow_runs}
    assert per_video[flow_runs[0].id] == [("restore a clip.mp4", "COMPLETED"), ("restore broken.mp4", "FAILED"),
                                          ("restore sub - b.mp4", "COMPLETED")]
    assert per_video[flow_runs[1].id] == [("restore broken.mp4", "FAILED")]
    assert {t.name.split(":")[0] for t in task_runs[flow_runs[0].id]} >= {"extract_frames", "decode"}  # stages nested in it
    kinds = [a.type for a in artifacts[flow_runs[0].id]]
    assert kinds.count("progress") == 2 and kinds.count("table") == 1, kinds  # sampling progress of both, the summary

    # MLflow: one nested run per restored video, tagged with the archive's flow run
    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    for name in ("a clip.mp4", "b.mp4"):
        run_id = next(m["mlflow_run_id"] for m in manifest if Path(m["input"]).name == name)
        tags = mlflow.get_run(run_id).data.tags
        assert tags["prefect_flow_run_id"] == str(flow_runs[0].id) and tags["mlflow.parentRunId"] == first["mlflow_run_id"]


def test_archive_command_refuses_bad_settings_before_any_work(tmp_path, capsys):
    from flows.cli import main

    (tmp_path / "in").mkdir()
    assert main(["archive", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err
    assert main(["archive", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--concurrency", "0"]) == 2
    assert "--concurrency must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_config_hash_follows_the_model_weights(tmp_path):
    """The archive's "already restored" identity holds the resolved model's weights: a retrained model (same name,
    new weights_sha256 in its card) restores the archive again; the same settings and weights skip it."""
    import json
    import shutil

    from storage.models import resolve

    shipped = resolve("sr8-res-gp")
    model = tmp_path / "my-sr8"
    shutil.copytree(shipped, model)
    before = config_hash({"model": str(model)})
    assert before == config_hash({"model": str(model)}) and before != config_hash({"model": "sr8-res-gp", "steps": 3})
    card = json.loads((model / "card.json").read_text())
    card["weights_sha256"] = "0" * 64  # what save_model records after retraining
    (model / "card.json").write_text(json.dumps(card))
    assert config_hash({"model": str(model)}) != before
    assert config_hash({}) == config_hash({"model": None})  # the default model resolves the same way
    assert config_hash({"chroma": "420"}) != config_hash({})  # another encoding of restored.mp4: written again
