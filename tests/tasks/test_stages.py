"""The stage machinery: declared stages, the one runner (skip, publish, stale temp dirs), keys derived once from the
settings, and every stage as a Prefect task whose cache follows the artifact store."""

from __future__ import annotations

import os
import time

import pytest

from storage.artifacts import ArtifactStore
from tasks import _stage, extract
from tasks.stages import ORDER, STAGES, stage_task


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from storage.sample import make_sample_clip

    return make_sample_clip(str(tmp_path_factory.mktemp("clip") / "clip.mp4"), frames=3, size=32)


def _age(path, seconds: float) -> None:
    """Set the modification time of path and everything under it `seconds` into the past."""
    old = time.time() - seconds
    for d, _, files in os.walk(path):
        for f in files:
            os.utime(os.path.join(d, f), (old, old))
        os.utime(d, (old, old))


def test_every_stage_is_declared_once_in_order():
    assert ORDER == ("extract_frames", "prepare", "estimate_flow", "encode", "generate_noise", "sample", "decode", "metrics",
                     "outputs")
    for name, stage in STAGES.items():
        assert stage.name == name and stage.version
        assert set(stage.upstream_names({})) <= set(ORDER[:ORDER.index(name)])  # reads only stages that come before it
    with pytest.raises(ValueError, match="exactly one of compute, produce, delegate"):
        _stage.Stage("x", "1", (), lambda a, o: {}, compute=lambda s, c: None, produce=lambda s, c, w: None)


def test_runner_skips_what_exists_and_removes_stale_tmp_dirs_where_a_stage_starts(tmp_path, clip):
    store = ArtifactStore(str(tmp_path / "work"))
    stale = tmp_path / "work" / "extract_frames" / ".tmp-0123-crashed.zarr"
    fresh = tmp_path / "work" / "extract_frames" / ".tmp-4567-running.zarr"
    other = tmp_path / "work" / "prepare" / ".tmp-89ab-crashed.zarr"  # another stage's folder: cleaned when it starts
    for d in (stale, fresh, other):
        (d / "frames").mkdir(parents=True)
        (d / "frames" / "c0").write_bytes(b"x")
    _age(stale, _stage.STALE_TMP_S + 60)
    _age(other, _stage.STALE_TMP_S + 60)
    call = extract.STAGE.call({"input": clip, "range": [0, None]}, {})
    first = _stage.run(extract.STAGE, store, call)
    assert not first.cached and store.exists("extract_frames", call.key)
    assert not stale.exists() and fresh.exists() and other.exists()  # only old leftovers, only of this stage
    assert store.open("extract_frames", call.key)["frames"].shape == (3, 32, 32, 3)
    again = _stage.run(extract.STAGE, store, call)
    assert again.cached and again.key == first.key
    with pytest.raises(ValueError, match="stage 'prepare' reads extract_frames"):
        STAGES["prepare"].call({"task": "sr8", "mode": "restore", "seed": 0, "mask": None, "multiple": 32}, {})


def test_keys_are_derived_once_and_execution_choices_stay_out_of_them(clip, tmp_path):
    from flows.config import RestoreConfig
    from flows.restore_video import derive_calls, derive_keys

    base = dict(input=clip, work_root=str(tmp_path / "work"), mode="benchmark")
    from storage.models import DEFAULT_MODELS
    from tasks.models import model_info

    calls, plan = derive_calls(RestoreConfig(**base))
    assert tuple(calls) == ORDER and plan.sample_space == "pixel"
    assert plan.model == DEFAULT_MODELS["sr8"] and plan.multiple == model_info(plan.model)["multiple"]
    for call in calls.values():  # each call reads exactly the keys derived for its upstream stages
        assert call.upstream == {n: calls[n].key for n in STAGES[call.stage].upstream_names(call.args)}
    keys = derive_keys(RestoreConfig(**base))
    assert {n: keys[n] for n in ORDER[:-1]} == {n: c.key for n, c in calls.items() if n != "outputs"}
    run_options = dict(device="cpu", executor="inline", max_batch=2, out=str(tmp_path / "elsewhere"))
    moved, _ = derive_calls(RestoreConfig(**base, **run_options), window=2)
    assert {n: c.key for n, c in moved.items() if n != "outputs"} == {n: c.key for n, c in calls.items() if n != "outputs"}
    reseeded, _ = derive_calls(RestoreConfig(**base, seed=1))
    assert [n for n in ORDER if reseeded[n].key != calls[n].key] == list(ORDER[1:])  # all but the frames


def test_retry_on_io_errors_only():
    class State:
        def __init__(self, exc):
            self.exc = exc

        def result(self):
            raise self.exc

    assert _stage.retry_on_io_error(None, None, State(ConnectionResetError("reset")))
    assert not _stage.retry_on_io_error(None, None, State(TimeoutError("stage ran out of time")))
    assert not _stage.retry_on_io_error(None, None, State(ValueError("bad input")))


@pytest.mark.slow  # Prefect's temporary server starts for it: ~20 s
def test_prefect_caches_a_stage_by_its_key_and_the_store_stays_the_truth(clip, tmp_path, monkeypatch):
    """A stage task run is Prefect-cached by the stage key (the UI shows `Cached`); once its artifact is deleted, the
    next run recomputes it instead of trusting Prefect's record."""
    from prefect import flow

    import tasks.stages as stages

    ran = []
    real_run = stages.run
    monkeypatch.setattr(stages, "run", lambda stage, store, call, **kw: ran.append(call.key) or real_run(stage, store, call, **kw))
    root = str(tmp_path / "work")
    call = extract.STAGE.call({"input": clip, "range": [0, None]}, {})

    @flow
    def twice():
        return stages.run_task(call, root, {}), stages.run_task(call, root, {})

    first, second = twice()
    assert not first.cached and second.cached and ran == [call.key]  # the second run never entered the stage
    ArtifactStore(root).remove("extract_frames", call.key)
    third, _ = twice()
    assert not third.cached and ran == [call.key, call.key] and ArtifactStore(root).exists("extract_frames", call.key)
    # the outputs stage writes into --out, outside the store: never cached, and says why
    from prefect.cache_policies import NO_CACHE

    outputs = STAGES["outputs"]
    assert outputs.prefect_cache.startswith("NO_CACHE:") and not outputs.artifact
    out_call = _stage.StageCall("outputs", "k", {}, {})
    assert stage_task(out_call, root, {}).cache_policy is NO_CACHE
