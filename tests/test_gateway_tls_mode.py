"""gateway.toml ``[tls]``: attested TLS ending in the enclave is the only mode.

``mode = "ingress"`` (TLS ending at the parent, checked against ``[tls] ca``) was removed once
the parent's ingress became a byte pipe to the enclave's own TLS port: no parent terminates
TLS, and an enclave's self-signed certificate can only be checked by its attestation. A
gateway.toml written for it is refused at start with one line that says what to do.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from trio_sign.gateway import GatewayConfigError, parse_gateway_config
from trio_sign.gateway._service import TLS_MODES

SHARES = "ab" * 32


def _toml(tls: str) -> str:
    return f"""
[api]
listen = "tcp://127.0.0.1:0"
token = "gateway-api-token-0123456789abcdef"
[events]
listen = "tcp://127.0.0.1:0"
[shares]
participant_files = ["p.json"]
[dev]
share_files = true
[attestation]
pcrs = {{ PCR0 = "{"11" * 48}", PCR1 = "{"22" * 48}", PCR2 = "{"33" * 48}" }}
{tls}
[[node]]
id = "node-1"
address = "tcp://127.0.0.1:50051"
events_token = "node-1-events-token-0123456789abcdef"
shares_sha256 = "{SHARES}"
"""


TLS = '[tls]\ncert = "gateway.pem"\nkey = "gateway.key"\n'


def test_attested_is_the_only_mode() -> None:
    assert TLS_MODES == ("attested",)
    for tls in (TLS, TLS + 'mode = "attested"\n', TLS + 'server_name = "node-1.internal"\n'):
        config = parse_gateway_config(_toml(tls))
        assert config.tls_mode == "attested"
        assert config.attested


@pytest.mark.parametrize(
    "extra",
    [
        'mode = "ingress"\nca = "pki/ca.pem"\nserver_name = "localhost"\n',  # the former config
        'mode = "ingress"\n',
        'ca = "pki/ca.pem"\n',
    ],
)
def test_the_ingress_mode_and_its_ca_are_refused_saying_why(extra: str) -> None:
    with pytest.raises(GatewayConfigError) as info:
        parse_gateway_config(_toml(TLS + extra))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith('[tls] mode = "ingress" and [tls] ca were removed')
    assert "byte pipe" in message
    assert "attestation" in message
    assert "docs/gateway.md" in message


def test_an_unknown_mode_names_the_one_there_is() -> None:
    with pytest.raises(GatewayConfigError, match=r"^\[tls\] mode must be one of 'attested'$"):
        parse_gateway_config(_toml(TLS + 'mode = "mtls"\n'))


def test_docs_say_the_ingress_mode_is_gone() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "gateway.md").read_text()
    assert "| `mode` | `attested` | `attested`, the only mode" in doc
    assert "| `ca` | refused |" in doc
