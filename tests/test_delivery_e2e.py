"""End to end against ``parley run`` as a user starts it: the banner names the IM listeners, and
a client written from the wire protocol connects over TCP (as the Android and iOS SDKs, v2)
and over WebSocket (as the JavaScript SDK, v1), authenticates with the token from
``/auth/grant``, syncs, sends and receives peer, group, super-group and room messages, and
gets REST-sent messages live."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from parley.servers import free_port

from .conftest import basic, start_parley_run
from .imclient import ACK, ENTER_ROOM, GROUP_IM, IM, METADATA, ROOM_IM, SYNC_GROUP, Client


@pytest.fixture
def parley_run(tmp_path: Path) -> Iterator[dict[str, str]]:
    http, mongo = free_port(), free_port()
    tcp, ws = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {"PARLEY_DELIVERY_TCP_ADDR": tcp, "PARLEY_DELIVERY_WS_ADDR": ws}
    process, _, text = start_parley_run(tmp_path, http, mongo, env=env)
    try:
        appid = re.search(r"appid:\s+(\d+)", text)
        secret = re.search(r"secret:\s+(\S+)", text)
        assert appid is not None and secret is not None
        yield {
            "base": f"http://127.0.0.1:{http}",
            "tcp": tcp,
            "ws": ws,
            "banner": text,
            "auth": basic(appid.group(1), hashlib.md5(secret.group(1).encode()).hexdigest()),
        }
    finally:
        process.terminate()
        process.wait(30)


async def test_clients_over_tcp_and_websocket_against_parley_run(
    parley_run: dict[str, str],
) -> None:
    run = parley_run
    assert f"tcp://{run['tcp']}" in run["banner"] and f"ws://{run['ws']}/ws" in run["banner"]
    server = {"Authorization": run["auth"]}
    async with aiohttp.ClientSession() as http:

        async def call(method: str, path: str, body: Any, headers: dict[str, str]) -> Any:
            async with http.request(method, run["base"] + path, json=body, headers=headers) as r:
                text = await r.text()
                assert r.status == 200, text
                return json.loads(text) if text else None

        async def token(uid: int) -> str:
            reply = await call("POST", "/auth/grant", {"uid": uid, "user_name": f"u{uid}"}, server)
            return str(reply["data"]["token"])

        # Stored before anyone connects: found by the first sync.
        await call("POST", "/messages/peers", {"sender": 2, "receiver": 1, "content": "hi"}, server)
        normal = await call(
            "POST", "/groups", {"master": 1, "name": "n", "members": [1, 2]}, server
        )
        big = await call(
            "POST", "/groups", {"master": 1, "name": "s", "super": True, "members": [1, 2]}, server
        )
        gid, sgid = normal["data"]["group_id"], big["data"]["group_id"]
        android = await Client.tcp(run["tcp"], version=2)
        web = await Client.ws(run["ws"], version=1)
        try:
            assert await android.auth(await token(1), 2, "android-1") == 0
            assert await web.auth(await token(2), 3, "page-guid") == 0
            found, _ = await android.sync_all(0)
            assert [m.cmd for m in found if m.cmd == IM] == [IM]
            assert next(m for m in found if m.cmd == IM).im()["content"] == "hi"

            # Peer, both ways.
            await android.send_im(1, 2, '{"text":"to web"}', msgid=1)
            await android.next(METADATA)
            assert (await android.next()).cmd == ACK
            assert (await web.pushed(IM))[1].im()["content"] == '{"text":"to web"}'
            await web.send_im(2, 1, '{"text":"to android"}', msgid=9)
            assert (await web.next(ACK)).ack()[1] is None  # v1: no status byte
            assert (await android.pushed(IM))[1].im()["content"] == '{"text":"to android"}'

            # REST-sent, live.
            await call(
                "POST", "/messages/peers", {"sender": 1, "receiver": 2, "content": "r"}, server
            )
            assert (await web.pushed(IM))[1].im()["content"] == "r"

            # A normal group and a super group.
            await web.send_im(2, gid, "group hello", cmd=GROUP_IM)
            assert (await android.pushed(GROUP_IM))[1].im()["content"] == "group hello"
            await android.send_im(1, sgid, "super hello", cmd=GROUP_IM)
            ack = await android.next(ACK)
            assert ack.ack()[1] == 0 and ack.flag == 0x20
            assert (await web.pushed(GROUP_IM))[1].flag == 0x30
            await web.send(SYNC_GROUP, struct.pack(">qq", sgid, 0))
            frames = await web.quiet(0.5)
            synced = [f.im()["content"] for f in frames if f.cmd == GROUP_IM]
            assert synced == ["super hello"]

            # A room.
            for client in (android, web):
                await client.send(ENTER_ROOM, struct.pack(">q", 42))
            await android.send(ROOM_IM, struct.pack(">qq", 1, 42) + b"in the room")
            assert (await web.next(ROOM_IM)).rt() == (1, 42, "in the room")

            # Everything sent is in the REST history of both.
            for uid, headers in ((1, await token(1)), (2, await token(2))):
                reply = await call("GET", "/messages", None, {"Authorization": f"Bearer {headers}"})
                contents = {e["content"] for e in reply["data"]}
                assert {
                    '{"text":"to web"}',
                    '{"text":"to android"}',
                    "group hello",
                } <= contents, uid
        finally:
            await android.close()
            await web.close()
