"""Subprocess and port helpers shared by the server context managers."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, interval: float = 0.25, proc=None) -> None:
    """Poll `url` until it answers HTTP 2xx; TimeoutError after `timeout` s, RuntimeError if `proc` dies."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if 200 <= r.status < 300:
                    return
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            last = e
        time.sleep(interval)
    raise TimeoutError(f"{url} did not answer within {timeout}s (last error: {last})")


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_group(proc: subprocess.Popen, signals=(signal.SIGINT,), grace: float = 10.0, kill_after: float = 5.0) -> None:
    """Stop a process started with start_new_session=True and everything in its process group.

    Sends each of `signals` in turn to the group, waiting up to `grace` s after each for the leader to
    exit; then SIGTERM, then SIGKILL, and finally SIGKILLs any stragglers left in the group.
    """
    pgid = proc.pid  # start_new_session=True: the leader's pid is the group id
    for sig in (*signals, signal.SIGTERM):
        if proc.poll() is not None:
            break
        _killpg(pgid, sig)
        try:
            proc.wait(timeout=grace if sig != signal.SIGTERM else kill_after)
        except subprocess.TimeoutExpired:
            continue
    if proc.poll() is None:
        _killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=10)
    # children (uvicorn workers, flow-run subprocesses) may outlive the leader: reap the group
    deadline = time.monotonic() + kill_after
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(pgid):
        _killpg(pgid, signal.SIGKILL)
