"""A local stand-in for the Nitro Security Module, for development and tests. Synchronous.

:class:`LocalNsm` has the method names and shapes of the real-device client
(``NsmDevice`` in ``_nsm_device``) and produces attestation documents in exactly the AWS format:
an untagged ES384 ``COSE_Sign1`` whose payload map has the keys, in order, ``module_id``,
``digest``, ``timestamp``, ``pcrs``, ``certificate``, ``cabundle``, ``public_key``,
``user_data``, ``nonce`` (null when absent). They are signed by a local CA chain shaped like
AWS's: a P-384 root, three intermediates (regional ``pathLen 2``, zonal ``pathLen 1``, instance
``pathLen 0``) and a short-lived (3 h) leaf with ``basicConstraints CA:FALSE`` and
``keyUsage digitalSignature, nonRepudiation``. A verifier pins :attr:`LocalNsm.root_pem` instead
of the AWS root; every other check is the production one.

Only the root persists (optionally, with :meth:`LocalNsm.from_dir`, so that a parent and an
enclave process on one machine share it). The intermediates are minted per ``LocalNsm`` with
AWS-like lifetimes (20 d, 6 d, 1 d) and renewed when they would expire within a leaf's lifetime;
each document gets a fresh leaf.

PCR semantics follow the NSM: 32 PCRs of 48 bytes; 0..15 hold the boot measurements and are
locked (read-only); 16..31 start at zero, can be extended (``PCR = SHA-384(PCR || data)``) and
then locked. A document carries every *locked* PCR, so 0..15 plus any locked 16..31.

Thread safety: every method takes one lock, so the object can be shared with
``trio.to_thread.run_sync`` callers as the real device is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ._cose import sign1_es384
from ._nsm_device import NsmError, encode_request

#: Number of PCRs, their size (SHA-384), and the boot-measurement PCRs that are read-only.
NSM_MAX_PCRS: Final = 32
PCR_BYTES: Final = 48
READ_ONLY_PCRS: Final = range(16)
#: Largest ``user_data``, ``nonce`` and ``public_key`` an attestation request may carry.
NSM_MAX_USER_FIELD_BYTES: Final = 1024
#: Bytes one ``get_random()`` returns (the NSM returns up to 256).
NSM_RANDOM_BYTES: Final = 256
#: Leaf validity; AWS's is about 3 h, starting a few seconds before the document.
LEAF_LIFETIME: Final = timedelta(hours=3)
_LEAF_BACKDATE = timedelta(seconds=3)
_ROOT_LIFETIME = timedelta(days=30 * 365)
_INTERMEDIATE_LIFETIMES = {
    "regional": timedelta(days=20),
    "zonal": timedelta(days=6),
    "instance": timedelta(days=1),
}
_PATH_LENGTHS = {"regional": 2, "zonal": 1, "instance": 0}
#: File names inside a :meth:`LocalNsm.from_dir` directory.
ROOT_BUNDLE_FILE: Final = "local-nsm-root.key.pem"
ROOT_CERT_FILE: Final = "local-nsm-root.pem"
#: PCR1 of a local enclave: a fixed stand-in for the kernel and boot ramdisk (there is none).
LOCAL_KERNEL_PCR1: Final = hashlib.sha384(b"trio-sign local NSM PCR1").digest()
#: PCR0 of a local enclave run from a source checkout (see :func:`local_image_digest`).
SOURCE_TREE_PCR0: Final = hashlib.sha384(b"trio-sign local NSM PCR0").digest()


def local_image_digest() -> bytes:
    """PCR0 of a local enclave: the stand-in for an EIF's image measurement.

    For an installed package (a wheel, the image): :func:`package_files_digest` of the
    installed ``trio_sign`` and ``proto_min``, so any change to the code changes it. Run from a
    source checkout (a ``.git`` above the package), whose files change under a running test
    suite while one process pins and another boots: the fixed :data:`SOURCE_TREE_PCR0`.
    """
    import proto_min
    import trio_sign

    roots = [Path(p.__file__ or "").resolve().parent for p in (trio_sign, proto_min)]
    if any((parent / ".git").exists() for parent in roots[0].parents):
        return SOURCE_TREE_PCR0
    return package_files_digest(roots)


def package_files_digest(roots: list[Path]) -> bytes:
    """SHA-384 over the files under ``roots``, in sorted order of their paths (each named
    ``<root name>/<relative path>``, then its length and bytes; ``__pycache__`` left out)."""
    digest = hashlib.sha384(b"trio-sign local image v1\0")
    files: list[tuple[str, Path]] = []
    for root in roots:
        for path in root.rglob("*"):
            if "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo"):
                continue
            if path.is_file():
                files.append((f"{root.name}/{path.relative_to(root).as_posix()}", path))
    for name, path in sorted(files):
        data = path.read_bytes()
        encoded = name.encode()
        digest.update(len(encoded).to_bytes(4, "big") + encoded)
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.digest()


def local_pcrs(config_sha256: bytes, *, image_digest: bytes | None = None) -> dict[int, bytes]:
    """The boot measurements (PCR0, PCR1, PCR2) of a local enclave running the measured
    configuration whose file's SHA-256 is ``config_sha256`` (DESIGN §9).

    PCR0 is :func:`local_image_digest` (the installed code), PCR1 :data:`LOCAL_KERNEL_PCR1`,
    PCR2 ``SHA-384(PCR0 || SHA-256(config))``: a changed configuration file changes PCR2, a
    changed installed package changes PCR0 and PCR2, and a KMS key policy or a parent that pins them
    refuses the enclave. The local enclave's NSM reports exactly these
    (``trio-sign enclave --nsm local:DIR --config FILE``).

    Args:
        config_sha256: SHA-256 of the configuration file's exact bytes (32 bytes).
        image_digest: PCR0 if already computed (default: computed now).
    """
    if len(config_sha256) != 32:
        raise ValueError("config_sha256 must be 32 bytes")
    pcr0 = image_digest if image_digest is not None else local_image_digest()
    pcr2 = hashlib.sha384(pcr0 + config_sha256).digest()
    return {0: pcr0, 1: LOCAL_KERNEL_PCR1, 2: pcr2}


def local_pcrs_for_config(path: str | os.PathLike[str]) -> dict[int, bytes]:
    """:func:`local_pcrs` of the configuration file at ``path``: what tools pin (a
    ``pcrs.json``, a kms-local key policy, parent.toml's ``[attestation]``) for a local enclave
    started with ``--config path``.

    Raises:
        OSError: the file cannot be read.
    """
    return local_pcrs(hashlib.sha256(Path(path).read_bytes()).digest())


class _DefaultLocalPcrs(Mapping[int, bytes]):
    """:func:`local_pcrs` of the built-in development configuration, computed on each read
    (the code may change between two reads in a development tree; a pin taken just before a
    launch matches the enclave it launches)."""

    def __init__(self) -> None:
        self._cached: tuple[float, dict[int, bytes]] | None = None

    def _values(self) -> dict[int, bytes]:
        from ..enclave._measured import DEVELOPMENT_CONFIG  # the enclave imports nitro first

        # Reading the package's files takes ~10 ms: one read serves the reads of one second
        # (``dict(DEFAULT_LOCAL_PCRS)`` reads three values).
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] > 1.0:
            self._cached = (now, local_pcrs(hashlib.sha256(DEVELOPMENT_CONFIG).digest()))
        return self._cached[1]

    def __getitem__(self, index: int) -> bytes:
        return self._values()[index]

    def __iter__(self) -> Iterator[int]:
        return iter((0, 1, 2))

    def __len__(self) -> int:
        return 3

    def __repr__(self) -> str:
        return "DEFAULT_LOCAL_PCRS(<local_pcrs of the development configuration>)"


#: Boot measurements of a non-debug local enclave whose measured configuration is the built-in
#: development one (``DEVELOPMENT_CONFIG``): what a :class:`LocalNsm` reports by default and
#: what the local tools pin when no configuration file is given. Read lazily: ``dict(...)``.
DEFAULT_LOCAL_PCRS: Final[Mapping[int, bytes]] = _DefaultLocalPcrs()

Clock = Callable[[], datetime]


def load_pcr_json(source: str | os.PathLike[str] | Mapping[str, Any]) -> dict[int, bytes]:
    """PCR values from ``nitro-cli build-enclave`` output or a plain mapping.

    Accepts ``{"Measurements": {"PCR0": hex, ...}}`` (what ``nitro-cli`` prints),
    ``{"PCR0": hex, ...}`` or ``{"0": hex, ...}``; a path to such a JSON file; or the parsed
    object. Non-PCR keys (``"HashAlgorithm"``) are ignored.

    Raises:
        ValueError: a PCR index outside 0..31 or a value that is not 48 bytes of hex.
    """
    if isinstance(source, Mapping):
        data: Any = source
    else:
        data = json.loads(Path(source).read_text(encoding="utf-8"))
    if isinstance(data, Mapping) and isinstance(data.get("Measurements"), Mapping):
        data = data["Measurements"]
    if not isinstance(data, Mapping):
        raise ValueError("PCR JSON is not an object")
    pcrs: dict[int, bytes] = {}
    for key, value in data.items():
        name = str(key).upper().removeprefix("PCR")
        if not name.isdigit():
            continue
        index = int(name)
        if not 0 <= index < NSM_MAX_PCRS:
            raise ValueError(f"PCR index {index} is outside 0..{NSM_MAX_PCRS - 1}")
        try:
            raw = bytes.fromhex(str(value))
        except ValueError as exc:
            raise ValueError(f"PCR{index} is not hex") from exc
        if len(raw) != PCR_BYTES:
            raise ValueError(f"PCR{index} is {len(raw)} bytes, expected {PCR_BYTES}")
        pcrs[index] = raw
    return pcrs


@dataclass(frozen=True)
class _Ca:
    role: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


class LocalNsm:
    """An in-process NSM that signs AWS-format attestation documents with a local CA.

    Args:
        root_key: the local root's private key (P-384); default a fresh one.
        root_cert: the local root certificate; default a fresh self-signed one for ``root_key``.
        pcrs: boot measurements for PCR 0..15 (48 bytes each); absent ones are zero. Default
            :data:`DEFAULT_LOCAL_PCRS`.
        debug: report as a debug-mode enclave: PCR0, PCR1 and PCR2 are zero whatever ``pcrs``
            says.
        module_id: the NSM module id; default a random ``i-<17 hex>-enc<16 hex>`` like AWS's.
        clock: where time comes from (tests pass a fixed clock); default UTC now.
    """

    def __init__(
        self,
        *,
        root_key: ec.EllipticCurvePrivateKey | None = None,
        root_cert: x509.Certificate | None = None,
        pcrs: Mapping[int, bytes] | None = None,
        debug: bool = False,
        module_id: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._clock: Clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()
        now = self._now()
        if root_cert is not None and root_key is None:
            raise ValueError("a root certificate needs its private key")
        key = root_key or ec.generate_private_key(ec.SECP384R1())
        if not isinstance(key.curve, ec.SECP384R1):
            raise ValueError("the local root key must be P-384")
        if root_cert is None:
            root_cert = _self_signed_root(key, now)
        elif root_cert.public_key() != key.public_key():
            raise ValueError("the local root certificate does not match its private key")
        self._root = _Ca("root", key, root_cert)
        self.module_id = module_id or f"i-{secrets.token_hex(9)[:17]}-enc{secrets.token_hex(8)}"
        self._instance_id = self.module_id.split("-enc")[0]
        self._intermediates: list[_Ca] = []
        self._pcrs = [bytes(PCR_BYTES)] * NSM_MAX_PCRS
        self._locked = [i in READ_ONLY_PCRS for i in range(NSM_MAX_PCRS)]
        initial = dict(DEFAULT_LOCAL_PCRS if pcrs is None else pcrs)
        for index, value in initial.items():
            if index not in READ_ONLY_PCRS:
                raise ValueError(f"boot measurement PCR{index} must be in 0..15")
            if len(value) != PCR_BYTES:
                raise ValueError(f"PCR{index} is {len(value)} bytes, expected {PCR_BYTES}")
            self._pcrs[index] = bytes(value)
        if debug:
            for index in (0, 1, 2):
                self._pcrs[index] = bytes(PCR_BYTES)
        self._renew_intermediates(now)

    @classmethod
    def from_dir(
        cls, path: str | os.PathLike[str], *, create: bool = False, **kwargs: Any
    ) -> LocalNsm:
        """A ``LocalNsm`` whose root lives in directory ``path``.

        The directory holds ``local-nsm-root.key.pem`` (private key and certificate, mode 0600)
        and ``local-nsm-root.pem`` (the certificate alone, for verifiers to pin). With
        ``create=True`` a missing root is generated; two processes racing to create it end up
        sharing one (the first atomic link wins). ``kwargs`` go to the constructor.

        Raises:
            FileNotFoundError: no root there and ``create`` is false.
            NsmError: ``reason="bad_local_root"`` if the key file is readable by group or
                others, or is not a matching key and certificate.
        """
        directory = Path(path)
        bundle = directory / ROOT_BUNDLE_FILE
        if not bundle.exists():
            if not create:
                raise FileNotFoundError(
                    f"no local NSM root in {directory} (create it with create=True)"
                )
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            key = ec.generate_private_key(ec.SECP384R1())
            clock: Clock = kwargs.get("clock") or (lambda: datetime.now(UTC))
            cert = _self_signed_root(key, clock())
            _create_exclusive(bundle, _bundle_pem(key, cert), mode=0o600)
        key, cert = _read_bundle(bundle)
        pin = cert.public_bytes(serialization.Encoding.PEM)
        cert_file = directory / ROOT_CERT_FILE
        if not cert_file.exists() or cert_file.read_bytes() != pin:
            _replace(cert_file, pin, mode=0o644)
        return cls(root_key=key, root_cert=cert, **kwargs)

    # -- what a verifier pins ---------------------------------------------------------------------

    @property
    def root_pem(self) -> bytes:
        """The local root certificate, PEM: pass it as ``verify_attestation(root_pem=...)``."""
        return self._root.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def root_certificate(self) -> x509.Certificate:
        return self._root.cert

    # -- the NSM operations (same names and shapes as NsmDevice) ----------------------------------

    def attestation(
        self,
        *,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes:
        """A fresh attestation document (raw untagged COSE_Sign1 bytes).

        Raises:
            NsmError: ``reason="InputTooLarge"`` if a field exceeds 1024 bytes.
            TypeError: a field is not bytes (as ``NsmDevice``).
        """
        fields = {"user_data": user_data, "nonce": nonce, "public_key": public_key}
        for name, value in fields.items():
            if value is not None and not isinstance(value, bytes | bytearray | memoryview):
                raise TypeError(f"{name} must be bytes or None")
            if value is not None and len(value) > NSM_MAX_USER_FIELD_BYTES:
                raise NsmError(
                    f"NSM refused Attestation: InputTooLarge ({name} is {len(value)} bytes, "
                    f"the limit is {NSM_MAX_USER_FIELD_BYTES})",
                    reason="InputTooLarge",
                )
        encode_request(
            "Attestation", {k: None if v is None else bytes(v) for k, v in fields.items()}
        )
        with self._lock:
            now = self._now()
            self._renew_intermediates(now)
            leaf_key, leaf = self._issue_leaf(now)
            payload: dict[str, Any] = {
                "module_id": self.module_id,
                "digest": "SHA384",
                "timestamp": _epoch_ms(now),
                "pcrs": {i: self._pcrs[i] for i in range(NSM_MAX_PCRS) if self._locked[i]},
                "certificate": leaf.public_bytes(serialization.Encoding.DER),
                "cabundle": [self._root.der, *(ca.der for ca in self._intermediates)],
                "public_key": None if public_key is None else bytes(public_key),
                "user_data": None if user_data is None else bytes(user_data),
                "nonce": None if nonce is None else bytes(nonce),
            }
        return sign1_es384(cbor2.dumps(payload), leaf_key)

    def describe_pcr(self, index: int) -> tuple[bool, bytes]:
        """``(locked, value)`` of PCR ``index``."""
        with self._lock:
            self._check_index(index)
            return self._locked[index], self._pcrs[index]

    def extend_pcr(self, index: int, data: bytes) -> bytes:
        """Extend PCR ``index`` with ``data`` (``SHA-384(old || data)``) and return the new value.

        Raises:
            NsmError: ``reason`` ``"InvalidIndex"`` (32 or more), ``"ReadOnlyIndex"`` (0..15,
                or locked), ``"request_too_large"`` (the request would exceed 4096 bytes).
            ValueError, TypeError: an index that is not a u16, data that is not bytes.
        """
        self._check_index(index)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("data must be bytes")
        encode_request("ExtendPCR", {"index": index, "data": bytes(data)})  # the size limit
        with self._lock:
            if self._locked[index]:
                raise NsmError(
                    f"NSM refused ExtendPCR: ReadOnlyIndex (PCR{index} is locked)",
                    reason="ReadOnlyIndex",
                )
            value = hashlib.sha384(self._pcrs[index] + bytes(data)).digest()
            self._pcrs[index] = value
            return value

    def lock_pcr(self, index: int) -> None:
        """Lock PCR ``index`` (16..31) against further extension; locking it again is a no-op.

        Raises:
            NsmError: ``reason`` ``"InvalidIndex"`` (32 or more), ``"ReadOnlyIndex"`` (0..15
                are the boot measurements, locked from the start).
        """
        with self._lock:
            self._check_index(index)
            if index in READ_ONLY_PCRS:
                raise NsmError(
                    f"NSM refused LockPCR: ReadOnlyIndex (PCR{index} is a boot measurement)",
                    reason="ReadOnlyIndex",
                )
            self._locked[index] = True

    def get_random(self) -> bytes:
        """256 random bytes (from the OS CSPRNG here; from the Nitro hardware on AWS)."""
        return secrets.token_bytes(NSM_RANDOM_BYTES)

    def describe_nsm(self) -> dict[str, Any]:
        """The ``DescribeNSM`` response: versions, module id, PCR count, locked PCRs, digest."""
        with self._lock:
            locked = [i for i in range(NSM_MAX_PCRS) if self._locked[i]]
        return {
            "version_major": 1,
            "version_minor": 0,
            "version_patch": 0,
            "module_id": self.module_id,
            "max_pcrs": NSM_MAX_PCRS,
            "locked_pcrs": locked,
            "digest": "SHA384",
        }

    def close(self) -> None:
        """Nothing to release (parity with the device client)."""

    def __enter__(self) -> LocalNsm:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalNsm(module_id={self.module_id!r})"

    # -- internals --------------------------------------------------------------------------------

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("LocalNsm clock must return aware datetimes")
        return now.astimezone(UTC)

    @staticmethod
    def _check_index(index: int) -> None:
        # Same split as NsmDevice: a non-u16 is a caller bug, an unknown PCR is the NSM's refusal.
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 0xFFFF:
            raise ValueError(f"PCR index must be an integer in 0..65535, got {index!r}")
        if index >= NSM_MAX_PCRS:
            raise NsmError(
                f"NSM refused the request: InvalidIndex (PCR{index}; there are {NSM_MAX_PCRS})",
                reason="InvalidIndex",
            )

    def _renew_intermediates(self, now: datetime) -> None:
        """Mint regional -> zonal -> instance again if any would expire within a leaf's life."""
        horizon = now + LEAF_LIFETIME + _LEAF_BACKDATE
        if self._intermediates and all(
            ca.cert.not_valid_before_utc <= now and ca.cert.not_valid_after_utc >= horizon
            for ca in self._intermediates
        ):
            return
        if self._root.cert.not_valid_after_utc < horizon:
            raise NsmError(
                "the local NSM root has expired; delete it to mint a new one",
                reason="bad_local_root",
            )
        region = "local-1"
        names = {
            "regional": _name(f"{secrets.token_hex(8)}.{region}.trio-sign.nitro-enclaves"),
            "zonal": _name(
                f"{secrets.token_hex(8)}.zonal.{region}.trio-sign.nitro-enclaves",
                locality=True,
            ),
            "instance": _name(
                f"{self._instance_id}.{region}.trio-sign.nitro-enclaves", locality=True
            ),
        }
        issuer = self._root
        chain: list[_Ca] = []
        for role in ("regional", "zonal", "instance"):
            key = ec.generate_private_key(ec.SECP384R1())
            cert = _ca_cert(
                subject=names[role],
                key=key,
                issuer=issuer,
                not_before=now - timedelta(minutes=5),
                lifetime=_INTERMEDIATE_LIFETIMES[role],
                path_length=_PATH_LENGTHS[role],
                crl_sign=role != "instance",
            )
            issuer = _Ca(role, key, cert)
            chain.append(issuer)
        self._intermediates = chain

    def _issue_leaf(self, now: datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        instance = self._intermediates[-1]
        key = ec.generate_private_key(ec.SECP384R1())
        not_before = (now - _LEAF_BACKDATE).replace(microsecond=0)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{self.module_id}.local-1.trio-sign", locality=True))
            .issuer_name(instance.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_before + LEAF_LIFETIME + _LEAF_BACKDATE)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True, content_commitment=True), False)
            .sign(instance.key, hashes.SHA384())
        )
        return key, cert


