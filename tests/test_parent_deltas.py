"""The parent's delta store (files and S3) and its end of the deltas channel (issue 16;
docs/key-lifecycle.md §3, §4): put-if-absent under races and crashes, gaps, sizes, the S3
backend through botocore's Stubber, the store/ack exchange and its protocol errors, and the
watcher's pushes in virtual time."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]
import pytest
import trio
import trio.testing
from botocore.response import StreamingBody  # type: ignore[import-untyped]
from botocore.stub import Stubber  # type: ignore[import-untyped]

from trio_sign.nitro import (
    AttestationMessage,
    BundleChunkMessage,
    BundleEndMessage,
    ChannelClosed,
    ChannelMessage,
    HelloMessage,
    MessageStream,
    PreloadResultMessage,
    RecipientCiphertextMessage,
)
from trio_sign.nitro._channel import (
    MAX_DELTA_CHUNK_BYTES,
    DeltaChunkMessage,
    DeltaConflictMessage,
    DeltaEndMessage,
    DeltaLoadedMessage,
    DeltaPushMessage,
    DeltaRefusedMessage,
    DeltaStoredMessage,
    DeltaStoreFailedMessage,
    DeltaStoreMessage,
    LogMessage,
)
from trio_sign.parent._deltas import (
    DeltaListing,
    Deltas,
    DeltaStoreError,
    FileDeltaStore,
    NotADelta,
    PutOutcome,
    S3DeltaStore,
    delta_fingerprint,
    object_name,
    open_delta_store,
    parse_object_name,
    serve_deltas_connection,
)
from trio_sign.parent._preload import serve_preload
from trio_sign.shares import CeremonyKey, DevKeyFile, encode_bundle, inspect_sealed

from .share_helpers import make_record

TAG = "0123456789ab"
OTHER_TAG = "ba9876543210"
HEAD = "cd" * 32


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dev_key(tmp_path_factory: pytest.TempPathFactory) -> DevKeyFile:
    return DevKeyFile.create(tmp_path_factory.mktemp("deltas") / "dev.key")


@pytest.fixture(scope="module")
def identity() -> CeremonyKey:
    return CeremonyKey.generate()


@pytest.fixture(scope="module")
def make_delta(dev_key: DevKeyFile, identity: CeremonyKey) -> Callable[[str], bytes]:
    """A signed sealed bundle of kind ``delta`` holding one account."""

    def make(account: str) -> bytes:
        return encode_bundle([make_record(account)], dev_key, signer=identity, kind="delta")

    return make


def file_store(tmp_path: Path, **kw: Any) -> FileDeltaStore:
    store = FileDeltaStore(tmp_path / "deltas", host_tag=TAG, **kw)
    store.recover()
    return store


async def inline(fn: Callable[..., Any], *args: Any) -> Any:
    """Run the store's call in the task: virtual time does not move during "disk" work."""
    return fn(*args)


class Alerts:
    def __init__(self) -> None:
        self.raised: list[tuple[str, str]] = []

    def __call__(self, code: str, message: str) -> None:
        self.raised.append((code, message))

    def codes(self) -> list[str]:
        return [code for code, _ in self.raised]


def hub(store: Any, alerts: Alerts | None = None, **kw: Any) -> Deltas:
    kw.setdefault("offload", inline)
    return Deltas(store, on_alert=alerts if alerts is not None else Alerts(), **kw)


def booted(deltas: Deltas, loaded: int | None = None) -> None:
    deltas.mark_booted(PreloadResultMessage(ok=True, accounts=1, deltas=loaded))


# -- names and listings ------------------------------------------------------------------------


def test_object_names() -> None:
    assert object_name(1) == "delta-00000001.enc"
    assert object_name(99_999_999) == "delta-99999999.enc"
    assert parse_object_name("delta-00000042.enc") == 42
    for name in (
        "delta-00000000.enc",
        "delta-1.enc",
        "delta-000000001.enc",
        "x-00000001.enc",
        ".delta-00000001.enc.0123456789ab.0011223344556677.tmp",
        "delta-00000001.enc~",
    ):
        assert parse_object_name(name) is None
    for bad in (0, -1, 100_000_000, True):
        with pytest.raises(ValueError, match="sequence"):
            object_name(bad)


def test_a_listing_stops_at_the_first_gap() -> None:
    assert DeltaListing.of([]) == DeltaListing((), ())
    listing = DeltaListing.of([3, 1, 2, 5, 7])
    assert listing.sequences == (1, 2, 3)
    assert listing.beyond_gap == (5, 7)
    assert (listing.head, listing.gap) == (3, 4)
    assert DeltaListing.of([2, 3]).head == 0
    assert DeltaListing.of([2, 3]).gap == 1
    assert DeltaListing.of([1, 2]).gap is None


# -- the file store ----------------------------------------------------------------------------


def test_file_put_if_absent(tmp_path: Path) -> None:
    store = file_store(tmp_path)
    assert store.put(1, b"one") is PutOutcome.STORED
    assert store.put(1, b"one") is PutOutcome.ALREADY_STORED
    assert store.put(1, b"uno") is PutOutcome.CONFLICT
    assert store.get(1) == b"one"  # the conflict changed nothing
    assert store.put(2, b"two") is PutOutcome.STORED
    assert store.list() == DeltaListing((1, 2), ())
    # no temporary file is left behind, whatever the outcome
    assert sorted(os.listdir(tmp_path / "deltas")) == ["delta-00000001.enc", "delta-00000002.enc"]
    assert store.location == f"file://{tmp_path / 'deltas'}"


