"""Store commands per HTTP request, from PyMongo's command monitoring.

Every client made by ``shared.mongo.make_client`` reports each command it starts to
``STORE_COMMANDS``. A command issued while a request is being handled (the request id is bound
in structlog's context variables by ``shared.logs``'s middleware, and PyMongo calls the
listener in the task that issues the command) is counted against that request id; commands of
background tasks (outbox relays, recovery, batched flushes) are not tied to any request and
are counted as such.

The counts of the most recent requests are kept (a bounded table), so a test or an operator
can ask how many commands a request took after it answered. When ``record`` is on, the
commands themselves (name, collection and filters) are kept too, so that each query a request
issued can be examined, e.g. with ``explain``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from pymongo import monitoring

KEEP = 10_000
BACKGROUND = "-"  # what ``commands`` files the commands of no request under

# The commands whose documents carry the statements worth examining, and where.
STATEMENTS = {"find": "filter", "update": "updates", "delete": "deletes", "count": "query"}


@dataclass(frozen=True, slots=True)
class StoreCommand:
    """One command a request issued: its name, its database and collection, and its filters
    (one per statement: a find's filter, each update's or delete's ``q``)."""

    name: str
    database: str
    collection: str
    filters: tuple[Mapping[str, Any], ...] = ()


@dataclass
class StoreCommandCounter(monitoring.CommandListener):
    keep: int = KEEP
    record: bool = False
    background: int = 0
    _counts: OrderedDict[str, int] = field(default_factory=OrderedDict)
    _commands: OrderedDict[str, list[StoreCommand]] = field(default_factory=OrderedDict)

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        request_id = structlog.contextvars.get_contextvars().get("request_id")
        if not request_id:
            self.background += 1
            if self.record:
                self._commands.setdefault(BACKGROUND, []).append(describe(event))
            return
        self._counts[request_id] = self._counts.get(request_id, 0) + 1
        self._counts.move_to_end(request_id)
        if len(self._counts) > self.keep:
            self._counts.popitem(last=False)
        if self.record:
            self._commands.setdefault(request_id, []).append(describe(event))
            self._commands.move_to_end(request_id)
            if len(self._commands) > self.keep:
                self._commands.popitem(last=False)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        return None

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        return None

    def count(self, request_id: str) -> int:
        """The store commands issued so far while handling ``request_id``."""
        return self._counts.get(request_id, 0)

    def commands(self, request_id: str) -> list[StoreCommand]:
        """The commands of ``request_id`` (``BACKGROUND``: of no request), only those issued
        while ``record`` was on."""
        return list(self._commands.get(request_id, []))


def describe(event: monitoring.CommandStartedEvent) -> StoreCommand:
    command = event.command
    name = event.command_name
    collection = command.get(name)
    filters: tuple[Mapping[str, Any], ...] = ()
    where = STATEMENTS.get(name)
    if where == "filter" or where == "query":
        filters = (copy.deepcopy(dict(command.get(where) or {})),)
    elif where is not None:
        filters = tuple(copy.deepcopy(dict(s.get("q") or {})) for s in command.get(where) or [])
    return StoreCommand(
        name, event.database_name, collection if isinstance(collection, str) else "", filters
    )


STORE_COMMANDS = StoreCommandCounter()
