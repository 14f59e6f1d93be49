"""MLflow helpers on a real sqlite backend in a tmp dir, and the `mlflow server` UI."""
from __future__ import annotations

import json
import os
import re
import urllib.request

import pytest

from infra.tracking import (MlflowUI, check_no_secrets, flatten, git_commit, is_secret_name, log_config,
                            log_output_files, log_series, redact, restoration_run, scrub, start_run, tracking_uri)


@pytest.fixture(scope="module")
def mlflow_root(tmp_path_factory):
    """One sqlite store for the module (creating MLflow's tables takes a second or two)."""
    return tmp_path_factory.mktemp("mlflow") / "work"


@pytest.fixture
def mlflow_uri(mlflow_root, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # anything written to ./mlruns would show up here
    prev = mlflow.get_tracking_uri()
    uri = tracking_uri(mlflow_root)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(prev)


def test_tracking_uri_default_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "a" / "b"
    assert tracking_uri(root) == f"sqlite:///{root}/mlflow.db" and root.is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking_uri(root) == "http://127.0.0.1:1"


def test_a_run_does_not_redirect_later_work_roots(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    prev = mlflow.get_tracking_uri()
    try:
        with start_run("infra-test", "a", uri=tracking_uri(tmp_path / "a")):
            pass  # mlflow.set_tracking_uri alone would export MLFLOW_TRACKING_URI to the environment
        assert "MLFLOW_TRACKING_URI" not in os.environ
        assert tracking_uri(tmp_path / "b") == f"sqlite:///{tmp_path}/b/mlflow.db"
    finally:
        mlflow.set_tracking_uri(prev)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_flatten():
    assert flatten({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": {}, "f": None}) == {
        "a.b.c": 1, "a.d": [1, 2], "e": "{}", "f": None}


def test_params_series_nested_and_artifacts(mlflow_uri, mlflow_root, tmp_path):
    from mlflow.tracking import MlflowClient

    config = {"sampler": {"steps": 50, "guidance": {"lambda": 1.0}}, "model": "tiny",
              "long": "x" * 7000, "many": {f"k{i}": i for i in range(250)}}
    with start_run("infra-test", "parent", tags={"git_commit": "abc123"}, uri=mlflow_uri) as parent:
        logged = log_config(config)
        log_series("psnr", [20.0, 21.5, 23.25])
        (tmp_path / "note.txt").write_text("hi")
        import mlflow

        mlflow.log_artifact(str(tmp_path / "note.txt"))
        with start_run("infra-test", "child", nested=True) as child:
            log_series("loss", [3.0, 2.0], start_step=10)
    with start_run("infra-test", "detached-child", parent_run_id=parent.info.run_id) as child2:
        pass

    client = MlflowClient(tracking_uri=mlflow_uri)
    params = client.get_run(parent.info.run_id).data.params
    assert params["sampler.steps"] == "50"
    assert params["sampler.guidance.lambda"] == "1.0"
    assert params["model"] == "tiny"
    assert params["many.k249"] == "249" and len(params) == 3 + 1 + 250 == len(logged)
    assert len(params["long"]) == 6000 and params["long"].endswith("...")
    assert client.get_run(parent.info.run_id).data.tags["git_commit"] == "abc123"

    hist = client.get_metric_history(parent.info.run_id, "psnr")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(0, 20.0), (1, 21.5), (2, 23.25)]
    hist = client.get_metric_history(child.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in hist) == [(10, 3.0), (11, 2.0)]

    for c in (child, child2):
        assert client.get_run(c.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id

    # artifacts live next to the DB, not in ./mlruns of the current directory
    uri = client.get_run(parent.info.run_id).info.artifact_uri
    assert uri.startswith((mlflow_root / "mlartifacts").as_uri()), uri
    assert not (tmp_path / "mlruns").exists()


def test_git_commit(tmp_path):
    assert re.fullmatch(r"[0-9a-f]{40}", git_commit())
    assert git_commit(tmp_path) == "unknown"


def test_remote_work_root_tracks_in_a_local_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "local"
    assert tracking_uri("s3://bucket/work", local_dir=local) == f"sqlite:///{local.resolve()}/mlflow.db"
    monkeypatch.setenv("RESTORE_VIDEO_MLFLOW_DIR", str(tmp_path / "env-dir"))
    assert tracking_uri("s3://bucket/work") == f"sqlite:///{(tmp_path / 'env-dir').resolve()}/mlflow.db"
    assert tracking_uri(f"file://{tmp_path}/w") == f"sqlite:///{tmp_path}/w/mlflow.db"
    assert not (tmp_path / "s3:").exists() and list(tmp_path.iterdir()) != []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env-dir", "local", "w"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking_uri("s3://bucket/work") == "http://127.0.0.1:1"


SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCY-SECRET"
KEY_ID = "AKIA-DISTINCTIVE-KEY-ID"


def test_redact_drops_storage_options_and_secret_names_everywhere():
    config = {"input": f"s3://{KEY_ID}:{SECRET}@bucket/in.mp4", "steps": 4, "model": None,
              "storage_options": {"key": KEY_ID, "secret": SECRET, "client_kwargs": {"endpoint_url": "http://h:1"}},
              "nested": {"aws_secret_access_key": SECRET, "session_token": "tok-123456", "api_key": "k-123456",
                         "keys": ["a", "b"], "note": f"copied {SECRET} by mistake", "monkey": 1},
              "storage_options.secret": SECRET, "flat.password": "hunter22"}
    safe = redact(config)
    assert safe == {"input": "s3://***@bucket/in.mp4", "steps": 4, "model": None,
                    "nested": {"keys": ["a", "b"], "note": "copied *** by mistake", "monkey": 1}}
    assert config["storage_options"]["secret"] == SECRET  # the input is not modified
    flat = redact(flatten(config))
    assert not any(k.startswith("storage_options") for k in flat) and SECRET not in repr(flat)
    assert KEY_ID not in repr(flat) and "tok-123456" not in repr(flat)
    assert scrub(f"boom: {SECRET} at https://u:p@host/x", config) == "boom: *** at https://***@host/x"
    for name in ("key", "secret", "token", "password", "aws_access_key_id", "AWS_SECRET_ACCESS_KEY", "api_key",
                 "credentials", "session_token", "key_file"):
        assert is_secret_name(name), name
    for name in ("keys", "monkey", "steps", "endpoint_url", "client_kwargs", "guidance_space", "weights_sha256"):
        assert not is_secret_name(name), name


def test_check_no_secrets_names_the_keys_and_the_way_out():
    check_no_secrets({"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}, "anon": False})
    check_no_secrets(None)
    with pytest.raises(ValueError, match=r"client_kwargs\.aws_secret_access_key, key.*AWS_ACCESS_KEY_ID"):
        check_no_secrets({"key": "a", "client_kwargs": {"aws_secret_access_key": "b"}})


def _store_text(root) -> str:
    """Every byte of the sqlite DB and the artifacts under `root`, as text."""
    return "".join(p.read_bytes().decode("latin-1") for p in sorted(root.rglob("*")) if p.is_file())


def test_restoration_run_finished_with_tags_params_input_and_no_secret(mlflow_uri, mlflow_root, tmp_path):
    from mlflow.tracking import MlflowClient

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.json").write_text("{}")
    (tmp_path / "out" / "restored.mp4").write_bytes(b"not really a video")
    params = {"input": str(tmp_path / "clip.mp4"), "steps": 4,
              "storage_options": {"key": KEY_ID, "secret": SECRET, "client_kwargs": {"endpoint_url": "http://h:1"}}}
    with restoration_run("restore-test", "clip.mp4:gp", params=params, uri=mlflow_uri, weights_hash="ab" * 32,
                         input_url=params["input"], tags={"method": "gp"}, system_metrics=False) as run:
        log_series("psnr", [30.0, 31.0])
        urls = {n: str(tmp_path / "out" / n) for n in ("metrics.json", "restored.mp4")}
        assert log_output_files(urls) == ["metrics.json"]  # videos only with log_videos
    client = MlflowClient(tracking_uri=mlflow_uri)
    got = client.get_run(run.info.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params == {"input": params["input"], "steps": "4"}
    assert got.data.tags["mlflow.source.git.commit"] == git_commit()
    assert got.data.tags["weights_sha256"] == "ab" * 32 and got.data.tags["method"] == "gp"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.json", "metrics.json"}
    config = json.loads(open(client.download_artifacts(run.info.run_id, "config.json", str(tmp_path))).read())
    assert config == {"input": params["input"], "steps": 4}
    [inp] = got.inputs.dataset_inputs
    assert inp.dataset.name == "clip.mp4" and params["input"] in inp.dataset.source
    text = _store_text(mlflow_root)
    assert "restore-test" in text and "weights_sha256" in text  # the scan reads the store
    assert SECRET not in text and KEY_ID not in text


def test_restoration_run_failed_with_the_error_and_no_secret(mlflow_uri, mlflow_root):
    from mlflow.tracking import MlflowClient

    params = {"steps": 4, "storage_options": {"secret": SECRET}}
    with pytest.raises(ZeroDivisionError):
        with restoration_run("restore-test", "bad", params=params, uri=mlflow_uri, system_metrics=False) as run:
            raise ZeroDivisionError(f"cannot divide, secret {SECRET} leaked into a message")
    got = MlflowClient(tracking_uri=mlflow_uri).get_run(run.info.run_id)
    assert got.info.status == "FAILED"
    assert got.data.tags["error"] == "ZeroDivisionError: cannot divide, secret *** leaked into a message"
    assert SECRET not in _store_text(mlflow_root)
    import mlflow

    assert mlflow.active_run() is None

    with pytest.raises(KeyboardInterrupt):
        with restoration_run("restore-test", "interrupted", uri=mlflow_uri, system_metrics=False) as run:
            raise KeyboardInterrupt
    assert MlflowClient(tracking_uri=mlflow_uri).get_run(run.info.run_id).info.status == "KILLED"


def test_restoration_run_nests_and_logs_system_metrics(mlflow_uri, monkeypatch):
    pytest.importorskip("psutil")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # default 10 s

    with restoration_run("restore-test", "archive", uri=mlflow_uri, system_metrics=False) as parent:
        pass
    client = MlflowClient(tracking_uri=mlflow_uri)
    with restoration_run("restore-test", "video", uri=mlflow_uri, parent_run_id=parent.info.run_id) as child:
        import time

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the monitor thread logs its first sample after ~0.2 s
            if any(k.startswith("system/") for k in client.get_run(child.info.run_id).data.metrics):
                break
            time.sleep(0.1)
    got = client.get_run(child.info.run_id)
    assert got.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert any(k.startswith("system/cpu") for k in got.data.metrics), got.data.metrics
    assert not any(k.startswith("system/") for k in client.get_run(parent.info.run_id).data.metrics)


@pytest.mark.slow
def test_mlflow_server_health_and_runs(mlflow_uri, mlflow_root):
    with start_run("ui-test", "r1", uri=mlflow_uri) as run:
        log_config({"a": {"b": 1}})
    with MlflowUI(mlflow_root) as ui:
        proc = ui.proc
        with urllib.request.urlopen(f"{ui.url}/health", timeout=5) as r:
            assert r.status == 200
        req = urllib.request.Request(f"{ui.url}/api/2.0/mlflow/runs/get?run_id={run.info.run_id}")
        with urllib.request.urlopen(req, timeout=10) as r:
            data = json.loads(r.read())
        assert {"key": "a.b", "value": "1"} in data["run"]["data"]["params"]
    assert proc.poll() is not None