def test_two_concurrent_puts_of_one_sequence(tmp_path: Path) -> None:
    """Different bytes: exactly one wins, the other is told conflict and the winner's bytes
    stay. Same bytes: both are told stored (one new, one already there)."""
    store = file_store(tmp_path)
    for round_ in range(20):
        different = round_ % 2 == 0
        sequence = round_ + 1
        payloads = [b"A" * 1000, b"B" * 1000] if different else [b"C" * 1000] * 2
        barrier = threading.Barrier(2)
        outcomes: list[PutOutcome | None] = [None, None]

        def put(
            i: int,
            sequence: int = sequence,
            payloads: list[bytes] = payloads,
            barrier: threading.Barrier = barrier,
            outcomes: list[PutOutcome | None] = outcomes,
        ) -> None:
            barrier.wait()
            outcomes[i] = store.put(sequence, payloads[i])

        threads = [threading.Thread(target=put, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if different:
            assert sorted(o.value for o in outcomes if o) == ["conflict", "stored"]
            winner = outcomes.index(PutOutcome.STORED)
            assert store.get(sequence) == payloads[winner]
        else:
            assert sorted(o.value for o in outcomes if o) == ["already_stored", "stored"]
            assert store.get(sequence) == payloads[0]
    assert store.list().head == 20
    assert not [n for n in os.listdir(tmp_path / "deltas") if n.endswith(".tmp")]


def test_a_gap_ends_the_listing(tmp_path: Path) -> None:
    store = file_store(tmp_path)
    for sequence in (1, 2, 4):
        store.put(sequence, b"x%d" % sequence)
    (tmp_path / "deltas" / "notes.txt").write_text("not a delta")
    listing = store.list()
    assert listing.sequences == (1, 2)
    assert listing.beyond_gap == (4,)


def test_sizes_are_bounded_both_ways(tmp_path: Path) -> None:
    store = file_store(tmp_path, max_delta_bytes=10)
    assert store.put(1, b"0123456789") is PutOutcome.STORED
    with pytest.raises(DeltaStoreError, match="max_delta_bytes"):
        store.put(2, b"0123456789A")
    assert store.list().head == 1
    # an object that grew on disk (another writer, an operator) is refused on the way out
    (tmp_path / "deltas" / object_name(2)).write_bytes(b"x" * 11)
    with pytest.raises(DeltaStoreError, match="max_delta_bytes"):
        store.get(2)
    with pytest.raises(DeltaStoreError, match="not in"):
        store.get(3)


def test_a_missing_directory_is_an_error_not_an_empty_store(tmp_path: Path) -> None:
    store = FileDeltaStore(tmp_path / "unmounted", host_tag=TAG)
    with pytest.raises(DeltaStoreError, match="cannot list"):
        store.list()


def test_a_file_system_without_hard_links_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = file_store(tmp_path)

    def no_link(src: Any, dst: Any) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    with pytest.raises(DeltaStoreError, match="hard links"):
        store.put(1, b"x")
    assert os.listdir(tmp_path / "deltas") == []


_CRASH = """
import os, sys
from pathlib import Path
import trio_sign._atomic as atomic
import trio_sign.parent._deltas as deltas
where = sys.argv[2]
def crash(*args, **kwargs):
    os._exit(9)
if where == "before_link":
    os.link = crash
else:
    deltas.fsync_directory = crash
store = deltas.FileDeltaStore(Path(sys.argv[1]), host_tag="0123456789ab")
store.put(1, b"the delta's bytes" * 100)
"""


def _crash_during_put(directory: Path, where: str) -> None:
    directory.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", _CRASH, str(directory), where], check=False, timeout=60
    )
    assert done.returncode == 9


def test_a_crash_between_write_and_link_leaves_nothing_visible(tmp_path: Path) -> None:
    directory = tmp_path / "deltas"
    _crash_during_put(directory, "before_link")
    [leftover] = os.listdir(directory)
    assert leftover.startswith(".delta-00000001.enc.0123456789ab.")
    store = FileDeltaStore(directory, host_tag=TAG)
    assert store.list() == DeltaListing()  # nothing visible even before the clean-up
    assert store.recover() == 1
    assert os.listdir(directory) == []
    assert store.put(1, b"retried") is PutOutcome.STORED


def test_a_crash_after_link_before_the_directory_fsync_leaves_it_whole(tmp_path: Path) -> None:
    directory = tmp_path / "deltas"
    _crash_during_put(directory, "after_link")
    store = FileDeltaStore(directory, host_tag=TAG)
    assert store.list().sequences == (1,)
    assert store.get(1) == b"the delta's bytes" * 100
    assert store.recover() == 1  # the temporary name of the same inode
    assert os.listdir(directory) == ["delta-00000001.enc"]
    # the enclave's retry with the same bytes is told stored
    assert store.put(1, b"the delta's bytes" * 100) is PutOutcome.ALREADY_STORED


def test_recover_spares_another_hosts_fresh_temporary(tmp_path: Path) -> None:
    directory = tmp_path / "deltas"
    directory.mkdir()
    fresh = directory / f".delta-00000003.enc.{OTHER_TAG}.0011223344556677.tmp"
    stale = directory / f".delta-00000004.enc.{OTHER_TAG}.8899aabbccddeeff.tmp"
    fresh.write_bytes(b"another parent is writing this")
    stale.write_bytes(b"another parent crashed")
    os.utime(stale, (1, 1))
    store = FileDeltaStore(directory, host_tag=TAG)
    assert store.recover() == 1
    assert fresh.exists()
    assert not stale.exists()


def test_open_delta_store_by_location(tmp_path: Path) -> None:
    store = open_delta_store(f"file://{tmp_path / 'new' / 'dir'}", max_delta_bytes=5)
    assert isinstance(store, FileDeltaStore)
    assert (tmp_path / "new" / "dir").is_dir()
    assert store.max_delta_bytes == 5
    s3 = open_delta_store("s3://bucket/shard-1", s3_client=object())  # type: ignore[arg-type]
    assert isinstance(s3, S3DeltaStore)
    assert s3.location == "s3://bucket/shard-1/"
    for bad in ("http://x/", "s3:///prefix", "deltas/"):
        with pytest.raises(ValueError, match="location"):
            open_delta_store(bad)


# -- the S3 store, through botocore's Stubber (no network) --------------------------------------


@pytest.fixture
def s3() -> Iterator[tuple[Any, Stubber]]:
    client = boto3.client(
        "s3",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def _body(data: bytes) -> dict[str, Any]:
    return {"Body": StreamingBody(io.BytesIO(data), len(data)), "ContentLength": len(data)}


def test_s3_put_is_conditional(s3: tuple[Any, Stubber]) -> None:
    client, stub = s3
    store = S3DeltaStore(client, "bucket", "shard-1")
    stub.add_response(
        "put_object",
        {},
        {
            "Bucket": "bucket",
            "Key": "shard-1/delta-00000001.enc",
            "Body": b"one",
            "IfNoneMatch": "*",
        },
    )
    assert store.put(1, b"one") is PutOutcome.STORED


@pytest.mark.parametrize(
    ("existing", "outcome"), [(b"one", "already_stored"), (b"uno", "conflict")]
)
def test_s3_precondition_failed_fetches_and_compares(
    s3: tuple[Any, Stubber], existing: bytes, outcome: str
) -> None:
    client, stub = s3
    store = S3DeltaStore(client, "bucket", "shard-1/")
    stub.add_client_error(
        "put_object", service_error_code="PreconditionFailed", http_status_code=412
    )
    stub.add_response(
        "get_object", _body(existing), {"Bucket": "bucket", "Key": "shard-1/delta-00000001.enc"}
    )
    assert store.put(1, b"one").value == outcome


def test_s3_other_errors_fail_the_put(s3: tuple[Any, Stubber]) -> None:
    client, stub = s3
    store = S3DeltaStore(client, "bucket")
    stub.add_client_error("put_object", service_error_code="AccessDenied", http_status_code=403)
    with pytest.raises(DeltaStoreError, match="AccessDenied"):
        store.put(1, b"one")
    stub.add_client_error("get_object", service_error_code="NoSuchKey", http_status_code=404)
    with pytest.raises(DeltaStoreError, match="not in s3://bucket/"):
        store.get(1)


def test_s3_list_reads_every_page(s3: tuple[Any, Stubber]) -> None:
    client, stub = s3
    store = S3DeltaStore(client, "bucket", "p/")

    def page(keys: list[str], token: str | None) -> dict[str, Any]:
        response: dict[str, Any] = {
            "Contents": [{"Key": k, "Size": 1} for k in keys],
            "IsTruncated": token is not None,
        }
        if token is not None:
            response["NextContinuationToken"] = token
        return response

    stub.add_response(
        "list_objects_v2",
        page(["p/delta-00000001.enc", "p/delta-00000002.enc"], "t1"),
        {"Bucket": "bucket", "Prefix": "p/delta-"},
    )
    stub.add_response(
        "list_objects_v2",
        page(["p/delta-00000003.enc", "p/delta-00000003.enc.bak"], "t2"),
        {"Bucket": "bucket", "Prefix": "p/delta-", "ContinuationToken": "t1"},
    )
    stub.add_response(
        "list_objects_v2",
        page(["p/delta-00000005.enc"], None),
        {"Bucket": "bucket", "Prefix": "p/delta-", "ContinuationToken": "t2"},
    )
    assert store.list() == DeltaListing((1, 2, 3), (5,))


def test_s3_get_is_bounded(s3: tuple[Any, Stubber]) -> None:
    client, stub = s3
    store = S3DeltaStore(client, "bucket", max_delta_bytes=4)
    stub.add_response("get_object", _body(b"four"))
    assert store.get(1) == b"four"
    stub.add_response("get_object", _body(b"fives"))
    with pytest.raises(DeltaStoreError, match="max_delta_bytes"):
        store.get(2)
    with pytest.raises(DeltaStoreError, match="max_delta_bytes"):
        store.put(3, b"fives")


# -- what the parent checks before it stores ---------------------------------------------------


def test_the_fingerprint_is_the_bundles_not_the_files(
    make_delta: Callable[[str], bytes], dev_key: DevKeyFile
) -> None:
    delta = make_delta("acct-fp")
    assert delta_fingerprint(delta, 1) == inspect_sealed(io.BytesIO(delta))[1].sha256_hex
    with pytest.raises(NotADelta, match="not a sealed bundle"):
        delta_fingerprint(b"garbage", 1)
    base = encode_bundle([make_record("acct-base")], dev_key)
    with pytest.raises(NotADelta, match="kind"):
        delta_fingerprint(base, 1)


# -- the deltas channel: stores ----------------------------------------------------------------


class Enclave:
    """The enclave's end of a deltas connection, over a memory stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.messages = MessageStream(stream)

    async def hello(self) -> None:
        await self.messages.send(HelloMessage(channel="deltas"))

    async def store(self, sequence: int, data: bytes, *, total: int | None = None) -> None:
        await self.messages.send(
            DeltaStoreMessage(sequence=sequence, total_bytes=len(data) if total is None else total)
        )
        for start in range(0, len(data), MAX_DELTA_CHUNK_BYTES):
            await self.messages.send(
                DeltaChunkMessage(data=data[start : start + MAX_DELTA_CHUNK_BYTES])
            )
        await self.messages.send(DeltaEndMessage())

    async def receive(self) -> ChannelMessage:
        return await self.messages.receive()

    async def receive_push(self) -> tuple[int, bytes]:
        push = await self.messages.receive_expected(DeltaPushMessage)
        data = bytearray()
        while True:
            message = await self.messages.receive()
            if isinstance(message, DeltaEndMessage):
                break
            assert isinstance(message, DeltaChunkMessage)
            data += message.data
        assert len(data) == push.total_bytes
        return push.sequence, bytes(data)

    async def loaded(self, sequence: int, accounts: int = 1) -> None:
        await self.messages.send(
            DeltaLoadedMessage(sequence=sequence, head=HEAD, accounts=accounts)
        )


Run = Callable[[Deltas], Awaitable[Enclave]]


async def until_closed(enclave: Enclave) -> None:
    while True:
        await enclave.receive()


@pytest.fixture
async def connect(nursery: trio.Nursery) -> Run:
    async def run(deltas: Deltas) -> Enclave:
        parent_end, enclave_end = trio.testing.memory_stream_pair()
        nursery.start_soon(serve_deltas_connection, parent_end, deltas)
        enclave = Enclave(enclave_end)
        await enclave.hello()
        return enclave

    return run


async def test_store_round_trip(
    tmp_path: Path, connect: Run, make_delta: Callable[[str], bytes]
) -> None:
    store = file_store(tmp_path)
    deltas = hub(store)
    enclave = await connect(deltas)
    big = make_delta("acct-1")
    await enclave.store(1, big)
    reply = await enclave.receive()
    assert reply == DeltaStoredMessage(sequence=1, sha256=delta_fingerprint(big, 1))
    assert store.get(1) == big
    await enclave.store(1, big)  # a retry
    assert await enclave.receive() == reply
    await enclave.store(1, make_delta("acct-other"))
    assert await enclave.receive() == DeltaConflictMessage(sequence=1)
    await enclave.store(2, b"not a bundle")
    failed = await enclave.receive()
    assert isinstance(failed, DeltaStoreFailedMessage)
    assert failed.reason.startswith("not_a_delta")
    assert store.list().head == 1
    assert (deltas.stats.written_total, deltas.stats.conflicts_total) == (1, 1)


async def test_a_store_failure_is_answered_and_alerted_once(
    tmp_path: Path,
    connect: Run,
    make_delta: Callable[[str], bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = file_store(tmp_path)
    alerts = Alerts()
    deltas = hub(store, alerts)
    enclave = await connect(deltas)

    def full(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    for _ in range(2):
        await enclave.store(1, make_delta("acct-1"))
        reply = await enclave.receive()
        assert isinstance(reply, DeltaStoreFailedMessage)
        assert "No space left" in reply.reason
    assert alerts.codes() == ["delta_store_failed"]  # once per streak
    assert deltas.stats.store_failures_total == 2
    assert os.listdir(tmp_path / "deltas") == []


@pytest.mark.parametrize(
    "case", ["oversized", "chunks_over_total", "chunks_under_total", "interleaved", "stray_chunk"]
)
async def test_protocol_errors_close_the_connection_and_store_nothing(
    tmp_path: Path, connect: Run, make_delta: Callable[[str], bytes], case: str
) -> None:
    store = file_store(tmp_path, max_delta_bytes=100_000)
    deltas = hub(store)
    enclave = await connect(deltas)
    delta = make_delta("acct-1")
    m = enclave.messages
    if case == "oversized":
        await m.send(DeltaStoreMessage(sequence=1, total_bytes=100_001))
    elif case == "chunks_over_total":
        await enclave.store(1, delta, total=len(delta) - 1)
    elif case == "chunks_under_total":
        await enclave.store(1, delta, total=len(delta) + 1)
    elif case == "interleaved":
        await m.send(DeltaStoreMessage(sequence=1, total_bytes=len(delta)))
        await m.send(DeltaChunkMessage(data=delta[:10]))
        await m.send(DeltaLoadedMessage(sequence=1, head=HEAD, accounts=1))
    else:
        await m.send(DeltaChunkMessage(data=b"x"))
    with pytest.raises(ChannelClosed):  # the parent closed its end
        await until_closed(enclave)
    assert store.list() == DeltaListing()
    assert not deltas.stats.connected


async def test_a_wrong_hello_is_refused(tmp_path: Path, nursery: trio.Nursery) -> None:
    parent_end, enclave_end = trio.testing.memory_stream_pair()
    nursery.start_soon(serve_deltas_connection, parent_end, hub(file_store(tmp_path)))
    enclave = MessageStream(enclave_end)
    await enclave.send(HelloMessage(channel="logs"))
    with pytest.raises(ChannelClosed):
        await enclave.receive()


async def test_the_store_runs_in_a_worker_thread(
    tmp_path: Path, nursery: trio.Nursery, make_delta: Callable[[str], bytes]
) -> None:
    """The default offload is a worker thread: the event loop keeps running during the put."""
    threads: list[int] = []
    store = file_store(tmp_path)
    real_put = store.put

    def put(sequence: int, data: bytes) -> PutOutcome:
        threads.append(threading.get_ident())
        return real_put(sequence, data)

    store.put = put  # type: ignore[method-assign]
    deltas = Deltas(store)
    parent_end, enclave_end = trio.testing.memory_stream_pair()
    nursery.start_soon(serve_deltas_connection, parent_end, deltas)
    enclave = Enclave(enclave_end)
    await enclave.hello()
    await enclave.store(1, make_delta("acct-1"))
    assert isinstance(await enclave.receive(), DeltaStoredMessage)
    assert threads
    assert threads[0] != threading.get_ident()


# -- the deltas channel: the watcher -----------------------------------------------------------


async def test_the_watcher_pushes_in_order_one_at_a_time(
    tmp_path: Path, connect: Run, autojump_clock: trio.abc.Clock
) -> None:
    store = file_store(tmp_path)
    for sequence in (1, 2, 3):
        store.put(sequence, b"delta %d" % sequence)
    deltas = hub(store, poll_interval_s=1.0)
    enclave = await connect(deltas)
    await trio.sleep(5)
    assert deltas.stats.pushed_total == 0  # nothing before the boot's position is known
    booted(deltas, loaded=1)  # the enclave loaded delta 1 at boot
    assert await enclave.receive_push() == (2, b"delta 2")
    await trio.sleep(3)
    assert deltas.stats.pushed_total == 1  # waits for the answer before the next
    await enclave.loaded(2)
    assert await enclave.receive_push() == (3, b"delta 3")
    await enclave.loaded(3)
    start = trio.current_time()
    store.put(4, b"delta 4")  # another replica's delta appears
    assert await enclave.receive_push() == (4, b"delta 4")
    assert trio.current_time() - start <= 1.0  # within one poll
    await enclave.loaded(4, accounts=7)
    await trio.testing.wait_all_tasks_blocked()
    stats = deltas.stats
    assert (stats.store_head, stats.enclave_sequence, stats.enclave_accounts) == (4, 4, 7)
    assert stats.pushed_total == 3


async def test_after_a_conflict_the_winner_is_pushed_at_once(
    tmp_path: Path, connect: Run, autojump_clock: trio.abc.Clock, make_delta: Callable[[str], bytes]
) -> None:
    store = file_store(tmp_path)
    deltas = hub(store, poll_interval_s=60.0)
    enclave = await connect(deltas)
    booted(deltas, loaded=0)
    await trio.testing.wait_all_tasks_blocked()
    winner = make_delta("acct-winner")
    store.put(1, winner)  # the other replica won sequence 1 just now
    start = trio.current_time()
    await enclave.store(1, make_delta("acct-loser"))
    assert await enclave.receive() == DeltaConflictMessage(sequence=1)
    assert await enclave.receive_push() == (1, winner)
    assert trio.current_time() == start  # not after the 60 s poll
    await enclave.loaded(1)
    # the loser seals again on the new head and wins sequence 2: not pushed back to it
    again = make_delta("acct-loser")
    await enclave.store(2, again)
    assert isinstance(await enclave.receive(), DeltaStoredMessage)
    with trio.move_on_after(300):
        message = await enclave.receive()
        pytest.fail(f"unexpected {message}")
    assert deltas.stats.pushed_total == 1
    assert deltas.stats.store_head == 2


async def test_a_refused_delta_alerts_and_backs_off(
    tmp_path: Path, connect: Run, autojump_clock: trio.abc.Clock
) -> None:
    store = file_store(tmp_path)
    store.put(1, b"foreign delta")
    alerts = Alerts()
    deltas = hub(store, alerts, poll_interval_s=1.0, refused_backoff_initial_s=10.0)
    enclave = await connect(deltas)
    booted(deltas, loaded=0)
    times = []
    for _ in range(3):
        assert (await enclave.receive_push())[0] == 1
        times.append(trio.current_time())
        await enclave.messages.send(DeltaRefusedMessage(sequence=1, reason="delta_chain"))
    assert times[1] - times[0] == pytest.approx(10.0, abs=1.0)
    assert times[2] - times[1] == pytest.approx(20.0, abs=1.0)
    await trio.testing.wait_all_tasks_blocked()
    assert alerts.codes() == ["delta_refused"] * 3
    assert "delta_chain" in alerts.raised[0][1]
    assert deltas.stats.refused_total == 3


async def test_an_unanswered_push_times_out_and_backs_off(
    tmp_path: Path, connect: Run, autojump_clock: trio.abc.Clock
) -> None:
    store = file_store(tmp_path)
    store.put(1, b"delta 1")
    alerts = Alerts()
    deltas = hub(store, alerts, answer_timeout_s=30.0, refused_backoff_initial_s=10.0)
    enclave = await connect(deltas)
    booted(deltas, loaded=0)
    await enclave.receive_push()
    first = trio.current_time()
    await enclave.receive_push()
    assert trio.current_time() - first == pytest.approx(40.0, abs=1.0)
    assert alerts.codes() == ["delta_refused"]
    assert "no answer" in alerts.raised[0][1]


async def test_a_gap_is_alerted_once_and_what_follows_is_not_pushed(
    tmp_path: Path, connect: Run, autojump_clock: trio.abc.Clock
) -> None:
    store = file_store(tmp_path)
    store.put(1, b"delta 1")
    store.put(3, b"delta 3")
    alerts = Alerts()
    deltas = hub(store, alerts)
    enclave = await connect(deltas)
    booted(deltas, loaded=0)
    assert (await enclave.receive_push())[0] == 1
    await enclave.loaded(1)
    await trio.sleep(10)
    assert alerts.codes() == ["delta_gap"]
    assert "delta 2 is missing" in alerts.raised[0][1]
    store.put(2, b"delta 2")  # it arrives late
    assert (await enclave.receive_push())[0] == 2
    await enclave.loaded(2)
    assert (await enclave.receive_push())[0] == 3


async def test_a_newer_connection_replaces_the_old_one(
    tmp_path: Path, connect: Run, autojump_clock: trio.abc.Clock
) -> None:
    store = file_store(tmp_path)
    deltas = hub(store)
    old = await connect(deltas)
    await trio.testing.wait_all_tasks_blocked()
    new = await connect(deltas)
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(ChannelClosed):
        await old.receive()
    assert deltas.stats.connected
    booted(deltas, loaded=0)
    store.put(1, b"delta 1")
    assert (await new.receive_push())[0] == 1


async def test_a_displacing_connection_only_delays_the_enclave(
    tmp_path: Path,
    connect: Run,
    autojump_clock: trio.abc.Clock,
    make_delta: Callable[[str], bytes],
) -> None:
    """The current bound of "a newer connection replaces the open one": a local process that
    says ``hello {channel: "deltas"}`` while the enclave is mid-store displaces it. The put
    already under way still finishes and is durable (its reply is lost), and when the enclave
    reconnects it displaces the intruder in turn and is pushed the delta it sealed, so it
    converges on the store. Refusing the newcomer instead would let a squatter that connected
    first hold the channel for good."""
    store = file_store(tmp_path)
    putting = trio.Event()
    release = trio.Event()

    async def put_like_a_worker_thread(fn: Callable[..., Any], *args: Any) -> Any:
        if fn == store.put:
            putting.set()
            with trio.CancelScope(shield=True):  # a worker thread is not abandoned
                await release.wait()
        return fn(*args)

    deltas = hub(store, offload=put_like_a_worker_thread)
    enclave = await connect(deltas)
    booted(deltas, loaded=0)
    delta = make_delta("acct-displaced")
    await enclave.store(1, delta)
    await putting.wait()
    intruder = await connect(deltas)
    await trio.testing.wait_all_tasks_blocked()
    release.set()
    with pytest.raises(ChannelClosed):  # no delta_stored: the enclave's store says disconnected
        await until_closed(enclave)
    assert store.get(1) == delta  # durable all the same
    assert deltas.stats.connected
    again = await connect(deltas)  # the enclave's reconnecting loop
    with pytest.raises(ChannelClosed):
        await until_closed(intruder)
    assert await again.receive_push() == (1, delta)
    await again.loaded(1)
    await trio.testing.wait_all_tasks_blocked()
    assert deltas.stats.enclave_sequence == 1
    assert deltas.stats.pushed_total == 1


async def test_unexpected_messages_break_the_connection(tmp_path: Path, connect: Run) -> None:
    enclave = await connect(hub(file_store(tmp_path)))
    await enclave.messages.send(LogMessage(line="wrong channel"))
    with pytest.raises(ChannelClosed):
        await enclave.receive()


# -- boot: the base, then every stored delta, on the preload channel --------------------------


async def _fake_enclave_boot(
    stream: trio.abc.Stream, *, answer: Callable[[str, int], PreloadResultMessage]
) -> tuple[bytes, BundleEndMessage, list[tuple[int, bytes]], int]:
    """The enclave's side of the boot: returns the base, its end frame, the deltas and the
    largest delta chunk seen."""
    m = MessageStream(stream)
    await m.send(HelloMessage(channel="preload"))
    await m.send(AttestationMessage(document=b"attestation document"))
    assert (await m.receive_expected(RecipientCiphertextMessage)).ciphertext == b"envelope"
    base = bytearray()
    while True:
        message = await m.receive()
        if isinstance(message, BundleEndMessage):
            end = message
            break
        assert isinstance(message, BundleChunkMessage)
        base += message.data
    assert end.total_bytes == len(base)
    received: list[tuple[int, bytes]] = []
    largest = 0
    for _ in range(end.deltas):
        push = await m.receive_expected(DeltaPushMessage)
        data = bytearray()
        while not isinstance(message := await m.receive(), DeltaEndMessage):
            assert isinstance(message, DeltaChunkMessage)
            largest = max(largest, len(message.data))
            data += message.data
        assert len(data) == push.total_bytes
        received.append((push.sequence, bytes(data)))
    fingerprint = inspect_sealed(io.BytesIO(bytes(base)))[1].sha256_hex
    await m.send(answer(fingerprint, end.deltas))
    return bytes(base), end, received, largest


async def _kms(document: bytes, header: dict[str, Any]) -> bytes:
    assert document == b"attestation document"
    return b"envelope"


@pytest.mark.parametrize("enclave_says", [True, False])
async def test_boot_streams_the_base_then_every_stored_delta_in_order(
    tmp_path: Path,
    dev_key: DevKeyFile,
    make_delta: Callable[[str], bytes],
    enclave_says: bool,
) -> None:
    base = encode_bundle([make_record(f"acct-{i}") for i in range(3)], dev_key)
    (tmp_path / "base.enc").write_bytes(base)
    store = file_store(tmp_path)
    stored = {s: make_delta(f"acct-d{s}") for s in (1, 2, 3)}  # a few KiB each
    for sequence, data in stored.items():
        store.put(sequence, data)
    store.put(5, make_delta("acct-beyond-the-gap"))  # not served: 4 is missing
    alerts = Alerts()
    deltas = hub(store, alerts)

    def answer(fingerprint: str, n: int) -> PreloadResultMessage:
        return PreloadResultMessage(
            ok=True,
            accounts=3 + n,
            sha256=fingerprint,
            deltas=n if enclave_says else None,
            deltas_head=HEAD if enclave_says else None,
        )

    parent_end, enclave_end = trio.testing.memory_stream_pair()
    seen: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:

        async def enclave() -> None:
            seen["boot"] = await _fake_enclave_boot(enclave_end, answer=answer)

        nursery.start_soon(enclave)
        result = await serve_preload(
            MessageStream(parent_end), tmp_path / "base.enc", _kms, chunk_bytes=1000, deltas=deltas
        )
    got_base, end, received, largest = seen["boot"]
    assert got_base == base
    assert end.deltas == 3
    assert received == sorted(stored.items())
    assert largest <= 1000  # the caller's chunk size, never above 256 KiB
    assert deltas.boot_streamed == 3
    assert alerts.codes() == ["delta_gap"]
    deltas.mark_booted(result)
    assert deltas.stats.enclave_sequence == 3  # said, or taken to be all three
    assert deltas.stats.store_head == 3


async def test_boot_without_a_store_or_deltas_says_zero(
    tmp_path: Path, dev_key: DevKeyFile
) -> None:
    base = encode_bundle([make_record("acct-0")], dev_key)
    (tmp_path / "base.enc").write_bytes(base)
    for deltas in (None, hub(file_store(tmp_path))):
        parent_end, enclave_end = trio.testing.memory_stream_pair()
        seen: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:

            async def enclave(
                enclave_end: trio.abc.Stream = enclave_end, seen: dict[str, Any] = seen
            ) -> None:
                seen["boot"] = await _fake_enclave_boot(
                    enclave_end,
                    answer=lambda fp, n: PreloadResultMessage(ok=True, accounts=1, sha256=fp),
                )

            nursery.start_soon(enclave)
            await serve_preload(
                MessageStream(parent_end), tmp_path / "base.enc", _kms, deltas=deltas
            )
        assert seen["boot"][1].deltas == 0
        assert seen["boot"][2] == []


async def test_boot_fails_when_the_store_cannot_be_listed(
    tmp_path: Path, dev_key: DevKeyFile
) -> None:
    (tmp_path / "base.enc").write_bytes(encode_bundle([make_record("acct-0")], dev_key))
    alerts = Alerts()
    deltas = hub(FileDeltaStore(tmp_path / "unmounted", host_tag=TAG), alerts)
    parent_end, enclave_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        m = MessageStream(enclave_end)
        await m.send(HelloMessage(channel="preload"))
        await m.send(AttestationMessage(document=b"attestation document"))
        with pytest.raises(DeltaStoreError, match="cannot list"):
            await serve_preload(
                MessageStream(parent_end), tmp_path / "base.enc", _kms, deltas=deltas
            )
        nursery.cancel_scope.cancel()
    assert alerts.codes() == ["delta_store_failed"]


# -- health --------------------------------------------------------------------------------------


async def test_readyz_and_metrics_show_the_store_and_the_enclave(
    tmp_path: Path, connect: Run, autojump_clock: trio.abc.Clock
) -> None:
    from trio_sign.parent._health import ParentState, render_metrics

    from .test_health import parse_exposition

    assert "deltas_stored" not in ParentState().report()  # no [deltas]
    assert "trio_sign_parent_deltas_stored" not in render_metrics(ParentState())
    store = file_store(tmp_path)
    for sequence in (1, 2):
        store.put(sequence, b"delta %d" % sequence)
    state = ParentState()
    deltas = Deltas(store, on_alert=state.alerts.raise_alert, offload=inline)
    state.deltas = deltas.stats
    enclave = await connect(deltas)
    booted(deltas, loaded=1)
    assert (await enclave.receive_push())[0] == 2
    await enclave.loaded(2, accounts=9)
    await enclave.store(3, b"not a delta")  # refused by the parent: counted nowhere
    await enclave.receive()
    await trio.testing.wait_all_tasks_blocked()
    report = state.report()
    assert (report["deltas_stored"], report["deltas_loaded"], report["deltas_head"]) == (
        2,
        2,
        HEAD,
    )
    samples = parse_exposition(render_metrics(state))
    assert samples["trio_sign_parent_deltas_stored"] == 2
    assert samples["trio_sign_parent_deltas_loaded"] == 2
    assert samples["trio_sign_parent_deltas_connected"] == 1
    assert samples["trio_sign_parent_deltas_pushed_total"] == 1
    assert samples["trio_sign_parent_deltas_conflicts_total"] == 0
    assert samples["trio_sign_parent_deltas_written_total"] == 0
    assert samples['trio_sign_alerts_total{alert="delta_refused"}'] == 0


async def _boot(
    tmp_path: Path, deltas: Deltas, answer: Callable[[str, int], PreloadResultMessage]
) -> tuple[PreloadResultMessage | BaseException, Any]:
    parent_end, enclave_end = trio.testing.memory_stream_pair()
    seen: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:

        async def enclave() -> None:
            try:
                seen["boot"] = await _fake_enclave_boot(enclave_end, answer=answer)
            except BaseException as exc:
                seen["boot"] = exc
                raise

        nursery.start_soon(enclave)
        try:
            result: PreloadResultMessage | BaseException = await serve_preload(
                MessageStream(parent_end), tmp_path / "base.enc", _kms, deltas=deltas
            )
        except DeltaStoreError as exc:
            result = exc
            nursery.cancel_scope.cancel()
    return result, seen.get("boot")


def _ok(fingerprint: str, n: int) -> PreloadResultMessage:
    return PreloadResultMessage(ok=True, accounts=1 + n, sha256=fingerprint, deltas=n)


async def test_boot_reads_deltas_ahead_and_still_sends_them_in_order(
    tmp_path: Path, dev_key: DevKeyFile, autojump_clock: trio.abc.Clock
) -> None:
    """S3 round trips overlap (at most BOOT_PREFETCH at a time), the order on the wire does
    not change, whichever read finishes first."""
    from trio_sign.parent._preload import BOOT_PREFETCH

    (tmp_path / "base.enc").write_bytes(encode_bundle([make_record("acct-0")], dev_key))
    store = file_store(tmp_path)
    n = 20
    for sequence in range(1, n + 1):
        store.put(sequence, b"delta %d" % sequence)
    in_flight = [0, 0]  # now, most

    async def slow(fn: Callable[..., Any], *args: Any) -> Any:
        if fn == store.get:
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])
            await trio.sleep(1.0 + (n - args[0]) * 0.1)  # later deltas come back sooner
            in_flight[0] -= 1
        return fn(*args)

    deltas = hub(store, offload=slow)
    start = trio.current_time()
    result, boot = await _boot(tmp_path, deltas, _ok)
    assert isinstance(result, PreloadResultMessage)
    assert [s for s, _ in boot[2]] == list(range(1, n + 1))
    assert [d for _, d in boot[2]] == [b"delta %d" % s for s in range(1, n + 1)]
    assert in_flight[1] == BOOT_PREFETCH
    assert trio.current_time() - start < 0.5 * sum(1.0 + i * 0.1 for i in range(n))


async def test_a_delta_that_cannot_be_read_fails_the_boot(
    tmp_path: Path, dev_key: DevKeyFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "base.enc").write_bytes(encode_bundle([make_record("acct-0")], dev_key))
    store = file_store(tmp_path)
    for sequence in (1, 2, 3):
        store.put(sequence, b"delta %d" % sequence)
    (tmp_path / "deltas" / object_name(2)).chmod(0)
    if os.access(tmp_path / "deltas" / object_name(2), os.R_OK):  # root reads anything
        real_get = store.get

        def get(sequence: int) -> bytes:
            if sequence == 2:
                raise DeltaStoreError("cannot read delta-00000002.enc: Permission denied")
            return real_get(sequence)

        monkeypatch.setattr(store, "get", get)
    alerts = Alerts()
    result, _ = await _boot(tmp_path, hub(store, alerts), _ok)
    assert isinstance(result, DeltaStoreError)  # bare, not in an exception group
    assert "delta-00000002.enc" in str(result)
    assert alerts.codes() == ["delta_store_failed"]


async def test_an_enclave_that_hangs_up_mid_deltas_still_gives_its_verdict(
    tmp_path: Path, dev_key: DevKeyFile
) -> None:
    """The enclave refuses a delta at boot (a broken chain) and stops reading: the parent
    reports the enclave's own reason, as it does for a refused base."""
    from trio_sign.parent._preload import PreloadRefused

    (tmp_path / "base.enc").write_bytes(encode_bundle([make_record("acct-0")], dev_key))
    store = file_store(tmp_path)
    for sequence in (1, 2):
        store.put(sequence, b"x" * 300_000)  # more than one chunk each
    parent_end, enclave_end = trio.testing.memory_stream_pair()

    async def enclave() -> None:
        m = MessageStream(enclave_end)
        await m.send(HelloMessage(channel="preload"))
        await m.send(AttestationMessage(document=b"attestation document"))
        while not isinstance(await m.receive(), DeltaPushMessage):
            pass
        await m.send(PreloadResultMessage(ok=False, reason="delta_chain"))
        await enclave_end.send_eof()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await enclave_end.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(enclave)
        with pytest.raises(PreloadRefused, match="delta_chain"):
            await serve_preload(
                MessageStream(parent_end), tmp_path / "base.enc", _kms, deltas=hub(store)
            )


def test_recover_reports_io_errors_as_store_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trio_sign.parent._deltas as module

    directory = tmp_path / "deltas"
    directory.mkdir()
    (directory / f".delta-00000001.enc.{TAG}.0011223344556677.tmp").write_bytes(b"x")

    def broken(path: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(module, "fsync_directory", broken)
    with pytest.raises(DeltaStoreError, match="Input/output error"):
        FileDeltaStore(directory, host_tag=TAG).recover()


async def test_a_hung_read_does_not_hold_up_a_stop(tmp_path: Path) -> None:
    """Listing an unreachable S3 can hang in botocore for minutes: a cancelled read is
    abandoned (its thread ends by itself), so a stop is not held up."""
    release = threading.Event()
    store = file_store(tmp_path)
    real_list = store.list

    def hung() -> DeltaListing:
        release.wait(timeout=10)
        return real_list()

    store.list = hung  # type: ignore[method-assign]
    deltas = Deltas(store)  # the default offload: worker threads
    timer = threading.Timer(5.0, release.set)  # the thread ends even if this test fails
    timer.start()
    try:
        start = time.monotonic()
        with trio.move_on_after(0.2) as scope:
            await deltas.listing()
        assert scope.cancelled_caught
        assert time.monotonic() - start < 2.0
    finally:
        release.set()
        timer.cancel()
