"""Users of a pageserver and their rights. Only verifiers are stored, never passwords.

Roles nest: ``read`` may read and pull, ``push`` may also push, ``admin`` may do anything
(create branches, manage users, start transfers).
"""

from __future__ import annotations

import json
import re
import threading
from enum import IntEnum
from pathlib import Path
from typing import Final

from zenith.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied
from zenith.pageserver.config import write_private
from zenith.pgwire.auth import ScramVerifier, StoredUser

_USER_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,62}")
_MD5_HASH: Final = re.compile(r"md5[0-9a-f]{32}")


class Role(IntEnum):
    READ = 1
    PUSH = 2
    ADMIN = 3

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.upper()]
        except KeyError:
            raise InvalidArgument(f"unknown role {text!r}: one of admin, push, read") from None

    def __str__(self) -> str:
        return self.name.lower()


def validate_user_name(name: str) -> str:
    if _USER_NAME.fullmatch(name) is None:
        raise InvalidArgument(
            f"invalid user name {name!r}", hint="letters, digits, '_', '.', '-'; at most 63"
        )
    return name


def require(user: StoredUser, needed: Role, action: str) -> None:
    """Raise :class:`PermissionDenied` unless ``user``'s role allows ``needed``."""
    if Role.parse(user.role) < needed:
        raise PermissionDenied(
            f'permission denied: user "{user.name}" (role {user.role}) may not {action}',
            hint=f"this needs the {needed} role",
        )


class UserStore:
    """``users.json``: ``{name: {role, scram_verifier, md5_hash}}``. Implements pgwire's
    ``Credentials``. Writes are atomic (temp file + rename) and keep mode 0600."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._users: dict[str, StoredUser] = {}
        if path.exists():
            raw = json.loads(path.read_text(encoding="utf-8"))
            for name, entry in raw.items():
                self._users[name] = StoredUser(
                    name, entry["role"], entry.get("scram_verifier"), entry.get("md5_hash")
                )

    def lookup(self, user: str) -> StoredUser | None:
        return self._users.get(user)

    def list(self) -> list[StoredUser]:
        return sorted(self._users.values(), key=lambda u: u.name)

    def add(
        self,
        name: str,
        role: Role,
        scram_verifier: str | None,
        md5_hash: str | None = None,
        *,
        replace: bool = False,
    ) -> StoredUser:
        """Add (or with ``replace`` change) a user. ``scram_verifier`` None: the user has no
        password and signs in only with a client certificate (``cert``) or where
        ``trust`` lets anyone in."""
        validate_user_name(name)
        if scram_verifier is None:
            md5_hash = None
        else:
            try:
                ScramVerifier.parse(scram_verifier)
            except ValueError:
                raise InvalidArgument(
                    "the password verifier is not a SCRAM-SHA-256 verifier") from None
        if md5_hash is not None and _MD5_HASH.fullmatch(md5_hash) is None:
            raise InvalidArgument("the md5 hash is not of the form md5<32 hex digits>")
        with self._lock:
            if name in self._users and not replace:
                raise AlreadyExists(f'user "{name}" already exists')
            user = StoredUser(name, str(role), scram_verifier, md5_hash)
            users = {**self._users, name: user}
            self._save(users)
            self._users = users
            return user

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self._users:
                raise NotFound(f'user "{name}" does not exist')
            users = {k: v for k, v in self._users.items() if k != name}
            if not any(Role.parse(u.role) is Role.ADMIN for u in users.values()):
                raise PermissionDenied(f'cannot remove "{name}": it is the last admin')
            self._save(users)
            self._users = users

    def _save(self, users: dict[str, StoredUser]) -> None:
        data = {
            u.name: {"role": u.role, "scram_verifier": u.scram_verifier, "md5_hash": u.md5_hash}
            for u in users.values()
        }
        write_private(self.path, json.dumps(data, indent=2) + "\n")
