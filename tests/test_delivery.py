"""The delivery service over real sockets (TCP and WebSocket) against the all-in-one stack, on
the in-process bus and on RabbitMQ: authentication, keep-alive, sync, live push, client sends
stored as REST sends are, groups, super groups, rooms, RT, multiple devices, and the inbound
validation that closes a connection (wire protocol §1.6, §5, §6, §7, §8)."""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from parley.servers import free_port
from services.auth.admin import AppCredentials, AuthAdmin
from services.customer.admin import CustomerAdmin
from shared.settings import Settings

from .conftest import App, Stack, _prepared_db, allinone_stack, basic, stack_settings
from .imclient import (
    ACK,
    AUTH_STATUS,
    CUSTOMER_V2,
    ENTER_ROOM,
    GROUP_IM,
    GROUP_NOTIFICATION,
    IM,
    METADATA,
    PING,
    PONG,
    ROOM_IM,
    RT,
    SUPER,
    SYNC,
    SYNC_GROUP,
    SYNC_GROUP_BEGIN,
    SYNC_GROUP_END,
    SYNC_GROUP_NOTIFY,
    SYNC_KEY,
    SYNC_NOTIFY,
    SYSTEM,
    Client,
    WsClient,
)


@pytest.fixture(scope="module", params=["local", "rabbit"])
async def im(request: pytest.FixtureRequest, mongo_url: str) -> AsyncIterator[Stack]:
    amqp = request.getfixturevalue("amqp_url") if request.param == "rabbit" else None
    async with allinone_stack(request.param, stack_settings(mongo_url, amqp)) as built:
        yield built


Transport = str  # "tcp" or "ws"
BOTH = pytest.mark.parametrize("transport", ["tcp", "ws"])


async def connect(stack: Stack, transport: Transport, version: int | None = None) -> Client:
    if transport == "tcp":
        return await Client.tcp(stack.settings.delivery_tcp_addr, version or 2)
    return await Client.ws(stack.settings.delivery_ws_addr, version or 1)


async def online(
    stack: Stack, app: App, uid: int, transport: Transport = "tcp", device: str = "dev-1"
) -> Client:
    """A connected, authenticated client of user ``uid`` (platform Android over TCP, web over
    WebSocket, as the SDKs)."""
    client = await connect(stack, transport)
    token = await stack.token(app, uid)
    assert await client.auth(token, 2 if transport == "tcp" else 3, device) == 0
    return client


async def rest_peer(stack: Stack, app: App, sender: int, receiver: int, content: str) -> None:
    status, body, _ = await stack.request(
        "POST",
        "/messages/peers",
        json={"sender": sender, "receiver": receiver, "content": content},
        headers=app.server_auth,
    )
    assert status == 200, body


async def history(stack: Stack, app: App, uid: int) -> list[dict[str, Any]]:
    status, body, _ = await stack.request("GET", "/messages", headers=await stack.client(app, uid))
    assert status == 200, body
    return list(body["data"])


async def create_group(stack: Stack, app: App, members: list[int], *, super_: bool = False) -> int:
    body = {"master": members[0], "name": "team", "super": super_, "members": members}
    status, reply, _ = await stack.request("POST", "/groups", json=body, headers=app.server_auth)
    assert status == 200, reply
    return int(reply["data"]["group_id"])


def key_body(key: int) -> bytes:
    return struct.pack(">q", key)


# ---- session ------------------------------------------------------------------------------


@BOTH
async def test_auth_ping_and_bad_tokens(im: Stack, transport: Transport) -> None:
    app = await im.new_app()
    client = await connect(im, transport)
    try:
        # PING is answered before authentication; other commands are ignored until then.
        await client.send(PING)
        pong = await client.next()
        assert (pong.cmd, pong.body, pong.version) == (PONG, b"", 0)
        await client.send(SYNC, key_body(0))
        # A bad token: status 1 in a version-0 frame; the connection stays open.
        await client.send(15, bytes([2, 3]) + b"bad" + bytes([1]) + b"d")
        status = await client.next()
        assert (status.cmd, status.version, status.body) == (AUTH_STATUS, 0, b"\x00\x00\x00\x01")
        # Then a good one: status 0 in the frame's version; the server seq keeps counting.
        assert await client.auth(await im.token(app, 7)) == 0
        assert client.frames == []
        await client.send(PING)
        pong = await client.next()
        assert (pong.cmd, pong.version, pong.seq) == (PONG, client.version, 4)
        # A second AUTH_TOKEN after success: ignored, no reply.
        await client.send(15, bytes([2, 3]) + b"bad" + bytes([1]) + b"d")
        await client.send(PING)
        assert (await client.next()).cmd == PONG
        assert client.frames == []
    finally:
        await client.close()


