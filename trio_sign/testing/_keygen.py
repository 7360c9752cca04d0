"""Test key material: a trusted dealer splits a fresh key per account into share files.

Real deployments get their shares from a key ceremony; this is for demos, tests and benchmarks.
Each participant gets a file in the plaintext key-share format (DESIGN §6): the service's file
is what gets sealed and preloaded into the enclave, the others stand in for the counterpart
participants (the user's device, a backup) that the gateway drives.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .._atomic import atomic_files
from .._errors import FrostError, TrioSignError
from ..crypto._schemes import ED25519, Scheme, scheme_by_name
from ..shares._plaintext import PlaintextEncoder
from ..shares._records import ShareRecord


def service_file_name() -> str:
    return "service_key_shares.json"


def participant_file_name(identifier: int) -> str:
    return f"participant-{identifier}_key_shares.json"


@dataclass(frozen=True)
class GenerateReport:
    accounts: int
    service_file: Path
    participant_files: dict[int, Path]
    seconds: float
    #: Accounts per ciphersuite name, in the order the suites were given.
    ciphersuites: dict[str, int] | None = None


def resolve_ciphersuites(names: Sequence[str] | None) -> list[Scheme]:
    """The suites named (default Ed25519 alone), each once, in the order given.

    Error handling:
        ``TrioSignError`` naming an unknown suite and the known ones.
    """
    if not names:
        return [ED25519]
    out: list[Scheme] = []
    for name in names:
        try:
            scheme = scheme_by_name(name)
        except FrostError as exc:
            raise TrioSignError(f"--ciphersuite: {exc}") from None
        if scheme not in out:
            out.append(scheme)
    return out


def generate_share_files(
    out_dir: str | os.PathLike[str],
    accounts: int,
    *,
    min_signers: int = 2,
    max_signers: int = 3,
    service_identifier: int = 1,
    account_prefix: str = "acct-",
    counterparts: bool = True,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    ciphersuites: Sequence[str] | None = None,
) -> GenerateReport:
    """Write ``service_key_shares.json`` and one file per counterpart participant.

    ``ciphersuites`` names the suites (DESIGN §14; default Ed25519 alone): account ``n`` is
    dealt in suite ``n mod len(ciphersuites)``, so several suites give a mixed file. Every
    participant's file holds the same accounts in the same suites; the header names the
    first suite and the records of the others carry their own ``"ciphersuite"``.

    Participants have identifiers 1..max_signers; ``service_identifier`` picks the service's.
    Account ids are ``{account_prefix}{n:08d}``. Files are created with mode 0600 and never
    overwritten unless ``force``. Each ends with the trailer line (DESIGN §6) and all are
    written atomically (:func:`trio_sign._atomic.atomic_files`): an interrupted run leaves no
    file, or the previous ones, under their names, never a truncated one. Every signing share
    is zeroed after it is written (the JSON text itself is an immutable str that CPython cannot
    zero; see docs/security.md).
    """
    if accounts < 0:
        raise TrioSignError("--accounts must be >= 0")
    if not 1 <= service_identifier <= max_signers:
        raise TrioSignError(f"--service-identifier must be in 1..{max_signers}")
    suites = resolve_ciphersuites(ciphersuites)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = list(range(1, max_signers + 1))
    paths = {i: out / participant_file_name(i) for i in ids if i != service_identifier}
    paths[service_identifier] = out / service_file_name()
    if not counterparts:
        paths = {service_identifier: paths[service_identifier]}
    for path in paths.values():
        if not force and path.exists():
            raise TrioSignError(f"{path} already exists; pass --force to overwrite it")
    start = time.monotonic()
    with atomic_files(list(paths.values()), overwrite=force) as opened:
        files = dict(zip(paths, opened, strict=True))
        encoders = {i: PlaintextEncoder(suites[0].name) for i in files}
        for i, f in files.items():
            f.write(encoders[i].start())
        width = max(8, len(str(accounts)))
        for n in range(accounts):
            account_id = f"{account_prefix}{n:0{width}d}"
            scheme = suites[n % len(suites)]
            dealer = scheme.trusted_dealer_keygen(min_signers, max_signers, identifiers=ids)
            for share, ident in zip(dealer.shares, ids, strict=True):
                if ident in files:
                    rec = ShareRecord(
                        account_id,
                        share.identifier,
                        share.signing_share,
                        share.verifying_share,
                        dealer.group_public_key,
                        min_signers,
                        max_signers,
                        ciphersuite=scheme.name,
                    )
                    files[ident].write(encoders[ident].add_record(rec))
                share.zero()
            if progress is not None and (n & 1023 == 0 or n + 1 == accounts):
                progress(n + 1, accounts)
        for i, f in files.items():
            f.write(encoders[i].finish())
    return GenerateReport(
        accounts=accounts,
        service_file=paths[service_identifier],
        participant_files={i: p for i, p in paths.items() if i != service_identifier},
        seconds=time.monotonic() - start,
        ciphersuites={s.name: len(range(i, accounts, len(suites))) for i, s in enumerate(suites)},
    )
