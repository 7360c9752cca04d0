"""``trio_sign.ops``: the KMS key policy and the parent's IAM policy rendered from the EIF's
PCRs (checked statically, by a small IAM evaluator and by the local KMS), and enclave memory
sizing for the Nitro allocator."""

from __future__ import annotations

import base64
import fnmatch
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from trio_sign.kms import KeyPolicy, KeyStore, LocalKms
from trio_sign.nitro import DEFAULT_LOCAL_PCRS, EphemeralRecipientKey, LocalNsm
from trio_sign.ops import (
    PolicyRenderError,
    SizingError,
    allocator_yaml,
    bundle_accounts,
    enclave_memory_mib,
    load_pcrs,
    local_kms_policy,
    main,
    render_key_policy,
    render_parent_iam_policy,
)
from trio_sign.shares import DevKeyFile, seal_file
from trio_sign.testing import generate_share_files, service_file_name

POLICIES = Path(__file__).resolve().parent.parent / "enclave_image" / "policies"
ACCOUNT = "111122223333"
PARENT = f"arn:aws:iam::{ACCOUNT}:role/trio-sign-parent"
ADMIN = f"arn:aws:iam::{ACCOUNT}:role/kms-admin"
SEALER = f"arn:aws:iam::{ACCOUNT}:role/trio-sign-ceremony"
PCRS = {i: DEFAULT_LOCAL_PCRS[i].hex() for i in (0, 1, 2)}
IMAGE_KEY = "kms:RecipientAttestation:ImageSha384"
MIB = 1024 * 1024


def test_exports() -> None:
    import trio_sign.ops as ops

    assert sorted(ops.__all__) == sorted(set(ops.__all__))
    for name in ops.__all__:
        assert hasattr(ops, name)
    public = {a for a in vars(ops) if not a.startswith("_")}
    modules = {a for a in public if type(getattr(ops, a)).__name__ == "module"}
    assert public - modules - {"annotations"} <= set(ops.__all__)


# -- a small IAM evaluator (independent of trio_sign.kms's) -----------------------------------


def _list(value: Any) -> list[Any]:
    return [value] if isinstance(value, str) else list(value)


def _principal_matches(statement: Mapping[str, Any], principal: str) -> bool:
    aws = _list(statement["Principal"]["AWS"])
    return principal in aws or "*" in aws


def _action_matches(statement: Mapping[str, Any], action: str) -> bool:
    return any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in _list(statement["Action"]))


def _conditions_hold(statement: Mapping[str, Any], context: Mapping[str, str]) -> bool:
    ctx = {k.lower(): v for k, v in context.items()}
    for operator, pairs in statement.get("Condition", {}).items():
        for key, values in pairs.items():
            got = ctx.get(key.lower())
            if operator == "Null":
                if (got is None) != (values == "true"):
                    return False
            elif operator == "StringEqualsIgnoreCase":
                if got is None or got.lower() not in [v.lower() for v in _list(values)]:
                    return False
            elif operator == "StringEquals":
                if got is None or got not in _list(values):
                    return False
            else:
                raise AssertionError(f"operator {operator} not modelled")
    return True


def evaluate(policy: Mapping[str, Any], principal: str, action: str, ctx: Mapping[str, str]) -> str:
    """IAM's rule for one policy: an explicit Deny wins, else some Allow, else implicit deny."""
    verdict = "implicit-deny"
    for st in policy["Statement"]:
        if not (_principal_matches(st, principal) and _action_matches(st, action)):
            continue
        if not _conditions_hold(st, ctx):
            continue
        if st["Effect"] == "Deny":
            return "deny"
        verdict = "allow"
    return verdict


def attested(pcrs: Mapping[int, str]) -> dict[str, str]:
    """The condition keys KMS sets for a Recipient request with these PCRs (upper-case hex,
    to exercise the case-insensitive comparison)."""
    ctx = {f"kms:RecipientAttestation:PCR{i}": v.upper() for i, v in pcrs.items()}
    ctx[IMAGE_KEY] = pcrs[0].upper()
    return ctx