@BOTH
async def test_rest_peer_message_is_pushed_live_and_synced(im: Stack, transport: Transport) -> None:
    app = await im.new_app()
    bob = await online(im, app, 2, transport)
    try:
        await rest_peer(im, app, 1, 2, '{"text":"first"}')
        meta, message = await bob.pushed(IM)
        assert message.im()["sender"] == 1 and message.im()["content"] == '{"text":"first"}'
        key, prev = struct.unpack_from(">qq", meta.body)
        assert (key, prev) == (1, 0) and len(meta.body) == 32
        assert (await bob.next(SYNC_NOTIFY)).key() == 1
        # The first entry has no previous key: an SDK drops the push and syncs (§5.6).
        begin, messages, end = await bob.sync(0)
        assert (begin, end) == (0, 1)
        assert [m.im()["content"] for m in messages] == ['{"text":"first"}']
        assert messages[0].flag == 0
        await bob.send(SYNC_KEY, key_body(1))
        await rest_peer(im, app, 1, 2, '{"text":"second"}')
        meta, message = await bob.pushed(IM)
        assert struct.unpack_from(">qq", meta.body) == (2, 1)  # prev = the client's key: kept
        assert message.im()["content"] == '{"text":"second"}'
    finally:
        await bob.close()


async def test_sync_after_reconnect_returns_every_stored_message_once(im: Stack) -> None:
    app = await im.new_app()
    sent = [f'{{"n":{n}}}' for n in range(25)]
    for content in sent[:10]:
        await rest_peer(im, app, 1, 2, content)
    bob = await online(im, app, 2, "tcp")
    found, _ = await bob.sync_all(0)
    assert [m.im()["content"] for m in found] == sent[:10]
    await bob.close()
    # Offline: more arrive; the reconnected device (SYNC(0): the stored key) gets only those.
    for content in sent[10:]:
        await rest_peer(im, app, 1, 2, content)
    await asyncio.sleep(0.2)  # the SYNC_KEY above is stored before the next connection reads it
    status, body, _ = await im.request("GET", "/messages/offline?uid=2", headers=app.server_auth)
    assert status == 200 and body["data"]["count"] == 15
    again = await online(im, app, 2, "ws", "web-2")
    try:
        found2, key2 = await again.sync_all(0)
        assert [m.im()["content"] for m in found2] == sent[10:]
        assert key2 == 25
        # A client ahead of the server is moved back (§6.2 step 4).
        begin, messages, end = await again.sync(1000)
        assert (begin, messages, end) == (1000, [], 25)
    finally:
        await again.close()


# ---- client sends -------------------------------------------------------------------------


