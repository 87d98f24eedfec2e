"""The auth service's storage: every read and write is a lookup or an insert by a string ``_id``.

* ``auth_app_revs|heads|pending`` (``shared/revlog.py``): each app is a log keyed ``"<appid>"``
  whose revision 1 (``_id "<appid>:1"``) holds the app (``{s: {name, key, secret, created_at}}``)
  and its ``app.created`` event. Apps never change, so a process that has read one keeps it.
* ``auth_user_revs|heads|pending``: each user is a log keyed ``"<appid>:<uid>"``. A delta is
  ``{f: {field: value, ...}, dnd: {"<peer_uid>": bool}}`` (``{s: <state>}`` replaces the state,
  as the migration writes it), the state ``{token?, name, forbidden, mute, notification_on,
  dnd: {"<peer_uid>": true}, customer, avatar}``. Concurrent changes of one user never lose
  each other: each is the next revision, claimed by insert, computed on the state it follows.
* ``auth_tokens``: ``{_id: <token>, appid, uid}``, what a Bearer verification reads. It is
  inserted once the revision that gave the user the token is committed (by the request, or by
  the relay that finishes a change whose process stopped), so a token resolves only for the
  user whose state holds it.
* ``auth_counters``: appid blocks of one id claimed by insert (``shared/idblocks.py``); its
  ``{_id: "appid", seq}`` document is the previous ``$inc`` counter, and
  ``{_id: "migrated:auth"}`` marks the migration below as done.
* ``auth_apps`` and ``auth_users``: the previous shape (int-keyed apps, user documents updated
  in place with an embedded outbox), read once by ``migrate``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import structlog
from pydantic import BaseModel, ConfigDict
from pymongo import IndexModel
from pymongo.errors import DuplicateKeyError

from shared.auth import TokenOwner
from shared.bus import Bus
from shared.events import Event, utcnow
from shared.idblocks import IdBlocks
from shared.legacy import insert_new, outbox_events, write_first_revisions
from shared.mongo import Collection, Database, Document
from shared.revlog import Compute, Revision, RevLog, Versioned

log = structlog.get_logger("parley.auth.repository")

APP_LOG = "auth_app"
USER_LOG = "auth_user"
TOKENS = "auth_tokens"
COUNTERS = "auth_counters"
LEGACY_APPS = "auth_apps"
LEGACY_USERS = "auth_users"
MIGRATED = "migrated:auth"
MIGRATION_BATCH = 500

INDEXES: dict[str, list[IndexModel]] = {}


class AppRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    appid: int
    name: str
    key: str
    secret: str


class User(BaseModel):
    """A user (or a customer-service visitor) as of ``revision``."""

    model_config = ConfigDict(frozen=True)

    appid: int
    uid: int
    revision: int
    token: str | None = None
    name: str = ""
    forbidden: bool = False
    mute: bool = False
    notification_on: bool = True
    dnd_peers: frozenset[int] = frozenset()
    customer: bool = False
    avatar: str = ""


def user_key(appid: int, uid: int) -> str:
    return f"{appid}:{uid}"


def fold_user(state: Document | None, delta: Document) -> Document:
    """The user's state after ``delta`` (pure: ``state`` is never modified)."""
    if "s" in delta:
        return dict(delta["s"])
    new = {**(state or {}), **delta.get("f", {})}
    if "dnd" in delta:
        peers = dict(new.get("dnd") or {})
        for peer, on in delta["dnd"].items():
            if on:
                peers[peer] = True
            else:
                peers.pop(peer, None)
        new["dnd"] = peers
    return new


def fold_app(state: Document | None, delta: Document) -> Document:
    return dict(delta["s"])


def to_user(appid: int, uid: int, versioned: Versioned) -> User | None:
    state = versioned.state
    if state is None:
        return None
    return User(
        appid=appid,
        uid=uid,
        revision=versioned.rev,
        token=state.get("token"),
        name=state.get("name", ""),
        forbidden=bool(state.get("forbidden", False)),
        mute=bool(state.get("mute", False)),
        notification_on=bool(state.get("notification_on", True)),
        dnd_peers=frozenset(int(peer) for peer in state.get("dnd") or {}),
        customer=bool(state.get("customer", False)),
        avatar=state.get("avatar", ""),
    )


