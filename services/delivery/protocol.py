"""GoBelieve's client wire protocol as pure functions: frames, body layouts, versions and the
inbound validation that closes a connection (wire protocol §1.2-§1.6, §2, §3.3, §4).

Nothing here does I/O. A frame is a 12-byte big-endian header (body length, seq, cmd,
version, flag, one reserved byte) and a body; ``decode_body`` turns a client frame's body into
a typed command (raising ``ProtocolError``, which closes the connection), ``encode`` turns a
server frame into bytes for a connection's version.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

HEADER = struct.Struct(">iiBBBB")
HEADER_SIZE = HEADER.size  # 12
MAX_BODY = 32767  # client->server body length limit (§1.3): 32768 and above closes
DEFAULT_VERSION = 2

# Commands (§3.1).
AUTH_STATUS = 3
IM = 4
ACK = 5
GROUP_NOTIFICATION = 7
GROUP_IM = 8
PING = 13
PONG = 14
AUTH_TOKEN = 15
RT = 17
ENTER_ROOM = 18
LEAVE_ROOM = 19
ROOM_IM = 20
SYSTEM = 21
UNREAD_COUNT = 22
LEGACY_CUSTOMER = 24
LEGACY_CUSTOMER_SUPPORT = 25
SYNC = 26
SYNC_BEGIN = 27
SYNC_END = 28
SYNC_NOTIFY = 29
SYNC_GROUP = 30
SYNC_GROUP_BEGIN = 31
SYNC_GROUP_END = 32
SYNC_GROUP_NOTIFY = 33
SYNC_KEY = 34
GROUP_SYNC_KEY = 35
NOTIFICATION = 36
METADATA = 37
CUSTOMER_V2 = 64

# What a client may send (§1.6 step 3); anything else closes the connection.
CLIENT_COMMANDS = frozenset(
    {4, 5, 8, 13, 14, 15, 17, 18, 19, 20, 22, 24, 25, 26, 30, 34, 35, 37, 64}
)

# Header flags (§4).
FLAG_TEXT = 0x01
FLAG_UNPERSISTENT = 0x02
FLAG_GROUP = 0x04
FLAG_SELF = 0x08
FLAG_PUSH = 0x10
FLAG_SUPER_GROUP = 0x20

# ACK statuses (§5.5).
ACK_OK = 0
ACK_NOT_MY_FRIEND = 1
ACK_NOT_YOUR_FRIEND = 2
ACK_IN_YOUR_BLACKLIST = 3
ACK_NOT_GROUP_MEMBER = 64
ACK_GROUP_NONEXIST = 65

# Auth platforms (§3.3).
PLATFORM_IOS = 1
PLATFORM_ANDROID = 2
PLATFORM_WEB = 3

# The largest stored content that still fits a client frame when read back (§12.39).
MAX_IM_CONTENT = MAX_BODY - 24
MAX_CUSTOMER_CONTENT = MAX_BODY - 36

_I64 = struct.Struct(">q")
_I32 = struct.Struct(">i")
_TWO_I64 = struct.Struct(">qq")
_IM_V1 = struct.Struct(">qqii")  # sender, receiver, timestamp, msgid
_IM_V0 = struct.Struct(">qqi")  # sender, receiver, msgid
_CUSTOMER = struct.Struct(">qqqqi")


class ProtocolError(Exception):
    """A client frame the server does not accept: the connection is closed, nothing sent."""


@dataclass(frozen=True, slots=True)
class Header:
    length: int
    seq: int
    cmd: int
    version: int
    flag: int


def parse_header(data: bytes) -> Header:
    """The 12-byte header of a client frame, checked (§1.6 steps 1-3)."""
    if len(data) < HEADER_SIZE:
        raise ProtocolError("short header")
    length, seq, cmd, version, flag, _ = HEADER.unpack_from(data)
    if length < 0 or length > MAX_BODY:
        raise ProtocolError(f"body length {length} out of range")
    if cmd not in CLIENT_COMMANDS:
        raise ProtocolError(f"command {cmd} not allowed from a client")
    return Header(length, seq, cmd, version, flag)


def frame(cmd: int, body: bytes, *, seq: int, version: int, flag: int = 0) -> bytes:
    """One frame's bytes. ``seq`` wraps modulo 2**32 (as a signed int32 on the wire)."""
    seq = (seq + 2**31) % 2**32 - 2**31
    return HEADER.pack(len(body), seq, cmd, version & 0xFF, flag & 0xFF, 0) + body


# ---- commands (decoded client bodies and server bodies) -------------------------------------


