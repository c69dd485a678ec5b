"""A real Dask cluster for tests: a `dask scheduler` and two `dask worker` processes (one thread each) on
127.0.0.1 free ports, shared by a test module. Registered from conftest.py as a pytest plugin.

The workers find the moto S3 server (tests/s3server.py) the way workers of a real cluster find their object
store: credentials and endpoint in their own environment (AWS_*), never in a task's arguments.

The workers run with SOMA_MANIFEST_PAUSE_AT=ingest_start,write_obs_fenced:<pause folder>: tests arm one of
these pauses (see faults.py) to hold a worker inside a step, e.g. to kill it there or to let it go on after its apply died.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from s3server import CREDENTIALS, S3Server
from soma_manifest.faults import PAUSE_ENV


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class DaskCluster:
    address: str
    pause: Path  # the pause folder of the workers
    processes: list[subprocess.Popen]

    def arm(self, point: str = "ingest_start") -> None:
        for leftover in self.pause.iterdir():
            leftover.unlink()
        (self.pause / "armed").write_text(point)

    def paused_pids(self, at_least: int = 1, timeout: float = 120) -> list[int]:
        """Wait until `at_least` workers are held at the pause point; their worker pids."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = [int(p.name.split("-")[1]) for p in self.pause.glob("paused-*")]
            if len(pids) >= at_least:
                return pids
            time.sleep(0.05)
        raise AssertionError("no worker reached the pause point")

    def release(self) -> None:
        (self.pause / "armed").unlink(missing_ok=True)
        (self.pause / "release").touch()

    def task_arguments(self) -> list[bytes]:
        """What the scheduler holds for each of its tasks: the function and its arguments, pickled."""
        from distributed import Client

        def run_specs(dask_scheduler) -> list[bytes]:
            from distributed.protocol.pickle import dumps

            return [dumps(task.run_spec) for task in dask_scheduler.tasks.values()]

        with Client(self.address, timeout=30) as client:
            return client.run_on_scheduler(run_specs)

    def wait_idle(self, timeout: float = 120) -> None:
        """Until no task runs on the cluster (a dead client's task goes on running: Dask does not stop it)."""
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            deadline = time.monotonic() + timeout
            while any(client.processing().values()):
                assert time.monotonic() < deadline, f"tasks still running: {client.processing()}"
                time.sleep(0.1)
            client.wait_for_workers(2, timeout=timeout)


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the dask scheduler exited"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError("the dask scheduler did not start")


@pytest.fixture(scope="module")
def dask_cluster(s3_server: S3Server) -> DaskCluster:
    """A scheduler and two single-threaded workers (with nannies, which restart a killed worker)."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    pause = Path(tempfile.mkdtemp(prefix="dask-pause-"))
    env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": s3_server.endpoint, PAUSE_ENV: f"ingest_start,write_obs_fenced:{pause}"}
    dask = [sys.executable, "-m", "dask"]
    procs = [subprocess.Popen([*dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)]
    try:
        _wait_for_port(port, procs[0])
        for _ in range(2):
            procs.append(subprocess.Popen([*dask, "worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                                           "--no-dashboard", "--memory-limit", "2GiB"], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=120)
        yield DaskCluster(address, pause, procs)
    finally:
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        shutil.rmtree(pause, ignore_errors=True)
