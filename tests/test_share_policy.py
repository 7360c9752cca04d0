"""Issue 14: an account's policy in its share record (DESIGN §6 version 2, field ``policy``),
in the plaintext file, the sealed bundle (``binary-v2``) and the store."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_sign._errors import ShareFileError
from trio_sign.shares import (
    DevKeyFile,
    ShareStore,
    encode_bundle,
    read_plaintext,
    read_sealed,
    reseal,
    seal_file,
    write_plaintext,
    write_plaintext_file,
)
from trio_sign.shares._sealed import read_sealed_header

from .share_helpers import make_record


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> DevKeyFile:
    return DevKeyFile.create(tmp_path_factory.mktemp("k") / "dev.key")


def _records() -> list:  # type: ignore[type-arg]
    return [
        make_record("a-default"),
        make_record("b-vip", policy="vip"),
        make_record("c-treasury", policy="treasury.cold-2"),
        make_record("d-default", policy="default"),
    ]


def test_plaintext_round_trip_and_default_is_not_written() -> None:
    buf = io.BytesIO()
    write_plaintext(buf, _records())
    lines = buf.getvalue().decode().splitlines()
    assert "policy" not in lines[1]
    assert json.loads(lines[2])["policy"] == "vip"
    assert "policy" not in lines[4]  # "default" written as nothing: the v1 bytes
    buf.seek(0)
    assert [r.policy for r in read_plaintext(buf)] == [
        "default",
        "vip",
        "treasury.cold-2",
        "default",
    ]
    buf.seek(0)
    store = ShareStore.load_plaintext(buf)
    assert store["b-vip"].policy == "vip"
    assert store["a-default"].policy == "default"
    assert store.policies() == {"default", "vip", "treasury.cold-2"}
    assert "policy='vip'" in repr(store["b-vip"])


@pytest.mark.parametrize("bad", ["", "has space", "x" * 65, "naïve", "-lead"])
def test_a_bad_policy_name_is_refused_with_its_line(bad: str) -> None:
    buf = io.BytesIO()
    write_plaintext(buf, [make_record("a")])
    lines = buf.getvalue().decode().splitlines()
    record = json.loads(lines[1])
    record["policy"] = bad
    lines[1] = json.dumps(record)
    with pytest.raises(ShareFileError) as caught:
        list(read_plaintext(io.BytesIO(("\n".join(lines) + "\n").encode())))
    assert caught.value.reason == "bad_policy"
    assert caught.value.line == 2


def test_a_policy_must_be_a_string() -> None:
    buf = io.BytesIO()
    write_plaintext(buf, [make_record("a")])
    lines = buf.getvalue().decode().splitlines()
    record = json.loads(lines[1])
    record["policy"] = 3
    lines[1] = json.dumps(record)
    with pytest.raises(ShareFileError) as caught:
        list(read_plaintext(io.BytesIO(("\n".join(lines) + "\n").encode())))
    assert caught.value.reason == "bad_type"


@pytest.mark.parametrize("verify", ["lazy", "full"])
def test_sealed_v2_round_trip(key: DevKeyFile, verify: str) -> None:
    bundle = encode_bundle(_records(), key, chunk_size=1024)
    header, _ = read_sealed_header(io.BytesIO(bundle))
    assert header["record_format"] == "binary-v2"
    store = ShareStore.load_sealed(io.BytesIO(bundle), key, verify=verify)  # type: ignore[arg-type]
    assert {a: store[a].policy for a in ("a-default", "b-vip", "c-treasury", "d-default")} == {
        "a-default": "default",
        "b-vip": "vip",
        "c-treasury": "treasury.cold-2",
        "d-default": "default",
    }
    assert store.policies() == {"default", "vip", "treasury.cold-2"}
    assert [r.policy for r in read_sealed(io.BytesIO(bundle), key)] == [
        "default",
        "vip",
        "treasury.cold-2",
        "default",
    ]


def test_all_default_bundles_stay_binary_v1(key: DevKeyFile) -> None:
    bundle = encode_bundle([make_record("a"), make_record("b", policy="default")], key)
    header, _ = read_sealed_header(io.BytesIO(bundle))
    assert header["record_format"] == "binary-v1"
    store = ShareStore.load_sealed(io.BytesIO(bundle), key)
    assert store.policies() == {"default"}


def test_seal_file_and_reseal_keep_policies(tmp_path: Path, key: DevKeyFile) -> None:
    src = tmp_path / "shares.json"
    write_plaintext_file(src, _records())
    sealed = tmp_path / "shares.enc"
    seal_file(src, sealed, key, chunk_size=600)
    with sealed.open("rb") as f:
        assert read_sealed_header(f)[0]["record_format"] == "binary-v2"
    other = DevKeyFile.create(tmp_path / "other.key")
    resealed = tmp_path / "again.enc"
    reseal(sealed, resealed, key, other)
    with resealed.open("rb") as f:
        store = ShareStore.load_sealed(f, other, verify="full")
    assert store["c-treasury"].policy == "treasury.cold-2"
    assert store.accounts == 4


def test_a_bad_policy_in_a_sealed_record_is_refused(key: DevKeyFile) -> None:
    bundle = encode_bundle([make_record("a"), make_record("b", policy="bad name")], key)
    with pytest.raises(ShareFileError) as caught:
        ShareStore.load_sealed(io.BytesIO(bundle), key)
    assert caught.value.reason == "bad_policy"
    assert caught.value.line == 2
    with pytest.raises(ShareFileError) as caught:
        list(read_sealed(io.BytesIO(bundle), key))
    assert caught.value.reason == "bad_policy"


_NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.one_of(st.just("default"), _NAMES), min_size=1, max_size=12))
def test_any_policies_round_trip_through_a_sealed_bundle(
    key: DevKeyFile, policies: list[str]
) -> None:
    """Every valid name, any mix with ``default``, across chunk boundaries (a small chunk
    size puts records of every length at the edges)."""
    records = [make_record(f"acct-{i}", policy=p) for i, p in enumerate(policies)]
    bundle = encode_bundle(records, key, chunk_size=600)
    store = ShareStore.load_sealed(io.BytesIO(bundle), key, verify="full")
    assert [store[f"acct-{i}"].policy for i in range(len(policies))] == policies
    assert store.policies() == set(policies)
    expected = "binary-v1" if set(policies) == {"default"} else "binary-v2"
    assert read_sealed_header(io.BytesIO(bundle))[0]["record_format"] == expected
