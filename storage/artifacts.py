"""Content-addressed zarr artifacts over fsspec, published atomically with a completion marker."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import uuid
import warnings
from fractions import Fraction
from pathlib import PurePath

import fsspec
import numpy as np
import xarray as xr
from zarr.codecs import BloscCodec, BloscShuffle

MARKER = "_COMPLETE"
_TMP_PREFIX = ".tmp-"
# zarr warns about any non-zarr object inside a group; the marker is ours and expected.
_MARKER_WARNING = rf"Object at {MARKER} is not recognized"
warnings.filterwarnings("ignore", message=_MARKER_WARNING)


def _jsonable(o):
    """json.dumps default: numpy scalars/arrays, Fractions, paths, sets."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Fraction, PurePath)):
        return str(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"artifact params must be JSON-like; got {type(o).__name__}: {o!r}")


def canonical_json(obj) -> str:
    """Deterministic JSON (sorted keys, no spaces, no NaN) used for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_jsonable, allow_nan=False)


def artifact_key(stage: str, version: str, params: dict, upstream: dict[str, str]) -> str:
    """sha256 of canonical JSON of (stage, version, params, upstream keys), 16 hex chars."""
    doc = {"stage": stage, "version": str(version), "params": params, "upstream": upstream}
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()[:16]


def _is_local(fs) -> bool:
    """True for the local filesystem."""
    protos = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protos or "local" in protos


def _fs(url: str, storage_options: dict | None):
    """(fs, path) for url; local filesystems get auto_mkdir."""
    opts = dict(storage_options or {})
    fs, path = fsspec.core.url_to_fs(url, **opts)
    if _is_local(fs):
        fs, path = fsspec.core.url_to_fs(url, **{**opts, "auto_mkdir": True})
    return fs, path


def _default_encoding(ds: xr.Dataset) -> dict:
    """Blosc-zstd for every variable; numpy-backed arrays with a 'frame' dim chunked per frame."""
    comp = (BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle),)
    enc = {}
    for name, var in ds.variables.items():
        if var.ndim == 0 or var.dtype.kind in "OUS":
            continue
        e = {"compressors": comp}
        if var.chunks is None and "frame" in var.dims and var.ndim > 1:
            e["chunks"] = tuple(1 if d == "frame" else n for d, n in zip(var.dims, var.shape))
        enc[name] = e
    return enc


def write_bytes_atomic(url: str, data: bytes, storage_options: dict | None = None) -> str:
    """Write bytes so readers see the old file or the whole new one, never a partial one."""
    fs, path = _fs(url, storage_options)
    if _is_local(fs):
        d, base = os.path.split(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f"{_TMP_PREFIX}{base}-{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        fs.pipe_file(path, data)  # a single object PUT is atomic on object stores
    return url


def write_json_atomic(url: str, obj, storage_options: dict | None = None) -> str:
    """Atomically write obj as pretty JSON (numpy scalars allowed)."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=_jsonable)
    return write_bytes_atomic(url, text.encode() + b"\n", storage_options)


def read_json(url: str, storage_options: dict | None = None):
    """Read a JSON document from any fsspec URL."""
    fs, path = _fs(url, storage_options)
    with fs.open(path, "rb") as f:
        return json.load(f)


