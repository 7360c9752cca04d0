"""``[dkg]`` in the measured configuration (DESIGN §9, §13): pinned participant keys and the
DKG's bounds, every refusal naming its key."""

from __future__ import annotations

import pytest

from trio_sign.enclave._measured import (
    DkgSettings,
    MeasuredConfigError,
    parse_measured_config,
)

KEY_A = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"  # RFC 8032 #1
KEY_B = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"  # RFC 8032 #2


def test_dkg_section_parsed_with_defaults() -> None:
    config = parse_measured_config(f'[dkg]\nparticipants = {{ ops-1 = "{KEY_A}" }}\n'.encode())
    assert config.dkg == DkgSettings(participants={"ops-1": bytes.fromhex(KEY_A)})
    assert config.dkg is not None
    assert config.dkg.ttl_s == 300.0
    assert config.dkg.max_open == 64
    assert config.dkg.store_retries == 5
    assert "ops-1" in repr(config)
    assert KEY_A not in repr(config.dkg)  # keys are public, but the repr names ids only


def test_dkg_section_every_key() -> None:
    text = (
        "[dkg]\nttl_s = 30\nmax_open = 2\nstore_retries = 0\n"
        f'[dkg.participants]\nops-1 = "{KEY_A}"\n"backup@site:2" = "{KEY_B}"\n'
    )
    dkg = parse_measured_config(text.encode()).dkg
    assert dkg is not None
    assert dkg.participants == {
        "ops-1": bytes.fromhex(KEY_A),
        "backup@site:2": bytes.fromhex(KEY_B),
    }
    assert (dkg.ttl_s, dkg.max_open, dkg.store_retries) == (30.0, 2, 0)


def test_no_dkg_section_means_no_dkg() -> None:
    assert parse_measured_config(b"").dkg is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("", "[dkg] participants must be a table"),
        ("participants = {}\n", "[dkg] participants must be a table"),
        ("participants = ['x']\n", "[dkg] participants must be a table"),
        (f'participants = {{ enclave = "{KEY_A}" }}\n', "'enclave' is reserved"),
        (f'participants = {{ "-x" = "{KEY_A}" }}\n', "'-x' is not a key id"),
        ('participants = { a = "00" }\n', "[dkg] participants.a must be 64 hex digits"),
        (f'participants = {{ a = "{"0" * 63}g" }}\n', "[dkg] participants.a must be 64 hex"),
        (f'participants = {{ a = "{KEY_A}", b = "{KEY_A}" }}\n', "participants.b repeats"),
        (f'participants = {{ a = "{KEY_A}" }}\nttl = 3\n', "unknown key 'ttl' in [dkg]"),
        (f'participants = {{ a = "{KEY_A}" }}\nttl_s = 0\n', "[dkg] ttl_s must be > 0"),
        (f'participants = {{ a = "{KEY_A}" }}\nttl_s = true\n', "[dkg] ttl_s must be a number"),
        (f'participants = {{ a = "{KEY_A}" }}\nttl_s = nan\n', "[dkg] ttl_s must be > 0"),
        (f'participants = {{ a = "{KEY_A}" }}\nmax_open = 0\n', "[dkg] max_open must be in 1.."),
        (f'participants = {{ a = "{KEY_A}" }}\nmax_open = 1.0\n', "max_open must be an integer"),
        (
            f'participants = {{ a = "{KEY_A}" }}\nstore_retries = -1\n',
            "[dkg] store_retries must be in 0..100",
        ),
    ],
)
def test_dkg_section_refusals(body: str, message: str) -> None:
    with pytest.raises(MeasuredConfigError) as info:
        parse_measured_config(f"[dkg]\n{body}".encode(), source="enclave.toml")
    assert message in str(info.value)
    assert str(info.value).startswith("enclave.toml: ")


def test_not_a_point_is_refused() -> None:
    # 64 hex digits that are not an Ed25519 point (y = 2 has no x)
    bad = (2).to_bytes(32, "little").hex()
    with pytest.raises(MeasuredConfigError, match="not a valid Ed25519 public key"):
        parse_measured_config(f'[dkg]\nparticipants = {{ a = "{bad}" }}\n'.encode())
