"""The groups service's values: a group as of a revision, and its members (plain data, no
store: the domain, its rules and the repository share them)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Member(BaseModel):
    model_config = ConfigDict(frozen=True)

    uid: int
    ts: int
    nickname: str | None = None
    mute: bool = False
    dnd: bool = False


class Group(BaseModel):
    """A live group as of ``revision``."""

    model_config = ConfigDict(frozen=True)

    appid: int
    gid: int
    master: int
    name: str
    notice: str
    super: bool
    revision: int
    members: dict[int, Member]

    @property
    def uids(self) -> list[int]:
        return sorted(self.members)

    def is_member(self, uid: int) -> bool:
        return uid in self.members

    @property
    def muted(self) -> list[int]:
        return sorted(uid for uid, m in self.members.items() if m.mute)
