"""The gateway side of the attested channel (issue 13, deliverable 4): every node connection of
the reference gateway is an attested channel by default, checked against the node's pins in
gateway.toml; a refused check is an alert, counted in /metrics, and the node is evicted at
once and not used; it is used again once a new connection passes. ``[dev] skip_attestation``
is the only way around it, and it says so."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_sign.gateway import (
    EnclaveNode,
    GatewayConfigError,
    GatewayHandle,
    parse_gateway_config,
    run_prober,
    serve_gateway,
)
from trio_sign.gateway._service import make_nodes
from trio_sign.nitro import DEFAULT_LOCAL_PCRS, LocalNsm
from trio_sign.testing import generate_share_files
from trio_sign.transport import open_listeners

from .attested_helpers import (
    CONFIG,
    OLD_SHARES,
    SHARES,
    FakeEnclave,
    GatewayPki,
    policy,
)
from .test_gateway_service import API_TOKEN, metrics, request

INTERVAL = 5.0
PCRS_TOML = "{ " + ", ".join(f'PCR{i} = "{v.hex()}"' for i, v in DEFAULT_LOCAL_PCRS.items()) + " }"


@pytest.fixture(scope="module")
def nsm() -> Iterator[LocalNsm]:
    local = LocalNsm()
    yield local
    local.close()


@pytest.fixture(scope="module")
def pki() -> GatewayPki:
    return GatewayPki.make()


def attested_node(
    enclave: FakeEnclave, pki: GatewayPki, nsm: LocalNsm, nursery: trio.Nursery
) -> EnclaveNode:
    """A node whose connections reach ``enclave`` over memory streams."""
    from trio_sign.attested import make_attested_client_context

    async def connector(address: str) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(enclave.serve_tls, server)
        return client

    return EnclaveNode(
        "node-1",
        "memory://enclave",
        ssl_context=make_attested_client_context(pki.client_cert, pki.client_key),
        attestation=policy(root_pem=nsm.root_pem, config=CONFIG),
        connector=connector,
    )


def _alerts(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str | None]]:
    return [
        (r.__dict__["alert"], r.__dict__.get("reason"))
        for r in caplog.records
        if "alert" in r.__dict__
    ]


async def test_a_node_that_fails_its_check_is_evicted_at_once_and_readmitted_once_it_passes(
    autojump_clock: trio.testing.MockClock,
    nsm: LocalNsm,
    pki: GatewayPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trio_sign.gateway")
    enclave = FakeEnclave(nsm, pki.ca.pem)
    async with trio.open_nursery() as nursery:
        node = attested_node(enclave, pki, nsm, nursery)
        await nursery.start(node.run)
        assert node.attestation == "pending"
        await nursery.start(
            functools.partial(run_prober, [node], interval_s=INTERVAL, evict_after_s=60.0)
        )
        assert (node.healthy, node.evicted, node.attestation) == (True, False, "verified")
        assert enclave.calls == ["GetAttestation", "Ping"]
        assert node.verified is not None
        assert node.verified.binding.shares == SHARES

        # The parent restarts the enclave on last month's bundle: a rollback.
        await enclave.reboot(shares=OLD_SHARES)
        enclave.calls.clear()
        await trio.sleep(INTERVAL)  # the next round reconnects and the check refuses
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == INTERVAL
        assert (node.healthy, node.evicted, node.attestation) == (False, True, "shares_mismatch")
        assert node.failing_since == INTERVAL  # evicted at once, not after evict_after_s (60)
        assert enclave.calls == ["GetAttestation"]  # nothing else was sent to it
        assert node.attestation_failures == {"shares_mismatch": 1}
        assert ("node_attestation_failed", "shares_mismatch") in _alerts(caplog)

        await trio.sleep(INTERVAL)  # still refused: counted, warned, no second alert
        await trio.testing.wait_all_tasks_blocked()
        assert node.attestation_failures == {"shares_mismatch": 2}
        assert _alerts(caplog).count(("node_attestation_failed", "shares_mismatch")) == 1
        assert enclave.calls == ["GetAttestation", "GetAttestation"]

        # The right bundle again: the next round's connection passes and re-admits the node.
        await enclave.reboot(shares=SHARES)
        enclave.calls.clear()
        await trio.sleep(INTERVAL)
        await trio.testing.wait_all_tasks_blocked()
        assert (node.healthy, node.evicted, node.attestation) == (True, False, "verified")
        assert node.last_ok == 3 * INTERVAL
        assert enclave.calls == ["GetAttestation", "Ping"]
        assert ("node_readmitted", None) in _alerts(caplog)
        assert node.attestations_verified == 2
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("what", ["debug", "other root"])
async def test_a_node_failing_other_checks_is_refused_with_their_reason(
    autojump_clock: trio.testing.MockClock, nsm: LocalNsm, pki: GatewayPki, what: str
) -> None:
    if what == "debug":
        other = LocalNsm(root_key=nsm._root.key, root_cert=nsm.root_certificate, debug=True)
        reason = "debug_mode"
    else:
        other = LocalNsm()
        reason = "chain_untrusted"
    enclave = FakeEnclave(other, pki.ca.pem)
    async with trio.open_nursery() as nursery:
        node = attested_node(enclave, pki, nsm, nursery)
        await nursery.start(node.run)
        await nursery.start(
            functools.partial(run_prober, [node], interval_s=INTERVAL, evict_after_s=60.0)
        )
        assert (node.evicted, node.attestation) == (True, reason)
        assert enclave.calls == ["GetAttestation"]
        nursery.cancel_scope.cancel()


async def test_an_unreachable_node_is_a_probe_failure_not_an_alert(
    autojump_clock: trio.testing.MockClock,
    nsm: LocalNsm,
    pki: GatewayPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stranger's client certificate: the enclave refuses the handshake. That is a
    connection failure (the prober evicts after evict_after_s), not a refused proof."""
    caplog.set_level(logging.INFO, logger="trio_sign.gateway")
    enclave = FakeEnclave(nsm, GatewayPki.make().ca.pem)
    async with trio.open_nursery() as nursery:
        node = attested_node(enclave, pki, nsm, nursery)
        await nursery.start(node.run)
        await nursery.start(
            functools.partial(run_prober, [node], interval_s=INTERVAL, evict_after_s=10.0)
        )
        assert (node.healthy, node.evicted, node.attestation) == (False, False, "pending")
        assert node.attestation_failures == {}
        await trio.sleep(2 * INTERVAL)
        await trio.testing.wait_all_tasks_blocked()
        assert node.evicted
        assert ("node_evicted", "rpc_unavailable") in _alerts(caplog)
        assert not [a for a in _alerts(caplog) if a[0] == "node_attestation_failed"]
        nursery.cancel_scope.cancel()


