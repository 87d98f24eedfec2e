"""What the delivery service does with each client frame and each ``message.*`` event.

* Client frames (wire protocol §5-§8) are handled one at a time per connection, in arrival
  order (``handle``): authentication through the auth service, sync from the messages
  service's inboxes, client sends stored through the messages service exactly as REST-sent
  messages are, rooms and RT through the bus.
* Agents' presence: a user of the customer-service app (an agent; its uid is the seller id)
  makes this replica publish ``agent.presence`` online at its first connection here and
  offline when its last one here closes, with the replica's id; the replica re-announces its
  connected agents every ``delivery_presence_interval`` seconds (and its cleanup says offline
  for them), and the customer service lets the reports of a replica gone silent lapse.
* Events (``on_event``): every replica consumes every ``message.*`` (and ``delivery.*``) event
  on a queue of its own, and pushes to the connections it holds. So a message accepted
  anywhere reaches every connected device, whichever replica holds it.

A message a client sent gets an id that records the sending device and its client-local msgid
(``origin_id``): any replica can then leave the sending device out of the live copies and put
the msgid back in the pushed frame; a sync later recognises the sender's own device (SELF).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import structlog
from prometheus_client import Gauge, Histogram

from shared.auth import TokenOwner, Verifier
from shared.bus import Bus
from shared.errors import ParleyError
from shared.events import (
    AgentPresence,
    CustomerMessage,
    Event,
    GroupMessage,
    GroupNotificationMessage,
    NotificationMessage,
    PeerMessage,
    RealtimeMessage,
    RoomMessage,
    SystemMessage,
    utcnow,
)
from shared.inboxes import DeliveryPost, InboxEntry, MessageStore, Stored
from shared.internal import GroupDirectory, GroupSnapshot
from shared.metrics import LATENCY_BUCKETS, REGISTRY

from . import protocol as p
from .connections import Connection, Registry

log = structlog.get_logger("parley.delivery")

SYNC_LIMIT = 3000  # personal inbox batch (wire protocol §1.3)
GROUP_SYNC_LIMIT = 100  # super-group batch
SEEN_EVENTS = 100_000

CONNECTIONS = Gauge(
    "parley_delivery_connections",
    "Open client connections of this delivery server, by transport.",
    ["transport"],
    registry=REGISTRY,
)
PUSH_SECONDS = Histogram(
    "parley_delivery_push_seconds",
    "From a message's acceptance to its frames queued on a connected device.",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)


@dataclass(frozen=True, slots=True)
class Origin:
    device: int
    msgid: int


def origin_id(device: int, msgid: int) -> str:
    """A new message id that records the sending device and the client's msgid."""
    return f"d{device}.{msgid}.{uuid.uuid4().hex[:24]}"


def origin_of(msg_id: str) -> Origin | None:
    """The device and msgid of a client-sent message's id; None for any other message."""
    if not msg_id.startswith("d"):
        return None
    parts = msg_id[1:].split(".")
    if len(parts) != 3:
        return None
    try:
        return Origin(int(parts[0]), int(parts[1]))
    except ValueError:
        return None


