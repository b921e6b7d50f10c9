"""Access rules: which users (and anonymous clients) may pull which repositories.

A repository is named as ``<upstream>/<repository at that upstream>``, e.g.
``docker.io/library/debian`` or ``ghcr.io/acme/app``, whichever way the client
reached it (registry prefix, containerd's ``?ns=``, or the default upstream).
In patterns ``*`` matches within one path component, ``**`` across components,
``?`` one character: ``docker.io/library/*``, ``ghcr.io/acme/**``, ``*/acme/**``.

Anonymous clients may read what ``anonymous`` lists; a user, that and what the
rules naming them (by name, by ``group:<name>``, or ``*`` for every user) list.
Without any rule, every user may read everything. Standard library only, so the
configuration can validate patterns with the same code that applies them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Authorizer", "Rule", "compile_pattern"]

_PATTERN = re.compile(r"[a-z0-9._\-/:*?]+")


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The regular expression of a repository pattern; ValueError if it is not one."""
    if not _PATTERN.fullmatch(pattern) or "/" not in pattern.strip("/") or "//" in pattern:
        raise ValueError(
            f"{pattern!r} is not <upstream>/<repository pattern> "
            "(lowercase, with * ** ? as wildcards)"
        )
    parts: list[str] = []
    for piece in re.split(r"(\*\*|\*|\?)", pattern):
        parts.append({"**": ".*", "*": "[^/]*", "?": "[^/]"}.get(piece, re.escape(piece)))
    return re.compile("".join(parts))


@dataclass(frozen=True)
class Rule:
    users: tuple[str, ...]  # user names, "group:<name>", or "*" for every user
    repositories: tuple[str, ...]  # patterns


class Authorizer:
    def __init__(
        self,
        anonymous: Sequence[str] = (),
        rules: Sequence[Rule] | None = None,
        groups: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self._anonymous = [compile_pattern(p) for p in anonymous]
        self._everything_for_users = rules is None
        groups = groups or {}
        # user name (or "*") → patterns
        self._by_user: dict[str, list[re.Pattern[str]]] = {}
        for rule in rules or ():
            patterns = [compile_pattern(p) for p in rule.repositories]
            for who in _expand(rule.users, groups):
                self._by_user.setdefault(who, []).extend(patterns)

    @property
    def anonymous_reads_anything(self) -> bool:
        return bool(self._anonymous)

    def may_read(self, user: str | None, upstream: str, repository: str) -> bool:
        name = f"{upstream}/{repository}"
        if any(p.fullmatch(name) for p in self._anonymous):
            return True
        if user is None:
            return False
        if self._everything_for_users:
            return True
        patterns = [*self._by_user.get(user, ()), *self._by_user.get("*", ())]
        return any(p.fullmatch(name) for p in patterns)


def _expand(users: Iterable[str], groups: Mapping[str, Sequence[str]]) -> set[str]:
    names: set[str] = set()
    for who in users:
        if who.startswith("group:"):
            names.update(groups[who.removeprefix("group:")])
        else:
            names.add(who)
    return names