@BOTH
async def test_client_peer_message_reaches_every_device_and_history(
    im: Stack, transport: Transport
) -> None:
    app = await im.new_app()
    alice = await online(im, app, 1, transport, "alice-phone")
    alice_web = await online(im, app, 1, "ws", "alice-web")
    bob_phone = await online(im, app, 2, "tcp", "bob-phone")
    bob_web = await online(im, app, 2, "ws", "bob-web")
    try:
        seq = await alice.send_im(1, 2, '{"text":"hi"}', msgid=77)
        meta = await alice.next(METADATA)
        ack = await alice.next()
        assert ack.cmd == ACK and ack.seq == meta.seq + 1
        assert ack.ack() == (seq, 0 if alice.version > 1 else None)
        own_key = struct.unpack_from(">q", meta.body)[0]
        for device in (bob_phone, bob_web):
            _, message = await device.pushed(IM)
            got = message.im()
            assert (got["sender"], got["receiver"], got["msgid"]) == (1, 2, 77)
            assert got["content"] == '{"text":"hi"}' and message.flag == 0x10
            assert message.version == device.version
            assert (await device.next(SYNC_NOTIFY)).key() >= 1
        # The sender's other device gets the copy from the sender's inbox; the sending one none.
        other_meta, copy = await alice_web.pushed(IM)
        assert struct.unpack_from(">q", other_meta.body)[0] == own_key
        assert copy.im()["msgid"] == 77
        assert [f.cmd for f in await alice.quiet(0.3)] == []
        # Stored as a REST-sent message: in both histories.
        for uid in (1, 2):
            entries = await history(im, app, uid)
            assert [(e["command"], e["sender"], e["receiver"], e["content"]) for e in entries] == [
                (4, 1, 2, '{"text":"hi"}')
            ]
        # In sync, the sending device sees SELF; the other devices of the sender do not.
        _, mine, _ = await alice.sync(own_key - 1)
        _, theirs, _ = await alice_web.sync(own_key - 1)
        assert [m.flag for m in mine] == [0x08] and [m.flag for m in theirs] == [0]
        # Someone else's identity: dropped, no ACK, nothing stored.
        await alice.send_im(3, 2, "forged")
        await alice.send(PING)
        assert [f.cmd for f in await alice.quiet(0.3)] == [PONG]
        assert len(await history(im, app, 2)) == 1
    finally:
        for client in (alice, alice_web, bob_phone, bob_web):
            await client.close()


async def test_group_messages(im: Stack) -> None:
    app = await im.new_app()
    gid = await create_group(im, app, [1, 2, 3])
    await im.wait_inbox(app.appid, "u:2", 1)  # the creation's group notification
    alice, bob, eve = (
        await online(im, app, 1, "tcp"),
        await online(im, app, 2, "ws"),
        await online(im, app, 4, "tcp"),
    )
    try:
        # The group notification of the creation is delivered by sync.
        _, messages, _ = await bob.sync(0)
        assert [m.cmd for m in messages] == [GROUP_NOTIFICATION]
        seq = await alice.send_im(1, gid, '{"text":"team"}', cmd=GROUP_IM)
        meta = await alice.next(METADATA)
        ack = await alice.next(ACK)
        assert ack.ack() == (seq, 0) and ack.seq == meta.seq + 1 and ack.flag == 0
        _, message = await bob.pushed(GROUP_IM)
        assert message.flag == 0x10
        assert message.im() | {"timestamp": 0} == {
            "sender": 1,
            "receiver": gid,
            "timestamp": 0,
            "msgid": 0,
            "content": '{"text":"team"}',
        }
        entries = await history(im, app, 3)
        assert [(e["command"], e["receiver"], e["content"]) for e in entries] == [
            (8, gid, '{"text":"team"}')
        ]
        # Not a member: 64; no such group: 65 (v2 clients see the status).
        seq = await eve.send_im(4, gid, "x", cmd=GROUP_IM)
        assert (await eve.next(ACK)).ack() == (seq, 64)
        seq = await eve.send_im(4, gid + 10_000, "x", cmd=GROUP_IM)
        assert (await eve.next(ACK)).ack() == (seq, 65)
        assert len(await history(im, app, 3)) == 1
    finally:
        for client in (alice, bob, eve):
            await client.close()