def _content(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


class DeliveryServer:
    def __init__(
        self,
        verifier: Verifier,
        store: MessageStore,
        groups: GroupDirectory,
        bus: Bus,
        *,
        kefu_appid: int = 0,
        presence_interval: float = 30.0,
    ) -> None:
        self.verifier = verifier
        self.store = store
        self.groups = groups
        self.bus = bus
        self.kefu_appid = kefu_appid
        self.registry = Registry()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._resolving: dict[str, asyncio.Future[TokenOwner]] = {}
        self.replica = uuid.uuid4().hex[:16]  # this process, in its agents' presence reports
        self.presence_interval = presence_interval
        self._announcing: set[asyncio.Task[bool]] = set()
        self._stopping = False

    # ---- connections ----

    def opened(self, conn: Connection) -> None:
        self.registry.connections += 1
        CONNECTIONS.labels(conn.transport).inc()

    def closed(self, conn: Connection) -> None:
        self.registry.connections -= 1
        CONNECTIONS.labels(conn.transport).dec()
        self.registry.remove(conn)
        if self._is_agent(conn) and not self._stopping and not self.registry.user(*conn.key):
            self._announce(conn.uid, "offline")  # its last connection here

    # ---- agents' presence ----

    def _is_agent(self, conn: Connection) -> bool:
        return conn.authenticated and bool(self.kefu_appid) and conn.appid == self.kefu_appid

    def _presence_event(self, seller_id: int, status: str) -> AgentPresence:
        return AgentPresence(
            appid=self.kefu_appid,
            seller_id=seller_id,
            status="online" if status == "online" else "offline",
            replica=self.replica,
            ttl=3 * self.presence_interval,
        )

    def _announce(self, seller_id: int, status: str) -> None:
        """Publish in the background (the event's time is taken now, so the customer service
        orders this replica's reports however they arrive)."""
        task = asyncio.create_task(self._publish(self._presence_event(seller_id, status)))
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def announce_agents(self) -> None:
        """Every ``presence_interval``: this replica's connected agents are online (so their
        status outlives no crash of this replica by more than three intervals)."""
        while True:
            await asyncio.sleep(self.presence_interval)
            for seller_id in self.registry.uids(self.kefu_appid) if self.kefu_appid else ():
                # Still connected as the report is made (its time is taken now): an agent that
                # left meanwhile has had its offline report, which this must not follow.
                if self.registry.user(self.kefu_appid, seller_id):
                    await self._publish(self._presence_event(seller_id, "online"))

    async def stop_presence(self) -> None:
        """Before the listeners close: every agent connected here is offline as far as this
        replica knows (published once, not per closing connection)."""
        self._stopping = True
        for seller_id in self.registry.uids(self.kefu_appid) if self.kefu_appid else ():
            await self._publish(self._presence_event(seller_id, "offline"))
        if self._announcing:
            await asyncio.gather(*self._announcing, return_exceptions=True)

    # ---- client frames ----

    async def handle(self, conn: Connection, header: p.Header, command: p.Command) -> None:
        cmd = header.cmd
        if cmd == p.PING:
            conn.send(p.Out(p.PONG))
            return
        if cmd == p.AUTH_TOKEN:
            assert isinstance(command, p.AuthToken)
            await self._auth(conn, header, command)
            return
        if not conn.authenticated:
            return  # every other command needs authentication (§1.8, §12.30)
        if isinstance(command, p.IMMessage):
            if cmd == p.IM:
                await self._peer(conn, header, command)
            else:
                await self._group(conn, header, command)
        elif isinstance(command, p.Key):
            if cmd == p.SYNC:
                await self._sync(conn, command.key)
            elif command.key > 0:  # SYNC_KEY
                await self._save_key(conn, 0, command.key)
        elif isinstance(command, p.GroupKey):
            if cmd == p.SYNC_GROUP:
                await self._sync_group(conn, command.gid, command.key)
            elif command.key > 0:  # GROUP_SYNC_KEY
                await self._save_key(conn, command.gid, command.key)
        elif isinstance(command, p.Room):
            if cmd == p.ENTER_ROOM:
                if command.room and command.room != conn.room:
                    self.registry.enter_room(conn, command.room)
            elif command.room == conn.room:  # LEAVE_ROOM
                self.registry.leave_room(conn)
        elif isinstance(command, p.CustomerMessage):
            await self._customer(conn, header, command)
        elif isinstance(command, p.RTMessage):
            if cmd == p.RT:
                await self._rt(conn, command)
            else:
                await self._room_message(conn, header, command)
        # ACK, PONG, METADATA, UNREAD_COUNT, the legacy customer commands: nothing to do.

    async def _auth(self, conn: Connection, header: p.Header, command: p.AuthToken) -> None:
        if conn.authenticated:
            return  # a second AUTH_TOKEN after success: ignored, no reply (§5.1)
        try:
            token = command.token.decode("ascii")
            if not token or not token.isprintable():
                raise ValueError("not a token")
            owner = await self._resolve(token)
        except (ValueError, ParleyError):
            conn.send(p.Out(p.AUTH_STATUS, p.encode_status(1)))  # stays open (§5.2)
            return
        except Exception as exc:  # the auth service or its store failed: status 1 too
            log.warning("token check failed", error=repr(exc))
            conn.send(p.Out(p.AUTH_STATUS, p.encode_status(1)))
            return
        if owner.uid == 0:
            conn.send(p.Out(p.AUTH_STATUS, p.encode_status(1)))
            return
        conn.appid, conn.uid = owner.appid, owner.uid
        conn.platform = command.platform
        conn.device = p.device_number(command.platform, command.device_id)
        conn.version = header.version
        conn.send(p.Out(p.AUTH_STATUS, p.encode_status(0)))
        self.registry.add_user(conn)
        first = len(self.registry.user(*conn.key)) == 1
        if self._is_agent(conn) and first and not self._stopping:
            self._announce(conn.uid, "online")  # its first connection here
        log.debug("authenticated", appid=conn.appid, uid=conn.uid, transport=conn.transport)

    async def _resolve(self, token: str) -> TokenOwner:
        """The token's owner; concurrent checks of one token (a user's devices reconnecting
        together) make one call."""
        pending = self._resolving.get(token)
        if pending is None:
            pending = asyncio.ensure_future(self.verifier.resolve_token(token))
            self._resolving[token] = pending
            pending.add_done_callback(lambda _: self._resolving.pop(token, None))
        return await asyncio.shield(pending)

    # ---- sends ----

    async def _peer(self, conn: Connection, header: p.Header, msg: p.IMMessage) -> None:
        if msg.sender != conn.uid or len(msg.content) > p.MAX_IM_CONTENT:
            return  # dropped, no ACK (§8.1, §12.39)
        done, stored = await self._store_im(conn, "peer", msg)
        if not done:
            return
        key = stored.keys.get(conn.uid) if stored is not None else None
        if key is None:
            return
        conn.send(p.out_metadata(key, key - 1), p.out_ack(header.seq))

    async def _store_im(
        self, conn: Connection, kind: Literal["peer", "group"], msg: p.IMMessage
    ) -> tuple[bool, Stored | None]:
        """Store a client's IM through the messages service, under an id that names the sending
        device: (False, None) when storing failed (no ACK: the SDK sends it again), else (True,
        what was stored; None for a group that is gone)."""
        post = DeliveryPost(
            kind=kind,
            msg_id=origin_id(conn.device, msg.msgid),
            appid=conn.appid,
            sender=conn.uid,
            receiver=msg.receiver,
            content=_content(msg.content),
        )
        try:
            return True, await self.store.post(post)
        except Exception as exc:
            log.warning("storing a client message failed", kind=kind, error=repr(exc))
            return False, None

    async def _load_group(self, appid: int, gid: int) -> GroupSnapshot | None:
        try:
            return await self.groups.get_group(appid, gid)
        except Exception as exc:
            log.warning("loading a group failed", gid=gid, error=repr(exc))
            return None

    async def _group(self, conn: Connection, header: p.Header, msg: p.IMMessage) -> None:
        if msg.sender != conn.uid or len(msg.content) > p.MAX_IM_CONTENT:
            return
        group = await self._load_group(conn.appid, msg.receiver)
        if group is None:
            conn.send(p.out_ack(header.seq, p.ACK_GROUP_NONEXIST))
            return
        if conn.uid not in group.members or conn.uid in group.muted:
            # Muted senders are told too, as non-members (wire protocol §12.5).
            conn.send(p.out_ack(header.seq, p.ACK_NOT_GROUP_MEMBER))
            return
        done, stored = await self._store_im(conn, "group", msg)
        if not done:
            return  # no ACK, for super groups too (§12.6)
        if stored is None:
            conn.send(p.out_ack(header.seq, p.ACK_GROUP_NONEXIST))
            return
        if stored.group_key is not None:
            key = stored.group_key
            conn.send(p.out_metadata(key, key - 1), p.out_ack(header.seq, flag=p.FLAG_SUPER_GROUP))
            return
        own = stored.keys.get(conn.uid)
        if own is None:
            conn.send(p.out_ack(header.seq))
        else:
            conn.send(p.out_metadata(own, own - 1), p.out_ack(header.seq))

    async def _customer(self, conn: Connection, header: p.Header, msg: p.CustomerMessage) -> None:
        """CUSTOMER_V2 (§7.6): as the authenticated user of its app, to or from the configured
        customer-service app; anything else is dropped without an ACK."""
        if msg.sender_appid != conn.appid or msg.sender != conn.uid:
            return
        if not self.kefu_appid or self.kefu_appid not in (msg.sender_appid, msg.receiver_appid):
            return
        if len(msg.content) > p.MAX_CUSTOMER_CONTENT or msg.receiver_appid <= 0:
            return
        post = DeliveryPost(
            kind="customer",
            msg_id=origin_id(conn.device, 0),
            appid=conn.appid,
            sender=conn.uid,
            receiver=msg.receiver,
            receiver_appid=msg.receiver_appid,
            content=_content(msg.content),
        )
        try:
            stored = await self.store.post(post)
        except Exception as exc:
            log.warning("storing a customer message failed", error=repr(exc))
            return
        key = stored.keys.get(conn.uid) if stored is not None else None
        if key is not None:
            conn.send(p.out_metadata(key, key - 1), p.out_ack(header.seq))

    async def _rt(self, conn: Connection, msg: p.RTMessage) -> None:
        if msg.sender != conn.uid:
            return
        await self._publish(
            RealtimeMessage(
                appid=conn.appid,
                msg_id=origin_id(conn.device, 0),
                content=_content(msg.content),
                timestamp=int(time.time()),
                sender=conn.uid,
                receiver=msg.receiver,
            )
        )

    async def _room_message(self, conn: Connection, header: p.Header, msg: p.RTMessage) -> None:
        if not conn.room or msg.receiver != conn.room:
            return  # not in that room: dropped (§7.1)
        # The sender is the authenticated user, whatever the frame says (§12.38).
        event = RoomMessage(
            appid=conn.appid,
            msg_id=origin_id(conn.device, 0),
            content=_content(msg.content),
            timestamp=int(time.time()),
            sender=conn.uid,
            room=conn.room,
        )
        if await self._publish(event):
            conn.send(p.out_ack(header.seq))

    async def _publish(self, event: Event) -> bool:
        try:
            await self.bus.publish_event(event)
        except Exception as exc:
            log.warning("publishing failed", event=event.routing_key, error=repr(exc))
            return False
        return True

    # ---- sync ----

    def _entry_frame(self, conn: Connection, entry: InboxEntry) -> p.Out:
        origin = origin_of(entry.msg)
        device = origin.device if origin is not None else 0
        own = entry.sender == conn.uid and device == conn.device
        content = entry.content.encode()
        if entry.command == p.CUSTOMER_V2:
            own = own and entry.sender_appid == conn.appid
            body = p.encode_customer(
                p.CustomerMessage(
                    entry.sender_appid or 0,
                    entry.sender,
                    entry.receiver_appid or 0,
                    entry.receiver,
                    entry.timestamp,
                    content,
                )
            )
            return p.Out(p.CUSTOMER_V2, body, flag=p.FLAG_SELF if own else 0)
        flag = p.FLAG_SELF if own else 0
        if entry.command in (p.IM, p.GROUP_IM):
            msgid = origin.msgid if origin is not None else 0
            message = p.IMMessage(entry.sender, entry.receiver, entry.timestamp, msgid, content)
            return p.out_im(entry.command, message, flag)
        return p.Out(entry.command, content, flag=0)  # SYSTEM, GROUP_NOTIFICATION

    async def _sync(self, conn: Connection, key: int) -> None:
        try:
            page = await self.store.page(conn.appid, conn.uid, 0, key, SYNC_LIMIT)
        except Exception as exc:
            log.warning("sync failed", error=repr(exc))
            return  # nothing sent: the client retries (§6.2 step 6)
        frames = [p.Out(p.SYNC_BEGIN, p.encode_key(page.start))]
        frames += [self._entry_frame(conn, e) for e in page.entries]
        if page.entries:
            end = page.entries[-1].id
        elif 0 < page.last < page.start:
            end = page.last  # the client is ahead of the server: move it back
        else:
            end = page.start
        frames.append(p.Out(p.SYNC_END, p.encode_key(end)))
        if page.entries and end < page.last:
            frames.append(p.Out(p.SYNC_NOTIFY, p.encode_key(end + 1)))
        conn.send(*frames)

    async def _sync_group(self, conn: Connection, gid: int, key: int) -> None:
        group = await self._load_group(conn.appid, gid)
        if group is None or not group.super or conn.uid not in group.members:
            return  # nothing for non-members (§6.9)
        try:
            page = await self.store.page(conn.appid, conn.uid, gid, key, GROUP_SYNC_LIMIT)
        except Exception as exc:
            log.warning("group sync failed", gid=gid, error=repr(exc))
            return
        frames = [p.Out(p.SYNC_GROUP_BEGIN, p.encode_group_key(gid, page.start))]
        frames += [self._entry_frame(conn, e) for e in page.entries]
        if page.entries:
            end = page.entries[-1].id
        elif 0 < page.last < page.start:
            end = page.last
        else:
            end = page.start
        frames.append(p.Out(p.SYNC_GROUP_END, p.encode_group_key(gid, end)))
        if page.entries and end < page.last:
            # More remain: after the END, so that every SDK asks again (§12.9).
            frames.append(p.Out(p.SYNC_GROUP_NOTIFY, p.encode_group_key(gid, page.last)))
        conn.send(*frames)

    async def _save_key(self, conn: Connection, gid: int, key: int) -> None:
        try:
            await self.store.set_sync_key(conn.appid, conn.uid, gid, key)
        except Exception as exc:
            log.warning("saving a sync key failed", error=repr(exc))

    # ---- events: live push ----

    def _first_time(self, event_id: str, kind: str) -> bool:
        key = f"{kind}:{event_id}"
        if key in self._seen:
            return False
        self._seen[key] = None
        while len(self._seen) > SEEN_EVENTS:
            self._seen.popitem(last=False)
        return True

    async def on_event(self, event: Event) -> None:
        """Push an event to the connections this process holds; a redelivery pushes nothing
        again."""
        if not self._first_time(event.event_id, event.routing_key):
            return
        accepted = event.occurred_at
        if isinstance(event, PeerMessage):
            self._push_peer(event)
        elif isinstance(event, GroupMessage):
            self._push_group(event)
        elif isinstance(event, SystemMessage):
            for inbox in event.keys:
                self._notify(event.appid, inbox.uid, inbox.key, None)
        elif isinstance(event, GroupNotificationMessage):
            for inbox in event.keys:
                self._notify(event.appid, inbox.uid, inbox.key, None)
            if event.group_key is not None and not event.keys:
                notify = p.Out(p.SYNC_GROUP_NOTIFY, p.encode_group_key(event.gid, event.group_key))
                for uid in event.recipients:
                    for conn in self.registry.user(event.appid, uid):
                        conn.send(notify)
        elif isinstance(event, NotificationMessage):
            frame = p.Out(p.NOTIFICATION, event.content.encode())
            for conn in self.registry.user(event.appid, event.receiver):
                conn.send(frame)
        elif isinstance(event, CustomerMessage):
            self._push_customer(event)
        elif isinstance(event, RoomMessage):
            self._push_room(event)
        elif isinstance(event, RealtimeMessage):
            origin = origin_of(event.msg_id)
            body = p.encode_rt(p.RTMessage(event.sender, event.receiver, event.content.encode()))
            for conn in self.registry.user(event.appid, event.receiver):
                if event.receiver == event.sender and origin and conn.device == origin.device:
                    continue
                conn.send(p.Out(p.RT, body))
            return
        else:
            return
        PUSH_SECONDS.observe(max(0.0, (utcnow() - accepted).total_seconds()))

    def _push_to(
        self,
        appid: int,
        uid: int,
        key: int,
        frame: p.Out,
        skip: tuple[int, int] | None,
    ) -> None:
        """METADATA(key, key - 1) + the pushed frame + SYNC_NOTIFY(key) to each of the user's
        connections but the sending device (``skip``: its uid and device_ID). Keys are dense,
        so the previous key in the same inbox is ``key - 1`` (0 for the first)."""
        for conn in self.registry.user(appid, uid):
            if skip is not None and (uid, conn.device) == skip:
                continue
            conn.send(p.out_metadata(key, key - 1), frame, p.Out(p.SYNC_NOTIFY, p.encode_key(key)))

    def _notify(self, appid: int, uid: int, key: int, skip: tuple[int, int] | None) -> None:
        for conn in self.registry.user(appid, uid):
            if skip is None or (uid, conn.device) != skip:
                conn.send(p.Out(p.SYNC_NOTIFY, p.encode_key(key)))

    def _push_peer(self, event: PeerMessage) -> None:
        origin = origin_of(event.msg_id)
        skip = (event.sender, origin.device) if origin is not None else None
        message = p.IMMessage(
            event.sender,
            event.receiver,
            event.timestamp,
            origin.msgid if origin is not None else 0,
            event.content.encode(),
        )
        frame = p.out_im(p.IM, message, p.FLAG_PUSH)
        for inbox in event.keys:
            self._push_to(event.appid, inbox.uid, inbox.key, frame, skip)

    def _push_group(self, event: GroupMessage) -> None:
        origin = origin_of(event.msg_id)
        skip = (event.sender, origin.device) if origin is not None else None
        content = event.content.encode()
        if event.super and event.group_key is not None:
            key = event.group_key
            msgid = origin.msgid if origin is not None else 0
            message = p.IMMessage(event.sender, event.gid, event.timestamp, msgid, content)
            frames = (
                p.out_metadata(key, key - 1),
                p.out_im(p.GROUP_IM, message, p.FLAG_PUSH | p.FLAG_SUPER_GROUP),
                p.Out(p.SYNC_GROUP_NOTIFY, p.encode_group_key(event.gid, key)),
            )
            for uid in event.members:
                for conn in self.registry.user(event.appid, uid):
                    if skip is None or (uid, conn.device) != skip:
                        conn.send(*frames)
            return
        message = p.IMMessage(event.sender, event.gid, event.timestamp, 0, content)
        frame = p.out_im(p.GROUP_IM, message, p.FLAG_PUSH)
        for inbox in event.keys:
            self._push_to(event.appid, inbox.uid, inbox.key, frame, skip)

    def _push_customer(self, event: CustomerMessage) -> None:
        body = p.encode_customer(
            p.CustomerMessage(
                event.sender_appid,
                event.sender,
                event.receiver_appid,
                event.receiver,
                event.timestamp,
                event.content.encode(),
            )
        )
        frame = p.Out(p.CUSTOMER_V2, body, flag=p.FLAG_PUSH)
        origin = origin_of(event.msg_id)
        skip = (event.sender, origin.device) if origin is not None else None
        self._push_to(event.receiver_appid, event.receiver, event.receiver_key, frame, None)
        self._push_to(event.sender_appid, event.sender, event.sender_key, frame, skip)

    def _push_room(self, event: RoomMessage) -> None:
        origin = origin_of(event.msg_id)
        body = p.encode_rt(p.RTMessage(event.sender, event.room, event.content.encode()))
        frame = p.Out(p.ROOM_IM, body)
        for conn in self.registry.room(event.appid, event.room):
            if origin is not None and (conn.uid, conn.device) == (event.sender, origin.device):
                continue
            conn.send(frame)
