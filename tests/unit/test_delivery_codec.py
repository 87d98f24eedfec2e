"""The wire protocol's frames as pure functions: the worked examples' bytes (wire protocol
§11), the version rules (§2) and the inbound validation that closes a connection (§1.6)."""

from __future__ import annotations

import pytest

from services.delivery import protocol as p


def hexbytes(text: str) -> bytes:
    return bytes.fromhex(" ".join(text.split()))


AUTH_FRAME = hexbytes(
    """00 00 00 0f 00 00 00 01 0f 02 00 00 02 06 61 62 63 31 32 33 06 64 65 76 2d 30 31"""
)


def test_auth_token_example_decodes() -> None:
    header, command = p.decode_frame(AUTH_FRAME)
    assert header == p.Header(length=15, seq=1, cmd=p.AUTH_TOKEN, version=2, flag=0)
    assert command == p.AuthToken(platform=2, token=b"abc123", device_id=b"dev-01")


def test_auth_status_example_encodes() -> None:
    ok = p.Out(p.AUTH_STATUS, p.encode_status(0)).encode(seq=1, version=2)
    assert ok == hexbytes("00 00 00 04 00 00 00 01 03 02 00 00 00 00 00 00")
    # A failed auth carries version 0 (the connection's version before a successful auth).
    bad = p.Out(p.AUTH_STATUS, p.encode_status(1)).encode(seq=1, version=0)
    assert bad == hexbytes("00 00 00 04 00 00 00 01 03 00 00 00 00 00 00 01")


def test_sync_example() -> None:
    header, command = p.decode_frame(
        hexbytes("00 00 00 08 00 00 00 02 1a 02 00 00 00 00 00 00 00 00 00 00")
    )
    assert (header.cmd, header.seq, command) == (p.SYNC, 2, p.Key(0))
    end = p.Out(p.SYNC_END, p.encode_key(0x2000)).encode(seq=4, version=2)
    assert end == hexbytes("00 00 00 08 00 00 00 04 1c 02 00 00 00 00 00 00 00 00 20 00")


SYNCED_IM = hexbytes(
    """00 00 00 25 00 00 00 03 04 02 00 00
    00 00 00 00 00 00 03 ea 00 00 00 00 00 00 03 e9 65 53 f1 00 00 00 00 00
    7b 22 74 65 78 74 22 3a 22 79 6f 22 7d"""
)


def test_synced_im_example_encodes() -> None:
    message = p.IMMessage(1002, 1001, 1700000000, 0, b'{"text":"yo"}')
    assert p.out_im(p.IM, message).encode(seq=3, version=2) == SYNCED_IM


def test_im_v2_example_and_its_ack() -> None:
    sent = hexbytes(
        """00 00 00 25 00 00 00 05 04 02 00 00
        00 00 00 00 00 00 03 e9 00 00 00 00 00 00 03 ea 00 00 00 00 00 00 00 00
        7b 22 74 65 78 74 22 3a 22 68 69 22 7d"""
    )
    header, command = p.decode_frame(sent)
    assert header.seq == 5
    assert command == p.IMMessage(1001, 1002, 0, 0, b'{"text":"hi"}')
    meta = p.out_metadata(0x2100, 0x2000).encode(seq=5, version=2)
    assert meta == hexbytes(
        """00 00 00 20 00 00 00 05 25 02 00 00 00 00 00 00 00 00 21 00
        00 00 00 00 00 00 20 00"""
        + " 00" * 16
    )
    ack = p.out_ack(5).encode(seq=6, version=2)
    assert ack == hexbytes("00 00 00 05 00 00 00 06 05 02 00 00 00 00 00 05 00")
    refused = p.out_ack(5, p.ACK_NOT_GROUP_MEMBER).encode(seq=6, version=2)
    assert refused == hexbytes("00 00 00 05 00 00 00 06 05 02 00 00 00 00 00 05 40")
    # v1 (the JS SDK): no status byte; a refusal looks like the success (§12.4).
    assert p.out_ack(5, 64).encode(seq=6, version=1) == hexbytes(
        "00 00 00 04 00 00 00 06 05 01 00 00 00 00 00 05"
    )


