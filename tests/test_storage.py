"""One conformance suite every storage backend runs (local disk, and a bucket on moto's server): each
operation and its crash-safety contract, through the public storage functions, as callers use them.

Modelled on Terraform's statemgr.TestFull. A new backend joins by adding a case to the `where` fixture.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from s3server import S3Server
from soma_manifest import storage
from soma_manifest.errors import StorageError
from soma_manifest.storage import Location, StoreSettings


@dataclass
class Where:
    root: Location  # an empty folder (prefix) of the backend under test
    broken: Location  # a place every operation fails at: under a file locally, in a missing bucket on S3


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Where]:
    before = storage.settings()
    if request.param == "local":
        (tmp_path / "a-file").write_bytes(b"x")
        yield Where(Location(tmp_path / "store"), Location(tmp_path / "a-file" / "below"))
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        storage.configure(StoreSettings(server.endpoint, "us-east-1"))
        yield Where(Location(f"s3://{server.new_bucket()}/store"), Location("s3://my-bucket-that-is-missing/below"))
    storage.configure(before)


def _race(n: int, work: Callable[[int], object]) -> list[object]:
    """Run `work(i)` in n threads released at once; their results in order."""
    start, results = threading.Barrier(n), [None] * n

    def run(i: int) -> None:
        start.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_the_backend_declares_the_protocol(where: Where) -> None:
    store = storage.store_for(where.root)
    assert isinstance(store, storage.Store)
    for capability in ("local_paths", "renames_atomically", "sees_dead_holders", "appends", "networked"):
        assert isinstance(getattr(store, capability), bool), capability


def test_a_file_a_folder_and_nothing(where: Where) -> None:
    file, folder, nothing = where.root / "f.txt", where.root / "d", where.root / "none"
    storage.mkdir(where.root)
    storage.write_atomic(file, b"hello")
    storage.write_atomic(folder / "inner.txt", b"in")
    assert [storage.exists(p) for p in (file, folder, nothing)] == [True, True, False]
    assert [storage.is_file(p) for p in (file, folder, nothing)] == [True, False, False]
    assert [storage.is_dir(p) for p in (file, folder, nothing)] == [False, True, False]
    assert storage.listdir(where.root) == {"f.txt": False, "d": True}
    assert storage.listdir(folder) == {"inner.txt": False}
    assert storage.listdir(nothing) is None
    with pytest.raises(NotADirectoryError):
        storage.listdir(file)
    assert storage.stat(file).size == 5 and storage.read_bytes(file) == b"hello"
    assert storage.read_bytes(nothing, missing_ok=True) is None and storage.read_versioned(nothing) is None
    for read in (storage.read_bytes, storage.stat):
        with pytest.raises(StorageError) as failed:
            read(nothing)
        assert failed.value.where == nothing.uri and "not found" in failed.value.message


def test_write_atomic_replaces_whole_and_keeps_the_previous_version(where: Where) -> None:
    """A reader running alongside the writes sees one whole version every time: never a part, never none."""
    loc, backup = where.root / "state.json", where.root / "state.json.backup"
    versions = [bytes([i]) * (256 << 10) for i in range(12)]
    storage.write_atomic(loc, versions[0])
    seen: list[bytes | None] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.append(storage.read_bytes(loc, missing_ok=True))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for previous, version in zip(versions, versions[1:]):
            storage.write_atomic(loc, version, backup=backup)
            assert storage.read_bytes(backup) == previous
    finally:
        done.set()
        reader.join()
    assert seen and all(s in versions for s in seen), "a reader saw a partial or missing file"
    assert storage.read_bytes(loc) == versions[-1]
    assert storage.listdir(where.root) == {"state.json": False, "state.json.backup": False}, "a temp file is left"


def test_create_exclusive_lets_exactly_one_racer_win(where: Where) -> None:
    loc = where.root / "lock"
    won = _race(6, lambda i: storage.create_exclusive(loc, f"holder {i}".encode()))
    assert won.count(True) == 1 and won.count(False) == 5
    winner = f"holder {won.index(True)}".encode()
    assert storage.read_bytes(loc) == winner
    assert storage.create_exclusive(loc, b"late") is False and storage.read_bytes(loc) == winner
    assert storage.listdir(where.root) == {"lock": False}, "a temp file is left"


def test_replace_if_is_a_compare_and_swap(where: Where) -> None:
    loc = where.root / "lock"
    storage.write_atomic(loc, b"first")
    data, first = storage.read_versioned(loc)
    assert data == b"first"
    second = storage.replace_if(loc, b"second", first)
    assert second is not None and storage.read_versioned(loc) == (b"second", second)
    assert storage.replace_if(loc, b"stale writer", first) is None, "a stale version won"
    assert storage.read_bytes(loc) == b"second", "a stale version changed the file"
    # Two takeovers from the same version: one wins, the other changes nothing.
    won = _race(2, lambda i: storage.replace_if(loc, f"taker {i}".encode(), second))
    assert sum(v is not None for v in won) == 1
    winner = next(i for i, v in enumerate(won) if v is not None)
    assert storage.read_versioned(loc) == (f"taker {winner}".encode(), won[winner])
    gone = where.root / "gone"
    assert storage.replace_if(gone, b"x", first) is None and not storage.exists(gone), "a missing file was created"
    assert storage.listdir(where.root) == {"lock": False}, "a temp file is left"


def test_staged_file_stores_only_on_success(where: Where) -> None:
    loc, failed = where.root / "s" / "a.h5ad", where.root / "s" / "b.h5ad"
    with storage.staged_file(loc) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b"complete")
    assert storage.read_bytes(loc) == b"complete" and not os.path.exists(tmp)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        with storage.staged_file(failed) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(b"half")
            raise RuntimeError("killed mid-write")
    assert not storage.exists(failed) and not os.path.exists(tmp)
    assert storage.listdir(where.root / "s") == {"a.h5ad": False}, "a temp file is left"


def test_put_file_and_the_ways_back(where: Where, tmp_path: Path) -> None:
    """put_file stores a local file whole; download, download_tree, local_file and open_read read it back."""
    payload = os.urandom(3 << 20)
    for name in ("t/one.bin", "t/sub/two.bin"):
        local = tmp_path / "put.bin"
        local.write_bytes(payload)
        storage.put_file(str(local), where.root / name)
    assert storage.read_bytes(where.root / "t/one.bin") == payload
    storage.download(where.root / "t/one.bin", str(tmp_path / "back" / "one.bin"))
    assert (tmp_path / "back" / "one.bin").read_bytes() == payload
    assert storage.download_tree(where.root / "t", str(tmp_path / "tree"))
    assert (tmp_path / "tree" / "sub" / "two.bin").read_bytes() == payload
    assert storage.download_tree(where.root / "none", str(tmp_path / "none")) is False
    with storage.local_file(where.root / "t/one.bin") as path:
        assert Path(path).read_bytes() == payload
    with storage.open_read(where.root / "t/sub/two.bin") as fh:
        fh.seek(1 << 20)
        assert fh.read(100) == payload[1 << 20:(1 << 20) + 100]


def test_delete_and_delete_tree_are_idempotent(where: Where) -> None:
    for name in ("keep.txt", "tree/a", "tree/b/c", "one"):
        storage.write_atomic(where.root / name, b"x")
    for _ in range(2):
        storage.delete(where.root / "one")
        storage.delete_tree(where.root / "tree")
    storage.delete(where.root / "never-was")
    storage.delete_tree(where.root / "never-was")
    assert storage.listdir(where.root) == {"keep.txt": False}


def test_a_snapshot_answers_as_live_calls_do(where: Where) -> None:
    for name in ("study/mtx/s1/matrix.mtx.gz", "study/mtx/s1/barcodes.tsv.gz", "study/mtx/s2/matrix.mtx.gz",
                 "study/cell_metadata/study.tsv.gz", "other.txt"):
        storage.write_atomic(where.root / name, name.encode())
    study = where.root / "study"
    places = [study, study / "mtx", study / "mtx" / "s1", study / "mtx" / "s1" / "matrix.mtx.gz",
              study / "mtx" / "s3", study / "mtx" / "s1" / "nothing.gz", study / "cell_metadata"]

    def answers() -> list[object]:
        out: list[object] = []
        for p in places:
            out += [storage.exists(p), storage.is_dir(p), storage.is_file(p)]
            try:
                out.append(storage.listdir(p))
            except NotADirectoryError:
                out.append("a file")
            out.append((storage.stat(p).size, storage.stat(p).etag) if storage.is_file(p) else None)
        return out

    live = answers()
    with storage.snapshot():
        storage.prefetch(study)
        assert answers() == live
        assert storage.exists(where.root / "other.txt"), "a lookup outside the prefetched prefix must go live"


def test_failures_are_one_storage_error_naming_the_uri(where: Where, tmp_path: Path) -> None:
    local = tmp_path / "local.bin"
    local.write_bytes(b"data")
    at = where.broken / "f"
    for name, call in [("read_bytes", lambda: storage.read_bytes(at)), ("stat", lambda: storage.stat(at)),
                       ("write_atomic", lambda: storage.write_atomic(at, b"x")),
                       ("create_exclusive", lambda: storage.create_exclusive(at, b"x")),
                       ("replace_if", lambda: storage.replace_if(at, b"x", "v")),
                       ("put_file", lambda: storage.put_file(str(local), at)),
                       ("delete", lambda: storage.delete(at))]:
        try:
            got = call()
        except StorageError as exc:
            assert exc.where == at.uri, f"{name}: {exc}"
            continue
        # replace_if and delete may also answer "no such file" (None, nothing to do); nothing else may pass
        assert name in ("replace_if", "delete") and got is None, f"{name} did not fail: {got!r}"


# ---------------------------------------------------------------- a stalled object store (issue #26)


@contextmanager
def _loopback_endpoint(handle: Callable[[socket.socket], None]) -> Iterator[str]:
    """An HTTP endpoint on 127.0.0.1 that runs `handle` on each connection, each in its own thread."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            held.append(conn)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for sock in (*held, server):
            sock.close()


