"""One apply at a time: a second one exits at once naming the holder; dead holders are taken over;
`unlock` removes a lock deliberately; plan and verify never need the lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict

import psutil
import pytest

from conftest import Project, apply_ok, assert_converged, invoke_cli, start_cli
from soma_manifest.lock import Holder, lock_path, read_holder

COMMAND = "soma-manifest apply /elsewhere/atlas.yaml"


def write_lock(project: Project, pid: int, *, host: str | None = None, created: float | None = None) -> Holder:
    """A lock file as another apply would have left it."""
    holder = Holder(pid, host or socket.gethostname(), "2026-01-02T03:04:05+00:00", COMMAND,
                    psutil.Process(pid).create_time() if created is None else created)
    path = lock_path(project.state_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(holder)))
    return holder


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    """A live process to name as the holder."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def assert_names(message: str, holder: Holder) -> None:
    for part in (f"pid {holder.pid}", holder.host, holder.started, holder.command):
        assert part in message, f"{part!r} not in {message!r}"


def test_second_apply_exits_at_once_naming_the_running_one(project: Project) -> None:
    first = start_cli("apply", project.manifest)
    try:
        lock = lock_path(project.state_path)
        deadline = time.monotonic() + 60
        while not lock.exists() and first.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        holder = read_holder(lock)
        assert holder is not None and holder.pid == first.proc.pid
        second = invoke_cli("apply", project.manifest)
        assert first.proc.poll() is None, "the second apply waited for the first"
        assert second.returncode == 1
        assert "the atlas is locked by" in second.stderr and str(project.manifest) in holder.command
        assert_names(second.stderr, holder)
        # Neither needs the lock: they only read.
        assert invoke_cli("plan", project.manifest).returncode == 0
        assert "locked" not in invoke_cli("verify", project.manifest).stderr
        done = first.wait()
        assert done.returncode == 0, done.stderr
    finally:
        first.kill_session()
    assert not lock.exists()
    assert_converged(project)


def test_live_holder_refuses_apply_until_unlock(project: Project, sleeper: subprocess.Popen) -> None:
    apply_ok(project)
    holder = write_lock(project, sleeper.pid)
    refused = invoke_cli("apply", project.manifest)
    assert refused.returncode == 1
    assert_names(refused.stderr, holder)
    assert "soma-manifest unlock" in refused.stderr
    assert invoke_cli("plan", project.manifest).returncode == 0
    assert invoke_cli("verify", project.manifest).returncode == 0

    unlocked = invoke_cli("unlock", project.manifest)
    assert unlocked.returncode == 0
    assert_names(unlocked.stderr, holder)
    assert not lock_path(project.state_path).exists()
    assert invoke_cli("apply", project.manifest).returncode == 0


@pytest.mark.parametrize("lock", ["dead pid", "recycled pid", "damaged file"])
def test_lock_of_a_dead_apply_is_taken_over(project: Project, lock: str) -> None:
    if lock == "dead pid":
        write_lock(project, dead_pid(), created=1.0)
    elif lock == "recycled pid":
        # A live pid, but not the process that took the lock (another start time).
        write_lock(project, os.getpid(), created=psutil.Process().create_time() - 1000)
    else:
        lock_path(project.state_path).parent.mkdir(parents=True)
        lock_path(project.state_path).write_text('{"pid": 12')
    apply_ok(project)
    assert not lock_path(project.state_path).exists()
    assert_converged(project)


def test_holder_on_another_host_is_never_taken_over(project: Project) -> None:
    holder = write_lock(project, dead_pid(), host="elsewhere.example.org", created=1.0)
    refused = invoke_cli("apply", project.manifest)
    assert refused.returncode == 1
    assert_names(refused.stderr, holder)
    assert not project.state_path.exists() and not project.atlas_uri.exists()
    assert invoke_cli("unlock", project.manifest).returncode == 0
    apply_ok(project)


def test_unlock_without_a_lock(project: Project) -> None:
    result = invoke_cli("unlock", project.manifest)
    assert result.returncode == 0 and "not locked" in result.stderr

