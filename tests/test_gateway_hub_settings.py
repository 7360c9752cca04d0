"""The participant endpoint's limits come from gateway.toml ``[participant_endpoint]`` (they
used to be HubSettings' defaults whatever the file said), and the hub's counts are on the
gateway's ``GET /metrics`` as ``trio_sign_gateway_participant_events_total{kind}``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, wrap_client_stream

from tests.test_gateway_service import metrics
from trio_sign.gateway import GatewayConfigError, GatewayHandle, parse_gateway_config, serve_gateway
from trio_sign.gateway._participants import SUBPROTOCOL, HubSettings
from trio_sign.gateway._service import _HUB_COUNTS, _HUB_SECONDS
from trio_sign.participant import _messages as m

PUBLIC_KEY = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"
KINDS = (
    "auth_ok",
    "auth_failed",
    "replaced",
    "malformed",
    "late_answers",
    "busy",
    "timeouts",
    "errors",
)


def gateway_toml(endpoint: str = "", node: str = "unix:///nonexistent/node.sock") -> str:
    return f"""
[api]
listen = "tcp://127.0.0.1:0"
token = "api-token-for-the-tests-0123456789"
[events]
listen = "tcp://127.0.0.1:0"
[participant_endpoint]
listen = "tcp://127.0.0.1:0"
{endpoint}
[participants.ops-phone]
key_id = "ops-phone-auth"
public_key = "{PUBLIC_KEY}"
[dev]
skip_attestation = true
[[node]]
id = "node-1"
address = "{node}"
events_token = "node-1-events-token-0123456789abcdef"
"""


def test_without_the_keys_the_hub_has_its_defaults() -> None:
    config = parse_gateway_config(gateway_toml('gateway_id = "gw-1"'))
    assert config.participant_hub == HubSettings(gateway_id="gw-1")
    assert config.participant_gateway_id == "gw-1"


def test_every_key_sets_its_limit() -> None:
    config = parse_gateway_config(
        gateway_toml(
            "max_connections = 50\nmax_handshakes = 5\nhandshake_timeout_s = 3\n"
            "max_in_flight = 65535\nping_interval_s = 5\nidle_timeout_s = 12.5\n"
            "log_interval_s = 60"
        )
    )
    assert config.participant_hub == HubSettings(
        gateway_id="gateway",
        max_connections=50,
        max_handshakes=5,
        handshake_timeout_s=3.0,
        max_in_flight=65535,
        ping_interval_s=5.0,
        idle_timeout_s=12.5,
        log_interval_s=60.0,
    )


def test_log_interval_zero_logs_every_line() -> None:
    assert parse_gateway_config(gateway_toml("log_interval_s = 0")).participant_hub == (
        HubSettings(log_interval_s=0.0)
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("max_connections = 0", "max_connections must be a whole number, at least 1"),
        ("max_handshakes = 1.5", "max_handshakes must be a whole number"),
        ("max_handshakes = true", "max_handshakes must be a whole number"),
        # the participant refuses a welcome whose max_in_flight is over 65535
        ("max_in_flight = 65536", "max_in_flight must be a whole number, 1..65535"),
        ("handshake_timeout_s = 0", "handshake_timeout_s must be a number of seconds, positive"),
        ('ping_interval_s = "15"', "ping_interval_s must be a number of seconds"),
        ("idle_timeout_s = inf", "idle_timeout_s must be a number of seconds"),
        ("log_interval_s = -1", "log_interval_s must be a number of seconds, 0 or more"),
        ("log_interval_s = nan", "log_interval_s must be a number of seconds"),
        (
            "ping_interval_s = 45\nidle_timeout_s = 45",
            "idle_timeout_s must be longer than ping_interval_s",
        ),
        ("log_interval = 10", "has unknown key 'log_interval'"),
    ],
)
def test_a_bad_value_is_refused_naming_the_key(line: str, message: str) -> None:
    with pytest.raises(GatewayConfigError, match=r"^\[participant_endpoint\] .*") as info:
        parse_gateway_config(gateway_toml(line))
    assert message in str(info.value)


async def test_the_gateway_serves_with_them_and_counts_on_metrics(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The hub the gateway runs has the file's settings; a refused handshake is counted in
    ``GET /metrics`` (every kind has its series, at 0 until it happens)."""
    config = parse_gateway_config(
        gateway_toml("log_interval_s = 3\nmax_handshakes = 7", f"unix://{tmp_path}/none.sock"),
        base=tmp_path,
    )
    gateway: GatewayHandle = await nursery.start(serve_gateway, config)
    assert gateway.participants is not None
    assert gateway.participants.settings is config.participant_hub
    assert gateway.participants.settings.log_interval_s == 3.0
    api = gateway.api_urls[0]
    text = await metrics(api)
    assert "# TYPE trio_sign_gateway_participant_events_total counter\n" in text
    for kind in KINDS:
        assert f'trio_sign_gateway_participant_events_total{{kind="{kind}"}} 0\n' in text

    assert gateway.participant_url is not None
    port = int(gateway.participant_url.rsplit(":", 1)[1].split("/")[0])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(10):
        async with stream, trio.open_nursery() as client:
            ws = await wrap_client_stream(
                client, stream, "127.0.0.1", "/v1/participants", subprotocols=[SUBPROTOCOL]
            )
            await ws.send_message(m.encode_message(m.Hello("ops-phone", "ops-phone-auth")))
            assert isinstance(m.parse_message(await ws.get_message()), m.Challenge)
            await ws.send_message(m.encode_message(m.Auth(bytes(64))))  # not its signature
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            client.cancel_scope.cancel()
    assert closed.value.reason is not None
    assert closed.value.reason.code == m.CLOSE_AUTH_FAILED
    text = await metrics(api)
    assert 'trio_sign_gateway_participant_events_total{kind="auth_failed"} 1\n' in text
    assert 'trio_sign_gateway_participant_events_total{kind="auth_ok"} 0\n' in text


