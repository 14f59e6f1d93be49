"""Nothing left running: spawn()ed process groups stop when their parent exits normally, on SIGTERM, and (the
leader) when the parent is SIGKILLed; the suite's leftover check finds marked processes."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from infra._proc import group_alive
from tests._servers import marked_processes, wait_gone

ROOT = Path(__file__).resolve().parents[2]

PARENT = r"""
import sys, time
sys.path.insert(0, {root!r})
from infra._proc import spawn
# a leader that starts a grandchild in its group, like `prefect server start` starting uvicorn
leader = spawn([sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"])
direct = spawn(["sleep", "301"])
print(leader.pid, direct.pid, flush=True)
{end}
"""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _start(end: str) -> tuple[subprocess.Popen, int, int]:
    proc = subprocess.Popen([sys.executable, "-c", PARENT.format(root=str(ROOT), end=end)], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    leader, direct = map(int, proc.stdout.readline().split())
    time.sleep(0.5)  # the grandchild is started
    return proc, leader, direct


def _wait(pred, timeout=15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def _cleanup(*pgids):
    for g in pgids:
        try:
            os.killpg(g, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("end", ["time.sleep(0.5)", "time.sleep(300)"], ids=["normal-exit", "sigterm"])
def test_spawned_groups_stop_when_the_parent_ends(end):
    proc, leader, direct = _start(end)
    try:
        assert group_alive(leader) and group_alive(direct)
        if "300" in end:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, 128 + signal.SIGTERM)
        assert _wait(lambda: not group_alive(leader) and not group_alive(direct)), "a spawned group outlived its parent"
    finally:
        _cleanup(leader, direct, proc.pid)


def test_spawned_leader_dies_with_a_sigkilled_parent():
    proc, leader, direct = _start("time.sleep(300)")
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert _wait(lambda: not _pid_alive(direct) and not _pid_alive(leader)), "PR_SET_PDEATHSIG did not fire"
    finally:
        _cleanup(leader, direct, proc.pid)


def test_marked_processes_finds_what_the_suite_started():
    mark = uuid.uuid4().hex
    env = {**os.environ, "RESTORE_VIDEO_TEST_SUITE": mark}
    p = subprocess.Popen(["sleep", "30"], env=env)
    other = subprocess.Popen(["sleep", "31"])  # this session's mark, not `mark`
    try:
        found = marked_processes(mark, pattern=re.compile(r"^sleep 30$"))
        assert [q.pid for q in found] == [p.pid]
        assert marked_processes(mark, pattern=re.compile(r"^sleep 31$")) == []
        p.kill()
        p.wait()
        assert wait_gone(found, timeout=5) == []
        assert marked_processes(mark, pattern=re.compile(r"^sleep 30$")) == []
    finally:
        for q in (p, other):
            q.kill()
            q.wait()


CLEANUP = r"""
import subprocess, sys, time
sys.path.insert(0, {root!r})
from infra._proc import install_cleanup
install_cleanup()
# a server child this process lost track of (like a Prefect temporary server started twice from two threads)
lost = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "uvicorn", "--factory",
                         "prefect.server.api.server:create_app"])
other = subprocess.Popen(["sleep", "302"])  # not a server: left alone
print(lost.pid, other.pid, flush=True)
{end}
"""


@pytest.mark.parametrize("end", ["time.sleep(0.3)", "time.sleep(300)"], ids=["normal-exit", "sigterm"])
def test_install_cleanup_reaps_lost_server_children(end):
    proc = subprocess.Popen([sys.executable, "-c", CLEANUP.format(root=str(ROOT), end=end)], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    lost, other = map(int, proc.stdout.readline().split())
    try:
        if "300" in end:
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, 128 + signal.SIGTERM)
        assert _wait(lambda: not _pid_alive(lost)), "the lost server child outlived the command"
        assert _pid_alive(other)
    finally:
        _cleanup(proc.pid)
