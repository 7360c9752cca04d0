"""`trio-sign gateway` as a process tree: the sign API over HTTP against a dev enclave that
subscribes to the gateway's own event server through the parent's relay (which adds the
node's token); freeze/unfreeze through the API. Then the API's own defences (DESIGN §16):
JSON only, Host and Origin checked, a bearer token."""

from __future__ import annotations

import functools
import json
import logging
import os
import ssl
import stat
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import trio

from trio_sign import __version__
from trio_sign.enclave import EnclaveConfig, serve_dev_enclave
from trio_sign.gateway import (
    GatewayConfigError,
    GatewayHandle,
    parse_gateway_config,
    serve_gateway,
)
from trio_sign.parent import serve_sse_relay
from trio_sign.testing import generate_share_files
from trio_sign.transport import open_listeners

NODE_TOKEN = "node-1-events-token-0123456789abcdef"
API_TOKEN = "api-token-for-the-tests-0123456789"


async def raw_response(url: str, head: str, data: bytes = b"") -> tuple[int, bytes, bytes]:
    """(status, head, body) of one request sent as bytes."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(head.encode() + data)
        raw = b""
        with trio.fail_after(30):
            while chunk := await stream.receive_some():
                raw += chunk
    head_bytes, _, payload = raw.partition(b"\r\n\r\n")
    return int(head_bytes.split()[1]), head_bytes, payload


async def raw_request(url: str, head: str, data: bytes = b"") -> tuple[int, Any]:
    status, _, payload = await raw_response(url, head, data)
    return status, json.loads(payload)


async def metrics(url: str) -> str:
    """``GET /metrics`` as a scraper sends it (no token); the Prometheus text."""
    authority = url.removeprefix("http://")
    status, head, body = await raw_response(
        url, f"GET /metrics HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    assert status == 200
    assert b"content-type: text/plain; version=0.0.4" in head.lower()
    return body.decode()


async def request(
    url: str,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = API_TOKEN,
    host: str | None = None,
    content_type: str | None = "application/json",
    extra: tuple[str, ...] = (),
) -> tuple[int, Any]:
    """One HTTP/1.1 request as a well-behaved client sends it; each keyword spoils one part."""
    authority = url.removeprefix("http://")
    data = b"" if body is None else json.dumps(body).encode()
    lines = [f"{method} {path} HTTP/1.1", f"Host: {authority if host is None else host}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [*extra, f"Content-Length: {len(data)}", "Connection: close"]
    return await raw_request(url, "\r\n".join(lines) + "\r\n\r\n", data)


async def sign(api: str, account: str, message_hex: str, **kwargs: Any) -> tuple[int, Any]:
    return await request(
        api, "POST", "/v1/sign", {"account_id": account, "message_hex": message_hex}, **kwargs
    )


def gateway_toml(participant_file: Path, grpc_url: str, *, api: str = "") -> str:
    return f"""
