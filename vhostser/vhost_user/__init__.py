"""vhost-user: the message table, the sans-io back-end state machine and its trio connection."""

from .backend import PROTOCOL_FEATURES, Outcome, Transfer, VhostUserBackend
from .connection import Journal, receive_message, send_backend_request, serve_connection
from .errors import FramingError, MessageError, ResumeError, UnknownRequestError, VhostUserError
from .interface import Device
from .messages import (
    F_PROTOCOL_FEATURES,
    BackendRequest,
    Header,
    Message,
    ProtocolFeature,
    Request,
    decode,
    encode,
)
from .vring import Vring

__all__ = [
    "F_PROTOCOL_FEATURES",
    "PROTOCOL_FEATURES",
    "BackendRequest",
    "Device",
    "FramingError",
    "Header",
    "Journal",
    "Message",
    "MessageError",
    "Outcome",
    "ProtocolFeature",
    "Request",
    "ResumeError",
    "Transfer",
    "UnknownRequestError",
    "VhostUserBackend",
    "VhostUserError",
    "Vring",
    "decode",
    "encode",
    "receive_message",
    "send_backend_request",
    "serve_connection",
]
