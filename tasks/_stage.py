"""What every stage shares: content-addressed keys, skip-if-present, timing, and the artifact store."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import lru_cache

from storage.artifacts import ArtifactStore, artifact_key, canonical_json

# Streaming stages work on batches of frames holding about this many bytes per array (at least one frame), so
# their memory is bounded by the frame size, not the clip length.
BATCH_BYTES = 32 * 2**20

# Bump a stage's version when its code changes what it writes: old artifacts are then not reused.
VERSIONS = {
    "extract_frames": "2",  # 2: streamed
    "prepare": "1",
    "estimate_flow": "2",  # 2: padded to the model's multiple, shot cuts, streamed
    "encode": "2",  # 2: padded to the model's multiple, streamed
    "generate_noise": "2",  # 2: a fresh GP draw per shot, streamed
    "sample": "1",
    "decode": "3",  # 2: sr8 back-projection onto the low-res input; 3: crops the model's padding, streamed
    "metrics": "1",
}


@lru_cache(maxsize=16)
def _store(root: str, options_json: str) -> ArtifactStore:
    return ArtifactStore(root, json.loads(options_json))


def store_for(work_root: str, storage_options: dict | None = None) -> ArtifactStore:
    """One ArtifactStore per (root, options) in a process; options may nest (s3fs `client_kwargs`)."""
    return _store(work_root, canonical_json(storage_options or {}))


def stage_key(stage: str, params: dict, upstream: dict[str, str]) -> str:
    return artifact_key(stage, VERSIONS[stage], params, upstream)


@dataclass
class StageRecord:
    """Bookkeeping of one stage in one run: its key, whether it was reused, and how long it took."""

    stage: str
    key: str
    cached: bool
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def run_stage(store: ArtifactStore, stage: str, key: str, compute) -> StageRecord:
    """Skip when the artifact exists; otherwise compute the xarray Dataset and publish it atomically."""
    start = time.perf_counter()
    if store.exists(stage, key):
        return StageRecord(stage, key, True, time.perf_counter() - start)
    ds = compute()
    store.write(stage, key, ds)
    return StageRecord(stage, key, False, time.perf_counter() - start)


def batch_frames(bytes_per_frame: int, budget: int | None = None) -> int:
    """Frames per batch so that one array of the batch holds about `budget` bytes (BATCH_BYTES; at least 1)."""
    return max(1, int(BATCH_BYTES if budget is None else budget) // max(1, int(bytes_per_frame)))


def run_stage_chunked(store: ArtifactStore, stage: str, key: str, produce, attrs: dict | None = None) -> StageRecord:
    """Skip when the artifact exists; otherwise `produce(writer)` writes it slice by slice (a ChunkedWriter), then
    it is published atomically, as `run_stage` does for a whole Dataset."""
    start = time.perf_counter()
    if store.exists(stage, key):
        return StageRecord(stage, key, True, time.perf_counter() - start)
    with store.writer(stage, key, attrs) as writer:
        produce(writer)
    return StageRecord(stage, key, False, time.perf_counter() - start)


def retry_on_io_error(task, task_run, state) -> bool:
    """Prefect retry condition: retry transient I/O errors, never bad input (ValueError and its VideoError)."""
    try:
        state.result()
    except ValueError:
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False
