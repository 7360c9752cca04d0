"""The KMS key policy and the parent's IAM policy, rendered from the EIF's PCRs.

The key policy is the only thing that keeps the parent's role from decrypting the bundle's data
key itself, so it is generated, never hand-edited:

* ``KeyAdministration``: the admin role manages the key (policy, aliases, rotation, deletion)
  and has no cryptographic action at all (no Decrypt, Encrypt, ReEncrypt, GenerateDataKey*).
* ``EnclaveDecryptWithAttestation``: the parent's role may call ``kms:Decrypt`` only when the
  request carries an attestation document (``Recipient``) whose ``ImageSha384`` (PCR0), PCR1,
  PCR2 (and PCR8 when the EIF is signed) are exactly the built EIF's. KMS then answers
  ``CiphertextForRecipient`` for the enclave's boot key, never the plaintext.
* ``DenyDecryptWithoutAttestation``: belt and braces, an explicit Deny of ``kms:Decrypt`` for
  the parent's role when ``kms:RecipientAttestation:ImageSha384`` is absent, so that a later
  Allow (or an IAM policy, should someone add the account-root statement) cannot reopen a plain
  Decrypt.
* ``SealingGenerateDataKey`` (with a sealing role): ``kms:GenerateDataKey`` for the ceremony
  role that seals bundles (``trio-sign shares seal``); a separate principal from the parent.
* ``DenyGrants``: nobody may create grants (a grant would bypass the conditions above).

There is deliberately **no** statement giving the account root ``kms:*`` (AWS's default key
policy has one): with it, any IAM policy in the account could grant an unconditional Decrypt.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from .._errors import TrioSignError

#: Condition key prefix KMS uses for the attestation document of a ``Recipient`` request.
RECIPIENT_PREFIX: Final = "kms:RecipientAttestation:"

#: Key administration without any cryptographic operation (no Decrypt/Encrypt/ReEncrypt/
#: GenerateDataKey*) and without ``kms:CreateGrant`` (denied to everyone below).
ADMIN_ACTIONS: Final = (
    "kms:CreateAlias",
    "kms:UpdateAlias",
    "kms:DeleteAlias",
    "kms:DescribeKey",
    "kms:EnableKey",
    "kms:DisableKey",
    "kms:EnableKeyRotation",
    "kms:DisableKeyRotation",
    "kms:GetKeyPolicy",
    "kms:GetKeyRotationStatus",
    "kms:ListAliases",
    "kms:ListGrants",
    "kms:ListKeyPolicies",
    "kms:ListResourceTags",
    "kms:PutKeyPolicy",
    "kms:RetireGrant",
    "kms:RevokeGrant",
    "kms:RotateKeyOnDemand",
    "kms:ScheduleKeyDeletion",
    "kms:CancelKeyDeletion",
    "kms:TagResource",
    "kms:UntagResource",
    "kms:UpdateKeyDescription",
)

#: PCRs pinned in the key policy when present: the image (0), kernel+boot ramdisk (1),
#: application (2) and the signing certificate (8, signed EIFs only).
POLICY_PCRS: Final = (0, 1, 2, 8)

_HEX48 = re.compile(r"[0-9a-fA-F]{96}")
_ROLE_ARN = re.compile(r"arn:(aws|aws-cn|aws-us-gov):iam::([0-9]{12}):role/[\w+=,.@/-]+")
_ACCOUNT = re.compile(r"[0-9]{12}")
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]")
_S3_URL = re.compile(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/(.+)")
_LOG_GROUP = re.compile(r"[\w#./-]{1,512}")


class PolicyRenderError(TrioSignError):
    """An input of the policy renderer is invalid; the message names it."""


def load_pcrs(text: str) -> dict[int, str]:
    """Parse ``trio-sign.pcrs.json`` (or nitro-cli's whole ``build-enclave`` JSON).

    Returns:
        ``{index: lowercase hex}`` with at least PCR0, PCR1 and PCR2.

    Error handling:
        :class:`PolicyRenderError` when the JSON is malformed, a PCR is not 48 bytes of hex,
        PCR0/1/2 are missing, or any of them is all zeros (a debug-mode measurement, which KMS
        conditions can never match in production).
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PolicyRenderError(f"the PCR file is not JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("Measurements"), dict):
        data = data["Measurements"]
    if not isinstance(data, dict):
        raise PolicyRenderError('the PCR file must be a JSON object like {"PCR0": "<hex>"}')
    pcrs: dict[int, str] = {}
    for name, value in data.items():
        match = re.fullmatch(r"PCR([0-9]|[12][0-9]|3[01])", str(name))
        if match is None:
            continue  # HashAlgorithm and other informational fields
        if not isinstance(value, str) or _HEX48.fullmatch(value) is None:
            raise PolicyRenderError(f"{name} must be 96 hex digits (SHA-384), got {value!r}")
        pcrs[int(match.group(1))] = value.lower()
    for index in (0, 1, 2):
        if index not in pcrs:
            raise PolicyRenderError(f"the PCR file has no PCR{index}")
        if set(pcrs[index]) == {"0"}:
            raise PolicyRenderError(
                f"PCR{index} is all zeros (a debug-mode measurement); build a production EIF"
            )
    return pcrs


def _check_required(*pcr_sets: Mapping[int, str]) -> None:
    for pcrs in pcr_sets:
        for index in (0, 1, 2):
            if index not in pcrs:
                raise PolicyRenderError(f"PCR{index} is required")


def attestation_condition(pcrs: Mapping[int, str]) -> dict[str, str]:
    """The ``StringEqualsIgnoreCase`` block pinning PCR0 (as ImageSha384), PCR1, PCR2, PCR8."""
    condition = {f"{RECIPIENT_PREFIX}ImageSha384": pcrs[0]}
    for index in POLICY_PCRS[1:]:
        if index in pcrs:
            condition[f"{RECIPIENT_PREFIX}PCR{index}"] = pcrs[index]
    return condition


def _role(arn: str, what: str, account: str) -> str:
    match = _ROLE_ARN.fullmatch(arn)
    if match is None:
        raise PolicyRenderError(
            f"{what} must be an IAM role ARN like arn:aws:iam::123456789012:role/NAME, got {arn!r}"
        )
    if match.group(2) != account:
        raise PolicyRenderError(f"{what} {arn} is not in account {account}")
    return arn


def render_key_policy(
    pcrs: Mapping[int, str],
    *,
    account: str,
    parent_role_arn: str,
    admin_role_arn: str,
    sealing_role_arn: str | None = None,
    previous: Sequence[Mapping[int, str]] = (),
) -> dict[str, Any]:
    """The KMS key policy for the bundle key (see the module docstring for each statement).

    ``previous``: the PCRs of EIFs still running during a rollout; each gets its own attested
    Decrypt statement (``EnclaveDecryptWithAttestationPrevious<n>``), so a document must match
    one EIF's measurements as a whole, never a mix of two.

    Error handling:
        :class:`PolicyRenderError` for a malformed account or role ARN, a role outside
        ``account``, the parent sharing a role with the admin or sealing role, or missing PCRs.
    """
    if _ACCOUNT.fullmatch(account) is None:
        raise PolicyRenderError(f"--account must be 12 digits, got {account!r}")
    parent = _role(parent_role_arn, "--parent-role", account)
    admin = _role(admin_role_arn, "--admin-role", account)
    roles = [parent, admin]
    if sealing_role_arn is not None:
        roles.append(_role(sealing_role_arn, "--sealing-role", account))
    if len(set(roles)) != len(roles):
        raise PolicyRenderError("the parent, admin and sealing roles must be different principals")
    _check_required(pcrs, *previous)
    image = f"{RECIPIENT_PREFIX}ImageSha384"
    statements: list[dict[str, Any]] = [
        {
            "Sid": "KeyAdministration",
            "Effect": "Allow",
            "Principal": {"AWS": admin},
            "Action": list(ADMIN_ACTIONS),
            "Resource": "*",
        },
        {
            "Sid": "EnclaveDecryptWithAttestation",
            "Effect": "Allow",
            "Principal": {"AWS": parent},
            "Action": "kms:Decrypt",
            "Resource": "*",
            "Condition": {"StringEqualsIgnoreCase": attestation_condition(pcrs)},
        },
        *(
            {
                "Sid": f"EnclaveDecryptWithAttestationPrevious{n}",
                "Effect": "Allow",
                "Principal": {"AWS": parent},
                "Action": "kms:Decrypt",
                "Resource": "*",
                "Condition": {"StringEqualsIgnoreCase": attestation_condition(old)},
            }
            for n, old in enumerate(previous, 1)
        ),
        {
            "Sid": "DenyDecryptWithoutAttestation",
            "Effect": "Deny",
            "Principal": {"AWS": parent},
            "Action": "kms:Decrypt",
            "Resource": "*",
            "Condition": {"Null": {image: "true"}},
        },
    ]
    if sealing_role_arn is not None:
        statements.append(
            {
                "Sid": "SealingGenerateDataKey",
                "Effect": "Allow",
                "Principal": {"AWS": sealing_role_arn},
                "Action": ["kms:GenerateDataKey", "kms:DescribeKey"],
                "Resource": "*",
            }
        )
    statements.append(
        {
            "Sid": "DenyGrants",
            "Effect": "Deny",
            "Principal": {"AWS": "*"},
            "Action": "kms:CreateGrant",
            "Resource": "*",
        }
    )
    return {"Version": "2012-10-17", "Id": "trio-sign-bundle-key", "Statement": statements}


def render_parent_iam_policy(
    pcrs: Mapping[int, str],
    *,
    account: str,
    region: str,
    key_id: str,
    bundle: str,
    log_group: str | None = None,
    partition: str = "aws",
    previous: Sequence[Mapping[int, str]] = (),
) -> dict[str, Any]:
    """The IAM policy of the parent instance's role.

    ``kms:Decrypt`` on the bundle key, with the same attestation conditions as the key policy
    (the key policy's own conditions apply in any case); ``s3:GetObject`` on the bundle object
    (boto3's download also issues HeadObject, authorised by the same action); CloudWatch Logs
    ``CreateLogStream`` and ``PutLogEvents`` in the log group, when one is given.

    Error handling:
        :class:`PolicyRenderError` naming the malformed argument.
    """
    if _ACCOUNT.fullmatch(account) is None:
        raise PolicyRenderError(f"--account must be 12 digits, got {account!r}")
    if _REGION.fullmatch(region) is None:
        raise PolicyRenderError(f"--region must look like us-east-1, got {region!r}")
    if re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}|mrk-[0-9a-f]{32}", key_id) is None:
        raise PolicyRenderError(
            f"--key-id must be a key id (UUID or mrk-...), not an alias or ARN; got {key_id!r}"
        )
    match = _S3_URL.fullmatch(bundle)
    if match is None:
        raise PolicyRenderError(f"--bundle must be s3://BUCKET/KEY, got {bundle!r}")
    bucket, obj = match.groups()
    _check_required(pcrs, *previous)
    key_arn = f"arn:{partition}:kms:{region}:{account}:key/{key_id}"
    statements: list[dict[str, Any]] = [
        {
            "Sid": "BundleKeyDecryptForEnclave" + (f"Previous{n}" if n else ""),
            "Effect": "Allow",
            "Action": "kms:Decrypt",
            "Resource": key_arn,
            "Condition": {"StringEqualsIgnoreCase": attestation_condition(values)},
        }
        for n, values in enumerate([pcrs, *previous])
    ]
    statements += [
        {
            "Sid": "FetchSealedBundle",
            "Effect": "Allow",
            "Action": "s3:GetObject",
            "Resource": f"arn:{partition}:s3:::{bucket}/{obj}",
        },
    ]
    if log_group is not None:
        if _LOG_GROUP.fullmatch(log_group) is None:
            raise PolicyRenderError(
                f"--log-group is not a CloudWatch log group name: {log_group!r}"
            )
        group = f"arn:{partition}:logs:{region}:{account}:log-group:{log_group}"
        statements.append(
            {
                "Sid": "ForwardEnclaveLogs",
                "Effect": "Allow",
                "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
                "Resource": [f"{group}:*", f"{group}:log-stream:*"],
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}


def local_kms_policy(policy: Mapping[str, Any], principal_arn: str) -> dict[str, Any]:
    """The statements of ``policy`` that apply to ``principal_arn``, in the local KMS's subset.

    ``trio-sign kms-local`` ignores principals and evaluates only ``StringEquals`` /
    ``StringEqualsIgnoreCase`` conditions. This keeps the statements naming ``principal_arn``
    (or ``*``) and drops the ``Null`` Deny: the local KMS already treats a condition on an absent
    key as false, so an attestation-conditioned Allow never allows a plain Decrypt there.
    For development hosts and tests; AWS gets the full policy.
    """
    kept = []
    for statement in policy["Statement"]:
        principal = statement.get("Principal", {})
        aws = principal.get("AWS", []) if isinstance(principal, dict) else principal
        principals = [aws] if isinstance(aws, str) else list(aws)
        if principal_arn not in principals and "*" not in principals:
            continue
        if "Null" in statement.get("Condition", {}):
            continue
        kept.append(dict(statement))
    if not kept:
        raise PolicyRenderError(f"no statement of the policy applies to {principal_arn}")
    return {"Version": policy.get("Version", "2012-10-17"), "Statement": kept}
