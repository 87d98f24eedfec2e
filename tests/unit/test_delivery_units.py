"""The delivery service's pure parts (no servers): message ids that record the sending
device, and a connection's outgoing queue (seq order, METADATA kept with its message)."""

from __future__ import annotations

import asyncio
import struct
import uuid

from services.delivery import protocol as p
from services.delivery.connections import MAX_QUEUED, Connection
from services.delivery.server import Origin, origin_id, origin_of


def test_origin_ids_round_trip_and_fit_an_event_id() -> None:
    for device, msgid in [(0, 0), (2**63 - 1, -(2**31)), (12345, 2**31 - 1)]:
        made = origin_id(device, msgid)
        assert origin_of(made) == Origin(device, msgid)
        assert len(made) <= 64  # an event id's limit
    assert origin_id(1, 2) != origin_id(1, 2)


def test_other_message_ids_have_no_origin() -> None:
    assert origin_of(uuid.uuid4().hex) is None
    assert origin_of("d" + "f" * 31) is None  # a REST message id may start with "d"
    assert origin_of("gn-abc-1") is None
    assert origin_of("dx.1.abc") is None


async def test_a_connection_writes_in_send_order_with_consecutive_seqs() -> None:
    written: list[bytes] = []

    async def write(frames: list[bytes]) -> None:
        written.extend(frames)

    conn = Connection("tcp", "test", write)
    conn.version = 2
    conn.send(p.out_metadata(5, 4), p.out_im(p.IM, p.IMMessage(1, 2, 3, 0, b"x"), p.FLAG_PUSH))
    conn.send(p.Out(p.SYNC_NOTIFY, p.encode_key(5)))
    await conn.flushed()
    seqs = [struct.unpack_from(">i", f, 4)[0] for f in written]
    cmds = [f[8] for f in written]
    assert seqs == [1, 2, 3] and cmds == [p.METADATA, p.IM, p.SYNC_NOTIFY]


async def test_a_slow_connection_drops_whole_sends_oldest_first() -> None:
    release = asyncio.Event()
    written: list[list[bytes]] = []

    async def write(frames: list[bytes]) -> None:
        await release.wait()
        written.append(frames)

    conn = Connection("tcp", "test", write)
    for n in range(MAX_QUEUED + 10):
        conn.send(p.out_metadata(n + 1, n), p.Out(p.SYNC_NOTIFY, p.encode_key(n + 1)))
    release.set()
    await conn.flushed()
    # The 10 oldest sends were dropped, each METADATA with its pair; the rest are in order.
    assert len(written) == MAX_QUEUED
    assert all(len(frames) == 2 for frames in written)
    kept = [struct.unpack_from(">q", frames[0], 12)[0] for frames in written]
    assert kept == list(range(11, MAX_QUEUED + 11))
