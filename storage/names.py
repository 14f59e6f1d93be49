"""Safe, readable output names and video listing over fsspec."""

from __future__ import annotations

import hashlib
import re
import unicodedata

import fsspec

VIDEO_GLOB = "**/*.{mp4,mov,mkv,avi,webm}"
_BAD_CHARS = re.compile(r'[<>:"|?*\x00-\x1f\x7f]')
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
                     *(f"lpt{i}" for i in range(1, 10))}
_MAX_BYTES = 200  # below the usual 255-byte file-name limit, leaving room for suffixes


def _clean_component(part: str) -> str:
    """One path component made safe: no control/reserved chars, no leading/trailing dots or spaces."""
    part = "".join(c for c in part if not unicodedata.category(c).startswith("C") or c == " ")
    part = _BAD_CHARS.sub("_", part)
    part = re.sub(r"\s+", " ", part).strip(" .")
    return part


def _truncate(stem: str, ext: str) -> str:
    """Cut stem so stem+ext fits _MAX_BYTES of UTF-8."""
    budget = _MAX_BYTES - len(ext.encode())
    while len(stem.encode()) > budget:
        stem = stem[:-1]
    return stem + ext


def _split_ext(name: str) -> tuple[str, str]:
    """('clip', '.mp4') for 'clip.mp4'; hidden-file style names keep no extension."""
    i = name.rfind(".")
    if i <= 0 or len(name) - i > 10 or " " in name[i:]:
        return name, ""
    return name[:i], name[i:]


def safe_output_name(input_name: str, taken: set[str]) -> str:
    """A single safe file name for input_name, unique (case-insensitively) in taken; adds it to taken.

    Directories are flattened with '__' ('a/b.mp4' -> 'a__b.mp4'); '..', '.', absolute roots,
    drive letters, backslashes and NUL/control characters cannot escape the output folder.
    Unicode is NFC-normalised and kept; collisions get a short hash suffix of the input name.
    """
    raw = unicodedata.normalize("NFC", str(input_name)).replace("\\", "/")
    raw = re.sub(r"^[A-Za-z]:", "", raw)  # drive letter
    parts = [_clean_component(p) for p in raw.split("/")]
    parts = [p for p in parts if p and p not in (".", "..")]
    name = "__".join(parts) or "video"
    stem, ext = _split_ext(name)
    stem = stem or "video"
    if stem.split(".")[0].lower() in _WINDOWS_RESERVED:
        stem = "_" + stem
    candidate = _truncate(stem, ext.lower() if ext.isascii() else ext)
    folded = {t.casefold() for t in taken}
    if candidate.casefold() in folded:
        digest = hashlib.sha256(str(input_name).encode("utf-8", "surrogatepass")).hexdigest()
        base, ext2 = _split_ext(candidate)
        for i in range(1000):
            suffix = f"-{digest[:8]}" + (f"-{i}" if i else "")
            candidate = _truncate(base, suffix + ext2)
            if candidate.casefold() not in folded:
                break
    taken.add(candidate)
    return candidate


def _glob_regex(pattern: str) -> re.Pattern:
    """Compile a glob ('**/' = any depth, '*' / '?' within a component) to a case-insensitive regex."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z", re.IGNORECASE)


def _expand_braces(pattern: str) -> list[str]:
    """'*.{mp4,mov}' -> ['*.mp4', '*.mov'] (nested braces supported)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [x for alt in m.group(1).split(",") for x in _expand_braces(head + alt + tail)]


def list_videos(prefix_url: str, glob: str = VIDEO_GLOB, storage_options: dict | None = None) -> list[str]:
    """Sorted URLs of files under prefix_url matching glob (case-insensitive; hidden/temp files skipped).

    Returns plain paths for plain local prefixes, full URLs ('s3://...', 'file://...') otherwise.
    """
    fs, root = fsspec.core.url_to_fs(prefix_url, **(storage_options or {}))
    root = root.rstrip("/")
    fs.invalidate_cache(root)  # fsspec instances are shared per process: a stale listing would miss new uploads
    if not fs.exists(root):
        raise FileNotFoundError(f"{prefix_url}: no such folder/prefix — check the URL and credentials.")
    regexes = [_glob_regex(p) for p in _expand_braces(glob)]
    keep_protocol = "://" in prefix_url
    out = []
    for path in fs.find(root):
        rel = path[len(root):].lstrip("/") if path.startswith(root) else path
        # hidden and temporary files (".tmp-*", ".DS_Store") are skipped; a literal ".." component of an
        # object-store key ("in/../clip.mp4") is a real object under the prefix, kept (its output name is made safe)
        if any(part.startswith(".") and part not in (".", "..") for part in rel.split("/")):
            continue
        if any(r.match(rel) for r in regexes):
            out.append(fs.unstrip_protocol(path) if keep_protocol else path)
    return sorted(out)