def policy(**kwargs: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "account": ACCOUNT,
        "parent_role_arn": PARENT,
        "admin_role_arn": ADMIN,
        "sealing_role_arn": SEALER,
    }
    args.update(kwargs)
    pcrs = args.pop("pcrs", PCRS)
    return render_key_policy(pcrs, **args)


# -- key policy --------------------------------------------------------------------------------


@pytest.mark.parametrize("pcrs", [PCRS, {**PCRS, 8: "8c" * 48}], ids=["unsigned", "signed"])
def test_parent_has_no_unconditional_decrypt(pcrs: dict[int, str]) -> None:
    doc = policy(pcrs=pcrs)
    text = json.dumps(doc)
    assert '"kms:*"' not in text
    assert ":root" not in text
    expected = {IMAGE_KEY: pcrs[0]}
    expected.update({f"kms:RecipientAttestation:PCR{i}": pcrs[i] for i in pcrs if i != 0})
    allows = [
        st
        for st in doc["Statement"]
        if st["Effect"] == "Allow"
        and _principal_matches(st, PARENT)
        and _action_matches(st, "kms:Decrypt")
    ]
    assert allows, "the parent must be able to Decrypt with attestation"
    for st in allows:
        assert st["Condition"] == {"StringEqualsIgnoreCase": expected}
        assert _list(st["Action"]) == ["kms:Decrypt"]
    # every Allow for the parent is this one statement: no GenerateDataKey, no kms:*
    parent_allows = [s for s in doc["Statement"] if s["Effect"] == "Allow" and
                     _principal_matches(s, PARENT)]  # fmt: skip
    assert parent_allows == allows
    # the belt-and-braces Deny
    denies = [
        st
        for st in doc["Statement"]
        if st["Effect"] == "Deny"
        and _principal_matches(st, PARENT)
        and _action_matches(st, "kms:Decrypt")
    ]
    assert [d["Condition"] for d in denies] == [{"Null": {IMAGE_KEY: "true"}}]


def test_key_policy_semantics() -> None:
    doc = policy(pcrs={**PCRS, 8: "8c" * 48})
    good = attested({**PCRS, 8: "8c" * 48})
    # the parent: Decrypt only with the exact measurements
    assert evaluate(doc, PARENT, "kms:Decrypt", good) == "allow"
    assert evaluate(doc, PARENT, "kms:Decrypt", {}) == "deny"
    for index in (0, 1, 2, 8):
        wrong = attested({**PCRS, 8: "8c" * 48, index: "ab" * 48})
        assert evaluate(doc, PARENT, "kms:Decrypt", wrong) != "allow", index
    debug = attested({0: "00" * 48, 1: "00" * 48, 2: "00" * 48, 8: "8c" * 48})
    assert evaluate(doc, PARENT, "kms:Decrypt", debug) != "allow"
    no_pcr8 = {k: v for k, v in good.items() if not k.endswith("PCR8")}
    assert evaluate(doc, PARENT, "kms:Decrypt", no_pcr8) != "allow"
    for action in ("kms:GenerateDataKey", "kms:Encrypt", "kms:ReEncryptFrom", "kms:CreateGrant",
                   "kms:PutKeyPolicy"):  # fmt: skip
        assert evaluate(doc, PARENT, action, good) != "allow", action
    # the admin manages the key and has no cryptographic operation; nobody creates grants
    assert evaluate(doc, ADMIN, "kms:PutKeyPolicy", {}) == "allow"
    assert evaluate(doc, ADMIN, "kms:ScheduleKeyDeletion", {}) == "allow"
    for action in ("kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:ReEncryptTo"):
        assert evaluate(doc, ADMIN, action, good) != "allow", action
    for who in (ADMIN, SEALER, PARENT):
        assert evaluate(doc, who, "kms:CreateGrant", {}) == "deny"
    # the sealing role seals and cannot decrypt
    assert evaluate(doc, SEALER, "kms:GenerateDataKey", {}) == "allow"
    assert evaluate(doc, SEALER, "kms:Decrypt", good) != "allow"
    # without a sealing role no one can GenerateDataKey
    bare = policy(sealing_role_arn=None)
    assert all(evaluate(bare, w, "kms:GenerateDataKey", {}) != "allow" for w in (ADMIN, PARENT))