def test_pushed_im_v1_example() -> None:
    message = p.IMMessage(1001, 1002, 0x6553F164, 0, b'{"text":"hi"}')
    pushed = p.out_im(p.IM, message, p.FLAG_PUSH).encode(seq=18, version=1)
    assert pushed == hexbytes(
        """00 00 00 25 00 00 00 12 04 01 10 00
        00 00 00 00 00 00 03 e9 00 00 00 00 00 00 03 ea 65 53 f1 64 00 00 00 00
        7b 22 74 65 78 74 22 3a 22 68 69 22 7d"""
    )
    # The client's v1 ACK of it parses, without a status.
    _, ack = p.decode_frame(hexbytes("00 00 00 04 00 00 00 09 05 01 00 00 00 00 00 12"))
    assert ack == p.Ack(18, 0)


def test_group_sync_example() -> None:
    _, command = p.decode_frame(
        hexbytes(
            "00 00 00 10 00 00 00 07 1e 02 00 00 00 00 00 00 00 00 0c 27 00 00 00 00 00 00 05 00"
        )
    )
    assert command == p.GroupKey(3111, 0x500)
    begin = p.Out(p.SYNC_GROUP_BEGIN, p.encode_group_key(3111, 0x500)).encode(seq=7, version=2)
    assert begin == hexbytes(
        "00 00 00 10 00 00 00 07 1f 02 00 00 00 00 00 00 00 00 0c 27 00 00 00 00 00 00 05 00"
    )


def test_ping_pong_example() -> None:
    header, command = p.decode_frame(hexbytes("00 00 00 00 00 00 00 0a 0d 02 00 00"))
    assert (header.cmd, header.seq, command) == (p.PING, 10, p.Empty())
    pong = p.Out(p.PONG).encode(seq=10, version=2)
    assert pong == hexbytes("00 00 00 00 00 00 00 0a 0e 02 00 00")


def test_v0_im_has_no_timestamp() -> None:
    legacy = hexbytes(
        """00 00 00 21 00 00 00 01 04 00 00 00
        00 00 00 00 00 00 03 e9 00 00 00 00 00 00 03 ea 00 00 00 00
        7b 22 74 65 78 74 22 3a 22 68 69 22 7d"""
    )
    _, command = p.decode_frame(legacy)
    assert command == p.IMMessage(1001, 1002, 0, 0, b'{"text":"hi"}')
    # Re-encoded for a v0 connection it is the same bytes; for v2, 4 bytes longer.
    assert p.out_im(p.IM, command).encode(seq=1, version=0) == legacy
    assert len(p.out_im(p.IM, command).encode(seq=1, version=2)) == len(legacy) + 4


def test_versions_above_two_read_like_two() -> None:
    _, ack = p.decode_frame(hexbytes("00 00 00 05 00 00 00 01 05 07 00 00 00 00 00 03 01"))
    assert ack == p.Ack(3, 1)
    _, im = p.decode_frame(p.out_im(p.IM, p.IMMessage(1, 2, 3, 4, b"x")).encode(seq=1, version=9))
    assert im == p.IMMessage(1, 2, 3, 4, b"x")


def test_seq_wraps_as_int32() -> None:
    wrapped = p.Out(p.PONG).encode(seq=2**31, version=2)
    assert wrapped[4:8] == bytes.fromhex("80000000")
    assert p.Out(p.PONG).encode(seq=2**32 + 1, version=2)[4:8] == bytes.fromhex("00000001")


def test_customer_round_trip() -> None:
    message = p.CustomerMessage(7, 1, 8, 2, 99, "客服".encode())
    header, decoded = p.decode_frame(
        p.Out(p.CUSTOMER_V2, p.encode_customer(message)).encode(seq=1, version=2)
    )
    assert header.cmd == p.CUSTOMER_V2 and decoded == message


# ---- what closes a connection (§1.6) --------------------------------------------------------


def raw(cmd: int, body: bytes = b"", *, length: int | None = None, version: int = 2) -> bytes:
    size = len(body) if length is None else length
    return p.HEADER.pack(size, 1, cmd, version, 0, 0) + body