async def test_super_group_messages_and_group_sync(im: Stack) -> None:
    app = await im.new_app()
    gid = await create_group(im, app, [1, 2], super_=True)
    alice, bob = await online(im, app, 1, "tcp"), await online(im, app, 2, "ws")
    outsider = await online(im, app, 9, "tcp")
    try:
        seq = await alice.send_im(1, gid, '{"text":"big"}', msgid=5, cmd=GROUP_IM)
        meta = await alice.next(METADATA)
        ack = await alice.next(ACK)
        assert ack.ack() == (seq, 0) and ack.flag == SUPER and ack.seq == meta.seq + 1
        gkey = struct.unpack_from(">q", meta.body)[0]
        meta_b, message = await bob.pushed(GROUP_IM)
        assert message.flag == 0x30 and message.im()["msgid"] == 5
        assert struct.unpack_from(">q", meta_b.body)[0] == gkey
        assert (await bob.next(SYNC_GROUP_NOTIFY)).group_key() == (gid, gkey)
        # SYNC_GROUP from before it: BEGIN(start), the message, END(its key).
        await bob.send(SYNC_GROUP, struct.pack(">qq", gid, gkey - 1))
        assert (await bob.next(SYNC_GROUP_BEGIN)).group_key() == (gid, gkey - 1)
        synced = await bob.next()
        assert synced.cmd == GROUP_IM and synced.im()["content"] == '{"text":"big"}'
        assert (await bob.next()).group_key() == (gid, gkey)
        await bob.send(35, struct.pack(">qq", gid, gkey))  # GROUP_SYNC_KEY
        # From 0: the stored group key, so nothing new.
        await bob.send(SYNC_GROUP, struct.pack(">qq", gid, 0))
        assert (await bob.next(SYNC_GROUP_BEGIN)).group_key() == (gid, gkey)
        assert (await bob.next()).cmd == SYNC_GROUP_END
        # A non-member's group sync gets nothing at all.
        await outsider.send(SYNC_GROUP, struct.pack(">qq", gid, 0))
        await outsider.send(PING)
        assert [f.cmd for f in await outsider.quiet(0.3)] == [PONG]
    finally:
        for client in (alice, bob, outsider):
            await client.close()


async def test_rooms_and_rt(im: Stack) -> None:
    app = await im.new_app()
    alice, bob, carol = (
        await online(im, app, 1, "tcp"),
        await online(im, app, 2, "ws"),
        await online(im, app, 3, "tcp"),
    )
    try:
        for client in (alice, bob):
            await client.send(ENTER_ROOM, key_body(500))
        await alice.send(PING)
        await alice.next(PONG)
        seq = await alice.send(ROOM_IM, struct.pack(">qq", 99, 500) + b"hello room")
        assert (await alice.next(ACK)).ack()[0] == seq
        got = await bob.next(ROOM_IM)
        assert got.rt() == (1, 500, "hello room")  # the sender is the authenticated user
        # Not in that room: dropped, no ACK; carol (in no room) got nothing.
        await carol.send(ROOM_IM, struct.pack(">qq", 3, 500) + b"x")
        await carol.send(PING)
        assert [f.cmd for f in await carol.quiet(0.3)] == [PONG]
        # REST room messages reach the room too.
        status, _, _ = await im.request(
            "POST",
            "/messages/rooms",
            json={"sender": 0, "receiver": 500, "content": "from the server"},
            headers=app.server_auth,
        )
        assert status == 200
        assert (await bob.next(ROOM_IM)).rt()[2] == "from the server"
        assert (await alice.next(ROOM_IM)).rt()[2] == "from the server"
        # RT: to the receiver's live connections.
        await alice.send(RT, struct.pack(">qq", 1, 3) + b"typing")
        assert (await carol.next(RT)).rt() == (1, 3, "typing")
    finally:
        for client in (alice, bob, carol):
            await client.close()


async def test_system_messages_and_notifications(im: Stack) -> None:
    app = await im.new_app()
    bob = await online(im, app, 2, "ws")
    try:
        status, _, _ = await im.request(
            "POST",
            "/messages/systems",
            json={"receiver": 2, "content": "sys"},
            headers=app.server_auth,
        )
        assert status == 200
        key = (await bob.next(SYNC_NOTIFY)).key()
        _, messages, end = await bob.sync(key - 1)
        assert [(m.cmd, m.body) for m in messages] == [(SYSTEM, b"sys")] and end == key
        status, _, _ = await im.request(
            "POST",
            "/messages/notifications",
            json={"receiver": 2, "content": "note"},
            headers=app.server_auth,
        )
        assert status == 200
        assert (await bob.next(36)).body == b"note"
    finally:
        await bob.close()


# ---- what closes a connection (§1.6) -----------------------------------------------------


def header(length: int, cmd: int, version: int = 2) -> bytes:
    return struct.pack(">iiBBBB", length, 1, cmd, version, 0, 0)


