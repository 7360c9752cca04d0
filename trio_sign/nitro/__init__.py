"""AWS Nitro Enclaves: attestation documents, the NSM, and the local stand-ins used off AWS."""

from ._attestation import AWS_NITRO_ROOT_PEM as AWS_NITRO_ROOT_PEM
from ._attestation import AWS_NITRO_ROOT_SHA256 as AWS_NITRO_ROOT_SHA256
from ._attestation import MAX_DOCUMENT_BYTES as MAX_DOCUMENT_BYTES
from ._attestation import MAX_USER_FIELD_BYTES as MAX_USER_FIELD_BYTES
from ._attestation import REASONS as REASONS
from ._attestation import AttestationDocument as AttestationDocument
from ._attestation import AttestationError as AttestationError
from ._attestation import CertificateInfo as CertificateInfo
from ._attestation import VerifiedAttestation as VerifiedAttestation
from ._attestation import decode_attestation as decode_attestation
from ._attestation import verify_attestation as verify_attestation
from ._binding import NO_DELTAS as NO_DELTAS
from ._binding import Binding as Binding
from ._binding import BindingError as BindingError
from ._binding import decode_binding as decode_binding
from ._binding import encode_binding as encode_binding
from ._channel import MAX_FRAME_BYTES as MAX_FRAME_BYTES
from ._channel import MAX_METRICS_BYTES as MAX_METRICS_BYTES
from ._channel import AttestationMessage as AttestationMessage
from ._channel import BundleChunkMessage as BundleChunkMessage
from ._channel import BundleEndMessage as BundleEndMessage
from ._channel import ChannelMessage as ChannelMessage
from ._channel import ChannelProtocolError as ChannelProtocolError
from ._channel import DrainMessage as DrainMessage
from ._channel import DroppedMessage as DroppedMessage
from ._channel import EventsConfigMessage as EventsConfigMessage
from ._channel import ExitMessage as ExitMessage
from ._channel import Frame as Frame
from ._channel import FrameChannel as FrameChannel
from ._channel import HelloMessage as HelloMessage
from ._channel import LogMessage as LogMessage
from ._channel import MetricsMessage as MetricsMessage
from ._channel import PreloadResultMessage as PreloadResultMessage
from ._channel import RecipientCiphertextMessage as RecipientCiphertextMessage
from ._channel import StateMessage as StateMessage
from ._channel import decode_message as decode_message
from ._cms import MAX_RECIPIENT_CIPHERTEXT_BYTES as MAX_RECIPIENT_CIPHERTEXT_BYTES
from ._cms import CmsError as CmsError
from ._cms import EphemeralRecipientKey as EphemeralRecipientKey
from ._cms import decrypt_recipient_ciphertext as decrypt_recipient_ciphertext
from ._cms import encrypt_for_recipient as encrypt_for_recipient
from ._cms import subject_key_identifier as subject_key_identifier
from ._local_nsm import DEFAULT_LOCAL_PCRS as DEFAULT_LOCAL_PCRS
from ._local_nsm import LocalNsm as LocalNsm
from ._local_nsm import load_pcr_json as load_pcr_json
from ._local_nsm import local_pcrs as local_pcrs
from ._local_nsm import local_pcrs_for_config as local_pcrs_for_config
from ._message_stream import ChannelClosed as ChannelClosed
from ._message_stream import MessageStream as MessageStream
from ._nsm_device import NSM_IOCTL_RAW as NSM_IOCTL_RAW
from ._nsm_device import AsyncNsm as AsyncNsm
from ._nsm_device import EntropySeed as EntropySeed
from ._nsm_device import NsmDevice as NsmDevice
from ._nsm_device import NsmError as NsmError
from ._nsm_device import NsmLike as NsmLike
from ._nsm_device import seed_entropy as seed_entropy

__all__ = [
    "AWS_NITRO_ROOT_PEM",
    "AWS_NITRO_ROOT_SHA256",
    "AsyncNsm",
    "AttestationDocument",
    "AttestationError",
    "AttestationMessage",
    "BundleChunkMessage",
    "BundleEndMessage",
    "CertificateInfo",
    "ChannelClosed",
    "ChannelMessage",
    "ChannelProtocolError",
    "CmsError",
    "DEFAULT_LOCAL_PCRS",
    "NO_DELTAS",
    "Binding",
    "BindingError",
    "decode_binding",
    "encode_binding",
    "local_pcrs",
    "local_pcrs_for_config",
    "DrainMessage",
    "DroppedMessage",
    "EntropySeed",
    "EphemeralRecipientKey",
    "EventsConfigMessage",
    "ExitMessage",
    "Frame",
    "FrameChannel",
    "HelloMessage",
    "LocalNsm",
    "LogMessage",
    "MessageStream",
    "MetricsMessage",
    "MAX_DOCUMENT_BYTES",
    "MAX_FRAME_BYTES",
    "MAX_METRICS_BYTES",
    "MAX_RECIPIENT_CIPHERTEXT_BYTES",
    "MAX_USER_FIELD_BYTES",
    "NSM_IOCTL_RAW",
    "NsmDevice",
    "NsmError",
    "NsmLike",
    "PreloadResultMessage",
    "REASONS",
    "RecipientCiphertextMessage",
    "StateMessage",
    "VerifiedAttestation",
    "decode_attestation",
    "decode_message",
    "decrypt_recipient_ciphertext",
    "encrypt_for_recipient",
    "load_pcr_json",
    "seed_entropy",
    "subject_key_identifier",
    "verify_attestation",
]
