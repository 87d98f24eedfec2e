"""Property: whatever is thrown at any route of the routing table (generated JSON bodies with
lone surrogates, deep nesting, huge integers and wrong types; raw bytes; garbage or valid
credentials; query strings; path ids), Parley never answers 5xx, every refusal is the error
envelope, and a refused request stores nothing and publishes no event for the app.

Bounded (a fixed number of examples, derandomized, no example database) so it takes seconds.
The all-in-one stack on the in-process bus is the target: the handlers are the same in every
mode, and one mode keeps it fast."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from shared.events import utcnow
from shared.routing import ROUTES, Route

from .conftest import Recorder, Stack
from .probes import app_documents
from .test_customer import app_key, desk

FIELDS = [
    "uid",
    "user_name",
    "name",
    "notice",
    "nickname",
    "master",
    "members",
    "super",
    "group_id",
    "sender",
    "receiver",
    "receivers",
    "content",
    "appid",
    "customer_id",
    "avatar",
    "do_not_disturb",
    "peer_uid",
    "on",
    "forbidden",
    "mute",
    "quiet",
    "inviter",
]
QUERY_KEYS = ["uid", "customer_id", "store_id", "store", "fields", "appid"]
PARAM = re.compile(r"\{(\w+):[^{}]+\}")

# Text as JavaScript back-ends produce it: any character, lone surrogate halves included.
any_text = st.text(
    alphabet=st.one_of(st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)),
    max_size=12,
)
# What aiohttp's client sends in a header or a query string: no control characters (the
# server's answer to those is tested over a raw socket in test_bad_input.py), no surrogates.
header_text = st.text(alphabet=st.characters(exclude_categories=["Cs", "Cc"]), max_size=40)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2, "1", "0", "", 2**63, 2**64]),
    st.floats(allow_nan=False, allow_infinity=False),
    any_text,
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), any_text), children, max_size=4),
    ),
    max_leaves=12,
)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"1" + b"]" * depth


bodies = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6).map(
        lambda value: json.dumps(value).encode()
    ),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.integers(min_value=60, max_value=3000).map(nested),
    st.integers(min_value=60, max_value=6000).map(lambda n: b'{"uid": ' + b"9" * n + b"}"),
    st.sampled_from([b"", b"{", b"NaN", b'{"uid": 1e999}', b"\xff\xfe", b'"\\ud83d"']),
    st.binary(max_size=48),
)


@dataclass
class Target:
    stack: Stack
    appid: int
    credentials: list[dict[str, str]]
    gid: int
    recorder: Recorder
    known: dict[str, int] | None = None  # the app's documents, when nothing is under way
    statuses: list[int] = field(default_factory=list)


@pytest.fixture(scope="module")
async def target(own_stack: Stack) -> Any:
    stack = own_stack
    app = await stack.new_app()
    await desk(stack, app, ["ann"])
    status, reply, _ = await stack.request(
        "POST",
        "/groups",
        json={"master": 1, "name": "g", "members": [1, 2]},
        headers=app.server_auth,
    )
    assert status == 200, reply
    credentials = [app.server_auth, await stack.client(app, 1), app_key(app), {}]
    async with stack.recorder(app.appid) as recorder:
        built = Target(stack, app.appid, credentials, reply["data"]["group_id"], recorder)
        yield built
    statuses = Counter(built.statuses)
    print(f"\nfuzzed {len(built.statuses)} requests; statuses: {sorted(statuses.items())}")


def path_of(route: Route, ids: list[str]) -> str:
    values = iter(ids)
    return PARAM.sub(lambda _: next(values, "1"), route.path)


async def quiet_state(target: Target) -> dict[str, int]:
    """The app's documents once nothing changes any more (consumers done)."""
    before = await app_documents(target.stack.db, target.appid)
    while True:
        events = len(target.recorder.events)
        await asyncio.sleep(0.2)
        now = await app_documents(target.stack.db, target.appid)
        if now == before and len(target.recorder.events) == events:
            return now
        before = now


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # a failure is reported as found: shrinking
    # examples that each wait on a real stack takes minutes
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    route=st.sampled_from(ROUTES),
    ids=st.lists(
        st.one_of(
            st.just("gid"),
            st.integers(min_value=0, max_value=2**64 + 5).map(str),
            st.sampled_from(["0", "00", "01", "9223372036854775808"]),
        ),
        min_size=2,
        max_size=2,
    ),
    credential=st.one_of(
        st.integers(min_value=0, max_value=3),
        header_text.map(lambda value: {"Authorization": value}),
        header_text.map(lambda value: {"Authorization": "Basic " + value}),
        header_text.map(lambda value: {"Authorization": "Bearer " + value}),
    ),
    extra_headers=st.dictionaries(
        st.sampled_from(["X-Real-IP", "X-Request-ID", "Content-Type"]), header_text, max_size=2
    ),
    query=st.dictionaries(st.sampled_from(QUERY_KEYS), header_text, max_size=3),
    body=bodies,
)
async def test_no_route_answers_5xx_or_writes_when_refusing(
    target: Target,
    route: Route,
    ids: list[str],
    credential: int | dict[str, str],
    extra_headers: dict[str, str],
    query: dict[str, str],
    body: bytes,
) -> None:
    stack = target.stack
    path = path_of(route, [str(target.gid) if i == "gid" else i for i in ids])
    auth = target.credentials[credential] if isinstance(credential, int) else credential
    headers = {**extra_headers, **auth}
    before = target.known if target.known is not None else await quiet_state(target)
    target.known = None  # until this request is known to have changed nothing
    events = len(target.recorder.events)
    started = utcnow()
    async with stack.http.request(
        route.method, stack.base_url + path, params=query, data=body, headers=headers
    ) as resp:
        status = resp.status
        answer = await resp.read()
        content_type = resp.content_type
    target.statuses.append(status)
    assert status < 500, (route.method, path, status, answer[:200])
    if status >= 400:
        assert content_type == "application/json", (route.method, path, status, answer[:200])
        assert json.loads(answer)["meta"]["code"] == status
        # Every event published so far has arrived once the recorder's sentinel has. (An
        # event published again by the outbox relay occurred before this request.)
        arrived = await target.recorder.published()
        new = [e for e in arrived[events:] if e.occurred_at >= started]
        assert new == [], (route.method, path, status)
        assert await app_documents(stack.db, target.appid) == before, (route.method, path)
        target.known = before