@BOTH
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(header(32768, 4), id="oversized"),
        pytest.param(header(-1, 13), id="negative-length"),
        pytest.param(header(0, 1), id="legacy-heartbeat"),
        pytest.param(header(0, 3), id="server-command"),
        pytest.param(header(1, 13) + b"x", id="ping-with-body"),
        pytest.param(header(20, 4) + bytes(20), id="short-im"),
        pytest.param(header(3, 15) + b"\x02\x00\x00", id="short-auth"),
    ],
)
async def test_invalid_frames_close_the_connection(
    im: Stack, transport: Transport, data: bytes
) -> None:
    client = await connect(im, transport)
    try:
        await client.write(data)
        await client.wait_closed()
        assert client.frames == []
    finally:
        await client.close()


async def test_a_text_websocket_message_closes(im: Stack) -> None:
    client = await connect(im, "ws")
    try:
        assert isinstance(client, WsClient)
        await client.socket.send_str("hello")
        await client.wait_closed()
    finally:
        await client.close()


async def test_idle_connections_are_closed(mongo_url: str) -> None:
    settings = stack_settings(mongo_url, None).model_copy(update={"delivery_idle_timeout": 0.5})
    async with allinone_stack("local", settings) as stack:
        client = await connect(stack, "tcp")
        try:
            await client.send(PING)
            assert (await client.next()).cmd == PONG
            await client.wait_closed(timeout=5.0)
        finally:
            await client.close()


async def with_kefu_app(settings: Settings) -> tuple[Settings, AppCredentials]:
    """The customer-service app, made before the stack starts (it is configured), and the
    settings naming it (``PARLEY_KEFU_APPID``)."""
    client, db = await _prepared_db(settings)
    try:
        kefu = await AuthAdmin(db, settings).create_app("kefu")
    finally:
        await client.close()
    return settings.model_copy(update={"kefu_appid": kefu.appid}), kefu


async def test_customer_messages_between_apps(mongo_url: str) -> None:
    settings, kefu = await with_kefu_app(stack_settings(mongo_url, None))
    async with allinone_stack("local", settings) as stack:
        shop = await stack.new_app("shop")
        agent_app = App(kefu.appid, kefu.key, kefu.secret)
        visitor = await online(stack, shop, 7, "tcp")
        agent = await online(stack, agent_app, 50, "ws")
        try:
            body = struct.pack(">qqqqi", shop.appid, 7, kefu.appid, 50, 0) + b"help"
            seq = await visitor.send(CUSTOMER_V2, body)
            meta = await visitor.next(METADATA)
            ack = await visitor.next(ACK)
            assert ack.ack() == (seq, 0) and ack.seq == meta.seq + 1
            _, pushed = await agent.pushed(CUSTOMER_V2)
            sender_appid, sender, receiver_appid, receiver, _ = struct.unpack_from(
                ">qqqqi", pushed.body
            )
            assert (sender_appid, sender, receiver_appid, receiver) == (
                shop.appid,
                7,
                kefu.appid,
                50,
            )
            assert pushed.body[36:] == b"help"
            _, synced, _ = await agent.sync(0)
            assert [(m.cmd, m.body[36:]) for m in synced] == [(CUSTOMER_V2, b"help")]
            # Neither side the customer-service app: dropped, no ACK.
            await visitor.send(CUSTOMER_V2, struct.pack(">qqqqi", shop.appid, 7, shop.appid, 8, 0))
            await visitor.send(PING)
            assert [f.cmd for f in await visitor.quiet(0.3)] == [PONG]
        finally:
            await visitor.close()
            await agent.close()


async def visitor_sees(stack: Stack, shop: App, store_id: int, expected: str) -> None:
    """Until ``/supporters`` (S18) reports the store's single agent ``expected``."""
    status, reply, _ = await stack.request(
        "POST",
        "/customer/register",
        json={"appid": shop.appid, "customer_id": "presence-visitor"},
        headers={"Authorization": basic(shop.appid, shop.key)},
    )
    assert status == 200, reply
    auth = {"Authorization": f"Bearer {reply['data']['token']}"}
    async with asyncio.timeout(10):
        while True:
            status, reply, _ = await stack.request(
                "GET", f"/supporters?store_id={store_id}", headers=auth
            )
            assert status == 200, reply
            if reply["data"]["status"] == expected:
                return
            await asyncio.sleep(0.05)


