"""MLflow helpers on a real sqlite backend in a tmp dir, and the `mlflow server` UI."""
from __future__ import annotations

import json
import re
import urllib.request

import pytest

from infra.tracking import MlflowUI, flatten, git_commit, log_config, log_series, start_run, tracking_uri


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # anything written to ./mlruns would show up here
    prev = mlflow.get_tracking_uri()
    uri = tracking_uri(tmp_path / "work")
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


def test_flatten():
    assert flatten({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": {}, "f": None}) == {
        "a.b.c": 1, "a.d": [1, 2], "e": "{}", "f": None}


def test_params_series_nested_and_artifacts(mlflow_uri, tmp_path):
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
    assert uri.startswith((tmp_path / "work" / "mlartifacts").as_uri()), uri
    assert not (tmp_path / "mlruns").exists()


def test_git_commit(tmp_path):
    assert re.fullmatch(r"[0-9a-f]{4,40}", git_commit())
    assert git_commit(tmp_path) == "unknown"


@pytest.mark.slow
def test_mlflow_server_health_and_runs(mlflow_uri, tmp_path):
    with start_run("ui-test", "r1", uri=mlflow_uri) as run:
        log_config({"a": {"b": 1}})
    with MlflowUI(tmp_path / "work") as ui:
        proc = ui.proc
        with urllib.request.urlopen(f"{ui.url}/health", timeout=5) as r:
            assert r.status == 200
        req = urllib.request.Request(f"{ui.url}/api/2.0/mlflow/runs/get?run_id={run.info.run_id}")
        with urllib.request.urlopen(req, timeout=10) as r:
            data = json.loads(r.read())
        assert {"key": "a.b", "value": "1"} in data["run"]["data"]["params"]
    assert proc.poll() is not None