@dataclass(frozen=True, slots=True)
class AuthToken:
    platform: int
    token: bytes
    device_id: bytes


@dataclass(frozen=True, slots=True)
class IMMessage:
    """IM (4) or GROUP_IM (8): ``receiver`` is a uid or a group id."""

    sender: int
    receiver: int
    timestamp: int
    msgid: int
    content: bytes


@dataclass(frozen=True, slots=True)
class RTMessage:
    """RT (17) or ROOM_IM (20): ``receiver`` is a uid or a room id."""

    sender: int
    receiver: int
    content: bytes


@dataclass(frozen=True, slots=True)
class CustomerMessage:
    sender_appid: int
    sender: int
    receiver_appid: int
    receiver: int
    timestamp: int
    content: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    status: int = ACK_OK


@dataclass(frozen=True, slots=True)
class Key:
    """SYNC, SYNC_KEY (and the server's SYNC_BEGIN/END/NOTIFY): one int64."""

    key: int


@dataclass(frozen=True, slots=True)
class GroupKey:
    """SYNC_GROUP, GROUP_SYNC_KEY (and SYNC_GROUP_BEGIN/END/NOTIFY): group id, then key."""

    gid: int
    key: int


@dataclass(frozen=True, slots=True)
class Room:
    room: int


@dataclass(frozen=True, slots=True)
class Count:
    count: int


@dataclass(frozen=True, slots=True)
class Empty:
    """PING, PONG, and bodies the server accepts but ignores (METADATA, 24, 25)."""


Command = (
    AuthToken
    | IMMessage
    | RTMessage
    | CustomerMessage
    | Ack
    | Key
    | GroupKey
    | Room
    | Count
    | Empty
)


def _need(body: bytes, size: int, what: str) -> None:
    if len(body) < size:
        raise ProtocolError(f"{what} body of {len(body)} bytes, at least {size} needed")


def decode_auth(body: bytes) -> AuthToken:
    """AUTH_TOKEN: longer than 3 bytes; both strings must fit; bytes after them ignored."""
    if len(body) <= 3:
        raise ProtocolError("auth body too short")
    platform = struct.unpack_from(">b", body, 0)[0]
    token_len = body[1]
    token_end = 2 + token_len
    if token_end + 1 > len(body):
        raise ProtocolError("auth token does not fit")
    device_len = body[token_end]
    device_end = token_end + 1 + device_len
    if device_end > len(body):
        raise ProtocolError("auth device id does not fit")
    return AuthToken(platform, body[2:token_end], body[token_end + 1 : device_end])


def decode_im(body: bytes, version: int) -> IMMessage:
    """IM/GROUP_IM in the frame's own version: v0 has no timestamp (§2.1)."""
    if version == 0:
        _need(body, _IM_V0.size, "IM v0")
        sender, receiver, msgid = _IM_V0.unpack_from(body)
        return IMMessage(sender, receiver, 0, msgid, body[_IM_V0.size :])
    _need(body, _IM_V1.size, "IM")
    sender, receiver, timestamp, msgid = _IM_V1.unpack_from(body)
    return IMMessage(sender, receiver, timestamp, msgid, body[_IM_V1.size :])


def decode_body(cmd: int, version: int, body: bytes) -> Command:
    """A client frame's body for ``cmd`` (§1.6 step 5); ``ProtocolError`` when it does not
    parse. Extra trailing bytes are ignored except where the last field runs to the end."""
    if cmd == AUTH_TOKEN:
        return decode_auth(body)
    if cmd in (IM, GROUP_IM):
        return decode_im(body, version)
    if cmd == ACK:  # never fails, even empty (§3.3)
        seq = _I32.unpack_from(body)[0] if len(body) >= 4 else 0
        status = body[4] if version > 1 and len(body) >= 5 else ACK_OK
        return Ack(seq, status)
    if cmd in (PING, PONG):
        if body:
            raise ProtocolError("PING/PONG must have an empty body")
        return Empty()
    if cmd in (RT, ROOM_IM):
        _need(body, 16, "RT")
        sender, receiver = _TWO_I64.unpack_from(body)
        return RTMessage(sender, receiver, body[16:])
    if cmd in (ENTER_ROOM, LEAVE_ROOM):
        _need(body, 8, "room")
        return Room(_I64.unpack_from(body)[0])
    if cmd == UNREAD_COUNT:
        _need(body, 4, "UNREAD_COUNT")
        return Count(_I32.unpack_from(body)[0])
    if cmd in (SYNC, SYNC_KEY):
        _need(body, 8, "sync")
        return Key(_I64.unpack_from(body)[0])
    if cmd in (SYNC_GROUP, GROUP_SYNC_KEY):
        _need(body, 16, "group sync")
        gid, key = _TWO_I64.unpack_from(body)
        return GroupKey(gid, key)
    if cmd == METADATA:
        _need(body, 32, "METADATA")
        return Empty()
    if cmd == CUSTOMER_V2:
        _need(body, _CUSTOMER.size, "CUSTOMER_V2")
        sender_appid, sender, receiver_appid, receiver, ts = _CUSTOMER.unpack_from(body)
        return CustomerMessage(
            sender_appid, sender, receiver_appid, receiver, ts, body[_CUSTOMER.size :]
        )
    if cmd in (LEGACY_CUSTOMER, LEGACY_CUSTOMER_SUPPORT):
        return Empty()
    raise ProtocolError(f"command {cmd} not allowed from a client")