[api]
listen = "tcp://127.0.0.1:0"
{api}
[events]
listen = "tcp://127.0.0.1:0"
[shares]
participant_files = ["{participant_file}"]
[prober]
interval_s = 0.5
evict_after_s = 5
[dev]
skip_attestation = true
[[node]]
id = "node-1"
address = "{grpc_url}"
events_token = "{NODE_TOKEN}"
"""


async def start_relay(
    nursery: trio.Nursery, gateway: GatewayHandle, path: Path, token: str | None
) -> str:
    """The parent's real relay in front of the gateway's events server, holding ``token``
    (what ``[relay] token`` in parent.toml gives it); returns its address for ``sse_via``."""
    origin = gateway.events_urls[0].rstrip("/")
    await nursery.start(
        functools.partial(
            serve_sse_relay,
            await open_listeners(f"unix://{path}"),
            [f"{origin}/v1/enclaves/"],
            ssl_context_for_upstream=ssl.create_default_context(),
            upstream_token=token,
        )
    )
    return f"unix://{path}"


async def test_gateway_signs_through_its_api(tmp_path: Path) -> None:
    gen = generate_share_files(tmp_path / "shares", 4)
    grpc_url = f"unix://{tmp_path}/enclave.sock"
    config = parse_gateway_config(
        gateway_toml(gen.participant_files[2], grpc_url, api=f'token = "{API_TOKEN}"')
    )
    record = json.loads(gen.service_file.read_text().splitlines()[1])
    account, group_key = record["account_id"], bytes.fromhex(record["group_public_key"])
    async with trio.open_nursery() as nursery:
        gateway = await nursery.start(serve_gateway, config)
        api = gateway.api_urls[0]
        relay = await start_relay(nursery, gateway, tmp_path / "relay.sock", NODE_TOKEN)
        await nursery.start(
            serve_dev_enclave,
            EnclaveConfig(
                grpc_listen=grpc_url,
                dev=True,
                dev_plaintext_shares=gen.service_file,
                gateway_url=gateway.events_urls[0].rstrip("/"),
                node_id="node-1",
                sse_via=relay,
            ),
        )
        status, body = await sign(api, account, "c0ffee")
        assert status == 200, body
        nacl.signing.VerifyKey(group_key).verify(
            bytes.fromhex("c0ffee"), bytes.fromhex(body["signature_hex"])
        )
        with trio.fail_after(30):  # the enclave has subscribed to our events
            while gateway.hub.subscribers("node-1") != 1:  # noqa: ASYNC110
                await trio.sleep(0.05)
        with trio.fail_after(30):  # the prober has seen the enclave (its first ping may fail)
            while not (await request(api, "GET", "/v1/nodes"))[1][0]["healthy"]:  # noqa: ASYNC110
                await trio.sleep(0.1)
        status, nodes = await request(api, "GET", "/v1/nodes")
        assert status == 200
        assert nodes == [
            {
                "id": "node-1",
                "healthy": True,
                "evicted": False,
                "attestation": "off",
                "subscribers": 1,
            }
        ]

        status, _ = await request(api, "POST", "/v1/nodes/node-1/freeze", {"account_id": account})
        assert status == 200
        with trio.fail_after(30):
            while (result := await sign(api, account, "00"))[0] == 200:  # noqa: ASYNC110
                await trio.sleep(0.05)
        status, body = result
        assert (status, body["reason"]) == (502, "enclave_refused")
        assert "frozen" in body["error"]
        await request(api, "POST", "/v1/nodes/node-1/unfreeze", {"account_id": account})
        with trio.fail_after(30):
            while (await sign(api, account, "01"))[0] != 200:  # noqa: ASYNC110
                await trio.sleep(0.05)

        # drain, then undrain (DESIGN §5): the enclave refuses new sessions, then takes them.
        assert (await request(api, "POST", "/v1/nodes/node-1/drain", {}))[0] == 200
        with trio.fail_after(30):
            while (await sign(api, account, "02"))[0] == 200:  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert (await request(api, "POST", "/v1/nodes/node-1/undrain", {}))[0] == 200
        with trio.fail_after(30):
            while (await sign(api, account, "03"))[0] != 200:  # noqa: ASYNC110
                await trio.sleep(0.1)

        text = await metrics(api)
        assert 'trio_sign_gateway_sign_requests_total{outcome="unknown_account"}' not in text
        signed = next(
            line
            for line in text.splitlines()
            if line.startswith('trio_sign_gateway_sign_requests_total{outcome="signed"}')
        )
        assert int(signed.rsplit(" ", 1)[1]) >= 3
        assert "trio_sign_gateway_nodes_known 1\n" in text
        assert "trio_sign_gateway_nodes_unattested 1\n" in text
        assert "trio_sign_gateway_sse_subscribers 1\n" in text
        assert "trio_sign_gateway_sign_duration_seconds_count " in text

        assert (await sign(api, "nobody", "00"))[0] == 404
        assert (await request(api, "POST", "/v1/sign", {"account_id": "x"}))[0] == 400
        assert (await request(api, "POST", "/v1/sign", [1, 2]))[0] == 400
        assert (await request(api, "GET", "/nope"))[0] == 404
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[shares]\nparticipant_files = []\n", "participant_files"),
        ('[shares]\nparticipant_files = ["p"]\n', r"\[\[node\]\]"),
        ('[shares]\nparticipant_files = ["p"]\n[[node]]\nid = "a b"\naddress = "x"\n', "id"),
        ('[shares]\nparticipant_files = ["p"]\n[[node]]\nid = "a"\n', "address is required"),
        ("[bogus]\n", "unknown section"),
        ('[api]\nlisen = "tcp://127.0.0.1:1"\n', r"\[api\] has unknown key 'lisen'"),
        ('[events]\nlisten = "x"\ncertfil = "c"\n', r"\[events\] has unknown key 'certfil'"),
        ("[prober]\ninterval = 1\n", r"\[prober\] has unknown key 'interval'"),
        ('[tls]\nca = "a"\ncert = "b"\nkey = "c"\nsni = "d"\n', r"\[tls\] has unknown key"),
        ('[shares]\nparticipant_file = ["p"]\n', r"\[shares\] has unknown key"),
        ('api = "x"\n', r"\[api\] must be a table"),
        (
            '[shares]\nparticipant_files = ["p"]\n[[node]]\nid = "a"\nadress = "x"\n',
            r"\[\[node\]\] #1 has unknown key 'adress'",
        ),
        ("[api", "not valid TOML"),
    ],
)
def test_config_errors(text: str, message: str) -> None:
    with pytest.raises(GatewayConfigError, match=message):
        parse_gateway_config(text)


# -- the sign API's defences (DESIGN §16) ------------------------------------------------------


def published_by_the_api(gateway: GatewayHandle) -> list[str]:
    """Event types the API published to node-1 (the prober's probes left out)."""
    node = gateway.hub._nodes.get("node-1")
    return [e.type for e in node.buffer if e.type != "probe"] if node is not None else []


@pytest.fixture
async def idle_gateway(tmp_path: Path, nursery: trio.Nursery) -> GatewayHandle:
    """A gateway whose node is not running: requests that pass the checks fail later (503)."""
    gen = generate_share_files(tmp_path / "shares", 1)
    config = parse_gateway_config(
        gateway_toml(
            gen.participant_files[2], f"unix://{tmp_path}/none.sock", api=f'token = "{API_TOKEN}"'
        )
    )
    handle: GatewayHandle = await nursery.start(serve_gateway, config)
    return handle


async def test_a_well_formed_request_passes_the_checks(idle_gateway: GatewayHandle) -> None:
    api = idle_gateway.api_urls[0]
    port = api.rsplit(":", 1)[1]
    assert (await sign(api, "acct", "00"))[0] == 404  # unknown account: past every check
    for host in (f"localhost:{port}", f"LOCALHOST:{port}", f"127.0.0.1:{port}"):
        assert (await sign(api, "acct", "00", host=host))[0] == 404
    same_origin = (f"Origin: http://127.0.0.1:{port}",)
    assert (await sign(api, "acct", "00", extra=same_origin))[0] == 404
    json_utf8 = "application/json; charset=utf-8"
    assert (await sign(api, "acct", "00", content_type=json_utf8))[0] == 404
    assert (await request(api, "GET", "/healthz", token=None, content_type=None))[0] == 200
    assert (await request(api, "POST", "/v1/nodes/node-1/drain", {}))[0] == 200
    assert (await request(api, "POST", "/v1/nodes/node-1/undrain", {}))[0] == 200
    assert published_by_the_api(idle_gateway) == ["drain", "undrain"]


async def test_metrics_count_sign_requests_by_outcome_without_a_token(
    idle_gateway: GatewayHandle,
) -> None:
    api = idle_gateway.api_urls[0]
    assert (await sign(api, "acct", "00"))[0] == 404
    assert (await sign(api, "acct", "zz"))[0] == 400
    assert (await request(api, "POST", "/v1/sign", {"account_id": "x"}))[0] == 400
    text = await metrics(api)
    assert (
        "# TYPE trio_sign_gateway_sign_requests_total counter\n"
        'trio_sign_gateway_sign_requests_total{outcome="unknown_account"} 1\n'
        'trio_sign_gateway_sign_requests_total{outcome="bad_request"} 2\n'
    ) in text
    assert "trio_sign_gateway_nodes_known 1\n" in text
    assert "trio_sign_gateway_sse_subscribers 0\n" in text
    assert 'trio_sign_gateway_sse_refusals_total{reason="unauthorized"} 0\n' in text
    assert f'trio_sign_build_info{{component="gateway",version="{__version__}"}} 1\n' in text
    # Host and Origin are still checked; nothing secret is in it.
    assert API_TOKEN not in text
    assert (await request(api, "GET", "/metrics", token=None, host="evil.example"))[0] == 421


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
async def test_a_post_that_is_not_json_is_415(
    idle_gateway: GatewayHandle, content_type: str | None
) -> None:
    """A page can send a "simple" cross-site POST (text/plain, forms) without a preflight; the
    API takes none of them, even when the body is JSON."""
    api = idle_gateway.api_urls[0]
    status, body = await sign(api, "acct", "00", content_type=content_type)
    assert status == 415, body
    for path in ("/v1/nodes/node-1/drain", "/v1/nodes/node-1/freeze"):
        status, _ = await request(api, "POST", path, {"account_id": "a"}, content_type="text/plain")
        assert status == 415
    assert not published_by_the_api(idle_gateway)


@pytest.mark.parametrize(
    "origin",
    ["http://evil.example", "null", "http://127.0.0.1:1", "https://localhost.evil.example", "x"],
)
async def test_a_foreign_origin_is_403(idle_gateway: GatewayHandle, origin: str) -> None:
    api = idle_gateway.api_urls[0]
    status, body = await sign(api, "acct", "00", extra=(f"Origin: {origin}",))
    assert status == 403, body
    status, _ = await request(
        api, "POST", "/v1/nodes/node-1/drain", {}, extra=(f"Origin: {origin}",)
    )
    assert status == 403
    assert not published_by_the_api(idle_gateway)


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:{port}", "127.0.0.1:1", "localhost", "[::1]:1", ""]
)
async def test_a_foreign_host_is_refused(idle_gateway: GatewayHandle, host: str) -> None:
    """DNS rebinding: a page on evil.example whose name now points at 127.0.0.1 sends
    ``Host: evil.example:PORT``; it is refused before the token is even looked at."""
    api = idle_gateway.api_urls[0]
    port = api.rsplit(":", 1)[1]
    status, body = await sign(api, "acct", "00", host=host.format(port=port))
    assert status == 421, body
    assert (await request(api, "GET", "/v1/nodes", host=host.format(port=port)))[0] == 421


