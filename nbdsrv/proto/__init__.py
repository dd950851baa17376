"""Sans-IO NBD protocol: constants, wire layouts, events and the handshake/transmission state machines.

Entry point: ``ServerConnection`` (see nbdsrv.proto.connection for the usage contract) and the events in
nbdsrv.proto.events. Nothing here does I/O.
"""

from .connection import Phase, ProtocolConfig, ServerConnection
from .events import (
    ConnectionClosed,
    Disconnect,
    Event,
    ExportInfo,
    ExportInfoRequest,
    InvalidRequest,
    ListRequest,
    ProtocolError,
    Ready,
    Request,
    StartTLS,
)
from .negotiation import Negotiated, Security

__all__ = [
    "ConnectionClosed",
    "Disconnect",
    "Event",
    "ExportInfo",
    "ExportInfoRequest",
    "InvalidRequest",
    "ListRequest",
    "Negotiated",
    "Phase",
    "ProtocolConfig",
    "ProtocolError",
    "Ready",
    "Request",
    "Security",
    "ServerConnection",
    "StartTLS",
]
