"""Key-share files (plaintext JSON Lines and sealed bundles) and the in-memory ``ShareStore``."""

from ._deltas import DeltaChain as DeltaChain
from ._deltas import SealedDelta as SealedDelta
from ._deltas import apply_delta as apply_delta
from ._deltas import load_delta as load_delta
from ._deltas import seal_delta as seal_delta
from ._keywrap import DataKeyProvider as DataKeyProvider
from ._keywrap import DevKeyFile as DevKeyFile
from ._plaintext import MAX_LINE_BYTES as MAX_LINE_BYTES
from ._plaintext import PlaintextEncoder as PlaintextEncoder
from ._plaintext import inspect_plaintext as inspect_plaintext
from ._plaintext import read_plaintext as read_plaintext
from ._plaintext import write_plaintext as write_plaintext
from ._plaintext import write_plaintext_file as write_plaintext_file
from ._records import ShareRecord as ShareRecord
from ._sealed import DEFAULT_CHUNK_SIZE as DEFAULT_CHUNK_SIZE
from ._sealed import ChunkDecrypted as ChunkDecrypted
from ._sealed import EndOfBundle as EndOfBundle
from ._sealed import Event as Event
from ._sealed import HeaderReceived as HeaderReceived
from ._sealed import SealedDecoder as SealedDecoder
from ._sealed import SealedEncoder as SealedEncoder
from ._sealed import SealResult as SealResult
from ._sealed import encode_bundle as encode_bundle
from ._sealed import inspect_sealed as inspect_sealed
from ._sealed import read_sealed as read_sealed
from ._sealed import read_sealed_header as read_sealed_header
from ._sealed import reseal as reseal
from ._sealed import seal_file as seal_file
from ._sealed import sign_bundle as sign_bundle
from ._sealed import sign_file as sign_file
from ._signature import BundleSignature as BundleSignature
from ._signature import BundleSigner as BundleSigner
from ._signature import BundleTrust as BundleTrust
from ._signature import CeremonyKey as CeremonyKey
from ._signature import SigningError as SigningError
from ._signature import verify_digest as verify_digest
from ._store import AccountShare as AccountShare
from ._store import SealedLoader as SealedLoader
from ._store import ShareStore as ShareStore

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_LINE_BYTES",
    "AccountShare",
    "BundleSignature",
    "BundleSigner",
    "BundleTrust",
    "CeremonyKey",
    "ChunkDecrypted",
    "DataKeyProvider",
    "DevKeyFile",
    "EndOfBundle",
    "Event",
    "HeaderReceived",
    "PlaintextEncoder",
    "SealResult",
    "SealedDecoder",
    "SealedEncoder",
    "SealedLoader",
    "ShareRecord",
    "ShareStore",
    "SigningError",
    "encode_bundle",
    "inspect_plaintext",
    "inspect_sealed",
    "read_plaintext",
    "read_sealed",
    "read_sealed_header",
    "reseal",
    "seal_file",
    "sign_bundle",
    "sign_file",
    "verify_digest",
    "write_plaintext",
    "write_plaintext_file",
    "DeltaChain",
    "SealedDelta",
    "seal_delta",
    "load_delta",
    "apply_delta",
]