# -- gateway.toml ------------------------------------------------------------------------------


def _toml(participant: Path, *, tls: str, nodes: str, extra: str = "") -> str:
    # [shares] participant_files is development only (issue 17): allowed by [dev] share_files
    if "[dev]" in extra:
        extra = extra.replace("[dev]", "[dev]\nshare_files = true", 1)
    else:
        extra += "\n[dev]\nshare_files = true\n"
    return f"""
[api]
listen = "tcp://127.0.0.1:0"
token = "{API_TOKEN}"
[events]
listen = "tcp://127.0.0.1:0"
[shares]
participant_files = ["{participant}"]
[prober]
interval_s = 0.2
evict_after_s = 30
{tls}
{extra}
{nodes}
"""


def _node(address: str = "unix:///x", **keys: str) -> str:
    lines = [
        "[[node]]",
        'id = "node-1"',
        f'address = "{address}"',
        'events_token = "node-1-events-token-0123456789abcdef"',
    ]
    lines += [f"{k} = {v}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def _write_pki(tmp_path: Path, pki: GatewayPki, nsm: LocalNsm) -> str:
    (tmp_path / "gateway.pem").write_bytes(pki.client_cert)
    (tmp_path / "gateway.key").write_bytes(pki.client_key)
    (tmp_path / "root.pem").write_bytes(nsm.root_pem)
    pcrs = {f"PCR{i}": v.hex() for i, v in DEFAULT_LOCAL_PCRS.items()}
    (tmp_path / "pcrs.json").write_text(json.dumps({"Measurements": pcrs}))
    return '[tls]\ncert = "gateway.pem"\nkey = "gateway.key"\n'


def test_attested_is_the_default_mode_and_each_node_gets_its_pins(
    tmp_path: Path, pki: GatewayPki, nsm: LocalNsm
) -> None:
    tls = _write_pki(tmp_path, pki, nsm)
    text = _toml(
        tmp_path / "p",
        tls=tls,
        extra='[attestation]\nroot = "root.pem"\npcrs = "pcrs.json"\nmax_age_s = 30\n',
        nodes=_node(shares_sha256=f'"{SHARES.hex()}"', config_sha256=f'"{CONFIG.hex()}"')
        + _node(shares_sha256=f'"{OLD_SHARES.hex().upper()}"', pcrs=PCRS_TOML).replace(
            '"node-1"', '"node-2"'
        ),
    )
    config = parse_gateway_config(text, base=tmp_path)
    assert (config.tls_mode, config.attested) == ("attested", True)
    nodes = make_nodes(config)
    assert [n.attested for n in nodes] == [True, True]
    assert [n.attestation for n in nodes] == ["pending", "pending"]
    one, two = (n._policy for n in nodes)
    assert one is not None
    assert two is not None
    assert (one.shares_sha256, one.config_sha256, one.max_age_s) == (SHARES, CONFIG, 30.0)
    assert (two.shares_sha256, two.config_sha256) == (OLD_SHARES, None)
    assert one.root_pem == two.root_pem == nsm.root_pem
    assert dict(one.pcrs) == dict(two.pcrs) == dict(DEFAULT_LOCAL_PCRS)


@pytest.mark.parametrize(
    ("tls", "nodes", "extra", "message"),
    [
        ("", _node(), "", r"^\[tls\] is required: .*\[dev\] skip_attestation = true"),
        ("TLS", _node(), "", r"^\[\[node\]\] node-1: shares_sha256 is required"),
        ("TLS", _node(shares_sha256=f'"{SHARES.hex()}"'), "", r"no PCRs pinned"),
        ("TLS", _node(shares_sha256='"abc"'), "", r"shares_sha256 must be 64 hex digits"),
        ("TLS", _node(config_sha256="7"), "", r"config_sha256 must be 64 hex digits"),
        ("TLS", _node(pcrs='{ PCR0 = "00" }'), "", r"pcrs: PCR0 is 1 bytes"),
        ("TLS", _node(pcrs="3"), "", r"pcrs must be a table"),
        ("TLS", _node(root="3"), "", r"root must be the path"),
        ("", _node(), "[dev]\nskip_attestation = 1", r"skip_attestation must be true or false"),
        ("", _node(), "[dev]\nskip = true", r"\[dev\] has unknown key 'skip'"),
        ("", _node(), "[attestation]\npcr = 1", r"\[attestation\] has unknown key 'pcr'"),
        ("", _node(), "[attestation]\nmax_age_s = 0", r"max_age_s must be a positive"),
    ],
)
def test_config_errors(
    tmp_path: Path, pki: GatewayPki, nsm: LocalNsm, tls: str, nodes: str, extra: str, message: str
) -> None:
    tls = tls.replace("TLS", _write_pki(tmp_path, pki, nsm))
    if "[attestation]" in extra:
        extra = "[dev]\nskip_attestation = true\n" + extra
    with pytest.raises(GatewayConfigError, match=message) as info:
        parse_gateway_config(_toml(tmp_path / "p", tls=tls, nodes=nodes, extra=extra))
    assert "\n" not in str(info.value)


def test_pins_that_make_no_policy_are_a_config_error_naming_the_node(
    tmp_path: Path, pki: GatewayPki, nsm: LocalNsm
) -> None:
    tls = _write_pki(tmp_path, pki, nsm)
    zeros = "{ PCR0 = '" + "00" * 48 + "', PCR1 = '" + "00" * 48 + "', PCR2 = '" + "00" * 48 + "' }"
    for pcrs, message in (
        (zeros, r"^\[\[node\]\] node-1: channel policy: .*debug-mode"),
        ('"missing.json"', r"^\[\[node\]\] node-1 pcrs: .*missing.json"),
        ('"pcrs.json"\nroot = "gateway.key"', r"^\[\[node\]\] node-1 root: .* not a PEM cert"),
        ('"pcrs.json"\nroot = "none.pem"', r"^\[\[node\]\] node-1 root: cannot read"),
    ):
        text = _toml(
            tmp_path / "p", tls=tls, nodes=_node(shares_sha256=f'"{SHARES.hex()}"', pcrs=pcrs)
        )
        config = parse_gateway_config(text, base=tmp_path)
        with pytest.raises(GatewayConfigError, match=message):
            make_nodes(config)


def test_skipping_attestation_says_so_loudly(
    tmp_path: Path, pki: GatewayPki, nsm: LocalNsm, caplog: pytest.LogCaptureFixture
) -> None:
    for tls, how in (("", "plain h2c"), (_write_pki(tmp_path, pki, nsm), "NOT verified")):
        caplog.clear()
        text = _toml(tmp_path / "p", tls=tls, nodes=_node(), extra="[dev]\nskip_attestation = true")
        config = parse_gateway_config(text, base=tmp_path)
        assert config.dev_skip_attestation
        assert not config.attested
        nodes = make_nodes(config)
        assert [(n.attested, n.attestation) for n in nodes] == [(False, "off")]
        [record] = [r for r in caplog.records if r.__dict__.get("alert") == "attestation_skipped"]
        assert record.levelno == logging.WARNING
        assert "DEVELOPMENT MODE" in record.getMessage()
        assert how in record.getMessage()


async def test_the_gateway_refuses_a_node_and_says_so_in_its_api_and_metrics(
    tmp_path: Path, pki: GatewayPki, nsm: LocalNsm, nursery: trio.Nursery
) -> None:
    """The process: gateway.toml pins, a real UNIX socket to the enclave double, the prober
    reconnecting; /v1/nodes and /metrics tell the story, and no session goes to the node."""
    enclave = FakeEnclave(nsm, pki.ca.pem, shares=OLD_SHARES)
    socket = tmp_path / "enclave.sock"
    listeners = await open_listeners(f"unix://{socket}")
    nursery.start_soon(functools.partial(trio.serve_listeners, enclave.serve_tls, listeners))
    gen = generate_share_files(tmp_path / "shares", 1)
    tls = _write_pki(tmp_path, pki, nsm)
    text = _toml(
        gen.participant_files[2],
        tls=tls,
        extra='[attestation]\nroot = "root.pem"\npcrs = "pcrs.json"\n',
        nodes=_node(f"unix://{socket}", shares_sha256=f'"{SHARES.hex()}"'),
    )
    gateway: GatewayHandle = await nursery.start(
        serve_gateway, parse_gateway_config(text, base=tmp_path)
    )
    api = gateway.api_urls[0]
    _, nodes = await request(api, "GET", "/v1/nodes")
    assert [(n["evicted"], n["attestation"]) for n in nodes] == [(True, "shares_mismatch")]
    assert enclave.calls == ["GetAttestation"]
    account = json.loads(gen.service_file.read_text().splitlines()[1])["account_id"]
    status, body = await request(
        api, "POST", "/v1/sign", {"account_id": account, "message_hex": "00"}
    )
    assert (status, body["reason"]) == (503, "no_healthy_node")
    assert "Commit" not in enclave.calls
    text_metrics = await metrics(api)
    assert 'trio_sign_gateway_attestation_failures_total{reason="shares_mismatch"} ' in text_metrics
    assert "trio_sign_gateway_nodes_evicted 1\n" in text_metrics
    assert "trio_sign_gateway_nodes_unattested 0\n" in text_metrics

    await enclave.reboot(shares=SHARES)
    with trio.fail_after(30):
        while (await request(api, "GET", "/v1/nodes"))[1][0]["attestation"] != "verified":  # noqa: ASYNC110
            await trio.sleep(0.05)
    text_metrics = await metrics(api)
    assert "trio_sign_gateway_attestations_verified_total 1\n" in text_metrics


async def test_an_enclave_that_never_answers_its_attestation_is_timed_out_not_used(
    autojump_clock: trio.testing.MockClock, nsm: LocalNsm, pki: GatewayPki
) -> None:
    """The check is bounded (attest_timeout_s, and the prober's round): a node whose enclave
    takes the handshake and never answers GetAttestation fails its rounds, is never sent
    anything else, and leaves no connection behind."""
    enclave = FakeEnclave(nsm, pki.ca.pem)
    hung = trio.Event()

    async def never(request: object, context: object) -> object:
        hung.set()
        await trio.sleep_forever()

    enclave.server = type(enclave.server)(
        {**enclave.handlers(), "/trio_sign.v1.SignService/GetAttestation": never}  # type: ignore[dict-item]
    )
    async with trio.open_nursery() as nursery:
        node = attested_node(enclave, pki, nsm, nursery)
        await nursery.start(node.run)
        await nursery.start(
            functools.partial(run_prober, [node], interval_s=INTERVAL, evict_after_s=10.0)
        )
        assert hung.is_set()
        assert trio.current_time() == INTERVAL  # the round's deadline ended the check
        assert (node.healthy, node.attestation, node.attestation_failures) == (
            False,
            "pending",
            {},
        )
        await trio.testing.wait_all_tasks_blocked()
        # The cancelled check closed its connection: only the next round's is open.
        assert (enclave.handshakes, enclave.server.connection_count) == (2, 1)
        assert enclave.calls == []
        await trio.sleep(2 * INTERVAL)
        await trio.testing.wait_all_tasks_blocked()
        assert node.evicted
        assert enclave.calls == []
        nursery.cancel_scope.cancel()


async def test_no_session_goes_to_a_refused_node_and_it_signs_again_once_it_passes(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, nsm: LocalNsm, pki: GatewayPki
) -> None:
    """Real FROST behind the double's attested TLS: the coordinator sends a refused node
    nothing (no_healthy_node), and signs through it once a new connection passes."""
    import nacl.signing

    from trio_sign.enclave._pool import SessionPool
    from trio_sign.enclave._service import SignService
    from trio_sign.gateway import Coordinator, GatewayError, load_participant_files
    from trio_sign.shares import ShareStore

    gen = generate_share_files(tmp_path / "shares", 2)
    with gen.service_file.open("rb") as f:
        store = ShareStore.load_plaintext(f)
    record = json.loads(gen.service_file.read_text().splitlines()[1])
    account, group_key = record["account_id"], bytes.fromhex(record["group_public_key"])
    service = SignService(store, SessionPool(store.get))
    enclave = FakeEnclave(nsm, pki.ca.pem, shares=OLD_SHARES, service=service.handlers())
    counterparts = load_participant_files([gen.participant_files[2]])
    async with trio.open_nursery() as nursery:
        node = attested_node(enclave, pki, nsm, nursery)
        await nursery.start(node.run)
        await nursery.start(
            functools.partial(run_prober, [node], interval_s=INTERVAL, evict_after_s=60.0)
        )
        coordinator = Coordinator([node], counterparts)
        assert node.evicted
        with pytest.raises(GatewayError) as info:
            await coordinator.sign_message(account, b"pay 1")
        assert info.value.reason == "no_healthy_node"
        assert enclave.calls == ["GetAttestation"]

        await enclave.reboot(shares=SHARES)
        await trio.sleep(INTERVAL)
        await trio.testing.wait_all_tasks_blocked()
        assert (node.evicted, node.attestation) == (False, "verified")
        signature = await coordinator.sign_message(account, b"pay 1")
        nacl.signing.VerifyKey(group_key).verify(b"pay 1", signature)
        assert enclave.calls[-2:] == ["Commit", "Sign"]
        assert enclave.calls.count("GetAttestation") == 2  # one per connection, first on each
        nursery.cancel_scope.cancel()
    store.close()