def test_rollout_allows_each_eif_as_a_whole() -> None:
    old = {i: f"{i + 0xB0:02x}" * 48 for i in (0, 1, 2)}
    doc = policy(previous=[old])
    sids = [s["Sid"] for s in doc["Statement"]]
    assert "EnclaveDecryptWithAttestationPrevious1" in sids
    assert evaluate(doc, PARENT, "kms:Decrypt", attested(PCRS)) == "allow"
    assert evaluate(doc, PARENT, "kms:Decrypt", attested(old)) == "allow"
    mixed = attested({0: PCRS[0], 1: old[1], 2: PCRS[2]})
    assert evaluate(doc, PARENT, "kms:Decrypt", mixed) == "implicit-deny"
    assert evaluate(doc, PARENT, "kms:Decrypt", {}) == "deny"
    with pytest.raises(PolicyRenderError, match="PCR1"):
        policy(previous=[{0: old[0], 2: old[2]}])
    iam = render_parent_iam_policy(
        PCRS, account=ACCOUNT, region="eu-west-1", previous=[old],
        key_id="1234abcd-12ab-34cd-56ef-1234567890ab", bundle="s3://b-1/k",
    )  # fmt: skip
    conditions = [s["Condition"] for s in iam["Statement"] if s["Action"] == "kms:Decrypt"]
    assert [c["StringEqualsIgnoreCase"][IMAGE_KEY] for c in conditions] == [PCRS[0], old[0]]


def test_local_kms_enforces_the_rendered_policy(tmp_path: Path) -> None:
    """The parent's statements, loaded into the local KMS: plain Decrypt refused, Recipient
    with the built EIF's PCRs answered, another image refused."""
    nsm_dir = tmp_path / "nsm"
    nsm = LocalNsm.from_dir(nsm_dir, create=True)
    store = KeyStore(tmp_path / "keys.json")
    try:
        open_kms = LocalKms(store, root_pem=nsm.root_pem)
        view = local_kms_policy(policy(), PARENT)
        assert [s["Sid"] for s in view["Statement"]] == [
            "EnclaveDecryptWithAttestation",
            "DenyGrants",
        ]
        kms = LocalKms(store, root_pem=nsm.root_pem, policy=KeyPolicy(view))

        def call(k: LocalKms, op: str, **body: Any) -> tuple[int, dict[str, Any]]:
            return k.handle(op, json.dumps(body).encode())

        status, created = call(open_kms, "CreateKey")
        assert status == 200
        key_id = created["KeyMetadata"]["KeyId"]
        status, dk = call(open_kms, "GenerateDataKey", KeyId=key_id, KeySpec="AES_256")
        assert status == 200

        def recipient(doc_nsm: LocalNsm) -> tuple[EphemeralRecipientKey, dict[str, str]]:
            key = EphemeralRecipientKey.generate()
            doc = doc_nsm.attestation(public_key=key.public_key_der)
            return key, {
                "AttestationDocument": base64.b64encode(doc).decode(),
                "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
            }

        status, out = call(kms, "Decrypt", CiphertextBlob=dk["CiphertextBlob"])
        assert (status, out["__type"]) == (400, "AccessDeniedException")
        key, rec = recipient(nsm)
        status, out = call(kms, "Decrypt", CiphertextBlob=dk["CiphertextBlob"], Recipient=rec)
        assert status == 200, out
        assert "Plaintext" not in out
        opened = key.decrypt_recipient_ciphertext(base64.b64decode(out["CiphertextForRecipient"]))
        assert base64.b64encode(bytes(opened)).decode() == dk["Plaintext"]
        for other in (
            LocalNsm.from_dir(nsm_dir, pcrs={**DEFAULT_LOCAL_PCRS, 2: b"\x02" * 48}),
            LocalNsm.from_dir(nsm_dir, debug=True),
        ):
            _, rec = recipient(other)
            status, out = call(kms, "Decrypt", CiphertextBlob=dk["CiphertextBlob"], Recipient=rec)
            assert (status, out["__type"]) == (400, "AccessDeniedException")
    finally:
        store.close()