@pytest.mark.parametrize("length", [-1, 32768, 2**31 - 1])
def test_bad_length_closes(length: int) -> None:
    with pytest.raises(p.ProtocolError):
        p.parse_header(raw(p.PING, length=length))


def test_largest_body_is_accepted() -> None:
    assert p.parse_header(raw(p.IM, length=32767)).length == 32767


@pytest.mark.parametrize("cmd", [0, 1, 2, 3, 6, 7, 9, 10, 11, 12, 16, 21, 23, 27, 36, 63, 65, 134])
def test_commands_outside_the_client_set_close(cmd: int) -> None:
    with pytest.raises(p.ProtocolError):
        p.parse_header(raw(cmd))


@pytest.mark.parametrize(
    ("cmd", "body", "version"),
    [
        (p.PING, b"\x00", 2),
        (p.PONG, b"x", 2),
        (p.IM, bytes(23), 2),
        (p.IM, bytes(19), 0),
        (p.GROUP_IM, bytes(23), 1),
        (p.RT, bytes(15), 2),
        (p.ROOM_IM, bytes(15), 2),
        (p.ENTER_ROOM, bytes(7), 2),
        (p.LEAVE_ROOM, bytes(7), 2),
        (p.UNREAD_COUNT, bytes(3), 2),
        (p.SYNC, bytes(7), 2),
        (p.SYNC_KEY, bytes(7), 2),
        (p.SYNC_GROUP, bytes(15), 2),
        (p.GROUP_SYNC_KEY, bytes(15), 2),
        (p.METADATA, bytes(31), 2),
        (p.CUSTOMER_V2, bytes(35), 2),
        (p.AUTH_TOKEN, b"\x02\x00\x00", 2),  # three bytes: too short (§12.25)
        (p.AUTH_TOKEN, b"\x02\x06abc123", 2),  # no device_len byte
        (p.AUTH_TOKEN, b"\x02\x09abc123\x00", 2),  # token longer than the body
        (p.AUTH_TOKEN, b"\x02\x01a\x05dev", 2),  # device id longer than the body
    ],
)
def test_short_or_bad_bodies_close(cmd: int, body: bytes, version: int) -> None:
    with pytest.raises(p.ProtocolError):
        p.decode_frame(raw(cmd, body, version=version))


@pytest.mark.parametrize(
    ("cmd", "body", "expected"),
    [
        (p.IM, bytes(24), p.IMMessage(0, 0, 0, 0, b"")),
        (p.RT, bytes(16), p.RTMessage(0, 0, b"")),
        (p.ACK, b"", p.Ack(0, 0)),  # an ACK never fails to parse
        (p.SYNC, bytes(8) + b"extra", p.Key(0)),  # trailing bytes ignored
        (p.METADATA, bytes(32), p.Empty()),
        (p.LEGACY_CUSTOMER, b"anything", p.Empty()),
        (p.LEGACY_CUSTOMER_SUPPORT, b"", p.Empty()),
        (p.AUTH_TOKEN, b"\x03\x01t\x00trailing", p.AuthToken(3, b"t", b"")),
    ],
)
def test_minimal_bodies_parse(cmd: int, body: bytes, expected: p.Command) -> None:
    assert p.decode_frame(raw(cmd, body))[1] == expected


def test_websocket_message_shorter_than_its_frame_closes() -> None:
    with pytest.raises(p.ProtocolError):
        p.decode_frame(raw(p.SYNC, bytes(8), length=9))
    with pytest.raises(p.ProtocolError):
        p.decode_frame(b"\x00\x00\x00")
    # Bytes after the first frame of a message are ignored.
    assert p.decode_frame(raw(p.SYNC, bytes(8)) + b"junk")[1] == p.Key(0)


def test_device_numbers() -> None:
    assert p.device_number(p.PLATFORM_ANDROID, b"") == 0
    one = p.device_number(p.PLATFORM_ANDROID, b"dev-01")
    assert one > 0 and one == p.device_number(p.PLATFORM_ANDROID, b"dev-01")
    assert one != p.device_number(p.PLATFORM_IOS, b"dev-01")
    assert one != p.device_number(p.PLATFORM_ANDROID, b"dev-02")
    assert p.device_number(p.PLATFORM_WEB, b"guid") > 0
