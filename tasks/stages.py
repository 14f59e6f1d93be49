"""The stages of restore-video in order, and the one Prefect task that runs any of them.

    extract_frames -> prepare -> estimate_flow -> encode -> generate_noise -> sample -> decode -> metrics -> outputs

Each stage runs as a Prefect task run named after it (`run_task`): retries on I/O errors only, a timeout, and its
content key exposed to Prefect as the task's cache key with a persisted result, so the UI shows a reused stage as
`Cached`. The artifact store stays the truth: a stage whose artifact is missing refreshes Prefect's cache entry
(recomputes), so a deleted artifact is never "reused" from a stale Prefect record. A stage whose products live
outside the store (`outputs`) opts out with NO_CACHE and says why (`Stage.prefect_cache`).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import replace

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import decode, degrade, encode, extract, metrics, noise, optical_flow, outputs, sample
from tasks._stage import Stage, StageCall, StageRecord, retry_on_io_error, run, store_for

STAGES: dict[str, Stage] = {s.name: s for s in (extract.STAGE, degrade.STAGE, optical_flow.STAGE, encode.STAGE, noise.STAGE,
                                                sample.STAGE, decode.STAGE, metrics.STAGE, outputs.STAGE)}
ORDER = tuple(STAGES)

# A stage's timeout: generous against preflight's estimate of the sampling time on one CPU thread (every other stage
# costs less than sampling), never under an hour. It catches a hung stage, not a slow one.
TIMEOUT_MIN_S = 3600.0
TIMEOUT_MARGIN = 20.0


def timeout_s(estimated_sampling_s: float) -> float:
    """The timeout of every stage of a job whose sampling preflight estimates at `estimated_sampling_s`."""
    return max(TIMEOUT_MIN_S, TIMEOUT_MARGIN * float(estimated_sampling_s))


def _cache_key(context, parameters: dict) -> str:
    """Prefect's cache key of a stage task run: the stage's content key in this work root."""
    call: StageCall = parameters["call"]
    root = hashlib.sha256(str(parameters["work_root"]).encode()).hexdigest()[:8]
    return f"restore-video-{call.stage}-{call.key}-{root}"


@task(retries=2, retry_delay_seconds=1, retry_condition_fn=retry_on_io_error)
def _stage_task(call: StageCall, work_root: str, storage_options: dict, pool=None) -> StageRecord:
    runtime = {"pool": pool} if pool is not None else {}
    return run(STAGES[call.stage], store_for(work_root, storage_options), call, **runtime)


def stage_task(call: StageCall, work_root: str, storage_options: dict | None = None, timeout: float | None = None):
    """The Prefect task that runs `call`: named after its stage, cached by its key (or NO_CACHE), with a timeout."""
    stage = STAGES[call.stage]
    options = dict(name=stage.name, task_run_name=f"{stage.name}:{call.key}")
    # Prefect enforces a timeout on a sync task only in the main thread; in a worker thread (restore-archive's
    # videos) it would merely log a warning per task run, so none is set there.
    if timeout is not None and threading.current_thread() is threading.main_thread():
        options["timeout_seconds"] = timeout
    if stage.prefect_cache == "key":
        store = store_for(work_root, storage_options)
        options.update(cache_key_fn=_cache_key, persist_result=True,
                       refresh_cache=not store.exists(stage.name, call.key))  # missing artifact: recompute, re-record
    else:
        options.update(cache_policy=NO_CACHE, persist_result=False)
    return _stage_task.with_options(**options)


def run_task(call: StageCall, work_root: str, storage_options: dict | None = None, pool=None,
             timeout: float | None = None) -> StageRecord:
    """Run `call` as a Prefect task run and return its record; a Prefect cache hit is reported as `cached`."""
    opts = dict(storage_options or {})
    state = stage_task(call, work_root, opts, timeout)(call, work_root, opts, pool, return_state=True)
    record = state.result()  # raises the stage's own error
    if state.name == "Cached":
        record = replace(record, cached=True, seconds=0.0)
    return record