@pytest.mark.parametrize(
    "authorization",
    [None, f"Bearer {API_TOKEN}x", f"Bearer {API_TOKEN[:-1]}", f"Basic {API_TOKEN}", "Bearer"],
)
async def test_a_missing_or_wrong_api_token_is_401(
    idle_gateway: GatewayHandle, authorization: str | None
) -> None:
    api = idle_gateway.api_urls[0]
    extra = () if authorization is None else (f"Authorization: {authorization}",)
    status, body = await sign(api, "acct", "00", token=None, extra=extra)
    assert (status, body) == (401, {"error": "unauthorized"})
    assert (await request(api, "GET", "/v1/nodes", token=None, extra=extra))[0] == 401
    status, _ = await request(api, "POST", "/v1/nodes/node-1/drain", {}, token=None, extra=extra)
    assert status == 401
    assert not published_by_the_api(idle_gateway)


async def test_two_authorization_headers_are_401(idle_gateway: GatewayHandle) -> None:
    api = idle_gateway.api_urls[0]
    status, _ = await sign(api, "acct", "00", extra=(f"Authorization: Bearer {API_TOKEN}",))
    assert status == 401


async def test_configured_allowed_hosts_replace_the_defaults(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    gen = generate_share_files(tmp_path / "shares", 1)
    api_section = f'token = "{API_TOKEN}"\nallowed_hosts = ["Gateway.Internal:8443"]'
    config = parse_gateway_config(
        gateway_toml(gen.participant_files[2], f"unix://{tmp_path}/none.sock", api=api_section)
    )
    assert config.api_allowed_hosts == ("gateway.internal:8443",)
    gateway: GatewayHandle = await nursery.start(serve_gateway, config)
    api = gateway.api_urls[0]
    assert (await sign(api, "acct", "00", host="gateway.internal:8443"))[0] == 404
    assert (await sign(api, "acct", "00"))[0] == 421  # 127.0.0.1:PORT is not listed now
    origin = ("Origin: https://gateway.internal:8443",)
    assert (await sign(api, "acct", "00", host="gateway.internal:8443", extra=origin))[0] == 404


async def test_without_a_configured_token_one_is_generated_into_a_0600_file(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gen = generate_share_files(tmp_path / "shares", 1)
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    config = parse_gateway_config(
        gateway_toml(gen.participant_files[2], f"unix://{tmp_path}/none.sock"), base=conf_dir
    )
    assert config.api_token is None
    gateway: GatewayHandle = await nursery.start(serve_gateway, config)
    token_file = conf_dir / "gateway-api.token"
    assert gateway.api_token_file == token_file
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    token = token_file.read_text().strip()
    assert token == gateway.api_token
    api = gateway.api_urls[0]
    assert (await sign(api, "acct", "00", token=token))[0] == 404
    assert (await sign(api, "acct", "00"))[0] == 401
    assert str(token_file) in caplog.text
    assert token not in caplog.text
    assert NODE_TOKEN not in caplog.text
    assert token not in repr(gateway)
    assert NODE_TOKEN not in repr(config)

    # The next start uses the same file (clients keep working); a bad one is a clear error.
    again: GatewayHandle = await nursery.start(serve_gateway, config)
    assert again.api_token == token
    token_file.write_text("not a token\n")
    with pytest.raises(GatewayConfigError, match=r"^\[api\] token_file: .* must hold 16 to"):
        await serve_gateway(config)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('token = "short"', r"^\[api\] token must be 16 to 1024 characters"),
        ("token = 7", r"^\[api\] token must be"),
        ('allowed_hosts = "localhost"', r"^\[api\] allowed_hosts must be a list"),
        ('allowed_hosts = ["a b"]', r"^\[api\] allowed_hosts must be a list"),
        ("token_file = 3", r"^\[api\] token_file must be a non-empty string"),
    ],
)
def test_api_config_errors(tmp_path: Path, section: str, message: str) -> None:
    with pytest.raises(GatewayConfigError, match=message) as info:
        parse_gateway_config(gateway_toml(tmp_path / "p", "unix:///x", api=section))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("token_line", "message"),
    [
        ("", r"^\[\[node\]\] n: events_token is required"),
        ('events_token = "short"', r"^\[\[node\]\] n: events_token must be 16 to 1024"),
        ("events_token = 1", r"^\[\[node\]\] n: events_token must be"),
    ],
)
def test_node_token_config_errors(token_line: str, message: str) -> None:
    text = f'[shares]\nparticipant_files = ["p"]\n[[node]]\nid = "n"\naddress = "x"\n{token_line}\n'
    with pytest.raises(GatewayConfigError, match=message) as info:
        parse_gateway_config(text)
    assert "short" not in str(info.value)


def test_the_gateway_command_exits_2_naming_an_unknown_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``[api] lisen`` once silently served on the default port; now nothing starts."""
    from trio_sign.cli._main import main

    config = tmp_path / "gateway.toml"
    config.write_text('[api]\nlisen = "tcp://127.0.0.1:9"\n')
    assert main(["gateway", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "[api] has unknown key 'lisen'" in err
