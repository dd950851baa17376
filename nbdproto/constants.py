"""NBD protocol numbers (doc/proto.md): magics, options, option replies, info types, commands, flags, errno.

Plain ``int`` constants (not enums) because the request path compares them millions of times a second;
``OPT_NAMES`` / ``CMD_NAMES`` / ``REP_NAMES`` give readable names for messages.
"""

from __future__ import annotations

import errno as _errno
from typing import Final

# --- magics -------------------------------------------------------------------------------------------
NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC: Final = 0x0003E889045565A9
REQUEST_MAGIC: Final = 0x25609513
EXTENDED_REQUEST_MAGIC: Final = 0x21E41C71
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF
EXTENDED_REPLY_MAGIC: Final = 0x6E8A278C

# --- handshake flags (server, 16 bit) and client flags (32 bit) -----------------------------------------
FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1
FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_C_NO_ZEROES: Final = 1 << 1
CLIENT_FLAGS_KNOWN: Final = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# --- transmission flags (16 bit) ------------------------------------------------------------------------
FLAG_HAS_FLAGS: Final = 1 << 0
FLAG_READ_ONLY: Final = 1 << 1
FLAG_SEND_FLUSH: Final = 1 << 2
FLAG_SEND_FUA: Final = 1 << 3
FLAG_ROTATIONAL: Final = 1 << 4
FLAG_SEND_TRIM: Final = 1 << 5
FLAG_SEND_WRITE_ZEROES: Final = 1 << 6
FLAG_SEND_DF: Final = 1 << 7
FLAG_CAN_MULTI_CONN: Final = 1 << 8
FLAG_SEND_RESIZE: Final = 1 << 9
FLAG_SEND_CACHE: Final = 1 << 10
FLAG_SEND_FAST_ZERO: Final = 1 << 11
FLAG_BLOCK_STAT_PAYLOAD: Final = 1 << 12

# --- options --------------------------------------------------------------------------------------------
OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_LIST: Final = 3
OPT_PEEK_EXPORT: Final = 4
OPT_STARTTLS: Final = 5
OPT_INFO: Final = 6
OPT_GO: Final = 7
OPT_STRUCTURED_REPLY: Final = 8
OPT_LIST_META_CONTEXT: Final = 9
OPT_SET_META_CONTEXT: Final = 10
OPT_EXTENDED_HEADERS: Final = 11

OPT_NAMES: Final[dict[int, str]] = {
    OPT_EXPORT_NAME: "EXPORT_NAME",
    OPT_ABORT: "ABORT",
    OPT_LIST: "LIST",
    OPT_PEEK_EXPORT: "PEEK_EXPORT",
    OPT_STARTTLS: "STARTTLS",
    OPT_INFO: "INFO",
    OPT_GO: "GO",
    OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT",
    OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
    OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS",
}

# --- option replies -------------------------------------------------------------------------------------
REP_ACK: Final = 1
REP_SERVER: Final = 2
REP_INFO: Final = 3
REP_META_CONTEXT: Final = 4
REP_FLAG_ERROR: Final = 1 << 31
REP_ERR_UNSUP: Final = REP_FLAG_ERROR | 1
REP_ERR_POLICY: Final = REP_FLAG_ERROR | 2
REP_ERR_INVALID: Final = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM: Final = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD: Final = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN: Final = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN: Final = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD: Final = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG: Final = REP_FLAG_ERROR | 9
REP_ERR_EXT_HEADER_REQD: Final = REP_FLAG_ERROR | 10

REP_NAMES: Final[dict[int, str]] = {
    REP_ACK: "ACK",
    REP_SERVER: "SERVER",
    REP_INFO: "INFO",
    REP_META_CONTEXT: "META_CONTEXT",
    REP_ERR_UNSUP: "ERR_UNSUP",
    REP_ERR_POLICY: "ERR_POLICY",
    REP_ERR_INVALID: "ERR_INVALID",
    REP_ERR_PLATFORM: "ERR_PLATFORM",
    REP_ERR_TLS_REQD: "ERR_TLS_REQD",
    REP_ERR_UNKNOWN: "ERR_UNKNOWN",
    REP_ERR_SHUTDOWN: "ERR_SHUTDOWN",
    REP_ERR_BLOCK_SIZE_REQD: "ERR_BLOCK_SIZE_REQD",
    REP_ERR_TOO_BIG: "ERR_TOO_BIG",
    REP_ERR_EXT_HEADER_REQD: "ERR_EXT_HEADER_REQD",
}