def _read_head(conn: socket.socket, at_least: int = 0) -> int:
    """Read a request's headers and `at_least` bytes in all; the bytes read."""
    got = b""
    while b"\r\n\r\n" not in got or len(got) < at_least:
        chunk = conn.recv(64 << 10)
        if not chunk:
            break
        got += chunk
    return len(got)


@contextmanager
def _bounded_to(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Reach `endpoint` as the object store, with the request deadline lowered from 60 s + 4 s per MiB to
    2 s + 1 s per 20 MiB, so that a test takes seconds."""
    from soma_manifest.storage import s3

    monkeypatch.setattr(s3, "REQUEST_BASE_S", 2.0)
    monkeypatch.setattr(s3, "MIN_RATE", 20 << 20)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    before = storage.settings()
    storage.configure(StoreSettings(endpoint, "us-east-1"))
    try:
        yield
    finally:
        storage.configure(before)


def _outcome(call: Callable[[], object]) -> BaseException | None:
    """What `call` raised (None if it returned); fails the test if it still runs after 120 s, far above the
    lowered deadlines (a hang guard: the assertion is that it ends, not how fast)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "the request hangs"
    return outcome[0]


@pytest.mark.parametrize("how", ["put_file", "write_atomic"])
def test_a_stalled_upload_fails_naming_the_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """A 20 MB upload to an endpoint that reads the headers and a first part of the body, then stops reading
    (and never answers), ends with one StorageError naming the URI once the request's deadline passes."""
    received: list[int] = []
    loc = Location("s3://my-bucket/atlases/sample.h5ad")
    payload = os.urandom(20 << 20)
    local = tmp_path / "sample.h5ad"
    local.write_bytes(payload)
    with _loopback_endpoint(lambda conn: received.append(_read_head(conn, 256 << 10))) as endpoint, \
            _bounded_to(endpoint, monkeypatch):
        failed = _outcome(lambda: storage.put_file(str(local), loc) if how == "put_file"
                          else storage.write_atomic(loc, payload))
    assert isinstance(failed, StorageError), repr(failed)
    assert failed.where == loc.uri and "did not finish" in failed.message, failed.render()
    assert received and 0 < received[0] < len(payload), "the endpoint did not stall mid-body"


def test_a_trickling_download_fails_naming_the_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer that promises 1 MB and sends a byte every 0.2 s never trips the read timeout (8 s of silence);
    the whole-request deadline ends it."""
    def trickle(conn: socket.socket) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\nETag: \"e\"\r\n\r\n"
        try:
            while conn.recv(4, socket.MSG_PEEK) == b"HEAD":  # s3fs asks for the size first
                _read_head(conn)
                conn.sendall(head)
            _read_head(conn)
            conn.sendall(head)
            for _ in range(600):
                conn.sendall(b"x")
                time.sleep(0.2)
        except OSError:  # the client gave up and closed the connection
            pass

    loc = Location("s3://my-bucket/raw/study/metadata.tsv")
    with _loopback_endpoint(trickle) as endpoint, _bounded_to(endpoint, monkeypatch):
        failed = _outcome(lambda: storage.read_bytes(loc))
    assert isinstance(failed, StorageError), repr(failed)
    assert failed.where == loc.uri and "did not finish" in failed.message, failed.render()