def test_the_docs_example_shows_the_defaults(tmp_path: Path) -> None:
    """docs/gateway.md's example names every limit with HubSettings' default."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "gateway.md").read_text()
    example = re.search(r"```toml\n(.*?)```", doc, re.DOTALL)
    assert example is not None
    config = parse_gateway_config(example[1], base=tmp_path)
    assert config.participant_hub == HubSettings()
    section = example[1].split("[participant_endpoint]", 1)[1].split("\n[", 1)[0]
    for key in (*_HUB_COUNTS, *_HUB_SECONDS, "log_interval_s"):
        assert f"\n{key} = " in section, key


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("timeout_s = nan", "[participant_endpoint] timeout_s must be a positive number"),
        ("timeout_s = inf", "[participant_endpoint] timeout_s must be a positive number"),
    ],
)
def test_the_other_numbers_refuse_nan_and_inf(line: str, message: str) -> None:
    """TOML's nan passed the old ``value <= 0`` check (and inf was taken as a time)."""
    with pytest.raises(GatewayConfigError) as info:
        parse_gateway_config(gateway_toml(line))
    assert str(info.value) == message
    prober = gateway_toml().replace("[dev]", "[prober]\ninterval_s = nan\n[dev]")
    with pytest.raises(GatewayConfigError, match=r"^\[prober\] interval_s must be a positive"):
        parse_gateway_config(prober)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("max_in_flight", 70_000, "max_in_flight"),
        ("max_connections", 0, "max_connections"),
        ("ping_interval_s", float("nan"), "ping_interval_s"),
        ("handshake_timeout_s", float("inf"), "handshake_timeout_s"),
        ("idle_timeout_s", 15.0, "longer than ping_interval_s"),
        ("log_interval_s", float("inf"), "log_interval_s"),
    ],
)
def test_hub_settings_built_in_code_are_checked_too(field: str, value: float, words: str) -> None:
    """Not only gateway.toml's parser: HubSettings itself refuses what it cannot run with."""
    changes: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=words):
        HubSettings(**changes)


@pytest.mark.parametrize("value", ["1.5", "0.5", "0", "true", "nan"])
def test_dkg_max_concurrent_is_a_whole_number_not_a_rounded_one(value: str) -> None:
    """[dkg] max_concurrent was int(positive number): 1.5 became 1 and 0.5 became 0."""
    toml = gateway_toml().replace("[dev]", f"[dkg]\nmax_concurrent = {value}\n[dev]")
    with pytest.raises(GatewayConfigError, match=r"^\[dkg\] max_concurrent must be a whole"):
        parse_gateway_config(toml)
    ok = gateway_toml().replace("[dev]", "[dkg]\nmax_concurrent = 3\n[dev]")
    assert parse_gateway_config(ok).dkg_max_concurrent == 3
