"""``trio-sign shares ...``: generate test shares, seal and sign them, inspect a sealed bundle,
make a ceremony signing key."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .._progress import Progress

log = logging.getLogger("trio_sign.cli")


# The suites' names for --help without importing the crypto modules at parse time (a test
# holds them to trio_sign.crypto.SCHEMES).
_ED25519 = "FROST-ED25519-SHA512-v1"
_SUITE_NAMES = (_ED25519, "FROST-secp256k1-SHA256-v1", "FROST-secp256k1-SHA256-TR-v1")


def add_parser(sub: Any) -> None:
    shares = sub.add_parser("shares", help="generate, seal and inspect key-share files")
    cmds = shares.add_subparsers(dest="shares_command", required=True, metavar="SUBCOMMAND")

    gen = cmds.add_parser(
        "generate",
        help="test key material: the service's share file plus the counterparts' files",
        description="Split a fresh key per account with a trusted dealer (test and demo "
        "material only; production shares come from a key ceremony). With several "
        "--ciphersuite options the accounts take the suites in turn (a mixed file).",
    )
    gen.add_argument("--accounts", type=int, required=True, metavar="N")
    gen.add_argument("--out", type=Path, required=True, metavar="DIR")
    gen.add_argument("--min-signers", type=int, default=2)
    gen.add_argument("--max-signers", type=int, default=3)
    gen.add_argument(
        "--service-identifier",
        type=int,
        default=1,
        help="which participant (1..max-signers) the service is (default 1)",
    )
    gen.add_argument("--account-prefix", default="acct-")
    gen.add_argument(
        "--ciphersuite",
        dest="ciphersuites",
        action="append",
        metavar="NAME",
        help="deal accounts in this suite (repeatable: round-robin over the suites given; "
        f"default {_ED25519}); one of {', '.join(_SUITE_NAMES)}",
    )
    gen.add_argument("--force", action="store_true", help="overwrite existing files")
    gen.set_defaults(func=cmd_generate)

    seal = cmds.add_parser(
        "seal",
        help="encrypt a plaintext share file into a sealed bundle",
        description="Validate every record, then encrypt the file in authenticated chunks "
        "under a fresh data key wrapped by the key provider.",
    )
    seal.add_argument("--in", dest="input", type=Path, required=True, metavar="FILE")
    seal.add_argument("--out", type=Path, required=True, metavar="FILE.enc")
    wrap = seal.add_mutually_exclusive_group(required=True)
    wrap.add_argument(
        "--dev-key",
        type=Path,
        metavar="KEYFILE",
        help="development key file standing in for KMS (created if missing)",
    )
    wrap.add_argument(
        "--kms-key-id",
        metavar="ID",
        help="wrap the data key with this KMS key (id or ARN; GenerateDataKey AES_256)",
    )
    _add_kms_endpoint_args(seal)
    _add_signing_args(seal)
    seal.add_argument("--chunk-size", type=int, default=64 * 1024, metavar="BYTES")
    seal.add_argument("--force", action="store_true", help="overwrite an existing output")
    seal.set_defaults(func=cmd_seal)

    reencrypt = cmds.add_parser(
        "reencrypt",
        help="re-seal a sealed bundle under a new data key wrapped by a new KMS key",
        description="Decrypt a sealed bundle chunk by chunk (its data key unwrapped by the "
        "provider its header names: KMS with the header's key id, or --old-dev-key) and "
        "re-encrypt it under a fresh data key from --new-kms-key-id (or --new-dev-key). "
        "Records and chunk boundaries are kept; the new file has a new fingerprint, so the old "
        "signature cannot carry over: it is re-signed with --signing-key or "
        "--signing-kms-key-id (unsigned without one, which only a development enclave loads).",
    )
    reencrypt.add_argument("--in", dest="input", type=Path, required=True, metavar="FILE.enc")
    reencrypt.add_argument("--out", type=Path, required=True, metavar="FILE.enc")
    new_wrap = reencrypt.add_mutually_exclusive_group(required=True)
    new_wrap.add_argument("--new-kms-key-id", metavar="ID", help="the KMS key to move to")
    new_wrap.add_argument(
        "--new-dev-key", type=Path, metavar="KEYFILE", help="a development key file to move to"
    )
    reencrypt.add_argument(
        "--old-dev-key",
        type=Path,
        metavar="KEYFILE",
        help="the development key file of a bundle sealed with --dev-key",
    )
    _add_kms_endpoint_args(reencrypt)
    _add_signing_args(reencrypt)
    reencrypt.add_argument("--force", action="store_true", help="overwrite an existing output")
    reencrypt.set_defaults(func=cmd_reencrypt)

    sign = cmds.add_parser(
        "sign",
        help="(re-)sign a sealed bundle without re-encrypting it (the fingerprint is kept)",
        description="Replace a sealed bundle's signature record (or add one) with a signature "
        "by --signing-key or --signing-kms-key-id over its fingerprint. Nothing is decrypted; "
        "the body and so the fingerprint are unchanged, so gateway pins do not move.",
    )
    sign.add_argument("--in", dest="input", type=Path, required=True, metavar="FILE.enc")
    sign.add_argument("--out", type=Path, required=True, metavar="FILE.enc")
    _add_kms_endpoint_args(sign)
    _add_signing_args(sign, required=True)
    sign.add_argument("--force", action="store_true", help="overwrite an existing output")
    sign.set_defaults(func=cmd_sign)

    inspect = cmds.add_parser(
        "inspect",
        help="show a sealed bundle's header, counts and fingerprint (no secrets)",
        description="Show a sealed bundle's header, counts and fingerprint, or check a "
        "plaintext share file to its trailer line and show its counts and SHA-256. No secret "
        "is ever shown.",
    )
    inspect.add_argument("file", type=Path, metavar="FILE")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.add_argument(
        "--signing-key",
        metavar="HEX",
        help="the Ed25519 public key (64 hex digits) the bundle must be signed by: exit 1 "
        "unless its signature is by this key and verifies",
    )
    inspect.set_defaults(func=cmd_inspect)

    ceremony = cmds.add_parser(
        "ceremony-key",
        help="make or show a ceremony signing key file (Ed25519) for shares seal --signing-key",
        description="A ceremony key signs base bundles (DESIGN §12). Its public key goes into "
        "enclave.toml's [bundles] signing_keys. Keep the file offline; KMS "
        "(--signing-kms-key-id) is the alternative.",
    )
    ceremony_cmds = ceremony.add_subparsers(
        dest="ceremony_command", required=True, metavar="SUBCOMMAND"
    )
    generate = ceremony_cmds.add_parser(
        "generate", help="make a new key file (mode 0600) and print its public key in hex"
    )
    generate.add_argument("--out", type=Path, required=True, metavar="FILE")
    generate.set_defaults(func=cmd_ceremony_generate)
    show = ceremony_cmds.add_parser("public-key", help="print a key file's public key in hex")
    show.add_argument("file", type=Path, metavar="FILE")
    show.set_defaults(func=cmd_ceremony_public_key)


def cmd_generate(args: argparse.Namespace) -> int:
    from .._errors import TrioSignError
    from ..testing import generate_share_files
    from ..testing._keygen import resolve_ciphersuites
    from ._listen import UsageError

    try:
        suites = [s.name for s in resolve_ciphersuites(args.ciphersuites)]
    except TrioSignError as exc:
        raise UsageError(str(exc)) from None
    progress = Progress("generating")
    try:
        report = generate_share_files(
            args.out,
            args.accounts,
            min_signers=args.min_signers,
            max_signers=args.max_signers,
            service_identifier=args.service_identifier,
            account_prefix=args.account_prefix,
            force=args.force,
            progress=progress,
            ciphersuites=suites,
        )
    finally:
        progress.close()
    log.info(
        "generated shares",
        extra={
            "accounts": report.accounts,
            "ciphersuites": ",".join(f"{k}={v}" for k, v in (report.ciphersuites or {}).items()),
            "service_file": str(report.service_file),
            "participant_files": ",".join(str(p) for p in report.participant_files.values()),
            "seconds": round(report.seconds, 3),
        },
    )
    for name, count in (report.ciphersuites or {}).items():
        print(f"{name}: {count:,} accounts")
    print(f"service shares:     {report.service_file}")
    for ident, path in sorted(report.participant_files.items()):
        print(f"participant {ident} shares: {path}")
    return 0


def _add_kms_endpoint_args(parser: Any) -> None:
    parser.add_argument(
        "--kms-endpoint",
        metavar="URL",
        help="KMS endpoint (e.g. the local KMS, http://127.0.0.1:4599); default: AWS's "
        "regional endpoint. Credentials come from the usual AWS chain",
    )
    parser.add_argument(
        "--kms-region", default="us-east-1", metavar="REGION", help="default us-east-1"
    )


def _add_signing_args(parser: Any, *, required: bool = False) -> None:
    sign = parser.add_mutually_exclusive_group(required=required)
    sign.add_argument(
        "--signing-key",
        type=Path,
        metavar="FILE",
        help="sign the bundle with this ceremony key file (shares ceremony-key generate)",
    )
    sign.add_argument(
        "--signing-kms-key-id",
        metavar="ID",
        help="sign the bundle with this KMS key (ECC_NIST_EDWARDS25519; Sign ED25519_SHA_512, "
        "MessageType RAW, over the bundle's fingerprint); --kms-endpoint applies",
    )


def _signer(args: argparse.Namespace) -> Any:
    """The signer the options name (the caller closes a ``CeremonyKey``), or None."""
    from ..shares import CeremonyKey

    if args.signing_key is not None:
        return CeremonyKey.load(args.signing_key)
    if args.signing_kms_key_id is not None:
        from ..kms import KmsBundleSigner, make_kms_client

        client = make_kms_client(args.kms_endpoint, region=args.kms_region)
        return KmsBundleSigner(client, args.signing_kms_key_id)
    return None


def _warn_unsigned(signer: bytes | None) -> None:
    if signer is None:
        log.warning(
            "the bundle is UNSIGNED: only a development enclave loads it (pass --signing-key "
            "FILE or --signing-kms-key-id ID)"
        )


def _close_signer(signer: Any) -> None:
    from ..shares import CeremonyKey

    if isinstance(signer, CeremonyKey):
        signer.close()


def cmd_ceremony_generate(args: argparse.Namespace) -> int:
    from ..shares import CeremonyKey

    with CeremonyKey.generate() as key:
        key.save(args.out)
        public = key.public_key.hex()
    log.info("ceremony key written", extra={"path": str(args.out), "public_key": public})
    print(f"public key {public}")
    print(f'enclave.toml: [bundles] signing_keys = ["{public}"]')
    return 0


def cmd_ceremony_public_key(args: argparse.Namespace) -> int:
    from ..shares import CeremonyKey

    with CeremonyKey.load(args.file) as key:
        print(key.public_key.hex())
    return 0


def _kms_provider(args: argparse.Namespace, key_id: str) -> Any:
    from ..kms import KmsDataKeyProvider, make_kms_client

    client = make_kms_client(args.kms_endpoint, region=args.kms_region)
    return KmsDataKeyProvider(client, key_id)


def cmd_seal(args: argparse.Namespace) -> int:
    from .._errors import TrioSignError
    from ..shares import DataKeyProvider, DevKeyFile, seal_file

    provider: DataKeyProvider
    if args.kms_key_id is not None:
        provider = _kms_provider(args, args.kms_key_id)
    elif args.kms_endpoint is not None and args.signing_kms_key_id is None:
        raise TrioSignError("--kms-endpoint needs --kms-key-id (it does not apply to --dev-key)")
    elif args.dev_key.exists():
        provider = DevKeyFile.load(args.dev_key)
    else:
        provider = DevKeyFile.create(args.dev_key)
        log.info("created development key file", extra={"path": str(args.dev_key)})
    signer: Any = None
    progress = Progress("sealing")
    try:
        signer = _signer(args)
        report = seal_file(
            args.input,
            args.out,
            provider,
            chunk_size=args.chunk_size,
            overwrite=args.force,
            progress=progress,
            signer=signer,
        )
    finally:
        progress.close()
        _close_signer(signer)
        if isinstance(provider, DevKeyFile):
            provider.close()
    log.info(
        "sealed shares",
        extra={
            "accounts": report.accounts,
            "chunks": report.chunks,
            "sha256": report.sha256,
            "out": str(args.out),
            "signer": "unsigned" if report.signer is None else report.signer.hex(),
        },
    )
    _warn_unsigned(report.signer)
    print(f"sealed {report.accounts:,} accounts into {args.out}")
    print(f"sha256 {report.sha256}")
    print(f"signed by {report.signer.hex()}" if report.signer else "unsigned")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from ..shares import sign_file

    signer = _signer(args)
    try:
        report = sign_file(args.input, args.out, signer, overwrite=args.force)
    finally:
        _close_signer(signer)
    assert report.signer is not None
    log.info(
        "signed shares",
        extra={"sha256": report.sha256, "signer": report.signer.hex(), "out": str(args.out)},
    )
    print(f"signed {args.out} by {report.signer.hex()}")
    print(f"sha256 {report.sha256}")
    return 0


def cmd_reencrypt(args: argparse.Namespace) -> int:
    from .._errors import TrioSignError
    from ..kms import KMS_PROVIDER
    from ..shares import DataKeyProvider, DevKeyFile, read_sealed_header, reseal

    with args.input.open("rb") as f:
        header, old_sha256 = read_sealed_header(f)
    kind = header["key_provider"]
    providers: list[DevKeyFile] = []
    signer: Any = None
    try:
        old: DataKeyProvider
        if kind == KMS_PROVIDER:
            old = _kms_provider(args, header["kms_key_id"])
        elif kind == DevKeyFile.provider:
            if args.old_dev_key is None:
                raise TrioSignError(f"{args.input} was sealed with a dev key: pass --old-dev-key")
            old = DevKeyFile.load(args.old_dev_key)
            providers.append(old)
        else:
            raise TrioSignError(f"{args.input}: unknown key_provider {kind!r} in its header")
        new: DataKeyProvider
        if args.new_kms_key_id is not None:
            new = _kms_provider(args, args.new_kms_key_id)
        else:
            new = DevKeyFile.load(args.new_dev_key)
            providers.append(new)
        signer = _signer(args)
        report = reseal(args.input, args.out, old, new, overwrite=args.force, signer=signer)
    finally:
        _close_signer(signer)
        for p in providers:
            p.close()
    log.info(
        "re-encrypted shares",
        extra={
            "accounts": report.accounts,
            "old_key": header["kms_key_id"],
            "new_key": new.key_id,
            "old_sha256": old_sha256,
            "sha256": report.sha256,
            "out": str(args.out),
        },
    )
    _warn_unsigned(report.signer)
    print(f"re-encrypted {report.accounts:,} accounts into {args.out} under {new.key_id}")
    print(f"sha256 {report.sha256}")
    print(f"signed by {report.signer.hex()}" if report.signer else "unsigned")
    return 0


def host_memory_check(accounts: int) -> None:
    """The CLI's counterpart of the enclave's preload check, for ``ShareStore.load_sealed``'s
    ``memory_check``: refuse, before the data key is unwrapped or anything is allocated, a
    bundle whose header declares more accounts than fit below the hard watermark of this
    process's memory limit (cgroup or ``MemTotal``; RSS as the use).

    Error handling:
        ``MemoryLimitError`` (a ``TrioSignError``: the CLI prints its one line). If the limits
        cannot be read (not Linux), nothing is checked: the loader still only grows with the
        records it decrypts.
    """
    from ..enclave._memory import check_preload_fits, read_memory_limit_bytes, read_rss_bytes

    try:
        limit, used = read_memory_limit_bytes(), read_rss_bytes()
    except (OSError, ValueError):
        log.debug("memory limits unreadable; bundle not checked against them")
        return
    check_preload_fits(accounts, limit_bytes=limit, used_bytes=used)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .._errors import TrioSignError
    from ..shares import inspect_plaintext, inspect_sealed
    from ._listen import UsageError

    expected: bytes | None = None
    if args.signing_key is not None:
        try:
            expected = bytes.fromhex(args.signing_key)
        except ValueError:
            expected = None
        if expected is None or len(expected) != 32:
            raise UsageError("--signing-key must be 64 hex digits (an Ed25519 public key)")
    verdict: str | None = None
    info: dict[str, Any]
    with args.file.open("rb") as f:
        if f.read(64).lstrip().startswith(b"{"):
            # A plaintext share file (JSON Lines): checked to its trailer, no secret shown.
            if expected is not None:
                raise UsageError("--signing-key applies to a sealed bundle, not a plaintext file")
            f.seek(0)
            info = dict(sorted(inspect_plaintext(f).items()))
            info["sealed"] = False
            info["file_bytes"] = args.file.stat().st_size
        else:
            f.seek(0)
            header, end = inspect_sealed(f)
            info = {k: v for k, v in sorted(header.items()) if k != "encrypted_data_key"}
            info.setdefault("kind", "base")
            info["encrypted_data_key_bytes"] = (
                len(str(header.get("encrypted_data_key", ""))) * 3 // 4
            )
            info["file_bytes"] = args.file.stat().st_size
            info["sha256"] = end.sha256_hex
            signature = end.signature
            if signature is None:
                info["signer"] = None
                info["signature"] = "unsigned"
            else:
                info["signer"] = signature.public_key.hex()
                info["signature"] = "valid" if signature.verifies(end.digest) else "INVALID"
            if expected is not None:
                if signature is None:
                    verdict = "the bundle is unsigned"
                elif signature.public_key != expected:
                    verdict = (
                        f"the bundle is signed by {signature.public_key.hex()}, "
                        "not by --signing-key"
                    )
                elif info["signature"] != "valid":
                    verdict = "the signature does not verify over the bundle's fingerprint"
                info["signed_by_expected_key"] = verdict is None
    if args.json:
        json.dump(info, sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            shown = json.dumps(value) if isinstance(value, dict) else value
            print(f"{key:<{width}}  {shown}")
    if verdict is not None:
        raise TrioSignError(f"{args.file}: {verdict}")
    return 0