def _app_record(appid: int, state: Document) -> AppRecord:
    return AppRecord(
        appid=appid, name=state.get("name", ""), key=state["key"], secret=state["secret"]
    )


class AppIdTaken(Exception):
    """An app log already exists under a freshly allocated appid (never expected)."""


class AuthRepository:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.apps = RevLog(db, APP_LOG, fold_app)
        self.users = RevLog(db, USER_LOG, fold_user, after_commit=self._record_token)
        self.tokens: Collection = db[TOKENS]
        self.counters: Collection = db[COUNTERS]
        self.appids = IdBlocks(self.counters, "appid", size=1)
        self._apps: dict[int, AppRecord] = {}

    def revlogs(self) -> list[RevLog]:
        """The logs whose unfinished changes the outbox relay settles."""
        return [self.apps, self.users]

    # ---- apps ----

    async def next_appid(self) -> int:
        return await self.appids.next_id()

    async def create_app(
        self, app: AppRecord, events: Sequence[Event], bus: Bus | None, request_id: str = ""
    ) -> None:
        state = {"name": app.name, "key": app.key, "secret": app.secret, "created_at": utcnow()}

        def compute(current: Versioned) -> tuple[Document, Sequence[Event]]:
            if current.rev > 0:
                raise AppIdTaken(app.appid)
            return {"s": state}, events

        await self.apps.change(str(app.appid), compute, bus=bus, request_id=request_id, new=True)
        self._apps[app.appid] = app

    async def get_app(self, appid: int) -> AppRecord | None:
        """The app (one lookup the first time this process asks for it; none after)."""
        known = self._apps.get(appid)
        if known is not None:
            return known
        doc = await self.apps.revs.find_one({"_id": f"{appid}:1"})
        if doc is None or doc.get("tomb"):
            return None
        app = _app_record(appid, doc["d"]["s"])
        self._apps[appid] = app
        return app

    async def list_apps(self) -> list[AppRecord]:
        """Every app (a management read of the whole app log)."""
        apps = []
        async for doc in self.apps.revs.find({}):
            key, _, rev = str(doc["_id"]).rpartition(":")
            if rev == "1" and not doc.get("tomb"):
                apps.append(_app_record(int(key), doc["d"]["s"]))
        return sorted(apps, key=lambda a: a.appid)

    # ---- users ----

    async def user(self, appid: int, uid: int) -> User | None:
        """The user as of the latest revision (one lookup when this process knows the user)."""
        return to_user(appid, uid, await self.users.read(user_key(appid, uid)))

    async def change_user(
        self, appid: int, uid: int, compute: Compute, bus: Bus | None, request_id: str = ""
    ) -> tuple[User | None, Revision | None]:
        """The next revision of the user from ``compute(current)`` (see ``RevLog.change``).
        When ``compute`` finds nothing to change, that is decided on the latest state: one
        lookup (of the revision after the one this process knows) and no write."""
        key = user_key(appid, uid)
        cached = self.users.cached(key)
        current = cached or await self.users.read(key)
        if compute(current) is None:
            if cached is not None:
                current = await self.users.read(key)  # confirm on the latest revision
            if compute(current) is None:
                return to_user(appid, uid, current), None
        after, revision = await self.users.change(key, compute, bus=bus, request_id=request_id)
        return to_user(appid, uid, after), revision

    async def uids(self, appid: int) -> list[int]:
        """Every uid of the app that has a state (a management read of the whole user log)."""
        prefix = f"{appid}:"
        found = set()
        async for doc in self.users.revs.find({}, {"_id": 1, "tomb": 1}):
            key, _, rev = str(doc["_id"]).rpartition(":")
            if rev == "1" and key.startswith(prefix) and not doc.get("tomb"):
                found.add(int(key[len(prefix) :]))
        return sorted(found)

    async def _record_token(self, revision: Revision) -> None:
        """After a revision that gave a user a token: make the token resolve to the user."""
        token = revision.delta.get("f", {}).get("token") or revision.delta.get("s", {}).get("token")
        if token:
            appid, _, uid = revision.key.partition(":")
            await self.ensure_token(str(token), int(appid), int(uid))

    async def ensure_token(self, token: str, appid: int, uid: int) -> None:
        """Record the token's owner (idempotent)."""
        with contextlib.suppress(DuplicateKeyError):
            await self.tokens.insert_one({"_id": token, "appid": appid, "uid": uid})

    async def owner_of(self, token: str) -> TokenOwner | None:
        doc = await self.tokens.find_one({"_id": token})
        return TokenOwner(appid=int(doc["appid"]), uid=int(doc["uid"])) if doc else None

    async def unannounced(self, appid: int, uid: int) -> list[int]:
        """Revisions of the user whose events are not confirmed yet (for tests and operators:
        it reads the pending pointers of every user)."""
        prefix = f"{user_key(appid, uid)}:"
        pointers = await self.users.pending.find({}).to_list()
        ids = [str(p["_id"]) for p in pointers]
        return sorted(int(i.rpartition(":")[2]) for i in ids if i.startswith(prefix))

    # ---- migration from the previous shape ----

    async def migrate(self) -> dict[str, int]:
        """Rewrite apps and users stored in the previous shape as logs, once: revision 1 is
        the document as it was, and events still waiting in its embedded outbox ride in that
        revision with a pending pointer, so the relay publishes them. Idempotent (an entity
        whose log exists is skipped) and concurrent replicas may run it at once; a marker
        document spares later starts the read of the old collections."""
        if await self.counters.find_one({"_id": MIGRATED}) is not None:
            return {}
        apps = await self._migrate_collection(
            self.db[LEGACY_APPS], self.apps, lambda doc: (str(doc["_id"]), {"s": legacy_app(doc)})
        )
        users = await self._migrate_collection(
            self.db[LEGACY_USERS],
            self.users,
            lambda doc: (str(doc["_id"]), {"s": legacy_user(doc)}),
        )
        with contextlib.suppress(DuplicateKeyError):
            await self.counters.insert_one(
                {"_id": MIGRATED, "apps": apps, "users": users, "at": utcnow()}
            )
        return {"apps": apps, "users": users}

    async def _migrate_collection(
        self,
        legacy: Collection,
        target: RevLog,
        convert: Callable[[Document], tuple[str, Document]],
    ) -> int:
        migrated = 0
        batch: list[Document] = []
        async for doc in legacy.find({}):
            batch.append(doc)
            if len(batch) >= MIGRATION_BATCH:
                migrated += await self._migrate_batch(batch, target, convert)
                batch = []
        return migrated + await self._migrate_batch(batch, target, convert)

    async def _migrate_batch(
        self,
        docs: list[Document],
        target: RevLog,
        convert: Callable[[Document], tuple[str, Document]],
    ) -> int:
        entities = [(*convert(doc), outbox_events(doc)) for doc in docs]
        if target is self.users:
            tokens = [
                {"_id": d["s"]["token"], "appid": int(k.split(":")[0]), "uid": int(k.split(":")[1])}
                for k, d, _ in entities
                if d["s"].get("token")
            ]
            await insert_new(self.tokens, tokens)
        return await write_first_revisions(target, entities)


def legacy_app(doc: Document) -> Document:
    return {
        "name": doc.get("name", ""),
        "key": doc["key"],
        "secret": doc["secret"],
        "created_at": doc.get("created_at"),
    }


def legacy_user(doc: Document) -> Document:
    peers = doc.get("dnd_peers") or {}
    state: Document = {"dnd": {str(peer): True for peer, on in peers.items() if on}}
    for field in ("token", "name", "forbidden", "mute", "notification_on", "customer", "avatar"):
        if field in doc:
            state[field] = doc[field]
    return state
