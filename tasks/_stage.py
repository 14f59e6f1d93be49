"""What every stage shares: content-addressed keys, skip-if-present, timing, and the artifact store."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import lru_cache

from storage.artifacts import ArtifactStore, artifact_key, canonical_json

# Bump a stage's version when its code changes what it writes: old artifacts are then not reused.
VERSIONS = {
    "extract_frames": "1",
    "prepare": "1",
    "estimate_flow": "1",
    "encode": "1",
    "generate_noise": "1",
    "sample": "1",
    "decode": "2",  # 2: sr8 back-projection onto the low-res input
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