def decode_frame(data: bytes) -> tuple[Header, Command]:
    """One whole client frame (a WebSocket message): the first frame in ``data``; bytes after
    it are ignored, a message shorter than its header says closes (§1.5)."""
    header = parse_header(data)
    end = HEADER_SIZE + header.length
    if len(data) < end:
        raise ProtocolError("message shorter than its frame")
    return header, decode_body(header.cmd, header.version, data[HEADER_SIZE:end])


# ---- server bodies --------------------------------------------------------------------------


def encode_im(msg: IMMessage, version: int) -> bytes:
    """IM/GROUP_IM body in a connection's version: v0 without the timestamp."""
    if version == 0:
        return _IM_V0.pack(msg.sender, msg.receiver, msg.msgid) + msg.content
    return _IM_V1.pack(msg.sender, msg.receiver, msg.timestamp, msg.msgid) + msg.content


def encode_ack(seq: int, status: int, version: int) -> bytes:
    """ACK body: the status byte only for versions above 1 (§2.1)."""
    seq = (seq + 2**31) % 2**32 - 2**31
    if version > 1:
        return _I32.pack(seq) + struct.pack(">b", status)
    return _I32.pack(seq)


def encode_rt(msg: RTMessage) -> bytes:
    return _TWO_I64.pack(msg.sender, msg.receiver) + msg.content


def encode_customer(msg: CustomerMessage) -> bytes:
    return (
        _CUSTOMER.pack(
            msg.sender_appid, msg.sender, msg.receiver_appid, msg.receiver, msg.timestamp
        )
        + msg.content
    )


def encode_key(key: int) -> bytes:
    return _I64.pack(key)


def encode_group_key(gid: int, key: int) -> bytes:
    return _TWO_I64.pack(gid, key)


def encode_metadata(sync_key: int, prev_sync_key: int) -> bytes:
    return _TWO_I64.pack(sync_key, prev_sync_key) + bytes(16)


def encode_status(status: int) -> bytes:
    return _I32.pack(status)


# ---- what the server sends, independent of the connection's version ------------------------


@dataclass(frozen=True, slots=True)
class Out:
    """A server frame before a connection stamps its seq and version: the IM and ACK bodies
    depend on the version, so they are kept decoded (``message``/``ack``) until written."""

    cmd: int
    body: bytes = b""
    flag: int = 0
    message: IMMessage | None = None
    ack: Ack | None = None

    def encode(self, seq: int, version: int) -> bytes:
        body = self.body
        if self.message is not None:
            body = encode_im(self.message, version)
        elif self.ack is not None:
            body = encode_ack(self.ack.seq, self.ack.status, version)
        return frame(self.cmd, body, seq=seq, version=version, flag=self.flag)


def out_metadata(sync_key: int, prev_sync_key: int) -> Out:
    return Out(METADATA, encode_metadata(sync_key, prev_sync_key))


def out_ack(seq: int, status: int = ACK_OK, flag: int = 0) -> Out:
    return Out(ACK, flag=flag, ack=Ack(seq, status))


def out_im(cmd: int, message: IMMessage, flag: int = 0) -> Out:
    return Out(cmd, flag=flag, message=message)


def device_number(platform: int, device_id: bytes) -> int:
    """The numeric device id of (device id, platform) (§5.1 step 5): 0 without a device id,
    else a stable positive int63 derived from both (no counter to share between replicas).
    Web pages get one too, from their per-page id, so a user's tabs are told apart (§12.14)."""
    if not device_id:
        return 0
    digest = hashlib.blake2b(device_id + b"\x00" + bytes([platform & 0xFF]), digest_size=8)
    return int.from_bytes(digest.digest(), "big") >> 1 or 1