# -- certificates ---------------------------------------------------------------------------------


def _name(common_name: str, *, locality: bool = False) -> x509.Name:
    attrs = [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "trio-sign"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "local NSM"),
    ]
    if locality:
        attrs[1:1] = [
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "Local"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Localhost"),
        ]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _key_usage(
    *,
    digital_signature: bool = False,
    content_commitment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=content_commitment,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _self_signed_root(key: ec.EllipticCurvePrivateKey, now: datetime) -> x509.Certificate:
    name = _name("trio-sign.local-nitro-enclaves")
    # Backdated a day: processes sharing a root may disagree a little about the time.
    not_before = (now - timedelta(days=1)).replace(microsecond=0)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + _ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            _key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True
        )
        .sign(key, hashes.SHA384())
    )


def _ca_cert(
    *,
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: _Ca,
    not_before: datetime,
    lifetime: timedelta,
    path_length: int,
    crl_sign: bool,
) -> x509.Certificate:
    not_before = not_before.replace(microsecond=0)
    not_after = min(not_before + lifetime, issuer.cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            # AWS: regional and zonal say digitalSignature, keyCertSign, cRLSign; the instance
            # CA says keyCertSign only.
            _key_usage(digital_signature=crl_sign, key_cert_sign=True, crl_sign=crl_sign),
            critical=True,
        )
        .sign(issuer.key, hashes.SHA384())
    )


def _epoch_ms(when: datetime) -> int:
    return (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


# -- the root on disk -----------------------------------------------------------------------------


def _bundle_pem(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bytes:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem + cert.public_bytes(serialization.Encoding.PEM)


def _read_bundle(path: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    mode = path.stat().st_mode
    if mode & 0o077:
        raise NsmError(
            f"{path} is readable by group or others (mode {mode & 0o777:o}); chmod 600 it",
            reason="bad_local_root",
        )
    data = path.read_bytes()
    marker = b"-----BEGIN CERTIFICATE-----"
    split = data.find(marker)
    try:
        if split < 0:
            raise ValueError("no certificate")
        key = serialization.load_pem_private_key(data[:split], password=None)
        cert = x509.load_pem_x509_certificate(data[split:])
    except ValueError as exc:
        raise NsmError(f"{path} is not a local NSM root bundle", reason="bad_local_root") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.public_key() != key.public_key():
        raise NsmError(f"{path}: key and certificate do not match", reason="bad_local_root")
    return key, cert


def _create_exclusive(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``path`` atomically unless it exists (then another process won; keep theirs)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _replace(path: Path, data: bytes, *, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