class ArtifactStore:
    """Zarr artifacts at {root}/{stage}/{key}.zarr; existing == complete (marker present)."""

    def __init__(self, root_url: str, storage_options: dict | None = None):
        self.root_url = str(root_url).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = _fs(self.root_url, self.storage_options)
        self.local = _is_local(self.fs)

    def url(self, stage: str, key: str) -> str:
        """URL of an artifact (whether or not it exists)."""
        return f"{self.root_url}/{stage}/{key}.zarr"

    def _path(self, stage: str, name: str) -> str:
        """Filesystem path (no protocol) of a name under a stage."""
        return f"{self.root.rstrip('/')}/{stage}/{name}"

    def _zarr_target(self, path: str):
        """(store argument, storage_options) for xarray: local paths or protocol URLs."""
        if self.local:
            return path, None
        return self.fs.unstrip_protocol(path), self.storage_options

    def exists(self, stage: str, key: str) -> bool:
        """True only when the artifact was completely published."""
        self.fs.invalidate_cache(self._path(stage, f"{key}.zarr"))  # another process may have published it
        return self.fs.exists(self._path(stage, f"{key}.zarr/{MARKER}"))

    def write(self, stage: str, key: str, ds: xr.Dataset, encoding: dict | None = None,
              overwrite: bool = False) -> str:
        """Publish ds atomically; returns its URL (a no-op if it already exists and not overwrite)."""
        if self.exists(stage, key) and not overwrite:
            return self.url(stage, key)
        final = self._path(stage, f"{key}.zarr")
        enc = {**_default_encoding(ds), **(encoding or {})}
        marker = canonical_json({"key": key, "stage": stage, "time": time.time()}).encode()
        if not self.local:
            # Object stores have no rename (mv = copy): write in place, marker last.
            if self.fs.exists(final):
                self.fs.rm(final, recursive=True)
            self._to_zarr(ds, final, enc)
            self.fs.pipe_file(f"{final}/{MARKER}", marker)
            return self.url(stage, key)
        tmp = self._path(stage, f"{_TMP_PREFIX}{key}-{uuid.uuid4().hex[:12]}.zarr")
        try:
            self._to_zarr(ds, tmp, enc)
            with open(os.path.join(tmp, MARKER), "wb") as f:
                f.write(marker)
            if os.path.exists(final):  # incomplete leftover, or overwrite
                if not overwrite and os.path.exists(os.path.join(final, MARKER)):
                    return self.url(stage, key)  # a concurrent writer won; same content
                _rmtree(final)
            try:
                os.rename(tmp, final)
            except OSError:
                if not os.path.exists(os.path.join(final, MARKER)):
                    raise
        finally:
            if os.path.exists(tmp):
                _rmtree(tmp)
        return self.url(stage, key)

    def _to_zarr(self, ds: xr.Dataset, path: str, encoding: dict) -> None:
        """Write a dataset as a zarr v3 group (unconsolidated)."""
        target, opts = self._zarr_target(path)
        kw = {"storage_options": opts} if opts else {}
        ds.to_zarr(target, mode="w", consolidated=False, zarr_format=3, encoding=encoding, **kw)

    def open(self, stage: str, key: str, chunks=None) -> xr.Dataset:
        """Open a published artifact lazily (dask, one chunk per zarr chunk by default; chunks=False: lazy numpy)."""
        if not self.exists(stage, key):
            raise FileNotFoundError(
                f"artifact {self.url(stage, key)} does not exist or is incomplete (no {MARKER}); "
                "run its stage first."
            )
        target, opts = self._zarr_target(self._path(stage, f"{key}.zarr"))
        kw = {"storage_options": opts} if opts else {}
        chunks = {} if chunks is None else (None if chunks is False else chunks)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_MARKER_WARNING)
            return xr.open_zarr(target, consolidated=False, zarr_format=3, chunks=chunks, **kw)

    def remove(self, stage: str, key: str) -> None:
        """Delete an artifact (marker first, so it stops 'existing' before data goes)."""
        path = self._path(stage, f"{key}.zarr")
        if self.fs.exists(f"{path}/{MARKER}"):
            self.fs.rm(f"{path}/{MARKER}")
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def remove_stale_tmp(self, older_than_s: float = 3600.0) -> list[str]:
        """Remove temp dirs (and, on object stores, marker-less artifacts) older than older_than_s."""
        removed = []
        now = time.time()
        for stage_dir in self.fs.ls(self.root, detail=False) if self.fs.exists(self.root) else []:
            if not self.fs.isdir(stage_dir):
                continue
            for p in self.fs.ls(stage_dir, detail=False):
                name = p.rstrip("/").rsplit("/", 1)[-1]
                stale_tmp = name.startswith(_TMP_PREFIX)
                unfinished = name.endswith(".zarr") and not self.fs.exists(f"{p}/{MARKER}")
                if not (stale_tmp or unfinished) or now - self._mtime(p) < older_than_s:
                    continue
                self.fs.rm(p, recursive=True)
                removed.append(p)
        return removed

    def _mtime(self, path: str) -> float:
        """Newest modification time under path (epoch s); +inf when unknown."""
        if self.local:
            return os.path.getmtime(path)
        try:
            ts = [self.fs.info(f).get("LastModified") for f in self.fs.find(path)]
            ts = [t.timestamp() for t in ts if t is not None]
            return max(ts) if ts else math.inf
        except FileNotFoundError:
            return math.inf


def _rmtree(path: str) -> None:
    """Recursive delete of a local directory (ignore if gone)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)