def test_render_refuses_bad_inputs() -> None:
    with pytest.raises(PolicyRenderError, match="--account"):
        policy(account="12345")
    with pytest.raises(PolicyRenderError, match="not in account"):
        policy(parent_role_arn="arn:aws:iam::999999999999:role/x")
    with pytest.raises(PolicyRenderError, match="IAM role ARN"):
        policy(admin_role_arn=f"arn:aws:iam::{ACCOUNT}:user/alice")
    with pytest.raises(PolicyRenderError, match="different principals"):
        policy(admin_role_arn=PARENT)
    with pytest.raises(PolicyRenderError, match="PCR2"):
        policy(pcrs={0: PCRS[0], 1: PCRS[1]})


def test_load_pcrs() -> None:
    plain = json.dumps(
        {"HashAlgorithm": "Sha384 { ... }", **{f"PCR{i}": v.upper() for i, v in PCRS.items()}}
    )
    assert load_pcrs(plain) == PCRS
    nitro_cli = json.dumps({"Measurements": {f"PCR{i}": v for i, v in PCRS.items()}})
    assert load_pcrs(nitro_cli) == PCRS
    for bad, match in [
        ("[", "not JSON"),
        ("[1]", "JSON object"),
        (json.dumps({"PCR0": PCRS[0], "PCR1": PCRS[1]}), "no PCR2"),
        (json.dumps({"PCR0": "abc", "PCR1": PCRS[1], "PCR2": PCRS[2]}), "96 hex"),
        (json.dumps({"PCR0": "0" * 96, "PCR1": PCRS[1], "PCR2": PCRS[2]}), "debug-mode"),
    ]:
        with pytest.raises(PolicyRenderError, match=match):
            load_pcrs(bad)