# --- info types (NBD_OPT_INFO / NBD_OPT_GO) -------------------------------------------------------------
INFO_EXPORT: Final = 0
INFO_NAME: Final = 1
INFO_DESCRIPTION: Final = 2
INFO_BLOCK_SIZE: Final = 3

# --- commands and command flags -------------------------------------------------------------------------
CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_TRIM: Final = 4
CMD_CACHE: Final = 5
CMD_WRITE_ZEROES: Final = 6
CMD_BLOCK_STATUS: Final = 7
CMD_RESIZE: Final = 8

CMD_NAMES: Final[dict[int, str]] = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
    CMD_RESIZE: "RESIZE",
}

CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1
CMD_FLAG_DF: Final = 1 << 2
CMD_FLAG_REQ_ONE: Final = 1 << 3
CMD_FLAG_FAST_ZERO: Final = 1 << 4
CMD_FLAG_PAYLOAD_LEN: Final = 1 << 5

# --- replies --------------------------------------------------------------------------------------------
REPLY_FLAG_DONE: Final = 1 << 0

REPLY_TYPE_NONE: Final = 0
REPLY_TYPE_OFFSET_DATA: Final = 1
REPLY_TYPE_OFFSET_HOLE: Final = 2
REPLY_TYPE_BLOCK_STATUS: Final = 5
REPLY_TYPE_BLOCK_STATUS_EXT: Final = 6
REPLY_TYPE_ERROR: Final = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET: Final = (1 << 15) | 2

# --- meta contexts --------------------------------------------------------------------------------------
META_BASE_ALLOCATION: Final = "base:allocation"
META_QEMU_ALLOCATION_DEPTH: Final = "qemu:allocation-depth"
# one context per persistent dirty bitmap: the prefix, then the bitmap's name (qemu-nbd's --bitmap)
META_QEMU_DIRTY_BITMAP: Final = "qemu:dirty-bitmap:"
STATE_HOLE: Final = 1 << 0  # base:allocation
STATE_ZERO: Final = 1 << 1  # base:allocation
STATE_DIRTY: Final = 1 << 0  # qemu:dirty-bitmap:NAME

# --- errno ----------------------------------------------------------------------------------------------
NBD_EPERM: Final = 1
NBD_EIO: Final = 5
NBD_ENOMEM: Final = 12
NBD_EINVAL: Final = 22
NBD_ENOSPC: Final = 28
NBD_EOVERFLOW: Final = 75
NBD_ENOTSUP: Final = 95
NBD_ESHUTDOWN: Final = 108

# The wire values are Linux's; the keys are the host's, which may differ on other systems.
_ERRNO_TO_NBD: Final[dict[int, int]] = {
    _errno.EPERM: NBD_EPERM,
    _errno.EACCES: NBD_EPERM,
    _errno.EROFS: NBD_EPERM,
    _errno.EIO: NBD_EIO,
    _errno.ENOMEM: NBD_ENOMEM,
    _errno.EINVAL: NBD_EINVAL,
    _errno.ENOSPC: NBD_ENOSPC,
    _errno.EFBIG: NBD_ENOSPC,
    _errno.EDQUOT: NBD_ENOSPC,
    _errno.EOVERFLOW: NBD_EOVERFLOW,
    _errno.ENOTSUP: NBD_ENOTSUP,
    _errno.EOPNOTSUPP: NBD_ENOTSUP,
    _errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def nbd_errno(posix_errno: int) -> int:
    """Map a host errno to the NBD wire errno (spec table); anything unknown becomes EINVAL."""
    return _ERRNO_TO_NBD.get(posix_errno, NBD_EINVAL)


# --- limits ---------------------------------------------------------------------------------------------
MAX_PAYLOAD: Final = 32 * 1024 * 1024  # largest READ/WRITE payload, as qemu-nbd
MAX_OPTION_LENGTH: Final = 64 * 1024  # largest option payload we buffer
MAX_NAME_LENGTH: Final = 4096  # export names and meta context queries
MAX_STRING: Final = 4096
