"""Subprocess and port helpers shared by the server context managers; spawn() = a process group stopped on exit."""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
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


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group `pgid` still exists."""
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
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if group_alive(pgid):
        _killpg(pgid, signal.SIGKILL)


# --- nothing left running: every server/worker this process starts is stopped when it exits ------------------------

_LIVE: dict[int, subprocess.Popen] = {}  # pid -> process group leader started by spawn()
_LIVE_LOCK = threading.Lock()
_ATEXIT_INSTALLED = False
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (even by SIGKILL). Linux only; a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:
        pass


def spawn(cmd: list[str], **popen_kwargs) -> subprocess.Popen:
    """`subprocess.Popen` in a new process group that this process stops on exit (atexit, SIGTERM/SIGHUP).

    - its own session, so `stop_group` reaches its children (uvicorn workers, flow-run subprocesses);
    - registered for `stop_all()` at interpreter exit; call `release(proc)` after stopping it yourself;
    - started from the main thread, it gets SIGTERM if this process dies without running atexit (SIGKILL, OOM).
      (Linux's PR_SET_PDEATHSIG fires when the spawning *thread* exits, so it is not used from other threads.)
    """
    popen_kwargs.setdefault("start_new_session", True)
    if threading.current_thread() is threading.main_thread() and sys.platform.startswith("linux"):
        popen_kwargs.setdefault("preexec_fn", _die_with_parent)
    exit_on_signals()
    proc = subprocess.Popen(cmd, **popen_kwargs)
    global _ATEXIT_INSTALLED
    with _LIVE_LOCK:
        _LIVE[proc.pid] = proc
        if not _ATEXIT_INSTALLED:
            atexit.register(stop_all)
            _ATEXIT_INSTALLED = True
    return proc


def release(proc: subprocess.Popen) -> None:
    """Forget a process started by spawn() (it has been stopped)."""
    with _LIVE_LOCK:
        _LIVE.pop(proc.pid, None)


def live() -> list[subprocess.Popen]:
    """Processes started by spawn() and not yet released."""
    with _LIVE_LOCK:
        return list(_LIVE.values())


def stop_all(grace: float = 5.0) -> None:
    """Stop every process group started by spawn() (registered with atexit)."""
    for proc in live():
        try:
            stop_group(proc, signals=(signal.SIGTERM,), grace=grace, kill_after=grace)
        except Exception:
            pass
        release(proc)


def _raise_system_exit(signum, frame):
    raise SystemExit(128 + signum)


def exit_on_signals(signals=(signal.SIGTERM, signal.SIGHUP)) -> None:
    """Make SIGTERM/SIGHUP raise SystemExit, so `with` blocks, `finally` and atexit handlers stop what was started.

    Python's default action for these signals ends the process at once, leaving servers (including Prefect's
    temporary server, which Prefect stops only in an atexit handler) running. Only default handlers are
    replaced, and only from the main thread (where Python delivers signals).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in signals:
        try:
            if signal.getsignal(sig) == signal.SIG_DFL:
                signal.signal(sig, _raise_system_exit)
        except (ValueError, OSError):  # not the main interpreter / unsupported signal
            pass


# Prefect's temporary server (started in-process when no PREFECT_API_URL is set) is tracked by Prefect one per port
# and stopped in an atexit handler; started concurrently from several threads (restore-archive's workers), one
# uvicorn process can lose its handle and outlive the command. These children are reaped at exit.
SERVER_CHILD_PATTERNS = ("prefect.server.api.server:create_app", "prefect server start", "mlflow server", "uvicorn")
_CLEANUP_INSTALLED = False


def reap_children(patterns: tuple[str, ...] = SERVER_CHILD_PATTERNS, grace: float = 5.0) -> list[str]:
    """SIGTERM (then SIGKILL after `grace` s) this process's direct children whose command line contains one of
    `patterns`; returns their command lines."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=False):
        try:
            cmd = " ".join(child.cmdline())
            if child.status() != psutil.STATUS_ZOMBIE and any(p in cmd for p in patterns):
                found.append((child, cmd))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    for child, _ in found:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs([c for c, _ in found], timeout=grace)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    return [cmd for _, cmd in found]


def install_cleanup() -> None:
    """For a command's entry point: SIGTERM/SIGHUP end it through `finally`/atexit (`exit_on_signals`), and at exit
    every server child still running (Prefect's temporary server included) is stopped (`reap_children`)."""
    global _CLEANUP_INSTALLED
    exit_on_signals()
    if not _CLEANUP_INSTALLED:
        atexit.register(reap_children)
        _CLEANUP_INSTALLED = True