def test_parent_iam_policy() -> None:
    doc = render_parent_iam_policy(
        PCRS,
        account=ACCOUNT,
        region="eu-west-1",
        key_id="1234abcd-12ab-34cd-56ef-1234567890ab",
        bundle="s3://shares-bucket/prod/service_key_shares.json.enc",
        log_group="/trio-sign/enclave",
    )
    by_sid = {s["Sid"]: s for s in doc["Statement"]}
    decrypt = by_sid["BundleKeyDecryptForEnclave"]
    assert decrypt["Action"] == "kms:Decrypt"
    assert decrypt["Resource"] == (
        f"arn:aws:kms:eu-west-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    )
    assert decrypt["Condition"]["StringEqualsIgnoreCase"][IMAGE_KEY] == PCRS[0]
    assert by_sid["FetchSealedBundle"] == {
        "Sid": "FetchSealedBundle",
        "Effect": "Allow",
        "Action": "s3:GetObject",
        "Resource": "arn:aws:s3:::shares-bucket/prod/service_key_shares.json.enc",
    }
    group = f"arn:aws:logs:eu-west-1:{ACCOUNT}:log-group:/trio-sign/enclave"
    assert by_sid["ForwardEnclaveLogs"]["Action"] == ["logs:CreateLogStream", "logs:PutLogEvents"]
    assert by_sid["ForwardEnclaveLogs"]["Resource"] == [f"{group}:*", f"{group}:log-stream:*"]
    assert all(s["Effect"] == "Allow" and "*" not in s["Action"] for s in doc["Statement"])
    without_logs = render_parent_iam_policy(
        PCRS, account=ACCOUNT, region="eu-west-1",
        key_id="1234abcd-12ab-34cd-56ef-1234567890ab", bundle="s3://b-1/k",
    )  # fmt: skip
    assert len(without_logs["Statement"]) == 2
    for kwargs, match in [
        ({"region": "nowhere"}, "--region"),
        ({"key_id": "alias/trio"}, "--key-id"),
        ({"bundle": "/local/file"}, "--bundle"),
    ]:
        args: dict[str, Any] = {
            "account": ACCOUNT, "region": "eu-west-1",
            "key_id": "1234abcd-12ab-34cd-56ef-1234567890ab", "bundle": "s3://b-1/k",
        }  # fmt: skip
        args.update(kwargs)
        with pytest.raises(PolicyRenderError, match=match):
            render_parent_iam_policy(PCRS, **args)


# -- the checked-in templates are what the renderer produces ----------------------------------

_KEY_SENTINELS = {
    "${PARENT_ROLE_ARN}": "arn:aws:iam::000000000000:role/sentinel-parent",
    "${ADMIN_ROLE_ARN}": "arn:aws:iam::000000000000:role/sentinel-admin",
    "${SEALING_ROLE_ARN}": "arn:aws:iam::000000000000:role/sentinel-sealing",
    "${PCR0}": "a0" * 48,
    "${PCR1}": "a1" * 48,
    "${PCR2}": "a2" * 48,
}
_IAM_SENTINELS = {
    "${KEY_ID}": "00000000-0000-0000-0000-00000000beef",
    "${BUNDLE_BUCKET}": "sentinel-bucket",
    "${BUNDLE_KEY}": "sentinel-object-key",
    "${LOG_GROUP}": "sentinel-log-group",
    "${REGION}": "zz-sentinel-9",
    "${ACCOUNT}": "000000000000",
    "${PCR0}": "a0" * 48,
    "${PCR1}": "a1" * 48,
    "${PCR2}": "a2" * 48,
}


def _templated(document: dict[str, Any], sentinels: Mapping[str, str]) -> str:
    text = json.dumps(document, indent=2) + "\n"
    for placeholder, value in sentinels.items():
        text = text.replace(value, placeholder)
    return text


def key_policy_template() -> str:
    s = _KEY_SENTINELS
    doc = render_key_policy(
        {0: s["${PCR0}"], 1: s["${PCR1}"], 2: s["${PCR2}"]},
        account="000000000000",
        parent_role_arn=s["${PARENT_ROLE_ARN}"],
        admin_role_arn=s["${ADMIN_ROLE_ARN}"],
        sealing_role_arn=s["${SEALING_ROLE_ARN}"],
    )
    return _templated(doc, s)


def parent_iam_template() -> str:
    s = _IAM_SENTINELS
    doc = render_parent_iam_policy(
        {0: s["${PCR0}"], 1: s["${PCR1}"], 2: s["${PCR2}"]},
        account=s["${ACCOUNT}"],
        region=s["${REGION}"],
        key_id=s["${KEY_ID}"],
        bundle=f"s3://{s['${BUNDLE_BUCKET}']}/{s['${BUNDLE_KEY}']}",
        log_group=s["${LOG_GROUP}"],
    )
    return _templated(doc, s)


def test_templates_match_the_renderer() -> None:
    """Regenerate with: python -c 'from tests.test_ops import write_templates; write_templates()'"""
    assert (POLICIES / "kms-key-policy.template.json").read_text() == key_policy_template()
    assert (POLICIES / "parent-iam-policy.template.json").read_text() == parent_iam_template()


def write_templates() -> None:
    (POLICIES / "kms-key-policy.template.json").write_text(key_policy_template())
    (POLICIES / "parent-iam-policy.template.json").write_text(parent_iam_template())


# -- command line ------------------------------------------------------------------------------


def test_cli_render(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pcrs = tmp_path / "trio-sign.pcrs.json"
    pcrs.write_text(json.dumps({f"PCR{i}": v for i, v in PCRS.items()}))
    base = ["--pcrs", str(pcrs), "--account", ACCOUNT, "--parent-role", PARENT]
    assert main(["render-key-policy", *base, "--admin-role", ADMIN, "--sealing-role", SEALER]) == 0
    assert json.loads(capsys.readouterr().out) == policy()
    assert main(["render-key-policy", *base, "--admin-role", ADMIN, "--for-local-kms"]) == 0
    KeyPolicy.from_json(capsys.readouterr().out)  # loads in trio-sign kms-local
    old = tmp_path / "old.pcrs.json"
    old.write_text(json.dumps({f"PCR{i}": f"{i + 0xB0:02x}" * 48 for i in (0, 1, 2)}))
    assert (
        main(["render-key-policy", *base, "--admin-role", ADMIN, "--previous-pcrs", str(old)]) == 0
    )
    assert len(json.loads(capsys.readouterr().out)["Statement"]) == 5
    assert main(["render-key-policy", *base, "--admin-role", PARENT]) == 1
    assert "different principals" in capsys.readouterr().err
    assert main(["render-key-policy", "--pcrs", str(tmp_path / "none"), "--account", ACCOUNT,
                 "--parent-role", PARENT, "--admin-role", ADMIN]) == 1  # fmt: skip
    assert "cannot read" in capsys.readouterr().err
    iam = ["render-parent-iam-policy", "--pcrs", str(pcrs), "--account", ACCOUNT,
           "--key-region", "us-east-1", "--key-id", "1234abcd-12ab-34cd-56ef-1234567890ab",
           "--bundle", "s3://b-1/k.enc", "--log-group", "/trio-sign/enclave"]  # fmt: skip
    assert main(iam) == 0
    assert len(json.loads(capsys.readouterr().out)["Statement"]) == 3


# -- memory -----------------------------------------------------------------------------------


def _formula(accounts: int, sessions: int) -> float:
    return max(512 * MIB, 2 * (60 * MIB + 400 * accounts + 1024 * sessions)) / MIB


@pytest.mark.parametrize(
    ("accounts", "sessions", "expected"),
    [
        (0, 10_000, 512),
        (10_000, 10_000, 512),
        (500_000, 10_000, 768),  # 2 x (60 MiB + 190.7 MiB + 9.8 MiB) = 521 MiB
        (1_000_000, 10_000, 1024),  # docs/enclave.md: about 900 MiB, allocate 1 GiB
        (2_000_000, 10_000, 1792),
        (10_000_000, 100_000, 8192),
    ],
)
def test_enclave_memory(accounts: int, sessions: int, expected: int) -> None:
    mib = enclave_memory_mib(accounts, max_sessions=sessions)
    assert mib == expected
    assert mib % 256 == 0
    assert _formula(accounts, sessions) <= mib < _formula(accounts, sessions) + 256


def test_enclave_memory_refuses() -> None:
    with pytest.raises(SizingError, match="--accounts"):
        enclave_memory_mib(-1)
    with pytest.raises(SizingError, match="--max-sessions"):
        enclave_memory_mib(1, max_sessions=0)
    with pytest.raises(SizingError, match="--cpu-count"):
        allocator_yaml(512, cpu_count=0)


def test_enclave_memory_from_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate_share_files(tmp_path, 7, counterparts=False)
    sealed = tmp_path / "bundle.enc"
    seal_file(tmp_path / service_file_name(), sealed, DevKeyFile.create(tmp_path / "dev.json"))
    assert bundle_accounts(sealed) == 7
    assert main(["enclave-memory", "--bundle", str(sealed), "--mib-only"]) == 0
    assert capsys.readouterr().out == "512\n"
    assert main(["enclave-memory", "--accounts", "1000000", "--cpu-count", "4"]) == 0
    out = capsys.readouterr().out
    assert "\nmemory_mib: 1024\n" in out
    assert "\ncpu_count: 4\n" in out
    assert main(["enclave-memory", "--bundle", str(tmp_path / "missing.enc")]) == 1
    assert "cannot read --bundle" in capsys.readouterr().err
