"""What every stage shares: the `Stage` declaration, one runner that derives the content key, skips what exists and
publishes atomically, timing, and the artifact store.

A stage module declares itself once:

    STAGE = Stage("estimate_flow", version="2", inputs=("prepare",),
                  identity=lambda args, opts: {"backend": args["backend"], ...},   # what enters the key
                  produce=_produce)                                            # (store, call, writer) -> None

`STAGE.call(args, keys, storage_options)` binds one run's arguments and upstream keys into a `StageCall` (its key
computed there, once); `run(STAGE, store, call)` runs it: an existing artifact is reused (`cached`), otherwise it is
computed and published atomically. `args` are JSON-like (names, URLs, numbers): tensors never travel through a call,
and arguments that do not change the result (device, window) stay out of `identity`, so they are not in the key.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterator

import numpy as np

from storage.artifacts import ArtifactStore, artifact_key, canonical_json

# Streaming stages work on batches of frames holding about this many bytes per array (at least one frame), so
# their memory is bounded by the frame size, not the clip length.
BATCH_BYTES = 32 * 2**20

# Temporary directories (and, on object stores, marker-less artifacts) untouched for this long are leftovers of
# crashed or killed runs: a live writer touches its files continuously, so a day is far beyond any live one.
STALE_TMP_S = 24 * 3600.0


@lru_cache(maxsize=16)
def _store(root: str, options_json: str) -> ArtifactStore:
    return ArtifactStore(root, json.loads(options_json))


def store_for(work_root: str, storage_options: dict | None = None) -> ArtifactStore:
    """One ArtifactStore per (root, options) in a process; options may nest (s3fs `client_kwargs`)."""
    return _store(work_root, canonical_json(storage_options or {}))


@dataclass
class StageRecord:
    """Bookkeeping of one stage in one run: its key, whether it was reused, and how long it took."""

    stage: str
    key: str
    cached: bool
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StageCall:
    """One stage of one run: its content key, the upstream artifact keys it reads and its own arguments."""

    stage: str
    key: str
    upstream: dict
    args: dict


@dataclass(frozen=True)
class Stage:
    """A stage: its name (the artifacts' folder), code version, the stages it reads, what of its arguments is its
    identity, and how it computes.

    inputs: upstream stage names whose keys enter this key (or a function of the args giving them);
    identity(args, storage_options) -> the params hashed into the key (may read a file's identity, never data);
    exactly one of
      compute(store, call) -> xr.Dataset            published whole,
      produce(store, call, writer) -> None          written frame slice by slice (a ChunkedWriter),
      delegate(store, call, **runtime) -> record    computes and publishes itself (the sampler on a model worker);
    artifact: False for a stage whose products live outside the store (the output videos): it always runs;
    prefect_cache: "key" (Prefect caches the task run by the stage key) or the reason it must not (NO_CACHE).
    """

    name: str
    version: str
    inputs: tuple | Callable[[dict], tuple]
    identity: Callable[[dict, dict], dict]
    compute: Callable | None = None
    produce: Callable | None = None
    delegate: Callable | None = None
    artifact: bool = True
    prefect_cache: str = "key"

    def __post_init__(self):
        if sum(f is not None for f in (self.compute, self.produce, self.delegate)) != 1:
            raise ValueError(f"stage {self.name!r}: give exactly one of compute, produce, delegate")

    def upstream_names(self, args: dict) -> tuple:
        return tuple(self.inputs(args) if callable(self.inputs) else self.inputs)

    def key(self, args: dict, upstream: dict, storage_options: dict | None = None) -> str:
        """sha256 of (name, version, identity(args), upstream keys): the artifact's content address."""
        return artifact_key(self.name, self.version, self.identity(args, storage_options or {}), upstream)

    def call(self, args: dict, keys: dict, storage_options: dict | None = None) -> StageCall:
        """Bind one run's args and the upstream keys (`keys`: stage name -> key; extra names are ignored)."""
        missing = [n for n in self.upstream_names(args) if keys.get(n) is None]
        if missing:
            raise ValueError(f"stage {self.name!r} reads {', '.join(missing)}: derive their keys first")
        upstream = {n: keys[n] for n in self.upstream_names(args)}
        return StageCall(self.name, self.key(args, upstream, storage_options), upstream, dict(args))


def run(stage: Stage, store: ArtifactStore, call: StageCall, **runtime) -> StageRecord:
    """The one stage runner: reuse the artifact when it exists; otherwise compute it and publish it atomically."""
    if call.stage != stage.name:
        raise ValueError(f"a call of stage {call.stage!r} given to stage {stage.name!r}")
    if not stage.artifact:
        start = time.perf_counter()
        extra = stage.delegate(store, call, **runtime)
        return StageRecord(stage.name, call.key, False, time.perf_counter() - start, dict(extra or {}))
    if stage.delegate is not None:
        start = time.perf_counter()
        clean_stale_once(store, stage.name)
        if store.exists(stage.name, call.key):
            return StageRecord(stage.name, call.key, True, time.perf_counter() - start)
        return stage.delegate(store, call, **runtime)
    if stage.produce is not None:
        return run_stage_chunked(store, stage.name, call.key, lambda writer: stage.produce(store, call, writer))
    return run_stage(store, stage.name, call.key, lambda: stage.compute(store, call))


_CLEANED: set = set()
_CLEANED_LOCK = threading.Lock()


def clean_stale_once(store: ArtifactStore, stage: str, older_than_s: float | None = None) -> list[str]:
    """`store.remove_stale_tmp` for one stage's folder, once per (store, stage) per process: the temporary
    directories of crashed runs are removed where a stage starts, not left to pile up."""
    ident = (store.root_url, canonical_json(store.storage_options), stage)
    with _CLEANED_LOCK:
        if ident in _CLEANED:
            return []
        _CLEANED.add(ident)
    return store.remove_stale_tmp(STALE_TMP_S if older_than_s is None else older_than_s, stage=stage)


def run_stage(store: ArtifactStore, stage: str, key: str, compute) -> StageRecord:
    """Skip when the artifact exists; otherwise compute the xarray Dataset and publish it atomically."""
    start = time.perf_counter()
    clean_stale_once(store, stage)
    if store.exists(stage, key):
        return StageRecord(stage, key, True, time.perf_counter() - start)
    ds = compute()
    store.write(stage, key, ds)
    return StageRecord(stage, key, False, time.perf_counter() - start)


def batch_frames(bytes_per_frame: int, budget: int | None = None) -> int:
    """Frames per batch so that one array of the batch holds about `budget` bytes (BATCH_BYTES; at least 1)."""
    return max(1, int(BATCH_BYTES if budget is None else budget) // max(1, int(bytes_per_frame)))


def frame_chunks(array) -> Iterator[tuple[int, np.ndarray]]:
    """(first frame, block (f, ...)) of a (frame, ...) array, one stored chunk of frames at a time (zarr chunks along
    `frame`; never the whole video); a numpy array comes in blocks of 8 frames."""
    n = int(array.shape[0])
    chunks = getattr(array, "chunks", None)
    step = int(chunks[0][0]) if chunks and isinstance(chunks[0], tuple) and chunks[0] else 8
    for s in range(0, n, step):
        yield s, np.asarray(array[s:s + step])


def run_stage_chunked(store: ArtifactStore, stage: str, key: str, produce, attrs: dict | None = None) -> StageRecord:
    """Skip when the artifact exists; otherwise `produce(writer)` writes it slice by slice (a ChunkedWriter), then
    it is published atomically, as `run_stage` does for a whole Dataset."""
    start = time.perf_counter()
    clean_stale_once(store, stage)
    if store.exists(stage, key):
        return StageRecord(stage, key, True, time.perf_counter() - start)
    with store.writer(stage, key, attrs) as writer:
        produce(writer)
    return StageRecord(stage, key, False, time.perf_counter() - start)


def retry_on_io_error(task, task_run, state) -> bool:
    """Prefect retry condition: retry transient I/O errors, never bad input (ValueError and its VideoError) nor a
    timeout (TimeoutError is an OSError: a stage that ran out of time would only run out of it again)."""
    try:
        state.result()
    except ValueError:
        return False
    except TimeoutError:
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False
