"""The messages domain: storing accepted messages in inboxes and group queues, turning group
changes into group notifications, offline counts and history. No HTTP here.

Every message goes through ``post``: the accepted message is recorded as pending (with its
recipients and where each inbox's append starts), stored in each inbox idempotently, its
``message.*`` event is published (its event id is the message id), and it is logged done and
taken off the pending list (in the background, batched with other requests'). If anything
stops in between, or the broker is away, ``recover`` finishes it: nothing is stored twice, and
every stored message gets its event (possibly twice, under the same event id).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import structlog
from pymongo.errors import PyMongoError

from shared.bus import Bus
from shared.errors import DISABLED_APPID, GROUP_NON_EXISTS, INVALID_UID, InvalidParam, ParleyError
from shared.events import CustomerMessage as CustomerMessageEvent
from shared.events import (
    Event,
    GroupChange,
    GroupEvent,
    GroupMembersAdded,
    GroupMembersRemoved,
    GroupMessage,
    GroupNotificationMessage,
    NotificationMessage,
    PeerMessage,
    RoomMessage,
    SystemMessage,
    utcnow,
)
from shared.internal import CustomerDirectory, GroupDirectory, GroupSnapshot
from shared.jsonio import dumps
from shared.mongo import Document

from .repository import Entry, MessagesRepository, Post, group_queue, keys_of, user_inbox
from .rules import (
    CMD_CUSTOMER,
    CMD_GROUP,
    CMD_GROUP_NOTIFICATION,
    CMD_PEER,
    CMD_SYSTEM,
    MessagePolicy,
    check_content,
    member_notifications,
    notification_for,
    store_messages,
    system_receivers,
)

log = structlog.get_logger("parley.messages")

HISTORY_CMDS = (CMD_PEER, CMD_GROUP, CMD_CUSTOMER)
HISTORY_LIMIT = 1024
# Notifications of one member change are stored and announced in batches of this many posts,
# and of at most this many recipients in all.
BATCH_POSTS = 500
BATCH_RECIPIENTS = 200_000
GROUP_NO_MEMBER = "group no member"
# A delivery server's inbox page: this many entries unless it asks for fewer (at most MAX).
PAGE_DEFAULT = 1000
PAGE_MAX = 3000


def new_msg_id() -> str:
    return uuid.uuid4().hex


class MessagesDomain:
    def __init__(
        self,
        repo: MessagesRepository,
        bus: Bus | None,
        policy: MessagePolicy,
        groups: GroupDirectory,
        customers: CustomerDirectory | None = None,
    ) -> None:
        self.repo = repo
        self.bus = bus
        self.policy = policy
        self.groups = groups
        self.customers = customers
        self._in_flight: dict[str, int] = {}  # posts being stored and announced here

    # ---- the message lifecycle ----

    async def post(self, post: Post, rid: str = "", *, derived: bool = False) -> Post:
        """Accept, store and announce one message; returns it done. A ``derived`` post's id
        comes from an event: it may have been posted (and done) before, so the log is read
        first and the post is logged done at once rather than in the background."""
        if derived and (done := await self.repo.done_post(post.id)) is not None:
            return done
        owners, _ = self._placement(post)
        post.plan = await self.repo.plan(post.appid, owners)
        existing = await self.repo.insert_pending(post)
        if existing is not None:  # in flight elsewhere, or left by a crash: finish it
            post = existing
        await self._complete(post, rid, now=derived)
        return post

    async def post_derived(self, posts: list[Post]) -> None:
        """Several posts derived from one event (one app), stored and announced in order with
        a few commands for all of them: which are done already, the pending list, the entries
        (one ordered insert), the events, the log. Replays skip what is done; a post found
        pending (a crash mid-way) is finished as it was recorded."""
        if not posts:
            return
        done = await self.repo.done_posts([p.id for p in posts])
        todo = [p for p in posts if p.id not in done]
        if not todo:
            return
        # Where each goes and what is stored (a post recorded earlier under the same id was
        # derived from the same event: the same placement).
        placements = [self._placement(p) for p in todo]
        plan = await self.repo.plan(todo[0].appid, {o for owners, _ in placements for o in owners})
        for post, (owners, _) in zip(todo, placements, strict=True):
            post.plan = {o: plan[o] for o in owners}
        existing = await self.repo.insert_pending_many(todo)
        todo = [existing.get(p.id, p) for p in todo]
        for post in existing.values():  # recorded earlier: its entries may sit below this plan
            for owner, key in post.plan.items():
                if owner in plan:
                    plan[owner] = min(plan[owner], key)
        for post in todo:
            self._in_flight[post.id] = self._in_flight.get(post.id, 0) + 1
        try:
            items = [
                (owners, p.id, fields) for p, (owners, fields) in zip(todo, placements, strict=True)
            ]
            keys = await self.repo.append_batch(todo[0].appid, items, plan)
            for post in todo:
                post.keys = keys[post.id]
            if self.bus is None:
                return  # a process without a broker: a running service's recovery announces them
            announced: list[Post] = []
            for post in todo:
                try:
                    await self.bus.publish_event(self._event(post, post.keys))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # durable as pending: the recovery loop announces it
                    log.warning("publish failed; recovery will retry", msg=post.id, error=repr(exc))
                    break
                announced.append(post)
            await self.repo.finish_now(announced)
        finally:
            for post in todo:
                self._in_flight[post.id] -= 1
                if not self._in_flight[post.id]:
                    del self._in_flight[post.id]

    async def _complete(self, post: Post, rid: str, *, now: bool = False) -> None:
        self._in_flight[post.id] = self._in_flight.get(post.id, 0) + 1
        try:
            await self._store_and_announce(post, rid, now=now)
        finally:
            self._in_flight[post.id] -= 1
            if not self._in_flight[post.id]:
                del self._in_flight[post.id]

    async def _store_and_announce(self, post: Post, rid: str, *, now: bool) -> None:
        owners, fields = self._placement(post)
        post.keys = await self.repo.append(post.appid, owners, post.id, fields, post.plan)
        if self.bus is None:
            return  # a process without a broker: a running service's recovery announces it
        event = self._event(post, post.keys)
        try:
            await self.bus.publish_event(event, headers={"request_id": rid} if rid else None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # durable as pending: the recovery loop announces it
            log.warning("publish failed; recovery will retry", msg=post.id, error=repr(exc))
            return
        await self.repo.finish(post, now=now)

    async def recover(self, grace: float) -> int:
        """Finish posts left pending (a crash between accepting and announcing)."""
        done = 0
        for post in await self.repo.pending_posts(utcnow() - timedelta(seconds=grace)):
            if post.id in self._in_flight or self.repo.finishing(post.id):
                continue  # still being handled here, or announced and about to be logged
            try:
                await self._complete(post, "", now=True)
                done += 1
            except Exception as exc:  # keep going; the next pass retries
                log.warning("recovering a pending message failed", msg=post.id, error=repr(exc))
        if done:
            log.info("recovered pending messages", count=done)
        return done

    @staticmethod
    def _placement(post: Post) -> tuple[list[str], Document]:
        """Which inboxes a post is stored in, and the stored fields."""
        kind = post.kind
        fields: Document = {"content": post.content, "timestamp": post.timestamp}
        if kind == "peer":
            fields |= {"cmd": CMD_PEER, "sender": post.sender, "receiver": post.receiver}
            return [user_inbox(post.receiver), user_inbox(post.sender)], fields
        if kind == "group":
            fields |= {"cmd": CMD_GROUP, "sender": post.sender, "receiver": post.gid}
            if post.super:
                return [group_queue(post.gid)], fields
            return [user_inbox(uid) for uid in post.members], fields
        if kind == "system":
            fields |= {"cmd": CMD_SYSTEM, "sender": 0, "receiver": 0}
            return [user_inbox(uid) for uid in post.receivers], fields
        if kind == "group_notification":
            fields |= {"cmd": CMD_GROUP_NOTIFICATION, "sender": 0, "receiver": post.gid}
            if post.super and not post.per_inbox:
                return [group_queue(post.gid)], fields
            return [user_inbox(uid) for uid in post.recipients], fields
        if kind == "customer":
            fields |= {
                "cmd": CMD_CUSTOMER,
                "sender": post.sender,
                "receiver": post.receiver,
                "sender_appid": post.sender_appid,
                "receiver_appid": post.receiver_appid,
            }
            # The post belongs to the sender's app; the receiver's copy, in the receiver's
            # app, was stored before the post (see ``post_customer``).
            return [user_inbox(post.sender)], fields
        return [], fields  # notification, room: never stored

    @staticmethod
    def _event(post: Post, keys: dict[str, int]) -> Event:
        base = {
            "event_id": post.id,  # stable: a re-announced message is recognisably the same
            "occurred_at": post.created_at,
            "appid": post.appid,
            "msg_id": post.id,
            "content": post.content,
            "timestamp": post.timestamp,
        }
        kind = post.kind
        if kind == "peer":
            return PeerMessage(
                **base, sender=post.sender, receiver=post.receiver, keys=keys_of(keys)
            )
        if kind == "group":
            return GroupMessage(
                **base,
                sender=post.sender,
                gid=post.gid,
                super=post.super,
                members=post.members,
                keys=keys_of(keys),
                group_key=keys.get(group_queue(post.gid)),
            )
        if kind == "system":
            return SystemMessage(**base, keys=keys_of(keys))
        if kind == "notification":
            return NotificationMessage(**base, receiver=post.receiver)
        if kind == "room":
            return RoomMessage(**base, sender=post.sender, room=post.room)
        if kind == "group_notification":
            return GroupNotificationMessage(
                **base,
                gid=post.gid,
                super=post.super,
                recipients=post.recipients,
                keys=keys_of(keys),
                group_key=keys.get(group_queue(post.gid)),
                cause=post.cause,
            )
        if kind == "customer":
            return CustomerMessageEvent(
                **base,
                sender_appid=post.sender_appid,
                sender=post.sender,
                receiver_appid=post.receiver_appid,
                receiver=post.receiver,
                sender_key=keys[user_inbox(post.sender)],
                receiver_key=post.receiver_key,
            )
        raise ValueError(f"unknown message kind {kind!r}")

    # ---- the REST endpoints' operations ----

    @staticmethod
    def _new(appid: int, kind: str, content: str, **fields: Any) -> Post:
        return Post(
            id=new_msg_id(),
            appid=appid,
            kind=kind,
            content=content,
            timestamp=int(time.time()),
            created_at=utcnow(),
            **fields,
        )

    def check_app_enabled(self, appid: int) -> None:
        """Apps in ``disabled_app_ids`` may not inject messages (spec §1.5)."""
        if appid in self.policy.disabled_app_ids:
            raise ParleyError(DISABLED_APPID)

    async def _existing_group(self, appid: int, gid: int) -> GroupSnapshot:
        group = await self.groups.get_group(appid, gid)
        if group is None:
            raise ParleyError(GROUP_NON_EXISTS)
        return group

    async def post_peer(
        self, appid: int, sender: int, receiver: int, content: str, rid: str = ""
    ) -> Post:
        check_content(self.policy, content)
        return await self.post(
            self._new(appid, "peer", content, sender=sender, receiver=receiver), rid
        )

    async def post_group(
        self, appid: int, sender: int, gid: int, content: str, rid: str = ""
    ) -> Post:
        check_content(self.policy, content)
        group = await self._existing_group(appid, gid)
        return await self.post(
            self._new(
                appid,
                "group",
                content,
                sender=sender,
                gid=gid,
                super=group.super,
                members=group.members,
            ),
            rid,
        )

    async def post_system(
        self,
        appid: int,
        receiver: int | None,
        receivers: Sequence[int],
        content: str,
        rid: str = "",
    ) -> Post:
        """S13: to ``receiver`` and ``receivers`` (the current IM core's form), each once."""
        check_content(self.policy, content)
        receivers = system_receivers(self.policy, receiver, receivers)
        return await self.post(
            self._new(appid, "system", content, receivers=list(dict.fromkeys(receivers))), rid
        )

    async def post_notification(
        self, appid: int, receiver: int, content: str, rid: str = ""
    ) -> Post:
        check_content(self.policy, content)
        return await self.post(self._new(appid, "notification", content, receiver=receiver), rid)

    async def post_room(
        self, appid: int, sender: int, room: int, content: str, rid: str = ""
    ) -> Post:
        check_content(self.policy, content)
        return await self.post(self._new(appid, "room", content, sender=sender, room=room), rid)

    async def post_group_notification(
        self, appid: int, gid: int, content: str, rid: str = ""
    ) -> Post:
        """S15: a custom notification to the group's current members."""
        check_content(self.policy, content)
        group = await self._existing_group(appid, gid)
        if not group.members:
            raise ParleyError(GROUP_NO_MEMBER)
        return await self.post(
            self._new(
                appid,
                "group_notification",
                content,
                gid=gid,
                super=group.super,
                recipients=group.members,
            ),
            rid,
        )

    async def post_customer(
        self,
        sender_appid: int,
        sender: int,
        receiver_appid: int,
        receiver: int,
        content: str,
        rid: str = "",
    ) -> Post:
        """A customer-service message (cmd 64) between two apps, as a delivery server posts
        it: stored in the receiver's inbox (in ``receiver_appid``) and the sender's."""
        post = self._new(
            sender_appid,
            "customer",
            content,
            sender=sender,
            receiver=receiver,
            sender_appid=sender_appid,
            receiver_appid=receiver_appid,
        )
        fields = {
            "cmd": CMD_CUSTOMER,
            "sender": sender,
            "receiver": receiver,
            "sender_appid": sender_appid,
            "receiver_appid": receiver_appid,
            "content": content,
            "timestamp": post.timestamp,
        }
        # The receiver's copy lives in another app's inboxes: store it first (idempotent by
        # msg_id); the post in the sender's app then records and announces both.
        receiver_keys = await self.repo.append(
            receiver_appid, [user_inbox(receiver)], post.id, fields
        )
        post.receiver_key = receiver_keys[user_inbox(receiver)]
        return await self.post(post, rid)

    # ---- group notifications from the groups service's events ----

    async def on_group_event(self, event: Event) -> None:
        """Store the group notification a ``group.*`` event calls for (spec §2.6). Replays
        are no-ops: the notification's id is derived from the event's."""
        if isinstance(event, GroupMembersAdded | GroupMembersRemoved):
            # These list only the changed members: the recipients are the members as of the
            # change (asked of the groups service at the event's revision).
            group = await self.groups.get_group(event.appid, event.gid, event.revision)
            built = member_notifications(event, group.members if group is not None else [])
            posts = [
                self._notification(event, f"gn-{event.event_id}-{n}", op, recipients, per_inbox)
                for n, (op, recipients, per_inbox) in enumerate(built)
                if recipients
            ]
            # Batches of at most BATCH_RECIPIENTS recipients in all (each post lists them).
            each = max((len(p.recipients) for p in posts), default=1)
            size = max(1, min(BATCH_POSTS, BATCH_RECIPIENTS // each))
            for start in range(0, len(posts), size):
                await self.post_derived(posts[start : start + size])
            return
        if not isinstance(event, GroupEvent):
            return
        one = notification_for(event)
        if one is not None:
            await self._notify(event, f"gn-{event.event_id}", *one)

    async def _notify(
        self,
        event: GroupChange,
        msg_id: str,
        op: dict[str, Any],
        recipients: list[int],
        per_inbox: bool,
    ) -> None:
        if not recipients:
            return  # nobody to notify (e.g. a group created empty): best effort, as the spec says
        await self.post(self._notification(event, msg_id, op, recipients, per_inbox), derived=True)

    @staticmethod
    def _notification(
        event: GroupChange, msg_id: str, op: dict[str, Any], recipients: list[int], per_inbox: bool
    ) -> Post:
        return Post(
            id=msg_id,
            appid=event.appid,
            kind="group_notification",
            content=dumps(op),
            timestamp=event.timestamp,
            created_at=utcnow(),
            gid=event.gid,
            super=event.super,
            per_inbox=per_inbox,
            recipients=recipients,
            cause=event.event_id,
        )

    # ---- reads ----

    async def offline_count(self, appid: int, uid: int | None, customer_id: str = "") -> int:
        """S19: the entries in ``uid``'s inbox after its sync key; without a uid, the visitor
        ``customer_id``'s (400 ``invalid uid`` when neither names one). The count is a badge
        hint: when the store cannot be read it is 0 ("nothing new")."""
        if not uid and customer_id:
            uid = await self._customers().client_id(appid, customer_id)
        if not uid:
            raise ParleyError(INVALID_UID)
        try:
            return await self.repo.count_after_sync_key(appid, user_inbox(uid))
        except PyMongoError as exc:
            log.warning("offline count failed; answering 0", uid=uid, error=repr(exc))
            return 0

    async def history(self, appid: int, uid: int, store: int | None = None) -> list[Entry]:
        """S20: the latest messages of the user's inbox, oldest first; with ``store``, only
        the customer-service messages with that store's agents."""
        entries = await self.repo.latest(appid, user_inbox(uid), HISTORY_CMDS, HISTORY_LIMIT)
        if not store:
            return entries
        sellers = set(await self._customers().store_sellers(appid, store))
        return store_messages(entries, self.policy.kefu_appid, sellers)

    def _customers(self) -> CustomerDirectory:
        if self.customers is None:
            raise RuntimeError("customer lookups need the customer service")
        return self.customers

    # ---- delivery servers (internal API) ----

    async def inbox_page(
        self, appid: int, uid: int | None, gid: int | None, after: int, limit: int | None
    ) -> list[Entry]:
        """A user's inbox (or a super group's queue) after the key ``after``, oldest first,
        never past a gap; at most ``limit`` entries (default PAGE_DEFAULT, at most PAGE_MAX)."""
        if (uid is None) == (gid is None):
            raise InvalidParam()
        owner = user_inbox(uid) if uid is not None else group_queue(gid or 0)
        return await self.repo.page(appid, owner, after, min(limit or PAGE_DEFAULT, PAGE_MAX))

    async def set_sync_key(self, appid: int, uid: int, key: int) -> None:
        """The key up to which a user has synced (monotonic)."""
        await self.repo.set_sync_key(appid, user_inbox(uid), key)
