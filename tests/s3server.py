"""A real S3 service on loopback for the tests: moto's server as a subprocess (its in-process server
stalls TileDB), one per pytest worker, with test credentials in the environment (the standard AWS chain)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-4f2b9c",
               "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3Server:
    endpoint: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def new_bucket(self) -> str:
        name = f"my-bucket-{uuid.uuid4().hex[:12]}"  # "bucket" in the name, as in real ones
        self.client().create_bucket(Bucket=name)
        return name

    def upload_tree(self, folder: Path, bucket: str, prefix: str) -> None:
        client = self.client()
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")

    def keys(self, bucket: str, prefix: str = "") -> dict[str, str]:
        """Every object under the prefix -> its ETag."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}

    def enforce_auth(self, on: bool) -> None:
        """Make moto check credentials (unknown keys are then refused: access denied)."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0" if on else b"inf",
                                         method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).read()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def moto_server(log: Path | None = None) -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port, test credentials in os.environ; `log` gets its request log."""
    port = _free_port()
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=out, stderr=out)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        yield S3Server(endpoint)
    finally:
        proc.terminate()
        proc.wait(10)
        if log:
            out.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def black_hole(*, accepts: bool) -> Iterator[str]:
    """An endpoint on loopback that never answers: with `accepts`, the kernel completes every connection
    (its backlog is long, nobody reads); without, the backlog is full, so a new connection is never accepted
    (Linux drops the handshake's SYN and the client waits)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(128 if accepts else 0)
    fillers = []
    try:
        if not accepts:
            for _ in range(4):
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(server.getsockname())
                fillers.append(filler)
            with socket.socket() as probe:
                probe.settimeout(1)
                try:
                    probe.connect(server.getsockname())
                    pytest.skip("cannot fill a listening socket's backlog here")
                except TimeoutError:
                    pass
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        for sock in (*fillers, server):
            sock.close()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with moto_server() as server:
        yield server
