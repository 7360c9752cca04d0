"""`trio-sign gateway` as a process tree: the sign API over HTTP against a dev enclave that
subscribes to the gateway's own event server; freeze/unfreeze through the API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import trio

from trio_sign.enclave import EnclaveConfig, serve_dev_enclave
from trio_sign.gateway import GatewayConfigError, parse_gateway_config, serve_gateway
from trio_sign.testing import generate_share_files


async def request(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    data = b"" if body is None else json.dumps(body).encode()
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(
            f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        raw = b""
        with trio.fail_after(30):
            while chunk := await stream.receive_some():
                raw += chunk
    head, _, payload = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


async def sign(api: str, account: str, message_hex: str) -> tuple[int, Any]:
    return await request(
        api, "POST", "/v1/sign", {"account_id": account, "message_hex": message_hex}
    )


async def test_gateway_signs_through_its_api(tmp_path: Path) -> None:
    gen = generate_share_files(tmp_path / "shares", 4)
    grpc_url = f"unix://{tmp_path}/enclave.sock"
    config = parse_gateway_config(
        f"""
[api]
listen = "tcp://127.0.0.1:0"
[events]
listen = "tcp://127.0.0.1:0"
[shares]
participant_files = ["{gen.participant_files[2]}"]
[prober]
interval_s = 0.5
evict_after_s = 5
[[node]]
id = "node-1"
address = "{grpc_url}"
"""
    )
    record = json.loads(gen.service_file.read_text().splitlines()[1])
    account, group_key = record["account_id"], bytes.fromhex(record["group_public_key"])
    async with trio.open_nursery() as nursery:
        gateway = await nursery.start(serve_gateway, config)
        api = gateway.api_urls[0]
        await nursery.start(
            serve_dev_enclave,
            EnclaveConfig(
                grpc_listen=grpc_url,
                dev=True,
                dev_plaintext_shares=gen.service_file,
                gateway_url=gateway.events_urls[0].rstrip("/"),
                node_id="node-1",
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
        assert nodes == [{"id": "node-1", "healthy": True, "evicted": False, "subscribers": 1}]

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
        ("[api", "not valid TOML"),
    ],
)
def test_config_errors(text: str, message: str) -> None:
    with pytest.raises(GatewayConfigError, match=message):
        parse_gateway_config(text)
