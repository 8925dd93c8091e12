"""NBD wire protocol: constants and struct packing, nothing else.

Names and numbers follow the protocol document (``doc/proto.md`` of the NBD project). Only the
fixed newstyle handshake exists here: oldstyle cannot name exports, and plain newstyle cannot
report errors for options.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

# NBD_REP_INFO types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_CAN_MULTI_CONN = 1 << 8

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH", CMD_TRIM: "TRIM",
             CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES", CMD_BLOCK_STATUS: "BLOCK_STATUS"}

# command flags
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply chunk types and flags
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# errno values on the wire (fixed by the protocol, not the host's)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle (cookie), offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
CHUNK_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, handle, length

#: Upper bound of an option's payload: names and info requests are tiny; anything bigger is abuse.
MAX_OPTION_LENGTH = 64 * 1024
#: Upper bound of one request's payload (what the server advertises as maximum block size).
MAX_REQUEST_LENGTH = 32 * 1024 * 1024
MAX_NAME_LENGTH = 4096


def server_greeting() -> bytes:
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def option_reply(option: int, reply_type: int, payload: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply_type, len(payload)) + payload


def info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", INFO_EXPORT, size, flags)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


def info_name(name: str) -> bytes:
    return struct.pack(">H", INFO_NAME) + name.encode()


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    """The reply to the old NBD_OPT_EXPORT_NAME (no option-reply framing, maybe 124 zeroes)."""
    return struct.pack(">QH", size, flags) + (b"" if no_zeroes else b"\0" * 124)


def simple_reply(handle: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def chunk(handle: int, chunk_type: int, payload: bytes, done: bool = True) -> bytes:
    flags = REPLY_FLAG_DONE if done else 0
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, chunk_type, handle, len(payload)) + payload


def offset_data_header(handle: int, offset: int, length: int) -> bytes:
    """Header of a final NBD_REPLY_TYPE_OFFSET_DATA chunk carrying ``length`` bytes of data."""
    return (CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, handle, 8 + length)
            + struct.pack(">Q", offset))


def error_chunk(handle: int, error: int, message: str) -> bytes:
    """NBD_REPLY_TYPE_ERROR: errno plus a human-readable message the client can log."""
    text = message.encode()[:4096]
    return chunk(handle, REPLY_TYPE_ERROR, struct.pack(">IH", error, len(text)) + text)


@dataclass(frozen=True)
class Request:
    flags: int
    type: int
    handle: int
    offset: int
    length: int

    @property
    def name(self) -> str:
        return CMD_NAMES.get(self.type, f"command {self.type}")


def parse_request(header: bytes) -> Request:
    """The 28-byte request header; raises ValueError on a bad magic (the stream is lost then)."""
    magic, flags, type_, handle, offset, length = REQUEST.unpack(header)
    if magic != REQUEST_MAGIC:
        raise ValueError(f"bad request magic 0x{magic:08x}")
    return Request(flags, type_, handle, offset, length)


def pack_request(type_: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    """A request header (for clients and tests)."""
    return REQUEST.pack(REQUEST_MAGIC, flags, type_, handle, offset, length)
