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
        if not self.local:
            # Object stores have no rename (mv = copy): write in place, marker last.
            if self.fs.exists(final):
                self.fs.rm(final, recursive=True)
            self._to_zarr(ds, final, enc)
            self._put_marker(stage, key)
            return self.url(stage, key)
        tmp = self._tmp_path(stage, key)
        try:
            self._to_zarr(ds, tmp, enc)
            return self._publish_dir(stage, key, tmp, overwrite)
        finally:
            if os.path.exists(tmp):
                _rmtree(tmp)

    def _tmp_path(self, stage: str, key: str) -> str:
        return self._path(stage, f"{_TMP_PREFIX}{key}-{uuid.uuid4().hex[:12]}.zarr")

    def _put_marker(self, stage: str, key: str) -> None:
        """Object stores: the completion marker, written last (its presence is what `exists` checks)."""
        marker = canonical_json({"key": key, "stage": stage, "time": time.time()}).encode()
        self.fs.pipe_file(self._path(stage, f"{key}.zarr/{MARKER}"), marker)

    def writer(self, stage: str, key: str, attrs: dict | None = None) -> "ChunkedWriter":
        """A ChunkedWriter for an artifact written frame slice by frame slice (see ChunkedWriter)."""
        return ChunkedWriter(self, stage, key, attrs)

    def _publish_dir(self, stage: str, key: str, tmp: str, overwrite: bool = False) -> str:
        """Marker into the finished local temp dir, then rename it to the final name (a concurrent winner is kept)."""
        final = self._path(stage, f"{key}.zarr")
        marker = canonical_json({"key": key, "stage": stage, "time": time.time()}).encode()
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

    def remove_stale_tmp(self, older_than_s: float = 3600.0, stage: str | None = None) -> list[str]:
        """Remove temp dirs (and, on object stores, marker-less artifacts) untouched for older_than_s seconds, under
        every stage or only under `stage`; returns the removed paths."""
        removed = []
        now = time.time()
        if stage is not None:
            stage_dirs = [self._path(stage, "").rstrip("/")]
        else:
            stage_dirs = self.fs.ls(self.root, detail=False) if self.fs.exists(self.root) else []
        for stage_dir in stage_dirs:
            if not self.fs.exists(stage_dir) or not self.fs.isdir(stage_dir):
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
        if self.local:  # a chunked writer touches files deep inside, not the directory itself
            try:
                times = [os.path.getmtime(path)]
                for d, _, files in os.walk(path):
                    times += [os.path.getmtime(os.path.join(d, f)) for f in files]
                return max(times)
            except FileNotFoundError:
                return math.inf
        try:
            ts = [self.fs.info(f).get("LastModified") for f in self.fs.find(path)]
            ts = [t.timestamp() for t in ts if t is not None]
            return max(ts) if ts else math.inf
        except FileNotFoundError:
            return math.inf


def frame_slices(frames: int, batch: int) -> list[slice]:
    """[0, frames) cut into consecutive slices of at most `batch` frames."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1 frame, got {batch}")
    return [slice(s, min(s + batch, frames)) for s in range(0, frames, batch)]


class ChunkedWriter:
    """An artifact written in frame slices, never held whole, then published like `ArtifactStore.write`.

        with store.writer("decode", key, attrs={...}) as w:
            w.create("frames", ("frame", "y", "x", "rgb"), (F, H, W, 3), np.uint8)
            for s in frame_slices(F, 8):
                w.write("frames", s.start, frames_of(s))   # (len(s), H, W, 3)
        # published here: temp dir + marker + rename (local), or in place with the marker last (object stores)

    Variables are zarr v3 arrays chunked along their first dim (`frame` or `pair`, `chunk_frames` per chunk,
    1 by default), Blosc-zstd compressed, with xarray's dimension names, so `ArtifactStore.open` reads them
    lazily like any other artifact. An exception inside the `with` removes the partial artifact.
    """

    def __init__(self, store: ArtifactStore, stage: str, key: str, attrs: dict | None = None):
        self.store, self.stage, self.key = store, stage, key
        self.attrs = dict(attrs or {})
        self.path = store._tmp_path(stage, key) if store.local else store._path(stage, f"{key}.zarr")
        self.arrays: dict = {}
        self._group = None

    def __enter__(self) -> "ChunkedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.publish()
        else:
            self.abort()

    def _open_group(self):
        import zarr

        if self._group is None:
            target, opts = self.store._zarr_target(self.path)
            if not self.store.local and self.store.fs.exists(self.path):
                self.store.fs.rm(self.path, recursive=True)  # an unfinished leftover (no marker)
            kw = {"storage_options": opts} if opts else {}
            self._group = zarr.open_group(target, mode="w", zarr_format=3, **kw)
        return self._group

    def create(self, name: str, dims: tuple, shape: tuple, dtype, chunk_frames: int = 1) -> None:
        """Declare a variable of known shape; its first dim is the chunked one."""
        if len(dims) != len(shape):
            raise ValueError(f"{name}: dims {dims} and shape {shape} differ in length")
        comp = BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle)
        chunks = (max(1, min(chunk_frames, shape[0])),) + tuple(shape[1:]) if shape[0] else tuple(max(1, n) for n in shape)
        dtype = np.dtype(dtype)
        fill = False if dtype == bool else 0
        self.arrays[name] = self._open_group().create_array(
            name, shape=tuple(shape), dtype=dtype, chunks=chunks, compressors=(comp,), fill_value=fill,
            dimension_names=tuple(dims), overwrite=True)

    def write(self, name: str, start: int, values: np.ndarray) -> None:
        """values -> variable[start : start + len(values)] along the first dim."""
        arr = self.arrays[name]
        values = np.asarray(values)
        if values.shape[1:] != arr.shape[1:] or start < 0 or start + values.shape[0] > arr.shape[0]:
            raise ValueError(f"{name}: cannot write {values.shape} at {start} into {arr.shape}")
        arr[start : start + values.shape[0]] = values.astype(arr.dtype, copy=False)

    def publish(self) -> str:
        """Write the attrs, then publish atomically (marker last); returns the artifact's URL."""
        group = self._open_group()
        group.attrs.update(json.loads(json.dumps(self.attrs, default=_jsonable)))
        if not self.store.local:
            self.store._put_marker(self.stage, self.key)
            return self.store.url(self.stage, self.key)
        try:
            return self.store._publish_dir(self.stage, self.key, self.path)
        finally:
            if os.path.exists(self.path):
                _rmtree(self.path)

    def abort(self) -> None:
        """Remove what was written (nothing is published)."""
        if self.store.local:
            _rmtree(self.path)
        elif self.store.fs.exists(self.path):
            self.store.fs.rm(self.path, recursive=True)


def _rmtree(path: str) -> None:
    """Recursive delete of a local directory (ignore if gone)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)