async def test_agent_presence_follows_connections(mongo_url: str) -> None:
    """An agent (a user of the customer-service app) is online from its first connection to
    its last: ``/supporters`` says so."""
    settings = stack_settings(mongo_url, None)
    client, db = await _prepared_db(settings)
    try:
        kefu = await AuthAdmin(db, settings).create_app("kefu")
    finally:
        await client.close()
    settings = settings.model_copy(update={"kefu_appid": kefu.appid})
    async with allinone_stack("local", settings) as stack:
        shop = await stack.new_app("shop")
        customer = CustomerAdmin(stack.db, stack.settings)
        store_id = await customer.create_store(shop.appid, "desk")
        seller = await customer.add_agent(shop.appid, store_id, "ann")
        agent_app = App(kefu.appid, kefu.key, kefu.secret)
        await visitor_sees(stack, shop, store_id, "offline")
        # A user of another app with the seller's number is not the agent.
        other = await online(stack, shop, seller, "tcp")
        phone = await online(stack, agent_app, seller, "tcp", "phone")
        try:
            await visitor_sees(stack, shop, store_id, "online")
            await other.close()
            web = await online(stack, agent_app, seller, "ws", "web")
            try:
                await phone.close()
                await asyncio.sleep(1.0)  # the close is seen; a second connection remains
                await visitor_sees(stack, shop, store_id, "online")
            finally:
                await web.close()
            await visitor_sees(stack, shop, store_id, "offline")
            # Reconnecting: online again.
            again = await online(stack, agent_app, seller, "tcp", "phone")
            try:
                await visitor_sees(stack, shop, store_id, "online")
            finally:
                await again.close()
            await visitor_sees(stack, shop, store_id, "offline")
        finally:
            await phone.close()
            await other.close()


async def test_tls_listeners(mongo_url: str, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = await asyncio.create_subprocess_exec(
        *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
        *("-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await made.wait() == 0
    settings = stack_settings(mongo_url, None).model_copy(
        update={
            "delivery_tls_addr": f"127.0.0.1:{free_port()}",
            "delivery_wss_addr": f"127.0.0.1:{free_port()}",
            "delivery_cert_file": str(cert),
            "delivery_key_file": str(key),
        }
    )
    tls = ssl.create_default_context(cafile=str(cert))
    tls.check_hostname = False
    async with allinone_stack("local", settings) as stack:
        app = await stack.new_app()
        token = await stack.token(app, 1)
        for client in (
            await Client.tcp(settings.delivery_tls_addr, 2, tls),
            await Client.ws(settings.delivery_wss_addr, 1, tls),
        ):
            try:
                assert await client.auth(token) == 0
                await client.send(PING)
                assert (await client.next()).cmd == PONG
            finally:
                await client.close()


@BOTH
async def test_commands_the_server_accepts_and_ignores(im: Stack, transport: Transport) -> None:
    app = await im.new_app()
    client = await online(im, app, 1, transport)
    try:
        await client.send(ACK, struct.pack(">i", 3) + b"\x00")  # a client's ACK of a frame
        await client.send(PONG)
        await client.send(METADATA, bytes(32))
        await client.send(22, struct.pack(">i", 5))  # UNREAD_COUNT
        await client.send(24, b"legacy customer")
        await client.send(25, b"")
        await client.send(SYNC_KEY, key_body(0))  # 0 changes nothing
        await client.send(19, key_body(77))  # LEAVE_ROOM of a room it is not in
        await client.send(PING)
        assert [f.cmd for f in await client.quiet(0.3)] == [PONG]
    finally:
        await client.close()


async def test_websocket_path_and_message_limit(im: Stack) -> None:
    addr = im.settings.delivery_ws_addr
    async with aiohttp.ClientSession() as http, http.get(f"http://{addr}/other") as resp:
        assert resp.status == 404  # the upgrade is served on /ws only (§1.5)
    client = await connect(im, "ws")
    try:
        assert isinstance(client, WsClient)
        # Over the 64 KiB WebSocket read limit: closed, whatever the frame inside says.
        await client.socket.send_bytes(header(8, SYNC) + bytes(8) + bytes(70_000))
        await client.wait_closed()
        assert client.frames == []
    finally:
        await client.close()
